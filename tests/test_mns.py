"""`CacheRetrieval(sampling="uniform")`: mixed negative sampling with the cache as the corpus.

The cache's logit is `log(filled / k) + logsumexp` of the eligible draws' fresh scores, so
`exp(logit)` is an unbiased estimate of the eligible cached mass, and its gradient is an
unbiased estimate of that mass's gradient. The loss's own gradient is the self-normalised
estimator of the same cross entropy the Gumbel mode estimates: consistent, bias ~ 1/k.
"""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import stepwise
import tfnegcache
import toy
from test_refresh import Recorder
from test_retrieval import DIM, batch, fill, make_task

NUM_ITEMS, TEMPERATURE = 12, 2.0


def uniform_task(use_in_batch=True, k=2, **kwargs):
    task, tower, cache = make_task(cache_size=NUM_ITEMS, temperature=TEMPERATURE, seed=4,
                                   use_in_batch_negatives=use_in_batch, num_negatives=k,
                                   sampling="uniform", **kwargs)
    fill(cache, tower, np.arange(NUM_ITEMS))       # the whole corpus, fresh
    return task, tower, cache


def eligible_mass(queries, table, ids, use_in_batch):
    """`[B]` exact eligible cached mass `sum_j exp(s_ij)` of each query."""
    scores = queries @ table.T / TEMPERATURE
    masses = []
    for i, positive in enumerate(ids):
        keep = ~np.isin(np.arange(NUM_ITEMS), ids) if use_in_batch else (
            np.arange(NUM_ITEMS) != positive)
        masses.append(np.exp(scores[i][keep]).sum())
    return np.array(masses)


@pytest.mark.parametrize("use_in_batch", [True, False])
def test_loss_value_is_the_cross_entropy_with_the_sampled_mass(use_in_batch):
    task, tower, cache = uniform_task(use_in_batch, k=3, loss=Recorder())
    queries, candidates, ids = batch(tower, [1, 6, 9])
    with tfnegcache.step.recording() as step:
        loss = task(queries, candidates, candidate_ids=ids, candidate_features={"item_id": ids},
                    training=True)
    (_, update, _), = step.updates
    slots = update.write_back_slots.numpy().reshape(3, 3)
    valid = update.write_back_valid.numpy().reshape(3, 3)
    q, table = queries.numpy(), tower.table.numpy()
    scores = q @ table.T / TEMPERATURE
    expected = 0.0
    for i in range(3):
        drawn = scores[i][slots[i]][valid[i]]
        sampled = NUM_ITEMS / 3 * np.exp(drawn).sum()
        in_batch = np.exp(scores[i][ids.numpy()]) if use_in_batch else np.exp(
            scores[i][ids.numpy()[i:i + 1]])
        expected += -scores[i][ids.numpy()[i]] + np.log(in_batch.sum() + sampled)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # Ineligible draws are exactly those on masked slots or on the query's own positive.
    item = cache.ids.numpy()[slots]
    masked = np.isin(item, ids.numpy()) if use_in_batch else item == ids.numpy()[:, None]
    np.testing.assert_array_equal(valid, ~masked)


def _draws(task, cache, tower, queries, ids, draws, grads_of):
    """Per draw: the cache logits `[B]` and the gradient of `grads_of(logits)`."""
    features = {"item_id": ids}

    @tf.function
    def one(step):
        cache.step.assign(step)
        with tf.GradientTape() as tape, tfnegcache.step.recording():
            task(queries, tower(features), candidate_ids=ids, candidate_features=features,
                 training=True)
            logits = task._loss.logits[:, -1]  # pylint: disable=protected-access
            target = grads_of(logits)
        grads = tape.gradient(target, [queries, tower.table])
        return logits, tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    return stepwise.draws(one, draws, (tf.float32, tf.float32))


