"""Scenarios of tests/test_distribute.py, run in processes of their own.

Logical CPU devices must be configured before TensorFlow initializes its devices, so the
scenarios run in a fresh interpreter: `python tests/dist_scenarios.py NAME OUT_JSON [args]`,
or several MirroredStrategy ones in one (`several`; a scenario that changes process-wide
state, such as the dtype policy, sets it back). A scenario prints nothing the test
reads; it writes its results as JSON to OUT_JSON.
"""

import json
import os
import sys
import traceback

import tfnegcache  # first: Keras 2

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
import toy  # noqa: E402  pylint: disable=wrong-import-position


def replica_values(variable):
    """Every local copy of a (possibly mirrored) variable, as numpy arrays."""
    values = getattr(variable, "values", None)
    if values is None:
        return [variable.numpy()]
    return [v.numpy() for v in values]


def split_cpu(num):
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) == num:
        return  # split by an earlier scenario of this process (`several`)
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num)


def several(out_dir, *scenarios):
    """The `scenarios` one after another in this process, so that they share one TensorFlow
    start-up; `name:arg` passes an argument. Each writes `out_dir/<name>.json`, or, if it
    raises, `out_dir/<name>.error` with the traceback, so each test sees only its own
    failure. Devices are split once, for all (each scenario asks for 2 CPUs)."""
    split_cpu(2)
    for scenario in scenarios:
        name, *args = scenario.split(":")
        tf.keras.backend.clear_session()  # layer and variable names as in a fresh process
        try:
            globals()[name](os.path.join(out_dir, f"{name}.json"), *args)
        except Exception:  # pylint: disable=broad-except
            with open(os.path.join(out_dir, f"{name}.error"), "w") as f:
                f.write(traceback.format_exc())


def mirrored(num=2):
    # Every MirroredStrategy numbers its collectives from the same key, and the runtime keeps
    # each key's shapes for the life of the process: in a process shared by scenarios
    # (`several`) each strategy takes a range of keys of its own, as TensorFlow's tests do.
    strategy = tf.distribute.MirroredStrategy
    strategy._collective_key_base += 100000  # pylint: disable=protected-access
    return strategy([f"/cpu:{i}" for i in range(num)])


def make_model(cache_size, layout="replicated", seed=0, build_on_compile=True, **task_kwargs):
    """The toy model with a cache of `layout`; `build_on_compile` as `toy.ToyModel`'s."""
    model = toy.ToyModel(cache_size=None, seed=seed, build_on_compile=build_on_compile,
                         **task_kwargs)
    cache_type = {"replicated": tfnegcache.NegativeCache,
                  "sharded": tfnegcache.ShardedNegativeCache}[layout]
    model.task.cache = cache_type(cache_size, toy.FEATURE_SPEC, 16, seed=seed)
    model.task.staleness = tf.keras.metrics.Mean(name="cache_staleness")
    return model


def cache_arrays(cache):
    """{name: [one array per local copy or shard]} of a cache's variables."""
    out = {}
    for shard in cache.stores():
        for v in shard.weights:
            name = v.name.split("/", 1)[1] if "/" in v.name else v.name
            out.setdefault(name, []).extend(replica_values(v))
    return out


def tolist(tree):
    return {k: [np.asarray(a).tolist() for a in v] for k, v in tree.items()}


# ---------------------------------------------------------------------------------- sharded

