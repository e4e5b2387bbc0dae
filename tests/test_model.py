"""CachedRetrievalModel end to end: fit, evaluate, predict, checkpoints, failed steps."""

import numpy as np
import pytest
import scipy.special
import tensorflow as tf

import tfnegcache
import toy


def snapshot(model):
    return {v.name: v.numpy() for v in model.task.cache.weights}


def assert_same(before, after):
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


@pytest.fixture(scope="module")
def data():
    return toy.interactions(20000, seed=1), toy.interactions(4000, seed=2)


def train(data, cache_size, epochs=3, **kwargs):
    model = toy.ToyModel(cache_size=cache_size, **kwargs)
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(data[0], 128), epochs=epochs, verbose=0)
    return model, history.history


def test_fit_fills_cache_lowers_loss_and_beats_in_batch_recall(data):
    untrained = toy.full_softmax_loss(toy.ToyModel(cache_size=512), data[1])
    model, history = train(data, cache_size=512)
    baseline, _ = train(data, cache_size=None)
    # The objective the cache estimates, the full softmax's cross entropy on held-out pairs,
    # falls (measured: 5.70 -> 3.39). The logged training loss is that estimate averaged
    # over an epoch: at Adam 0.05 it levels off after the first epoch and moves by noise
    # (520.3, 510.4, 520.7 for seed 0), so it is not compared across epochs.
    trained = toy.full_softmax_loss(model, data[1])
    assert trained < untrained - 1.0, (untrained, trained)
    assert np.all(np.isfinite(history["loss"]))
    assert history["cache_fill"][-1] == pytest.approx(toy.NUM_ITEMS / 512)
    assert 0 < history["cache_staleness"][-1] < history["cache_staleness"][0]
    cached_recall = toy.recall_at(model, data[1])
    in_batch_recall = toy.recall_at(baseline, data[1])
    # Measured: 0.751 vs 0.656 (seed 0); the planted popularity skew biases in-batch negatives.
    assert cached_recall > in_batch_recall + 0.05, (cached_recall, in_batch_recall)
    assert int(model.task.cache.step.numpy()) == 3 * (20000 // 128)


def test_evaluate_and_predict_leave_cache_unchanged_and_report_no_staleness(data):
    model, _ = train(data, cache_size=512, epochs=1)
    before = snapshot(model)
    results = model.evaluate(toy.dataset(data[1], 128), return_dict=True, verbose=0)
    model.predict(tf.constant(data[1]["user_id"][:256]), verbose=0)
    assert_same(before, snapshot(model))
    assert "cache_staleness" not in results and "cache_fill" not in results
    assert np.isfinite(results["loss"])


def test_eval_loss_includes_the_cache(data):
    """In evaluation the cache's column is the exact log-mass of its stale scores over the
    slots that are not in-batch candidates: the loss equals a numpy cross entropy over
    [in-batch scores, that log-mass] (TFRS's default loss: summed over the batch)."""
    model, _ = train(data, cache_size=512, epochs=1)
    batch = {k: v[:128] for k, v in data[1].items()}
    loss = model.compute_loss(batch, training=False).numpy()
    cache = model.task.cache
    filled = int(cache.num_filled.numpy())
    assert filled > 200
    queries = model.query_tower(tf.constant(batch["user_id"])).numpy().astype(np.float64)
    candidates = model.candidate_tower(
        {"item_id": tf.constant(batch["item_id"]), "tokens": tf.constant(batch["tokens"])})
    in_batch = queries @ candidates.numpy().astype(np.float64).T
    cached_ids = cache.ids.numpy()[:filled]
    stale = cache.embeddings.numpy()[:filled].astype(np.float64)
    eligible = ~np.isin(cached_ids, batch["item_id"])    # each candidate counts once
    assert 0 < eligible.sum() < filled
    log_mass = scipy.special.logsumexp(queries @ stale[eligible].T, axis=1)
    logits = np.concatenate([in_batch, log_mass[:, None]], axis=1)
    expected = np.sum(scipy.special.logsumexp(logits, axis=1) - np.diag(in_batch))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    cache.num_filled.assign(0)   # an empty cache: only in-batch negatives remain
    without = model.compute_loss(batch, training=False).numpy()
    expected = np.sum(scipy.special.logsumexp(in_batch, axis=1) - np.diag(in_batch))
    np.testing.assert_allclose(without, expected, rtol=1e-5)


def test_checkpoint_restores_cache_and_training_resumes_identically(data, tmp_path):
    tf.config.experimental.enable_op_determinism()
    model, _ = train(data, cache_size=400, epochs=1)
    path = str(tmp_path / "ckpt")
    model.save_weights(path)

    restored = toy.ToyModel(cache_size=400)
    restored.compile(tf.keras.optimizers.Adam(0.05))
    restored.fit(toy.dataset({k: v[:128] for k, v in data[0].items()}, 128), epochs=1, verbose=0)
    restored.load_weights(path)
    assert_same(snapshot(model), snapshot(restored))
    ids = tf.constant(np.arange(toy.NUM_ITEMS + 5), tf.int64)
    np.testing.assert_array_equal(model.task.cache.lookup(ids).numpy(),
                                  restored.task.cache.lookup(ids).numpy())

    more = toy.dataset({k: v[:2560] for k, v in data[1].items()}, 128)
    model.fit(more, epochs=1, verbose=0)
    restored.fit(more, epochs=1, verbose=0)
    assert_same(snapshot(model), snapshot(restored))
    for a, b in zip(model.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_model_built_by_its_first_step_trains_as_one_built_before(data):
    # The other tests build the toy model's variables when they compile it (ToyModel's
    # `build_variables`), so their first step is traced once; a user's model is usually
    # built by that step, inside its first trace, which tf.function then traces again.
    def fit(build_on_compile):
        tf.keras.backend.clear_session()   # the same layer names in both
        model = toy.ToyModel(cache_size=256, num_negatives=2, refresh_per_step=16,
                             build_on_compile=build_on_compile)
        model.compile(tf.keras.optimizers.Adam(0.05))
        history = model.fit(toy.dataset(data[0], 128).take(12), epochs=2, verbose=0)
        return model, history.history

    unbuilt, unbuilt_history = fit(False)
    built, built_history = fit(True)
    assert unbuilt.train_function.experimental_get_tracing_count() == 2
    assert built.train_function.experimental_get_tracing_count() == 1
    assert unbuilt_history == built_history
    assert len(unbuilt.weights) == len(built.weights)
    for a, b in zip(unbuilt.weights + unbuilt.optimizer.variables(),
                    built.weights + built.optimizer.variables()):
        assert a.name == b.name
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    ids = tf.constant(np.arange(toy.NUM_ITEMS + 5), tf.int64)
    np.testing.assert_array_equal(unbuilt.task.cache.lookup(ids).numpy(),
                                  built.task.cache.lookup(ids).numpy())


def test_model_checkpoint_callback_keeps_the_cache(data, tmp_path):
    model = toy.ToyModel(cache_size=512)
    model.compile(tf.keras.optimizers.Adam(0.05))
    path = str(tmp_path / "weights-{epoch:02d}")
    model.fit(toy.dataset(data[0], 128).take(20), epochs=2, verbose=0,
              callbacks=[tf.keras.callbacks.ModelCheckpoint(path, save_weights_only=True)])
    restored = toy.ToyModel(cache_size=512)
    restored.load_weights(str(tmp_path / "weights-02")).expect_partial()
    assert_same(snapshot(model), snapshot(restored))


class PoisonedTower(toy.CandidateTower):
    """Returns NaN embeddings for item 0."""

    def call(self, features):
        out = super().call(features)
        poisoned = tf.equal(features["item_id"], 0)[:, None]
        return tf.where(poisoned, np.nan, out)


def test_a_step_with_nan_embeddings_fails_and_changes_nothing(data):
    model = toy.ToyModel(cache_size=512)
    model.compile(tf.keras.optimizers.Adam(0.05))
    clean = {k: v[data[0]["item_id"] != 0] for k, v in data[0].items()}
    model.fit(toy.dataset(clean, 128).take(5), epochs=1, verbose=0)
    model.candidate_tower.__class__ = PoisonedTower
    model.train_function = None  # retrace with the poisoned tower
    before = snapshot(model)
    weights = [v.numpy() for v in model.trainable_variables]
    poisoned = {k: v[:128].copy() for k, v in data[0].items()}
    poisoned["item_id"][3] = 0
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite"):
        model.fit(toy.dataset(poisoned, 128), epochs=1, verbose=0)
    assert_same(before, snapshot(model))
    for w, v in zip(weights, model.trainable_variables):
        np.testing.assert_array_equal(w, v.numpy())


# ------------------------------------------------------------------ tasks and their caches


class TwoTasks(toy.ToyModel):
    """Two retrieval tasks over the same towers (say, clicks and purchases): each with its own
    cache, or with `shared=True` one cache for both."""

    def __init__(self, shared, cache_size=128, **kwargs):
        super().__init__(cache_size=cache_size, name="clicks", **kwargs)
        cache = self.task.cache if shared else tfnegcache.NegativeCache(
            cache_size, toy.FEATURE_SPEC, 16, name="purchases_cache")
        self.second = tfnegcache.CacheRetrieval(cache=cache, candidate_model=self.candidate_tower,
                                                name="purchases")

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        queries, embeddings = self.query_tower(features["user_id"]), self.candidate_tower(candidates)
        kwargs = dict(candidate_ids=features["item_id"], candidate_features=candidates,
                      compute_metrics=False)
        return self.task(queries, embeddings, **kwargs) + self.second(queries, embeddings, **kwargs)


class TaskTwice(toy.ToyModel):
    """Calls its one task twice per step (two positives per query, say)."""

    def compute_loss(self, features, training=False):
        return super().compute_loss(features, training) + super().compute_loss(features, training)


def model_state(model, optimizer):
    """Every weight and optimizer variable, and the id index of the first task's cache
    (`full_state` of test_transaction asks `cache_tasks()`, which refuses a shared cache)."""
    state = {f"{i}:{v.name}": v.numpy() for i, v in enumerate(model.weights)}
    state.update({f"optimizer/{i}:{v.name}": v.numpy()
                  for i, v in enumerate(optimizer.variables())})
    keys, slots = (t.numpy() for t in model.task.cache.index.export())
    order = np.argsort(keys)
    state["index/keys"], state["index/slots"] = keys[order], slots[order]
    return state


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def prefilled(model):
    """`model` with 40 items in its cache and every layer built."""
    table = toy.item_table()
    items = {k: tf.constant(v[:40]) for k, v in table.items()}
    model.task.cache.insert(items, model.candidate_tower(items), items["item_id"])
    model.query_tower(tf.constant([0], tf.int64))
    return model


def test_two_tasks_sharing_one_cache_are_refused_when_compiling():
    model = prefilled(TwoTasks(shared=True))
    optimizer = tf.keras.optimizers.Adam(0.05)
    before = model_state(model, optimizer)
    with pytest.raises(ValueError, match=r"^The tasks 'clicks' and 'purchases' share "
                                         r"the cache 'negative_cache': each would plan its "
                                         r"inserts from the same state in every step, and the "
                                         r"cache would be corrupted\. Give each CacheRetrieval "
                                         r"task its own cache\.$"):
        model.compile(optimizer)
    assert model.optimizer is None                   # not compiled: fit cannot run
    assert_same_state(before, model_state(model, optimizer))
    # With a cache each, the same model trains, and each cache advances once per step.
    model = TwoTasks(shared=False)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(64 * 3, seed=1), 64), epochs=1, verbose=0)
    for task in model.cache_tasks():
        cache = task.cache
        assert int(cache.step.numpy()) == 3
        filled = int(cache.num_filled.numpy())
        ids = cache.ids.numpy()[:filled]
        assert len(np.unique(ids)) == filled == int(cache.index.size().numpy())


