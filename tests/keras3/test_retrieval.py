"""The Keras 3 retrieval loss: TFRS's in-batch softmax (agreeing with the TF front end), the
cache's column in evaluation and training, the corrected estimator (exact under a common
shift, unbiased for the cached mass), and the mean gradient against the full softmax."""

import keras
import numpy as np
import pytest
import scipy.special
from keras import ops

import cases
import k3help
import tfnegcache.keras3 as k3
from tfnegcache import _record


def _in_batch_loss(variant):
    case = cases.in_batch_case()
    variant = dict(variant)
    logq = variant.pop("logq", False)
    weighted = variant.pop("sample_weight", False)
    task = k3.CacheRetrieval(**variant)
    return task(case["queries"], case["candidates"], candidate_ids=case["ids"],
                candidate_sampling_probability=case["probability"] if logq else None,
                sample_weight=case["sample_weight"] if weighted else None)


@pytest.mark.parametrize("name", sorted(cases.IN_BATCH_VARIANTS))
def test_in_batch_loss_agrees_with_the_tf_front_end(name, tf_reference):
    loss = _in_batch_loss(cases.IN_BATCH_VARIANTS[name])
    np.testing.assert_allclose(float(k3help.numpy(loss)), tf_reference["in_batch"][name],
                               rtol=1e-6)


def test_in_batch_loss_is_the_summed_softmax_cross_entropy():
    case = cases.in_batch_case()
    logits = case["queries"] @ case["candidates"].T / 0.5
    expected = sum(scipy.special.logsumexp(logits[i]) - logits[i, i] for i in range(5))
    loss = _in_batch_loss({"temperature": 0.5})
    np.testing.assert_allclose(float(k3help.numpy(loss)), expected, rtol=1e-6)


def test_accidental_hits_are_masked_unlike_keras_rs():
    labels = np.eye(3, 4, dtype=np.float32)
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([7, 8, 7, 9], np.int32)
    masked = k3help.numpy(k3.remove_accidental_hits(labels, logits, ids))
    hit = np.zeros([3, 4], bool)
    hit[0, 2] = hit[2, 0] = True          # the other column holding the row's positive id
    assert np.all(masked[hit] < -1e30)
    np.testing.assert_array_equal(masked[~hit], logits[~hit])


def _cache_task(variant, case):
    variant = dict(variant)
    logq = variant.pop("logq", False)
    tower = k3help.TableTower(case["table"])
    cache = k3help.cache(16)
    task = k3.CacheRetrieval(cache=cache, candidate_model=tower, **variant)
    k3help.fill(cache, tower, case["cached"])
    tower.table.assign(case["moved"])
    return task, tower, logq


@pytest.mark.parametrize("name", sorted(cases.CACHE_VARIANTS))
def test_evaluation_loss_with_a_cache_agrees_with_the_tf_front_end(name, tf_reference):
    case = cases.cache_case()
    task, tower, logq = _cache_task(cases.CACHE_VARIANTS[name], case)
    batch = case["batch"]
    loss = task(case["queries"], tower({"item_id": batch}), candidate_ids=batch,
                candidate_features={"item_id": batch},
                candidate_sampling_probability=case["probability"] if logq else None,
                training=False)
    np.testing.assert_allclose(float(k3help.numpy(loss)), tf_reference["with_cache"][name],
                               rtol=1e-5)


def test_evaluation_loss_with_a_cache_is_the_cross_entropy_over_positive_batch_and_cache():
    case = cases.cache_case()
    task, tower, _ = _cache_task({"use_in_batch_negatives": True}, case)
    q, fresh, stale = case["queries"], case["moved"], case["table"]
    batch = case["batch"]
    expected = 0.0
    for i in range(3):
        in_batch = fresh[batch] @ q[i]
        cached = [stale[j] @ q[i] for j in case["cached"] if j not in batch]
        logits = np.concatenate([in_batch, [scipy.special.logsumexp(cached)]])
        expected += scipy.special.logsumexp(logits) - in_batch[i]
    loss = task(q, tower({"item_id": batch}), candidate_ids=batch,
                candidate_features={"item_id": batch}, training=False)
    np.testing.assert_allclose(float(k3help.numpy(loss)), expected, rtol=1e-5)