def sharded_exact(out):
    """Sharded: loss equals a single union cache's; draws follow the union softmax;
    checkpoint keeps both shards and a restored run continues identically."""
    split_cpu(2)
    strategy = mirrored(2)
    tf.config.experimental.enable_op_determinism()
    table = toy.item_table()
    n = toy.NUM_ITEMS // 2
    with strategy.scope():
        model = make_model(n, "sharded", use_in_batch_negatives=False)
        model.compile(tf.keras.optimizers.SGD(0.0))
    reference = make_model(2 * n, "replicated", use_in_batch_negatives=False)
    # Both built from the same seed: same towers.
    reference.query_tower(tf.constant([0]))
    reference.candidate_tower({k: tf.constant(v[:1]) for k, v in table.items()})
    with strategy.scope():
        model.query_tower(tf.constant([0]))
        model.candidate_tower({k: tf.constant(v[:1]) for k, v in table.items()})
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        a.assign(b.numpy())

    items = {k: tf.constant(v) for k, v in table.items()}
    embeddings = reference.candidate_tower(items)
    # Shard r holds items [r n, (r + 1) n); the reference holds all of them.
    for r, shard in enumerate(model.task.cache.shards):
        rows = slice(r * n, (r + 1) * n)
        shard.insert({k: v[rows] for k, v in items.items()}, embeddings[rows], items["item_id"][rows])
    reference.task.cache.insert(items, embeddings, items["item_id"])

    batch = {k: v[:64] for k, v in toy.interactions(64, seed=5).items()}
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(batch).batch(64))
    dist_batch = next(iter(dist))

    @tf.function
    def dist_loss(features):
        def step(f):
            with tfnegcache.step.recording():
                return model.compute_loss(f, training=True)
        return strategy.reduce("SUM", strategy.run(step, args=(features,)), axis=None)

    with tfnegcache.step.recording():
        ref_loss = float(reference.compute_loss(batch, training=True))
    result = {"loss": float(dist_loss(dist_batch)), "ref_loss": ref_loss}

    # Chi-square: one user repeated over the global batch, many steps; a low temperature
    # makes the softmax far from uniform at initialization.
    TEMPERATURE = 0.004  # pylint: disable=invalid-name
    user = 7
    queries = model.query_tower(tf.fill([64], user))
    qdist = strategy.experimental_distribute_values_from_function(
        lambda ctx: queries[ctx.replica_id_in_sync_group * 32:][:32])

    @tf.function
    def draw(q):
        def one(q):
            return model.task.cache.draw(q, 4, TEMPERATURE).features["item_id"]
        return strategy.gather(strategy.run(one, args=(q,)), axis=0)

    counts = np.zeros(toy.NUM_ITEMS)
    for step in range(60):
        for shard in model.task.cache.shards:
            shard.step.assign(step)
        drawn = draw(qdist).numpy().ravel()
        counts += np.bincount(drawn, minlength=toy.NUM_ITEMS)
    scores = (embeddings.numpy() @ queries.numpy()[0]) / TEMPERATURE
    probs = np.exp(scores - scores.max())
    result["counts"] = counts.tolist()
    result["probs"] = (probs / probs.sum()).tolist()

    # Checkpoint: both shards saved and restored; training continues identically.
    for shard in model.task.cache.shards:
        shard.step.assign(0)
    data = toy.interactions(64 * 6, seed=9)
    with strategy.scope():
        model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(data, 64).take(3), epochs=1, verbose=0)
    path = os.path.join(os.path.dirname(out), "sharded-ckpt")
    model.save_weights(path)
    saved = cache_arrays(model.task.cache)
    with strategy.scope():
        restored = make_model(n, "sharded", use_in_batch_negatives=False)
        restored.compile(tf.keras.optimizers.Adam(0.05))
    restored.fit(toy.dataset(data, 64).take(1), epochs=1, verbose=0)  # build, then overwrite
    restored.load_weights(path)
    result["restored_equal"] = all(
        np.array_equal(a, b) for k in saved
        for a, b in zip(saved[k], cache_arrays(restored.task.cache)[k]))
    more = toy.dataset(data, 64).skip(3)
    model.fit(more, epochs=1, verbose=0)
    restored.fit(more, epochs=1, verbose=0)
    after_a, after_b = cache_arrays(model.task.cache), cache_arrays(restored.task.cache)
    result["continued_diff"] = {
        k: [float(np.abs(a.astype(np.float64) - b).max()) if a.dtype.kind in "fi" else
            float(not np.array_equal(a, b)) for a, b in zip(after_a[k], after_b[k])]
        for k in after_a}
    result["continued_equal"] = all(
        np.allclose(a, b, rtol=1e-6, atol=1e-6) if a.dtype.kind == "f" else np.array_equal(a, b)
        for k in after_a for a, b in zip(after_a[k], after_b[k]))
    result["shards_differ"] = not np.array_equal(after_a["ids:0"][0], after_a["ids:0"][1])
    json.dump(result, open(out, "w"))