def test_a_task_called_twice_in_one_training_step_is_refused_and_changes_nothing():
    model = prefilled(TaskTwice(cache_size=128, name="clicks"))
    model.compile(tf.keras.optimizers.Adam(0.05))
    before = model_state(model, model.optimizer)
    with pytest.raises(ValueError, match=r"The task 'clicks' was called twice in one training "
                                         r"step: each call draws from and writes to the cache "
                                         r"'negative_cache'.*Call each CacheRetrieval task once "
                                         r"per step"):
        model.fit(toy.dataset(toy.interactions(64, seed=1), 64), epochs=1, verbose=0)
    assert_same_state(before, model_state(model, model.optimizer))


def test_a_custom_loop_with_two_tasks_on_one_cache_is_refused_and_changes_nothing():
    model = prefilled(TwoTasks(shared=True))
    optimizer = tf.keras.optimizers.Adam(0.05)
    before = model_state(model, optimizer)
    batch = {k: tf.constant(v) for k, v in toy.interactions(64, seed=1).items()}
    with pytest.raises(ValueError, match=r"The tasks 'clicks' and 'purchases' both "
                                         r"draw from and write to the cache 'negative_cache'"):
        tfnegcache.run_step(lambda: model.compute_loss(batch, training=True),
                            lambda: model.trainable_variables, optimizer)
    assert int(optimizer.iterations.numpy()) == 0
    assert_same_state(before, model_state(model, optimizer))


