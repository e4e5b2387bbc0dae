"""Step time of fit on 1 vs 2 replicas (logical CPU devices) for both cache layouts, and the
cache's bytes per replica.

    PYTHONPATH=. python benchmarks/distributed.py [--cache-size 16384] [--steps 60]

Logical CPUs share the host's cores, so 2 replicas measure the distribution overhead (the
collectives, the sharded draw's gathers), not a speed-up.
"""

import argparse
import json
import os
import sys
import time

import tfnegcache  # first: Keras 2

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import toy  # noqa: E402  pylint: disable=wrong-import-position


def cache_bytes_per_replica(cache):
    """Bytes of the cache's variables held by one replica (shard 0, or one mirrored copy)."""
    shard = cache.local_caches()[0]
    total = 0
    for v in shard.weights:
        if v.dtype == tf.string:
            total += int(np.prod(v.shape)) * 8  # pointer-size estimate for strings
        else:
            total += int(np.prod(v.shape)) * v.dtype.size
    return total


class Timer(tf.keras.callbacks.Callback):
    def __init__(self, skip):
        super().__init__()
        self.skip, self.times = skip, []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch >= self.skip:
            self.times.append(time.perf_counter() - self.start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-size", type=int, default=16384, help="slots per replica")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    data = toy.interactions(args.batch * args.steps, seed=1)
    rows = []
    for replicas, layout in ((1, "replicated"), (2, "replicated"), (2, "sharded")):
        strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
                    if replicas > 1 else tf.distribute.get_strategy())
        with strategy.scope():
            model = toy.ToyModel(cache_size=None)
            cache_type = (tfnegcache.ShardedNegativeCache if layout == "sharded"
                          else tfnegcache.NegativeCache)
            model.task.cache = cache_type(args.cache_size, toy.FEATURE_SPEC, 16)
            model.task.staleness = tf.keras.metrics.Mean(name="cache_staleness")
            model.compile(tf.keras.optimizers.Adam(0.05))
        timer = Timer(skip=5)
        model.fit(toy.dataset(data, args.batch), epochs=1, verbose=0, callbacks=[timer])
        cache = model.task.cache
        union = args.cache_size * (replicas if layout == "sharded" else 1)
        rows.append({
            "replicas": replicas, "layout": layout, "slots_per_replica": args.cache_size,
            "slots_sampled_from": union,
            "cache_bytes_per_replica": cache_bytes_per_replica(cache),
            "step_ms_median": 1000 * float(np.median(timer.times)),
            "step_ms_p90": 1000 * float(np.percentile(timer.times, 90)),
        })
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