def sharded_save(out):
    """A sharded cache trained on 2 replicas, saved in every weights format (for a test that
    loads it on one device)."""
    split_cpu(2)
    strategy = mirrored(2)
    with strategy.scope():
        model = make_model(64, "sharded", use_in_batch_negatives=False)
        model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(64 * 3, seed=9), 64), epochs=1, verbose=0)
    model(tf.constant([0], tf.int64))
    directory = os.path.join(os.path.dirname(out), "sharded_save")   # its own `checkpoint`
    os.makedirs(directory, exist_ok=True)
    paths = {fmt: os.path.join(directory, name)
             for fmt, name in (("tf", "sharded"), ("h5", "sharded.h5"),
                               ("keras", "sharded.weights.h5"))}
    for path in paths.values():
        model.save_weights(path)
    json.dump({"paths": paths,
               "filled": [int(s.num_filled.numpy()) for s in model.task.cache.shards]},
              open(out, "w"))


# ------------------------------------------------------------------------------- replicated

def replicated_identical(out):
    """Replicated: the copies stay identical, and equal a single device on the global batch."""
    split_cpu(2)
    strategy = mirrored(2)
    data = toy.interactions(64 * 8, seed=3)
    result = {}
    for lr in (0.0, 0.05):
        with strategy.scope():
            model = make_model(200)
            model.compile(tf.keras.optimizers.Adam(lr) if lr else tf.keras.optimizers.SGD(0.0))
        single = make_model(200)
        single.compile(tf.keras.optimizers.Adam(lr) if lr else tf.keras.optimizers.SGD(0.0))
        model.fit(toy.dataset(data, 64), epochs=1, verbose=0, shuffle=False)
        single.fit(toy.dataset(data, 64), epochs=1, verbose=0, shuffle=False)
        result[str(lr)] = {"dist": tolist(cache_arrays(model.task.cache)),
                           "single": tolist(cache_arrays(single.task.cache))}
    json.dump(result, open(out, "w"))


class LastStepWeights(tf.keras.callbacks.Callback):
    """Keeps the candidate tower's weights as they were before the last training step."""

    def on_train_batch_begin(self, batch, logs=None):
        self.weights = self.model.candidate_tower.get_weights()


def refresh_everything(out):
    """A full random refresh every step (refresh_per_step >= size) under 2 replicas: after
    `fit`, every filled slot holds the tower's embedding of its features with the weights
    before the last step (refreshed, written back and inserted rows are all encoded with
    the weights the step started from), in both layouts."""
    split_cpu(2)
    strategy = mirrored(2)
    data = toy.interactions(64 * 6, seed=5)
    result = {}
    for layout in ("replicated", "sharded"):
        with strategy.scope():
            model = make_model(128, layout=layout, refresh_per_step=128)
            model.compile(tf.keras.optimizers.Adam(0.05))
        last = LastStepWeights()
        model.fit(toy.dataset(data, 64), epochs=1, verbose=0, shuffle=False, callbacks=[last])
        model.candidate_tower.set_weights(last.weights)
        cache = model.task.cache
        errors, checked = [], 0
        for shard in cache.stores():
            older = np.arange(int(shard.num_filled.numpy()))
            checked += len(older)
            features = {k: tf.gather(v, older) for k, v in shard.features.items()}
            expected = model.candidate_tower(features).numpy()
            for copy in replica_values(shard.embeddings):
                errors.append(float(np.abs(np.asarray(copy)[older] - expected).max()))
        result[layout] = {"max_error": errors, "copies": len(errors), "checked": checked}
    json.dump(result, open(out, "w"))


class PoisonedTower(toy.CandidateTower):
    """NaN embeddings for the last item."""

    def call(self, features):
        out = super().call(features)
        return tf.where(tf.equal(features["item_id"], toy.NUM_ITEMS - 1)[:, None], np.nan, out)


def full_state(model):
    """Every copy of every weight and optimizer variable, and every local id index."""
    state = {}
    variables = list(model.weights) + list(model.optimizer.variables())
    for i, v in enumerate(variables):
        for r, copy in enumerate(replica_values(v)):
            state[f"{i}:{v.name}:{r}"] = np.asarray(copy).tolist()
    for i, cache in enumerate(model.task.cache.stores()):
        keys, values = (t.numpy() for t in cache.index.export())
        order = np.argsort(keys)
        state[f"index{i}"] = [keys[order].tolist(), values[order].tolist()]
    return state