def _shifted_task(estimator, k, case, num_items=10):
    tower = k3help.TableTower(case["table"])
    cache = k3help.cache(num_items)
    per_query = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    task = k3.CacheRetrieval(loss=per_query, cache=cache, candidate_model=tower,
                             num_negatives=k, use_in_batch_negatives=False,
                             estimator=estimator)
    k3help.fill(cache, tower, np.arange(num_items))
    tower.table.assign(case["moved"])
    return task, tower, cache


def _training_loss(task, tower, queries, positives):
    with _record.recording():
        return k3help.numpy(task(queries, tower({"item_id": positives}),
                                 candidate_ids=positives,
                                 candidate_features={"item_id": positives}, training=True))


@pytest.mark.parametrize("estimator,k", [("corrected", 1), ("corrected", 3), ("stale", 1)])
def test_training_values_under_a_common_shift_agree_with_the_tf_front_end(estimator, k,
                                                                          tf_reference):
    case = cases.shifted_case()
    task, tower, cache = _shifted_task(estimator, k, case)
    q, fresh = case["queries"], case["moved"]
    positives = case["positives"]
    exact = np.array([scipy.special.logsumexp(fresh @ q[i]) - fresh[p] @ q[i]
                      for i, p in enumerate(positives)])
    for step in range(3):          # any draw gives the same value
        cache.step.assign(step)
        loss = _training_loss(task, tower, q, positives)
        np.testing.assert_allclose(loss, tf_reference["shifted"][f"{estimator}/{k}"],
                                   rtol=1e-5, atol=1e-5)
        if estimator == "corrected":   # ... the exact cross entropy with the fresh tower
            np.testing.assert_allclose(loss, exact, rtol=1e-5, atol=1e-5)
    if estimator == "stale":
        assert np.abs(loss - exact).max() > 0.1   # the stale value is off


def test_the_corrected_cache_logit_is_an_unbiased_estimate_of_the_fresh_mass():
    """With moves that differ per item, `exp(cache logit)` averages k independent terms
    `Z~ exp(s_j - s~_j)`, j drawn from the stale softmax: mean the fresh mass Z, with a
    variance known exactly (the same check as the TF front end's)."""
    num_items, k = 10, 20000
    case = cases.shifted_case()
    task, tower, cache = _shifted_task("corrected", k, case)
    rng = np.random.default_rng(5)
    fresh = (case["moved"] + 0.5 * rng.normal(size=case["moved"].shape)).astype(np.float32)
    tower.table.assign(fresh)
    q, positives = case["queries"], case["positives"]
    stale = k3help.numpy(cache.embeddings.value)[:num_items].astype(np.float64)
    loss = _training_loss(task, tower, q, positives).astype(np.float64)
    q, fresh = q.astype(np.float64), fresh.astype(np.float64)
    s_pos = np.sum(q * fresh[positives], 1)
    estimate = np.exp(s_pos) * np.expm1(loss)   # loss = log(e^{s+} + e^{logit}) - s+
    for i, p in enumerate(positives):
        f, e = np.delete(fresh, p, 0) @ q[i], np.delete(stale, p, 0) @ q[i]
        z_stale = np.exp(e).sum()
        prob, term = np.exp(e) / z_stale, z_stale * np.exp(f - e)
        mass = np.exp(f).sum()
        stderr = np.sqrt((prob @ (term - mass) ** 2) / k)
        assert stderr > 1e-3 * mass                      # the estimate is random
        assert abs(z_stale - mass) > 10 * stderr         # the stale mass is off
        assert abs(estimate[i] - mass) < 4.5 * stderr, (estimate[i], mass, stderr)


