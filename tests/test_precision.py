"""Reduced precision: half-precision cache storage and scoring train as well as float32, and
models train, evaluate and keep their caches under every Keras dtype policy."""

import contextlib

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
import tensorflow_recommenders as tfrs

import tfnegcache
import toy
from test_transaction import assert_unchanged, full_state

# Held-out recall@10 of the toy model after 2 epochs with float32 storage, measured when this
# test was written: 0.7535, 0.7560, 0.7533 for seeds 0, 1, 2 (float16 and bfloat16, seed 0:
# 0.7535 both). The recall is over 4000 held-out pairs, so its binomial standard error is
# ~0.007, and a different held-out draw moves it by that much. A half-precision cache only
# perturbs the stale scores the negatives are drawn from (relative error 2^-11 for float16,
# 2^-8 for bfloat16); gradients and fresh scores stay float32. We allow 0.02 (~3 standard
# errors): within noise, yet a cache that broke sampling (in-batch-like recall, ~0.65 in
# test_model.py) would fail.
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data():
    return toy.interactions(12000, seed=1), toy.interactions(4000, seed=2)


def train(data, embedding_dtype, seed=0, scoring_dtype=None):
    model = toy.ToyModel(cache_size=512, seed=seed, embedding_dtype=embedding_dtype,
                         scoring_dtype=scoring_dtype)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(data[0], 128), epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def float32_recall(data):
    return toy.recall_at(train(data, tf.float32), data[1])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_cache_matches_float32_recall(data, float32_recall, dtype):
    model = train(data, dtype)
    cache = model.task.cache
    assert cache.embeddings.dtype == dtype
    assert cache.embedding_dtype == dtype
    assert cache.embeddings.numpy().itemsize == 2
    assert cache.fill_fraction().numpy() > 0.5
    recall = toy.recall_at(model, data[1])
    assert abs(recall - float32_recall) <= TOLERANCE, (dtype.name, recall, float32_recall)
    # The written embeddings are the rounded fresh ones: finite, and not all zero.
    stored = tf.cast(cache.embeddings[: int(cache.num_filled.numpy())], tf.float32).numpy()
    assert np.all(np.isfinite(stored)) and np.abs(stored).sum() > 0


def test_float32_is_the_default_storage(data):
    assert toy.ToyModel(cache_size=512).task.cache.embeddings.dtype == tf.float32


def test_bfloat16_scoring_matches_float32_recall(data, float32_recall):
    # The sampler scores rounded queries and embeddings (relative error 2^-8 per score, as
    # bfloat16 storage gives); the loss stays float32. Same tolerance as storage.
    model = train(data, tf.float32, scoring_dtype=tf.bfloat16)
    assert model.task.cache.scoring_dtype == tf.bfloat16
    assert model.task.cache.embeddings.dtype == tf.float32
    recall = toy.recall_at(model, data[1])
    assert abs(recall - float32_recall) <= TOLERANCE, (recall, float32_recall)


# ------------------------------------------------------------------ Keras dtype policies
BATCH = 64
# The dtype the towers compute in under each policy, and the one the task's loss and the
# cache's log-mass must be in.
POLICIES = {"mixed_float16": (tf.float16, tf.float32),
            "mixed_bfloat16": (tf.bfloat16, tf.float32),
            "float64": (tf.float64, tf.float64)}


@contextlib.contextmanager
def dtype_policy(name):
    """`set_global_policy(name)` (or `set_floatx("float64")`), undone on exit."""
    floatx = tf.keras.backend.floatx()
    policy = tf.keras.mixed_precision.global_policy().name
    try:
        if name == "float64":
            tf.keras.backend.set_floatx("float64")
        else:
            tf.keras.mixed_precision.set_global_policy(name)
        yield
    finally:
        tf.keras.backend.set_floatx(floatx)
        # None: the default policy again, the one that follows floatx.
        tf.keras.mixed_precision.set_global_policy(None if policy == floatx else policy)


@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    with dtype_policy(request.param):
        yield request.param


class Recorder(tf.keras.losses.Loss):
    """TFRS's loss (softmax cross entropy, summed) that keeps the logits it was given."""

    def __init__(self):
        super().__init__(reduction=tf.keras.losses.Reduction.SUM)
        self.logits = []

    def call(self, y_true, y_pred):
        self.logits.append(y_pred)
        return tf.nn.softmax_cross_entropy_with_logits(y_true, y_pred)