def failed_step(out):
    """Under 2 replicas, a step where one replica's batch has NaN embeddings fails and leaves
    every copy of every weight, optimizer variable, cache variable and index unchanged."""
    split_cpu(2)
    strategy = mirrored(2)
    result = {}
    for layout in ("replicated", "sharded"):
        with strategy.scope():
            model = make_model(128, layout=layout, refresh_per_step=8)
            # Poisoned from the start (the first steps never see the last item), so the
            # failing step runs the step those traced.
            model.candidate_tower.__class__ = PoisonedTower
            model.compile(tf.keras.optimizers.Adam(0.05))
        data = toy.interactions(64 * 6, seed=5)
        clean = {k: v[data["item_id"] != toy.NUM_ITEMS - 1] for k, v in data.items()}
        model.fit(toy.dataset(clean, 64).take(3), epochs=1, verbose=0)
        before = full_state(model)
        poisoned = {k: v[:64].copy() for k, v in clean.items()}
        poisoned["item_id"][40] = toy.NUM_ITEMS - 1    # in replica 1's half of the batch
        try:
            model.fit(toy.dataset(poisoned, 64), epochs=1, verbose=0)
            error = None
        except tf.errors.InvalidArgumentError as e:  # pylint: disable=broad-except
            error = str(e)
        after = full_state(model)
        result[layout] = {"error": error and error[-400:],
                          "changed": [k for k in before if before[k] != after[k]],
                          "num_state": len(before)}
    json.dump(result, open(out, "w"))


class RootQueries(tf.keras.layers.Embedding):
    """sqrt(x^2): a finite output everywhere, a NaN gradient where an entry is 0. Squared in
    float32, so that no small entry underflows to 0 under mixed_float16."""

    def call(self, ids):
        out = super().call(ids)
        return tf.cast(tf.sqrt(tf.square(tf.cast(out, tf.float32))), out.dtype)


def loss_scale_skip(out):
    """Under mixed_float16 on 2 replicas, a step whose gradient is NaN on one replica only is
    skipped by the loss-scale optimizer on both, and no copy of any cache changes; the next
    step applies on both. Sets the float32 policy back when it ends."""
    split_cpu(2)
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        strategy = mirrored(2)
        result = {}
        for layout in ("replicated", "sharded"):
            with strategy.scope():
                model = make_model(128, layout=layout)
                # sqrt(x^2) from the start: the same step traces every fit below, and its
                # gradient is finite until an entry is set to 0.
                model.query_tower.__class__ = RootQueries
                model.compile(tf.keras.mixed_precision.LossScaleOptimizer(
                    tf.keras.optimizers.Adam(0.05), initial_scale=2**10))
            data = toy.interactions(64 * 4, seed=5)
            model.fit(toy.dataset(data, 64).take(3), epochs=1, verbose=0)
            scale = float(model.optimizer.loss_scale.numpy())
            batch = {k: v[:64].copy() for k, v in toy.interactions(64, seed=6).items()}
            user = int(batch["user_id"][40])             # in replica 1's half of the batch
            batch["user_id"][:32] = np.where(batch["user_id"][:32] == user, (user + 1) % 120,
                                             batch["user_id"][:32])
            weights = model.query_tower.embeddings.numpy()
            kept = weights[user, 3]
            weights[user, 3] = 0.0
            model.query_tower.embeddings.assign(weights)
            before = full_state(model)
            model.fit(toy.dataset(batch, 64), epochs=1, verbose=0)
            after = full_state(model)
            changed = [k for k in before if before[k] != after[k]]
            steps_before = [np.asarray(c).tolist() for s in model.task.cache.stores()
                            for c in replica_values(s.step)]
            weights[user, 3] = kept
            model.query_tower.embeddings.assign(weights)
            model.fit(toy.dataset(toy.interactions(64, seed=7), 64), epochs=1, verbose=0)
            result[layout] = {
                "changed": changed, "num_state": len(before),
                "scale": [scale, float(model.optimizer.loss_scale.numpy())],
                "steps_after_skip": steps_before,
                "steps_after_next": [np.asarray(c).tolist() for s in model.task.cache.stores()
                                     for c in replica_values(s.step)]}
        json.dump(result, open(out, "w"))
    finally:   # the policy is process-wide: the next scenario of `several` gets float32
        tf.keras.mixed_precision.set_global_policy("float32")