@pytest.mark.parametrize("use_in_batch,k", [(True, 1), (False, 3)])
def test_the_mean_gradient_is_the_full_softmax_gradient(use_in_batch, k):
    """With a fresh cache of the whole corpus, the surrogate loss's gradient (queries and the
    candidate table) averaged over draws is the full softmax's, coordinate by coordinate."""
    num_items = 12
    table = np.random.default_rng(4).normal(size=(num_items, 4)).astype(np.float32)
    tower = k3help.TableTower(table)
    cache = k3help.cache(num_items, seed=4)
    task = k3.CacheRetrieval(cache=cache, candidate_model=tower, temperature=2.0,
                             use_in_batch_negatives=use_in_batch, num_negatives=k)
    k3help.fill(cache, tower, np.arange(num_items))
    ids = np.array([1, 6, 9], np.int32)
    queries = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)

    logits = queries @ table.T / 2.0
    softmax = scipy.special.softmax(logits, axis=1)
    assert softmax.min() > 0.01           # every item drawn often: the z-test holds
    onehot = np.eye(num_items)[ids]
    exact = np.concatenate([((softmax - onehot) @ table / 2.0).ravel(),
                            ((softmax - onehot).T @ queries / 2.0).ravel()])

    def loss_at(q, t, step):
        with keras.StatelessScope(state_mapping=[(tower.table, t), (cache.step, step)]):
            with _record.recording():
                return task(q, tower({"item_id": ids}), candidate_ids=ids,
                            candidate_features={"item_id": ids}, training=True)

    def gradient(q, t, step):
        _, grads = k3help.value_and_grad(lambda q_, t_: loss_at(q_, t_, step), q, t)
        return ops.concatenate([ops.reshape(g, [-1]) for g in grads], 0)

    q, t = ops.convert_to_tensor(queries), ops.convert_to_tensor(table)
    draws = 2000          # one draw per cache step 0, 1, ...: all of them in one call
    samples = k3help.numpy(k3help.compiled(lambda q_, t_, steps: k3help.stacked(
        lambda step: gradient(q_, t_, step), steps))(q, t, ops.arange(draws, dtype="int32")))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(draws)
    varying = samples.std(0) > 1e-4
    assert varying.sum() > 10                              # the estimator is random ...
    z = (mean - exact)[varying] / stderr[varying]
    assert np.abs(z).max() < 4.5, np.abs(z).max()          # ... and unbiased
    np.testing.assert_allclose(mean[~varying], exact[~varying], atol=1e-4)


def test_bad_arguments_and_inputs_are_refused_with_what_was_received():
    tower = k3help.TableTower(np.zeros([4, 4], np.float32))
    with pytest.raises(ValueError, match=r"`num_negatives` must be an integer >= 1. "
                                         r"Received: num_negatives=0."):
        k3.CacheRetrieval(num_negatives=0)
    with pytest.raises(ValueError, match=r"`temperature` must be a number > 0"):
        k3.CacheRetrieval(temperature=-1.0)
    with pytest.raises(ValueError, match="`sampling` must be 'gumbel'"):
        k3.CacheRetrieval(sampling="top")
    with pytest.raises(ValueError, match="`candidate_model` must be given with a cache"):
        k3.CacheRetrieval(cache=k3help.cache(4))
    task = k3.CacheRetrieval(cache=k3help.cache(4), candidate_model=tower)
    q = np.zeros([2, 4], np.float32)
    ids = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="`candidate_ids` .* and `candidate_features`"):
        task(q, q, candidate_ids=ids)
    with pytest.raises(ValueError, match="training=True outside a training step"):
        task(q, q, candidate_ids=ids, candidate_features={"item_id": ids}, training=True)
    with pytest.raises(ValueError, match=r"must have shape \[num_rows, 4\]"):
        task(np.zeros([2, 3], np.float32), q, candidate_ids=ids,
             candidate_features={"item_id": ids})
    only_cache = k3.CacheRetrieval(cache=k3help.cache(4), candidate_model=tower,
                                   use_in_batch_negatives=False)
    with pytest.raises(ValueError, match="use_in_batch_negatives=False"):
        only_cache(q, q, candidate_ids=ids, candidate_features={"item_id": ids},
                   candidate_sampling_probability=np.ones([2], np.float32))