def item_tensors():
    return {k: tf.constant(v) for k, v in toy.item_table().items()}


class MetricToy(toy.ToyModel):
    """The toy model with an id-based FactorizedTopK metric (indexed after training)."""

    def __init__(self, **kwargs):
        index = tfrs.layers.factorized_top_k.BruteForce(k=10)
        super().__init__(loss=Recorder(),
                         metrics=tfrs.metrics.FactorizedTopK(index, ks=(1, 10)), **kwargs)
        self.index = index

    def build_index(self):
        items = item_tensors()
        self.index.index(self.candidate_tower(items), items["item_id"])


def expected_loss(model, batch):
    """The task's evaluation loss in float64 numpy from the towers' outputs and the cache as
    stored: softmax cross entropy over the in-batch scores and the exact log-mass of the
    cached candidates outside the batch, summed."""
    candidates = {"item_id": tf.constant(batch["item_id"]), "tokens": tf.constant(batch["tokens"])}
    q = model.query_tower(tf.constant(batch["user_id"])).numpy().astype(np.float64)
    c = model.candidate_tower(candidates).numpy().astype(np.float64)
    cache = model.task.cache
    filled = int(cache.num_filled.numpy())
    outside = ~np.isin(cache.ids.numpy()[:filled], batch["item_id"])
    stale = cache.embeddings.numpy()[:filled][outside].astype(np.float64)
    scores = np.concatenate([q @ c.T, scipy.special.logsumexp(q @ stale.T, axis=1)[:, None]], 1)
    return float(np.sum(scipy.special.logsumexp(scores, axis=1) - np.diag(scores)))


def top_k_accuracy(model, batch, k):
    items = item_tensors()
    scores = tf.matmul(model.query_tower(tf.constant(batch["user_id"])),
                       model.candidate_tower(items), transpose_b=True)
    top = tf.math.top_k(tf.cast(scores, tf.float64), k).indices.numpy()
    return float(np.mean(np.any(top == batch["item_id"][:, None], axis=1)))


def test_fit_and_evaluate_under_each_dtype_policy(policy):
    tower_dtype, loss_dtype = POLICIES[policy]
    model = MetricToy(cache_size=128)
    model.compile(tf.keras.optimizers.Adam(0.05))
    assert model.query_tower(tf.constant([0], tf.int64)).dtype == tower_dtype
    history = model.fit(toy.dataset(toy.interactions(BATCH * 4, seed=1), BATCH), epochs=1,
                        verbose=0).history
    assert np.all(np.isfinite(history["loss"])) and history["cache_fill"][-1] > 0.5
    # Every step applied: the cache advanced once per step (a loss-scale optimizer may skip
    # its first steps while it lowers a scale that overflows float16).
    skipped = 0
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        skipped = int(np.log2(2**15 / float(model.optimizer.loss_scale.numpy())))
    assert int(model.task.cache.step.numpy()) + skipped == 4
    # The logits, the cache's column (its log-mass estimate) included, were in loss_dtype.
    recorded = model.task._loss.logits   # pylint: disable=protected-access
    assert recorded and {t.dtype for t in recorded} == {loss_dtype}

    model.build_index()
    held_out = toy.interactions(BATCH, seed=2)
    results = model.evaluate(toy.dataset(held_out, BATCH), return_dict=True, verbose=0)
    # The loss over the exact log-mass, to float32 rounding: a log-mass summed in float16
    # would be off by ~1e-3.
    np.testing.assert_allclose(results["loss"], expected_loss(model, held_out),
                               rtol=1e-9 if policy == "float64" else 1e-5)
    # Top-k accuracy as the index ranks (in the towers' dtype: a score tied after rounding
    # to float16 or bfloat16 can swap ranks with its neighbour, one query in 64 at most).
    for k in (1, 10):
        got = results[f"factorized_top_k/top_{k}_categorical_accuracy"]
        assert abs(got - top_k_accuracy(model, held_out, k)) <= (
            0 if policy == "float64" else 1 / BATCH), (k, got)


