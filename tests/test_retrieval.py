"""CacheRetrieval: loss value, drop-in equality with TFRS, and an unbiased gradient."""

import numpy as np
import pytest
import scipy.special
import tensorflow as tf
import tensorflow_recommenders as tfrs

import stepwise
import tfnegcache

DIM = 4
SPEC = {"item_id": tf.TensorSpec([], tf.int64)}


class TableTower(tf.keras.layers.Layer):
    """Candidate tower: a trainable embedding table indexed by item id."""

    def __init__(self, table):
        super().__init__()
        self.table = tf.Variable(table, name="table")

    def call(self, features):
        return tf.gather(self.table, features["item_id"])


def make_task(cache_size=16, seed=0, table=None, **kwargs):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(cache_size, DIM)).astype(np.float32) if table is None else table
    tower = TableTower(table)
    cache = tfnegcache.NegativeCache(cache_size, SPEC, DIM, seed=seed)
    task = tfnegcache.CacheRetrieval(cache=cache, candidate_model=tower, **kwargs)
    return task, tower, cache


def fill(cache, tower, ids):
    ids = tf.constant(ids, tf.int64)
    cache.insert({"item_id": ids}, tower({"item_id": ids}), ids)


def batch(tower, ids, seed=1):
    ids = tf.constant(ids, tf.int64)
    queries = tf.constant(np.random.default_rng(seed).normal(size=(len(ids), DIM)), tf.float32)
    return queries, tower({"item_id": ids}), ids