def fit_recall(out, epochs, names="single,replicated,sharded"):
    """Held-out recall@10 of fit under MirroredStrategy (2 replicas) and on one device."""
    split_cpu(2)
    train, held_out = toy.interactions(20000, seed=1), toy.interactions(4000, seed=2)
    result = {}
    for name in names.split(","):
        # Built by their first step, as a user's models are (the other scenarios build
        # theirs when compiling: `toy.ToyModel.build_variables`).
        if name == "single":
            model = make_model(512, build_on_compile=False)
            model.compile(tf.keras.optimizers.Adam(0.05))
        else:
            with mirrored(2).scope():
                model = make_model(512 if name == "replicated" else 256, layout=name,
                                   build_on_compile=False)
                model.compile(tf.keras.optimizers.Adam(0.05))
        history = model.fit(toy.dataset(train, 128), epochs=int(epochs), verbose=0)
        result[name] = {"recall": toy.recall_at(model, held_out),
                        "loss": history.history["loss"]}
    json.dump(result, open(out, "w"))


# ------------------------------------------------------------------------------ multi-worker

class CacheSnapshots(tf.keras.callbacks.Callback):
    """Writes the cache at each epoch end (after BackupAndRestore's backup) and at train
    begin (after its restore); optionally kills this worker at the start of an epoch."""

    def __init__(self, directory, kill_at_epoch=None):
        super().__init__()
        self.directory, self.kill_at_epoch = directory, kill_at_epoch

    def _dump(self, name):
        arrays = {k: v[0] for k, v in cache_arrays(self.model.task.cache).items()}
        np.savez(os.path.join(self.directory, name), **arrays)

    def on_train_begin(self, logs=None):
        self._dump("train_begin.npz")

    def on_epoch_end(self, epoch, logs=None):
        self._dump(f"epoch_end_{epoch}.npz")

    def on_epoch_begin(self, epoch, logs=None):
        if self.kill_at_epoch is not None and epoch == self.kill_at_epoch:
            os._exit(17)  # pylint: disable=protected-access


def worker(out, backup_dir, epochs, kill="none", layouts="replicated"):
    """One MultiWorkerMirroredStrategy worker (TF_CONFIG from the environment). Fits a model
    for each of the comma-separated `layouts` in turn (several share one start-up), each with
    its backups and cache snapshots in a directory named after it, resuming from its backup
    if one is there. After each layout it writes `{layout: results}` so far to OUT. `kill`
    ("LAYOUT:EPOCH" or "none") makes this worker exit with code 17 at the start of that
    layout's epoch, as a machine failure would."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    data = toy.interactions(64 * 2 * 12, seed=4)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = toy.dataset(data, 128).with_options(options)
    kill_layout, _, kill_epoch = kill.partition(":")
    results = {}
    for layout in layouts.split(","):
        with strategy.scope():
            model = make_model(300 if layout == "replicated" else 150, layout=layout)
            model.compile(tf.keras.optimizers.Adam(0.05))
        directory = os.path.join(os.path.dirname(out), layout)
        os.makedirs(directory, exist_ok=True)
        backup = os.path.join(backup_dir, layout)
        callbacks = [tf.keras.callbacks.BackupAndRestore(backup),
                     tfnegcache.ShardedCacheBackup(backup),
                     CacheSnapshots(directory, int(kill_epoch) if kill_layout == layout else None)]
        history = model.fit(dataset, epochs=int(epochs), verbose=0, callbacks=callbacks)
        results[layout] = {"loss": history.history["loss"],
                           "cache_step": int(cache_arrays(model.task.cache)["step:0"][0]),
                           "first_ids": cache_arrays(model.task.cache)["ids:0"][0][:8].tolist(),
                           "epochs_run": len(history.history["loss"])}
        json.dump(results, open(out, "w"))


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