@pytest.mark.parametrize("index", ["streaming", "score-based"])
def test_a_metric_tfrs_cannot_run_in_the_policy_is_refused_with_what_to_do(policy, index):
    table = tf.data.Dataset.from_tensor_slices(toy.item_table()).batch(100)
    model = MetricToy(cache_size=128)
    if index == "streaming":
        candidates = table.map(model.candidate_tower)
    else:   # indexed without ids: ranks are compared by score
        candidates = tfrs.layers.factorized_top_k.BruteForce(k=10).index(
            model.candidate_tower(item_tensors()))
    model.task._factorized_metrics = [  # pylint: disable=protected-access
        tfrs.metrics.FactorizedTopK(candidates, ks=(1, 10))]
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(BATCH * 2, seed=1), BATCH), epochs=1, verbose=0)
    before = full_state(model)
    what = "its streaming index" if index == "streaming" else "score-based top-k accuracy"
    with pytest.raises(ValueError, match=rf"The factorized metric 'factorized_top_k' cannot run "
                                         rf"in {POLICIES[policy][0].name}.*'{policy}' dtype "
                                         rf"policy\): in TFRS, {what}.*float32 only\. Index the "
                                         r"candidates with their ids"):
        model.evaluate(toy.dataset(toy.interactions(BATCH, seed=2), BATCH), verbose=0)
    assert_unchanged(before, model)


# ------------------------------------------------------------------ mixed_float16's loss scale


@pytest.fixture(name="mixed_float16")
def fixture_mixed_float16():
    with dtype_policy("mixed_float16"):
        yield


def loss_scaled(initial_scale=2**15, optimizer=None, steps=3, **kwargs):
    """The toy model under a loss-scale optimizer after `steps` clean steps."""
    model = toy.ToyModel(cache_size=128, **kwargs)
    model.compile(tf.keras.mixed_precision.LossScaleOptimizer(
        optimizer or tf.keras.optimizers.Adam(0.05), initial_scale=initial_scale))
    if steps:
        model.fit(toy.dataset(toy.interactions(BATCH * steps, seed=1), BATCH), epochs=1,
                  verbose=0)
    return model


def one_batch(model, seed=7):
    model.fit(toy.dataset(toy.interactions(BATCH, seed=seed), BATCH), epochs=1, verbose=0)


class RootTower(tf.keras.layers.Embedding):
    """sqrt(x^2): a finite output everywhere, a NaN gradient where an entry is 0."""

    def call(self, ids):
        return tf.sqrt(tf.square(super().call(ids)))


def test_the_loss_is_scaled_so_a_scale_that_overflows_float16_skips_the_step(mixed_float16):
    # 2^40 times the loss's gradient overflows the float16 activations' gradients: the
    # loss-scale optimizer skips the step and halves its scale, and the step writes nothing.
    model = loss_scaled(initial_scale=2**40, steps=0)
    model.fit(toy.dataset(toy.interactions(BATCH * 3, seed=1), BATCH), epochs=1, verbose=0)
    assert float(model.optimizer.loss_scale.numpy()) == 2**37
    assert int(model.optimizer.iterations.numpy()) == 3
    cache = model.task.cache
    assert int(cache.step.numpy()) == 0 and int(cache.num_filled.numpy()) == 0
    assert int(cache.index.size().numpy()) == 0
    assert int(model.optimizer.inner_optimizer.iterations.numpy()) == 3
    reference = toy.ToyModel(cache_size=128)    # the same seed: the same initial weights
    reference(tf.constant([0], tf.int64))
    reference.candidate_tower(item_tensors())
    for a, b in zip(reference.trainable_weights, model.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.name)


def test_non_finite_gradients_skip_the_step_and_change_nothing_then_training_goes_on(
        mixed_float16):
    model = loss_scaled()
    scale = float(model.optimizer.loss_scale.numpy())
    model.query_tower.__class__ = RootTower
    model.train_function = None
    batch = toy.interactions(BATCH, seed=7)
    weights = model.query_tower.embeddings.numpy()
    weights[batch["user_id"][0], 3] = 0.0
    model.query_tower.embeddings.assign(weights)
    before = full_state(model)
    model.fit(toy.dataset(batch, BATCH), epochs=1, verbose=0)   # no error: skipped
    after = full_state(model)
    iterations = [k for k in before if "iteration" in k]
    assert len(iterations) == 1
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed == iterations
    assert after[iterations[0]] == before[iterations[0]] + 1
    assert float(model.optimizer.loss_scale.numpy()) == scale / 2
    # The next step with finite gradients applies, and writes the cache.
    step = int(model.task.cache.step.numpy())
    model.query_tower.__class__ = tf.keras.layers.Embedding
    model.train_function = None
    one_batch(model, seed=8)
    assert int(model.task.cache.step.numpy()) == step + 1
    assert not np.array_equal(model.query_tower.embeddings.numpy(), weights)