@pytest.mark.parametrize("use_in_batch", [True, False])
@pytest.mark.parametrize("temperature", [None, 0.5])
@pytest.mark.parametrize("training", [False, True])
def test_loss_equals_cross_entropy_over_positive_in_batch_and_cache(use_in_batch, temperature, training):
    # In training the value pins the uncorrected estimator's (`estimator="stale"`): the
    # cross entropy with the stale cached log-mass. The default, corrected, estimator adds
    # the draw's fresh-over-stale correction (tests/test_defaults.py); evaluation uses the
    # exact stale log-mass with either.
    task, tower, cache = make_task(temperature=temperature, use_in_batch_negatives=use_in_batch,
                                   num_negatives=3, **({"estimator": "stale"} if training else {}))
    fill(cache, tower, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    # Cache embeddings are stale: the tower has moved on since they were written.
    tower.table.assign_add(tf.fill(tower.table.shape, 0.1))
    queries, candidates, ids = batch(tower, [2, 5, 12])
    with tfnegcache.step.recording():
        loss = task(queries, candidates, candidate_ids=ids,
                    candidate_features={"item_id": ids}, training=training)

    q, c, stale = queries.numpy(), candidates.numpy(), cache.embeddings.numpy()[:10]
    t = temperature or 1.0
    expected = 0.0
    for i in range(3):
        in_batch = q[i] @ c.T / t if use_in_batch else np.array([q[i] @ c[i] / t])
        masked = {2, 5, 12} if use_in_batch else {int(ids[i])}
        cached = [q[i] @ stale[j] / t for j in range(10) if j not in masked]
        logits = np.concatenate([in_batch, cached])
        positive = in_batch[i] if use_in_batch else in_batch[0]
        expected += scipy.special.logsumexp(logits) - positive
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def _tfrs_and_ours(**kwargs):
    candidates = tf.data.Dataset.from_tensor_slices(
        (tf.range(16, dtype=tf.int64), np.random.default_rng(0).normal(size=(16, DIM)).astype(np.float32)))
    def metrics():
        return tfrs.metrics.FactorizedTopK(
            tfrs.layers.factorized_top_k.BruteForce(k=5).index_from_dataset(candidates.batch(4)),
            ks=(1, 5))
    common = dict(batch_metrics=[tf.keras.metrics.AUC(from_logits=True)],
                  loss_metrics=[tf.keras.metrics.Mean()], **kwargs)
    reference = tfrs.tasks.Retrieval(metrics=metrics(), **common)
    ours, tower, cache = make_task(metrics=metrics(), **{k: v for k, v in common.items()})
    return reference, ours, tower


@pytest.mark.parametrize("kwargs", [
    {},
    {"temperature": 0.3},
    {"remove_accidental_hits": True},
    {"num_hard_negatives": 2},
    {"temperature": 2.0, "remove_accidental_hits": True, "num_hard_negatives": 3},
])
@pytest.mark.parametrize("training", [False, True])
def test_empty_cache_is_identical_to_tfrs_retrieval(kwargs, training):
    reference, ours, tower = _tfrs_and_ours(**kwargs)
    queries, candidates, ids = batch(tower, [3, 7, 3, 11, 1])
    weights = tf.constant([1.0, 0.5, 2.0, 1.0, 0.0])
    probability = tf.constant([0.1, 0.2, 0.1, 0.3, 0.05])
    for call_kwargs in ({}, {"sample_weight": weights, "candidate_sampling_probability": probability}):
        expected = reference(queries, candidates, candidate_ids=ids, **call_kwargs)
        with tfnegcache.step.recording():
            got = ours(queries, candidates, candidate_ids=ids,
                       candidate_features={"item_id": ids}, training=training, **call_kwargs)
        assert got.numpy() == expected.numpy(), (got.numpy(), expected.numpy())
    for a, b in zip(reference.metrics, ours.metrics):
        np.testing.assert_array_equal(np.asarray(a.result()), np.asarray(b.result()), err_msg=a.name)


def test_without_cache_it_is_tfrs_retrieval():
    task = tfnegcache.CacheRetrieval(temperature=0.7)
    reference = tfrs.tasks.Retrieval(temperature=0.7)
    q, c = tf.random.normal([6, 3], seed=1), tf.random.normal([6, 3], seed=2)
    assert task(q, c).numpy() == reference(q, c).numpy()


def _surrogate_gradients(task, cache, tower, queries, ids, draws):
    """Gradients (queries, table) of the training loss for `draws` independent draws."""
    features = {"item_id": ids}

    @tf.function
    def one(step):
        cache.step.assign(step)
        with tf.GradientTape() as tape, tfnegcache.step.recording():
            loss = task(queries, tower(features), candidate_ids=ids, candidate_features=features,
                        training=True)
        grads = tape.gradient(loss, [queries, tower.table])
        return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    return stepwise.draws(one, draws)


@pytest.mark.parametrize("use_in_batch,k", [(True, 1), (False, 1), (True, 3), (False, 4)])
def test_mean_surrogate_gradient_is_the_full_softmax_gradient(use_in_batch, k):
    num_items = 12
    task, tower, cache = make_task(cache_size=num_items, temperature=2.0, seed=4,
                                   use_in_batch_negatives=use_in_batch, num_negatives=k)
    fill(cache, tower, np.arange(num_items))      # fresh embeddings of the whole corpus
    ids = tf.constant([1, 6, 9], tf.int64)
    queries = tf.Variable(np.random.default_rng(9).normal(size=(3, DIM)).astype(np.float32))

    with tf.GradientTape() as tape:               # exact: softmax over every item
        logits = tf.matmul(queries, tower.table, transpose_b=True) / 2.0
        exact_loss = tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(ids, logits))
    exact = tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(exact_loss, [queries, tower.table])], 0)

    # The z-test below needs every item drawn often: no softmax weight under 1%.
    assert tf.reduce_min(tf.nn.softmax(logits)).numpy() > 0.01
    draws = 3000
    samples = _surrogate_gradients(task, cache, tower, queries, ids, draws)
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(draws)
    varying = samples.std(0) > 1e-4                # not float32 rounding noise
    assert varying.sum() > 10                      # the estimator is random...
    z = (mean - exact.numpy())[varying] / stderr[varying]
    assert np.abs(z).max() < 4.5, np.abs(z).max()  # ...and unbiased (~50 coordinates)
    # Coordinates that do not vary (the positive's own rows) are exact.
    np.testing.assert_allclose(mean[~varying], exact.numpy()[~varying], atol=1e-4)