@pytest.mark.parametrize("use_in_batch,k", [(True, 1), (False, 3)])
def test_the_sampled_mass_and_its_gradient_are_unbiased(use_in_batch, k):
    task, tower, cache = uniform_task(use_in_batch, k=k, loss=Recorder())
    ids = tf.constant([1, 6, 9], tf.int64)
    queries = tf.Variable(np.random.default_rng(9).normal(size=(3, DIM)).astype(np.float32))
    draws = 3000
    logits, grads = _draws(task, cache, tower, queries, ids, draws,
                           lambda logits: tf.reduce_sum(tf.exp(logits)))
    exact = eligible_mass(queries.numpy(), tower.table.numpy(), ids.numpy(), use_in_batch)
    masses = np.exp(logits)
    z = (masses.mean(0) - exact) / (masses.std(0) / np.sqrt(draws))
    assert np.abs(z).max() < 4.5, (masses.mean(0), exact, z)

    with tf.GradientTape() as tape:                   # gradient of the exact eligible mass
        scores = tf.matmul(queries, tower.table, transpose_b=True) / TEMPERATURE
        keep = np.stack([~np.isin(np.arange(NUM_ITEMS), ids.numpy()) if use_in_batch else
                         np.arange(NUM_ITEMS) != int(ids[i]) for i in range(3)])
        target = tf.reduce_sum(tf.where(keep, tf.exp(scores), 0.0))
    expected = tf.concat([tf.reshape(g, [-1]) for g in
                          tape.gradient(target, [queries, tower.table])], 0).numpy()
    mean, stderr = grads.mean(0), grads.std(0) / np.sqrt(draws)
    varying = grads.std(0) > 1e-4
    assert varying.sum() > 10
    z = (mean - expected)[varying] / stderr[varying]
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    np.testing.assert_allclose(mean[~varying], expected[~varying], atol=1e-4)


def test_the_loss_gradient_approaches_the_full_softmax_gradient_as_k_grows():
    ids = tf.constant([1, 6, 9], tf.int64)
    errors = {}
    for k in (1, 32):
        task, tower, cache = uniform_task(use_in_batch=False, k=k, loss=Recorder())
        queries = tf.Variable(np.random.default_rng(9).normal(size=(3, DIM)).astype(np.float32))
        with tf.GradientTape() as tape:               # the exact objective: softmax over all
            logits = tf.matmul(queries, tower.table, transpose_b=True) / TEMPERATURE
            exact_loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(ids, logits))
        exact = tf.concat([tf.reshape(g, [-1]) for g in
                           tape.gradient(exact_loss, [queries, tower.table])], 0).numpy()
        features = {"item_id": ids}

        @tf.function
        def one(step, task=task, cache=cache, tower=tower, queries=queries):
            cache.step.assign(step)
            with tf.GradientTape() as tape, tfnegcache.step.recording():
                loss = task(queries, tower(features), candidate_ids=ids,
                            candidate_features=features, training=True)
            grads = tape.gradient(loss, [queries, tower.table])
            return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

        mean = np.mean(stepwise.draws(one, 1500), 0)
        errors[k] = np.linalg.norm(mean - exact) / np.linalg.norm(exact)
    # Measured: relative error 0.445 at k = 1 (the self-normalisation bias) and 0.044 at
    # k = 32 (bias about 0.445 / 32 plus the Monte-Carlo error of 1500 draws).
    assert errors[32] < 0.08 and errors[1] > 4 * errors[32], errors


def test_uniform_sampling_trains_a_model_as_mns():
    model = toy.ToyModel(cache_size=toy.NUM_ITEMS, num_negatives=8, sampling="uniform")
    cache = model.task.cache
    cache.warm_start(tf.data.Dataset.from_tensor_slices(toy.item_table()),
                     model.candidate_tower, id_key="item_id")
    # The draws of training steps are uniform over the whole catalogue, whatever the batch;
    # those on the batch's own candidates do not count (their in-batch columns do).
    data = toy.interactions(40 * 128, seed=4)
    counts = np.zeros(toy.NUM_ITEMS)
    @tf.function
    def draws(batch):
        with tfnegcache.step.recording() as record:
            model.compute_loss(batch, training=True)
        (_, update, _), = record.updates
        return update.write_back_slots, update.write_back_valid

    for start in range(0, len(data["item_id"]), 128):
        batch = {k: tf.constant(v[start:start + 128]) for k, v in data.items()}
        slots, valid = (x.numpy() for x in draws(batch))
        drawn_ids = cache.ids.numpy()[slots]
        np.testing.assert_array_equal(valid, ~np.isin(drawn_ids, batch["item_id"].numpy()))
        counts += np.bincount(slots, minlength=toy.NUM_ITEMS)
        cache.step.assign_add(1)   # the next step's draws (no optimizer, no write)
    assert counts.sum() == 40 * 128 * 8
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(4096, seed=1), 128), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["cache_staleness"][-1] > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"sampling": "softmax"}, r"`sampling` must be 'gumbel'.*Received: sampling='softmax'"),
    ({"sampling": "uniform", "top_m": 4}, r"Received: top_m=4 with sampling='uniform'"),
])
def test_bad_sampling_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_task(**kwargs)


def test_a_sharded_cache_refuses_uniform_sampling():
    cache = tfnegcache.ShardedNegativeCache(8, {"item_id": tf.TensorSpec([], tf.int64)}, DIM)
    with pytest.raises(ValueError, match=r"uniform draws over the union are not implemented"):
        tfnegcache.CacheRetrieval(cache=cache, candidate_model=lambda f: f, sampling="uniform")
