"""What the step's checks cost: `train_step` with and without them, in one process.

    python -m benchmarks.transaction_cost              # N = 2^16, B = 256, 80 calls each
    python -m benchmarks.transaction_cost --quick      # N = 2^10, 6 calls each: a smoke run

Two identical models (the step_time benchmark's towers, a full cache of N synthetic
candidates) are traced, one as shipped and one with every check of the step (finiteness of the
loss, the gradients and the embeddings to write; row counts) replaced by the identity. Their
steps are called alternately, so the machine's load falls on both alike; the medians and their
ratio are printed and written to `<results>/transaction_cost.json`.
"""

import argparse
import os
import time

import numpy as np

from benchmarks import _common  # first: imports tfnegcache (Keras 2) before TensorFlow
import tensorflow as tf  # pylint: disable=g-bad-import-order

from tfnegcache import checks
from benchmarks import synthetic
from benchmarks import token_towers


def _model(corpus, num_slots, dim):
    model = token_towers.TwoTower(corpus.tokens_per_candidate, cache_size=num_slots, dim=dim)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    cache = model.task.cache
    fill = tf.function(lambda t, i: cache.insert({"candidate_tokens": t},
                                                 model.candidate_tower(t), i))
    for start in range(0, num_slots, 4096):
        fill(tf.constant(corpus.candidate_tokens[start:start + 4096]),
             tf.constant(corpus.candidate_ids[start:start + 4096]))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2n", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=80, help="timed calls of each step")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.calls = 10, 6
    num_slots = 2**args.log2n
    corpus = synthetic.make_corpus(num_candidates=max(num_slots, 256), seed=0)
    features = {k: tf.constant(v) for k, v in corpus.queries(args.batch, split="train").items()}

    checked = _model(corpus, num_slots, args.dim)
    with_checks = tf.function(checked.train_step)
    with_checks(features)
    finite, same_rows = checks.finite, checks.same_rows
    checks.finite = lambda tensor, what: tensor
    checks.same_rows = lambda *args_, **kwargs: tf.no_op()
    try:
        unchecked = _model(corpus, num_slots, args.dim)
        without = tf.function(unchecked.train_step)
        without(features)                       # traced without the checks
    finally:
        checks.finite, checks.same_rows = finite, same_rows

    times = {"with_checks": [], "without_checks": []}
    steps = {"with_checks": with_checks, "without_checks": without}
    for call in range(args.calls):
        for name in (("with_checks", "without_checks") if call % 2 else
                     ("without_checks", "with_checks")):
            start = time.perf_counter()
            steps[name](features)["loss"].numpy()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    ratio = medians["with_checks"] / medians["without_checks"]
    result = {"machine": _common.machine(), "N": num_slots, "batch": args.batch, "dim": args.dim,
              "calls": args.calls, "median_ms": medians, "with_over_without": ratio,
              "loadavg": os.getloadavg()}
    print(f"cache step at N=2^{args.log2n}: {medians['with_checks']:.1f} ms with the checks, "
          f"{medians['without_checks']:.1f} ms without (x{ratio:.3f}; load "
          f"{result['loadavg'][0]:.1f})")
    path = _common.write_json("transaction_cost", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