# ------------------------------------------------------------------ XLA


JIT_REFUSED = (r"^`jit_compile` must be False or None for a CachedRetrievalModel\. Received: "
               r"jit_compile=True\. Its caches find cached ids in a hash table "
               r"\(tf\.lookup\.experimental\.MutableHashTable, .*\), which XLA cannot compile, "
               r"so the first step would fail\. Compile the model without it, and run the "
               r"towers under XLA instead: decorate their computation with "
               r"`tf\.function\(jit_compile=True\)`\.$")


class XlaTower(toy.CandidateTower):
    """The toy candidate tower, XLA-compiled."""

    @tf.function(jit_compile=True)
    def encode(self, item_id, tokens):
        return self.ids(item_id) + tf.reduce_mean(self.tokens(tokens), 1)

    def call(self, features):
        return self.encode(features["item_id"], features["tokens"])


def test_jit_compile_is_refused_when_compiling_and_when_set_and_xla_towers_train():
    model = prefilled(toy.ToyModel(cache_size=128))
    optimizer = tf.keras.optimizers.Adam(0.05)
    before = model_state(model, optimizer)
    with pytest.raises(ValueError, match=JIT_REFUSED):
        model.compile(optimizer, jit_compile=True)
    assert model.optimizer is None
    assert_same_state(before, model_state(model, optimizer))

    model.compile(optimizer)
    model.fit(toy.dataset(toy.interactions(64, seed=1), 64), epochs=1, verbose=0)
    train_function = model.train_function
    with pytest.raises(ValueError, match=JIT_REFUSED):
        model.jit_compile = True
    assert not model.jit_compile and model.train_function is train_function

    # What the message advises: the towers under XLA, the step as it is.
    model = toy.ToyModel(cache_size=128)
    model.candidate_tower = model.task.candidate_model = XlaTower(16)
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(64 * 2, seed=1), 64), epochs=1,
                        verbose=0).history
    assert np.isfinite(history["loss"][-1]) and int(model.task.cache.step.numpy()) == 2