def test_a_non_finite_loss_still_fails_the_step_under_a_loss_scale(mixed_float16):
    model = loss_scaled()

    class PoisonedQueries(tf.keras.layers.Embedding):
        def call(self, ids):
            out = super().call(ids)
            return tf.where(tf.equal(ids, 0)[:, None], tf.cast(np.nan, out.dtype), out)

    model.query_tower.__class__ = PoisonedQueries
    model.train_function = None
    batch = toy.interactions(BATCH, seed=7)
    batch["user_id"][5] = 0
    before = full_state(model)
    scale = float(model.optimizer.loss_scale.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"the loss has NaN or Inf"):
        model.fit(toy.dataset(batch, BATCH), epochs=1, verbose=0)
    assert_unchanged(before, model)
    assert float(model.optimizer.loss_scale.numpy()) == scale


def test_the_update_does_not_depend_on_the_loss_scale(mixed_float16):
    # The gradients are unscaled before the optimizer: with plain SGD, scales 2^2 and 2^12
    # give the same weights (up to float16 rounding of the scaled gradients).
    models = [loss_scaled(initial_scale=scale, optimizer=tf.keras.optimizers.SGD(0.1))
              for scale in (2**2, 2**12)]
    for model, scale in zip(models, (2**2, 2**12)):
        assert float(model.optimizer.loss_scale.numpy()) == scale   # nothing was skipped
    for a, b in zip(models[0].trainable_weights, models[1].trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-5, err_msg=a.name)


# ------------------------------------------------------------------ mixed tower dtypes


class Float64Table(tf.keras.layers.Layer):
    """A float64 candidate tower: a trainable table indexed by item id."""

    def __init__(self, table):
        super().__init__(dtype="float64")
        self.table = tf.Variable(table, name="table")

    def call(self, features):
        return tf.gather(self.table, features["item_id"])


def test_a_float64_candidate_tower_with_float32_queries_computes_in_float64():
    rng = np.random.default_rng(0)
    tower = Float64Table(rng.normal(size=(12, 4)))
    cache = tfnegcache.NegativeCache(12, {"item_id": tf.TensorSpec([], tf.int64)}, 4)
    task = tfnegcache.CacheRetrieval(cache=cache, candidate_model=tower, num_negatives=2)
    cached = tf.range(6, 12, dtype=tf.int64)
    cache.insert({"item_id": cached}, tower({"item_id": cached}), cached)
    queries = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    ids = tf.constant([0, 1, 2], tf.int64)
    candidates = tower({"item_id": ids})
    assert candidates.dtype == tf.float64
    loss = task(queries, candidates, candidate_ids=ids, candidate_features={"item_id": ids})
    assert loss.dtype == tf.float64
    # Exactly the loss with float64 queries: the queries were cast, not the candidates.
    same = task(tf.cast(queries, tf.float64), candidates, candidate_ids=ids,
                candidate_features={"item_id": ids})
    assert loss.numpy() == same.numpy()
    q, c = queries.numpy().astype(np.float64), candidates.numpy()
    stale = cache.embeddings.numpy()[:6].astype(np.float64)
    scores = np.concatenate([q @ c.T, scipy.special.logsumexp(q @ stale.T, axis=1)[:, None]], 1)
    np.testing.assert_allclose(loss.numpy(), np.sum(
        scipy.special.logsumexp(scores, axis=1) - np.diag(scores)), rtol=1e-12)

    # Training: the step runs in float64 and writes float32 rows into the cache.
    optimizer = tf.keras.optimizers.SGD(0.1)
    loss = tfnegcache.run_step(
        lambda: task(queries, tower({"item_id": ids}), candidate_ids=ids,
                     candidate_features={"item_id": ids}), tower.trainable_variables, optimizer)
    assert loss.dtype == tf.float64 and np.isfinite(loss.numpy())
    assert int(cache.step.numpy()) == 1 and int(cache.num_filled.numpy()) == 9
    np.testing.assert_array_equal(cache.lookup(ids).numpy(), [6, 7, 8])
    np.testing.assert_array_equal(cache.embeddings.numpy()[6:9],
                                  c.astype(np.float32))   # inserted before the update