def test_logq_with_a_partial_cache_is_unbiased_for_the_importance_weighted_softmax():
    """logQ + cache: the mean surrogate gradient is the gradient of the softmax over
    [positive - log Q, uncached in-batch negatives - log Q, the cache's mass + log(n - 1)]."""
    num_items, temperature = 12, 2.0
    task, tower, cache = make_task(cache_size=num_items, temperature=temperature, seed=4,
                                   num_negatives=2)
    cached = np.arange(8)
    fill(cache, tower, cached)                    # fresh embeddings of items 0..7
    ids = tf.constant([1, 6, 9, 10], tf.int64)    # 9 and 10 are not cached
    probability = tf.constant([0.1, 0.05, 0.2, 0.02], tf.float32)
    queries = tf.Variable(np.random.default_rng(9).normal(size=(4, DIM)).astype(np.float32))

    with tf.GradientTape() as tape:               # the objective, with the exact cache sum
        scores = tf.matmul(queries, tower.table, transpose_b=True) / temperature  # [4, 12]
        in_batch = tf.gather(scores, ids, axis=1) - tf.math.log(probability)[None, :]
        rows = []
        for i in range(4):
            kept = [in_batch[i, i]] + [in_batch[i, j] for j in range(4)
                                       if j != i and int(ids[j]) not in cached]
            others = [j for j in cached if j != int(ids[i])]
            mass = tf.reduce_logsumexp(tf.gather(scores[i], others)) + np.log(3.0)
            rows.append(tf.reduce_logsumexp(tf.stack(kept + [mass])) - in_batch[i, i])
        reference = tf.add_n(rows)
    exact = tf.concat([tf.reshape(g, [-1]) for g in
                       tape.gradient(reference, [queries, tower.table])], 0).numpy()

    features = {"item_id": ids}

    @tf.function
    def one(step):
        cache.step.assign(step)
        with tf.GradientTape() as tape, tfnegcache.step.recording():
            loss = task(queries, tower(features), candidate_ids=ids, candidate_features=features,
                        candidate_sampling_probability=probability, training=True)
        grads = tape.gradient(loss, [queries, tower.table])
        return loss, tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    loss, _ = one(tf.constant(0, tf.int64))
    np.testing.assert_allclose(loss.numpy(), reference.numpy(), rtol=1e-5)  # value: exact
    draws = 3000
    _, samples = stepwise.draws(one, draws, (tf.float32, tf.float32))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(draws)
    varying = samples.std(0) > 1e-4
    assert varying.sum() > 10
    z = (mean - exact)[varying] / stderr[varying]
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    np.testing.assert_allclose(mean[~varying], exact[~varying], atol=1e-4)


def test_logq_without_in_batch_negatives_is_rejected():
    task, tower, cache = make_task(use_in_batch_negatives=False)
    queries, candidates, ids = batch(tower, [1, 2])
    with pytest.raises(ValueError, match="use_in_batch_negatives=False"):
        task(queries, candidates, candidate_ids=ids, candidate_features={"item_id": ids},
             candidate_sampling_probability=tf.constant([0.5, 0.5]))


def test_bad_task_arguments_and_inputs_are_rejected():
    task, tower, cache = make_task()
    with pytest.raises(ValueError, match="num_negatives"):
        tfnegcache.CacheRetrieval(cache=cache, candidate_model=tower, num_negatives=0)
    with pytest.raises(ValueError, match="candidate_model"):
        tfnegcache.CacheRetrieval(cache=cache)
    with pytest.raises(ValueError, match="NegativeCache"):
        tfnegcache.CacheRetrieval(cache="big", candidate_model=tower)
    queries, candidates, ids = batch(tower, [1, 2])
    with pytest.raises(ValueError, match=r"candidate_ids.*candidate_features.*must be passed"):
        task(queries, candidates, candidate_ids=ids)
    with pytest.raises(ValueError, match=r"\[num_rows, 4\].*Received shape \(2, 3\)"):
        task(queries[:, :3], candidates, candidate_ids=ids, candidate_features={"item_id": ids})
    with pytest.raises(ValueError, match=r"missing feature"):
        task(queries, candidates, candidate_ids=ids, candidate_features={"id": ids})
