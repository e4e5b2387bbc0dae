"""Multi-head ("maxsim") queries `[B, H, d]` with a cache: TFRS's loss with an empty cache,
the exact maxsim log-mass, draws from the maxsim softmax, training, and input checks."""

import json
import os
import signal
import subprocess
import sys

import tfnegcache  # first: it selects Keras 2 before TensorFlow loads (the subprocess too)

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import sampling

import forkserver
import stepwise
from test_retrieval import DIM, SPEC, _tfrs_and_ours, fill, make_task
from test_sampling import softmax

HEADS = 3


def multi_head_batch(tower, ids, heads=HEADS, seed=1):
    """`([B, heads, DIM] queries, [B, DIM] candidates, [B] ids)` for candidate `ids`."""
    ids = tf.constant(ids, tf.int64)
    rng = np.random.default_rng(seed)
    queries = tf.constant(rng.normal(size=(len(ids), heads, DIM)), tf.float32)
    return queries, tower({"item_id": ids}), ids


def maxsim(queries, embeddings):
    """`[B, N]` numpy maxsim scores `max_h <q_ih, e_j>` (float64)."""
    return np.einsum("bhd,nd->bhn", np.float64(queries), np.float64(embeddings)).max(axis=1)


def meansim(queries, embeddings):
    """A wrong scoring the power checks reject: the mean over heads."""
    return np.einsum("bhd,nd->bhn", np.float64(queries), np.float64(embeddings)).mean(axis=1)


def maxsim_but_last_head(queries, embeddings):
    """A wrong scoring the power checks reject: a head left out of the max."""
    return maxsim(queries[:, :-1], embeddings)


def chi_square_p(draws, probabilities):
    """p-value of the draws (ints) against `probabilities`; 0 when a draw has probability 0
    (the power checks meet that: a wrong distribution can have a smaller support)."""
    support = probabilities > 0
    counts = np.bincount(draws, minlength=len(probabilities))
    if counts[~support].sum() > 0:
        return 0.0
    return scipy.stats.chisquare(counts[support], probabilities[support] * len(draws)).pvalue


# ------------------------------------------------------------------ TFRS equivalence


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
    queries, candidates, ids = multi_head_batch(tower, [3, 7, 3, 11, 1])
    weights = tf.constant([1.0, 0.5, 2.0, 1.0, 0.0])
    probability = tf.constant([0.1, 0.2, 0.1, 0.3, 0.05])
    mask = tf.constant(np.random.default_rng(4).random((5, 5)) > 0.3) | tf.eye(5, dtype=tf.bool)
    for call_kwargs in ({}, {"sample_weight": weights, "candidate_sampling_probability": probability},
                        {"score_mask": mask, "sample_weight": weights}):
        expected = reference(queries, candidates, candidate_ids=ids, **call_kwargs)
        with tfnegcache.step.recording():
            got = ours(queries, candidates, candidate_ids=ids,
                       candidate_features={"item_id": ids}, training=training, **call_kwargs)
        assert got.numpy() == expected.numpy(), (got.numpy(), expected.numpy())
    # Loss metric and AUC batch metric equal; the factorized metrics are skipped by both.
    for a, b in zip(reference.metrics, ours.metrics):
        np.testing.assert_array_equal(np.asarray(a.result()), np.asarray(b.result()), err_msg=a.name)
    seen = [m for m in ours.metrics if isinstance(m, (tf.keras.metrics.AUC, tf.keras.metrics.Mean))
            and not m.name.startswith(("factorized", "cache"))]
    assert len(seen) == 2 and all(m.result().numpy() > 0 for m in seen)   # they saw the batch


@pytest.mark.parametrize("kwargs,call_kwargs", [
    ({"temperature": 0.7}, {}),
    ({"remove_accidental_hits": True, "num_hard_negatives": 2},
     {"sample_weight": np.array([1.0, 0.5, 2.0, 1.0], np.float32)}),
    ({}, {"candidate_sampling_probability": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}),
    ({"temperature": 0.2}, {"score_mask": np.array([[1, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1],
                                                    [1, 1, 1, 1]], bool)}),
])
def test_without_cache_it_is_tfrs_retrieval(kwargs, call_kwargs):
    task = tfnegcache.CacheRetrieval(**kwargs)
    reference = tfrs.tasks.Retrieval(**kwargs)
    q, c = tf.random.normal([4, HEADS, 3], seed=1), tf.random.normal([4, 3], seed=2)
    ids = tf.constant([5, 6, 5, 7], tf.int64)
    assert (task(q, c, candidate_ids=ids, **call_kwargs).numpy()
            == reference(q, c, candidate_ids=ids, **call_kwargs).numpy())


# ------------------------------------------------------------------ exact value with a cache


def _filled_task(**kwargs):
    task, tower, cache = make_task(**kwargs)
    fill(cache, tower, np.arange(10))
    # Cached embeddings are stale: the tower has moved on since they were written.
    tower.table.assign_add(tf.fill(tower.table.shape, 0.1))
    return task, tower, cache


@pytest.mark.parametrize("use_in_batch", [True, False])
@pytest.mark.parametrize("temperature", [None, 0.5])
@pytest.mark.parametrize("training", [False, True])
def test_loss_is_cross_entropy_over_positive_in_batch_and_cache_with_maxsim(
        use_in_batch, temperature, training):
    # In training the value pins the uncorrected estimator's (see tests/test_retrieval.py).
    task, tower, cache = _filled_task(temperature=temperature, num_negatives=3,
                                      use_in_batch_negatives=use_in_batch,
                                      **({"estimator": "stale"} if training else {}))
    queries, candidates, ids = multi_head_batch(tower, [2, 5, 12])
    with tfnegcache.step.recording():
        loss = task(queries, candidates, candidate_ids=ids, candidate_features={"item_id": ids},
                    training=training)

    t = temperature or 1.0
    in_batch = maxsim(queries.numpy(), candidates.numpy()) / t        # [3, 3]
    cached = maxsim(queries.numpy(), cache.embeddings.numpy()[:10]) / t  # [3, 10]
    expected = 0.0
    for i in range(3):
        masked = {2, 5, 12} if use_in_batch else {int(ids[i])}
        row = in_batch[i] if use_in_batch else in_batch[i, i:i + 1]
        logits = np.concatenate([row, [cached[i, j] for j in range(10) if j not in masked]])
        expected += scipy.special.logsumexp(logits) - in_batch[i, i]
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("use_in_batch", [True, False])
@pytest.mark.parametrize("top_m", [None, 4])
def test_cache_logit_in_evaluation_is_the_maxsim_log_mass(use_in_batch, top_m):
    temperature = 0.5
    task, tower, cache = _filled_task(temperature=temperature, top_m=top_m,
                                      use_in_batch_negatives=use_in_batch)
    queries, _, ids = multi_head_batch(tower, [2, 5, 12])
    column, write_back = task._cache_column(queries, ids, training=False)  # pylint: disable=protected-access
    assert write_back is None

    scores = maxsim(queries.numpy(), cache.embeddings.numpy()[:10]) / temperature
    expected = []
    for i in range(3):
        # With in-batch negatives every batch candidate is masked (counted once, in-batch);
        # without, only the query's own positive (an accidental hit).
        masked = {2, 5, 12} if use_in_batch else {int(ids[i])}
        eligible = np.array([scores[i, j] for j in range(10) if j not in masked])
        if top_m is not None:
            eligible = np.sort(eligible)[-top_m:]
        expected.append(scipy.special.logsumexp(eligible))
    np.testing.assert_allclose(column.numpy(), expected, rtol=1e-5)


def test_one_head_is_the_single_vector_query():
    """`[B, 1, d]` queries give the loss and gradients of `[B, d]` ones (same draws)."""
    results = []
    for expand in (False, True):
        task, tower, cache = _filled_task(temperature=0.5, num_negatives=2)
        queries, _, ids = multi_head_batch(tower, [2, 5, 12], heads=1)
        queries = tf.Variable(queries if expand else queries[:, 0])
        with tf.GradientTape() as tape, tfnegcache.step.recording() as step:
            loss = task(queries, tower({"item_id": ids}), candidate_ids=ids,
                        candidate_features={"item_id": ids}, training=True)
        grads = tape.gradient(loss, [queries, tower.table])
        (_, update, _), = step.updates
        results.append([loss.numpy(), np.reshape(grads[0], [3, DIM]),
                        tf.convert_to_tensor(grads[1]).numpy(),
                        update.write_back_slots.numpy()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mean_surrogate_gradient_is_the_maxsim_softmax_gradient():
    """The correction term uses maxsim fresh scores: averaged over draws, the gradient is the
    full softmax's over maxsim scores (a fresh cache of the whole corpus)."""
    num_items, temperature = 12, 2.0
    task, tower, cache = make_task(cache_size=num_items, temperature=temperature, seed=4,
                                   use_in_batch_negatives=False, num_negatives=2)
    fill(cache, tower, np.arange(num_items))
    ids = tf.constant([1, 6, 9], tf.int64)
    queries = tf.Variable(
        0.5 * np.random.default_rng(9).normal(size=(3, 2, DIM)).astype(np.float32))

    with tf.GradientTape() as tape:
        logits = tf.reduce_max(tf.einsum("bhd,nd->bhn", queries, tower.table), 1) / temperature
        exact_loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(ids, logits))
    exact = tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in
                       tape.gradient(exact_loss, [queries, tower.table])], 0).numpy()
    assert tf.reduce_min(tf.nn.softmax(logits)).numpy() > 0.01   # every item drawn often

    features = {"item_id": ids}

    @tf.function
    def one(step):
        cache.step.assign(step)
        with tf.GradientTape() as tape, tfnegcache.step.recording():
            loss = task(queries, tower(features), candidate_ids=ids, candidate_features=features,
                        training=True)
        grads = tape.gradient(loss, [queries, tower.table])
        return loss, tf.concat([tf.reshape(tf.convert_to_tensor(g), [-1]) for g in grads], 0)

    np.testing.assert_allclose(one(tf.constant(0, tf.int64))[0].numpy(), exact_loss.numpy(),
                               rtol=1e-5)
    draws = 2000
    _, samples = stepwise.draws(one, draws, (tf.float32, tf.float32))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(draws)
    varying = samples.std(0) > 1e-4
    assert varying.sum() > 10
    z = (mean - exact)[varying] / stderr[varying]
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    np.testing.assert_allclose(mean[~varying], exact[~varying], atol=1e-4)


# ------------------------------------------------------------------ draws follow maxsim


NUM_SLOTS, NUM_FILLED, TEMPERATURE = 60, 50, 0.5
MASKED_IDS = [3, 17]           # the batch's candidates: never drawn
EXCLUDED_IDS = [5, 1000, 0]    # each query's positive (1000 is not cached)


def _multi_head_cache(block_size, seed=0):
    rng = np.random.default_rng(seed)
    cache = tfnegcache.NegativeCache(NUM_SLOTS, SPEC, DIM, seed=seed, block_size=block_size)
    ids = tf.range(NUM_FILLED, dtype=tf.int64)
    cache.insert({"item_id": ids}, tf.constant(rng.normal(size=(NUM_FILLED, DIM)), tf.float32),
                 ids)
    queries = rng.normal(size=(3, HEADS, DIM)).astype(np.float32)
    return cache, queries


def _eligible_logits(score_fn, queries, cache, top_m=None):
    """`[3, NUM_SLOTS]` logits of `score_fn` with the masks of `_multi_head_cache` (slot i
    holds id i); with `top_m`, each row's best `top_m` only."""
    logits = score_fn(queries, cache.embeddings.numpy()) / TEMPERATURE
    logits[:, NUM_FILLED:] = -np.inf
    logits[:, MASKED_IDS] = -np.inf
    for row, slot in enumerate(EXCLUDED_IDS):
        if slot < NUM_SLOTS:
            logits[row, slot] = -np.inf
    if top_m is not None:
        kth = np.sort(logits, axis=1)[:, -top_m][:, None]
        logits = np.where(logits >= kth, logits, -np.inf)
    return logits


def draw_p_values(block_size, tile_elements, top_m=None, num_samples=20000, monkeypatch=None,
                  wrong_scorings=(meansim,)):
    """Draws `num_samples` per query from a cache with `[3, HEADS, DIM]` queries through
    `NegativeCache.sample` (`tile_elements` overrides the plan's tile budget, so a small cache
    is scored in several chunks).

    Returns:
      `(p-values [3] against the maxsim softmax, p-values [3] per wrong scoring, the plans
      used, the draw, the maxsim logits)`. A wrong scoring's softmax is taken over the same
      slots as the maxsim one (for `top_m`, the maxsim top m), so it is rejected for its
      weights, not for a different support.
    """
    cache, queries = _multi_head_cache(block_size)
    plans = []
    original = sampling.plan_sampler

    def recording_plan(*args, **kwargs):
        if tile_elements is not None:
            kwargs["tile_elements"] = tile_elements
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(sampling, "plan_sampler", recording_plan)
    draw = cache.sample(tf.constant(queries), num_samples=num_samples, temperature=TEMPERATURE,
                        masked_ids=tf.constant(MASKED_IDS, tf.int64),
                        excluded_ids=tf.constant(EXCLUDED_IDS, tf.int64), top_m=top_m)
    right = _eligible_logits(maxsim, queries, cache, top_m)
    slots = draw.slots.numpy()
    p_right = [chi_square_p(slots[i], softmax(right[i])) for i in range(3)]
    p_wrong = []
    for score_fn in wrong_scorings:
        wrong = np.where(np.isfinite(right), _eligible_logits(score_fn, queries, cache), -np.inf)
        p_wrong.append([chi_square_p(slots[i], softmax(wrong[i])) for i in range(3)])
    return p_right, p_wrong, plans, draw, right


@pytest.mark.parametrize("block_size,tile_elements,num_chunks", [
    (4, 72, 8),       # 2 blocks of 4 per chunk; the last chunk is ragged (padded rows)
    (5, 90, 6),       # 2 blocks of 5 per chunk; chunks cut evenly (sliced rows)
    (8, None, 1),     # the default tile: 8 blocks in one chunk
])
def test_two_stage_draws_follow_the_maxsim_softmax(block_size, tile_elements, num_chunks,
                                                   monkeypatch):
    p_right, p_wrong, plans, draw, logits = draw_p_values(
        block_size, tile_elements, monkeypatch=monkeypatch,
        wrong_scorings=(meansim, maxsim_but_last_head))
    # The plan budgets B * H rows per tile.
    assert [(p.block_size, p.num_chunks) for p in plans] == [(block_size, num_chunks)]
    assert plans[0].num_blocks > 1
    assert min(p_right) > 1e-3, p_right
    assert np.max(p_wrong) < 1e-6, p_wrong       # power: mean over heads, a dropped head
    np.testing.assert_allclose(draw.log_mass.numpy(), scipy.special.logsumexp(logits, 1),
                               rtol=1e-5)
    # The winning perturbed score of a Gumbel-Max draw is Gumbel(log-mass): mean M + 0.5772.
    np.testing.assert_allclose(draw.perturbed.numpy().mean(1),
                               draw.log_mass.numpy() + 0.5772156649, atol=0.05)


def test_top_m_draws_follow_the_maxsim_softmax_over_the_maxsim_top_m(monkeypatch):
    top_m = 8
    p_right, p_wrong, _, draw, logits = draw_p_values(4, None, top_m=top_m,
                                                      monkeypatch=monkeypatch)
    assert (np.isfinite(logits).sum(1) == top_m).all()
    assert min(p_right) > 1e-3, p_right          # and never a slot outside the maxsim top m
    assert np.max(p_wrong) < 1e-6, p_wrong       # power: mean over heads on those m slots
    np.testing.assert_allclose(draw.log_mass.numpy(), scipy.special.logsumexp(logits, 1),
                               rtol=1e-5)


def test_sharded_cache_without_replicas_draws_from_the_maxsim_softmax():
    cache, queries = _multi_head_cache(4)
    sharded = tfnegcache.ShardedNegativeCache(NUM_SLOTS, SPEC, DIM, block_size=4)
    ids = tf.range(NUM_FILLED, dtype=tf.int64)
    sharded.insert({"item_id": ids}, cache.embeddings[:NUM_FILLED], ids)
    draw = sharded.draw(tf.constant(queries), 20000, TEMPERATURE,
                        masked_ids=tf.constant(MASKED_IDS, tf.int64),
                        excluded_ids=tf.constant(EXCLUDED_IDS, tf.int64))
    logits = _eligible_logits(maxsim, queries, cache)
    np.testing.assert_allclose(draw.log_mass.numpy(), scipy.special.logsumexp(logits, 1),
                               rtol=1e-5)
    drawn = draw.features["item_id"].numpy().reshape(3, -1)
    for row in range(3):
        assert chi_square_p(drawn[row], softmax(logits[row])) > 1e-3


def _sharded_scenario(out):
    """Run in a subprocess: two logical CPUs, a MirroredStrategy, a sharded cache whose two
    shards hold different halves of the items, `[4, HEADS, DIM]` queries per replica.

    Logical devices must be set before TensorFlow creates its first tensor, so this module
    (and what it imports) creates none at import time.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(3)
    half = 20
    embeddings = rng.normal(size=(2 * half, DIM)).astype(np.float32)
    with strategy.scope():
        cache = tfnegcache.ShardedNegativeCache(half, SPEC, DIM, block_size=4)
    for r, shard in enumerate(cache.shards):
        ids = tf.range(r * half, (r + 1) * half, dtype=tf.int64)
        shard.insert({"item_id": ids}, embeddings[r * half:(r + 1) * half], ids)
    queries = rng.normal(size=(8, HEADS, DIM)).astype(np.float32)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: queries[ctx.replica_id_in_sync_group * 4:][:4])

    @tf.function
    def draw(q):
        def one(q):
            result = cache.draw(q, 50, TEMPERATURE)
            return result.log_mass, result.features["item_id"]
        masses, drawn = strategy.run(one, args=(q,))
        return strategy.gather(masses, axis=0), strategy.gather(drawn, axis=0)

    counts = np.zeros((8, 2 * half))
    for step in range(40):
        for shard in cache.shards:
            shard.step.assign(step)
        log_mass, drawn = draw(per_replica)
        for row, items in enumerate(drawn.numpy().reshape(8, -1)):
            counts[row] += np.bincount(items, minlength=2 * half)
    logits = maxsim(queries, embeddings) / TEMPERATURE
    with open(out, "w") as f:
        json.dump({"log_mass": log_mass.numpy().tolist(),
                   "expected_log_mass": scipy.special.logsumexp(logits, 1).tolist(),
                   "counts": counts.tolist(),
                   "probs": [softmax(row).tolist() for row in logits]}, f)


def test_sharded_draw_over_two_replicas_gathers_every_head(tmp_path):
    out, log_path = tmp_path / "sharded.json", tmp_path / "sharded.log"
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here,
                                           os.environ.get("PYTHONPATH", "")]))
    proc = forkserver.start([sys.executable, os.path.abspath(__file__), out], cwd=os.getcwd(),
                            env=env, stdout=log_path, new_session=True)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(log_path) as log:
        assert proc.returncode == 0, log.read()[-3000:]
    with open(out) as f:
        result = json.load(f)
    np.testing.assert_allclose(result["log_mass"], result["expected_log_mass"], rtol=1e-5)
    counts, probs = np.array(result["counts"]), np.array(result["probs"])
    for row in range(8):   # 40 steps x 50 draws per query, over the union of both shards
        expected = probs[row] * counts[row].sum()
        big = expected >= 5
        observed = np.append(counts[row][big], counts[row][~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
        keep = expected > 0
        assert scipy.stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


# ------------------------------------------------------------------ training


class MultiHeadModel(tfnegcache.CachedRetrievalModel):
    """The toy corpus with a query tower of `heads` embeddings per user, `[B, heads, dim]`."""

    def __init__(self, heads=HEADS, dim=8, cache_size=128):
        super().__init__()
        import toy  # pylint: disable=import-outside-toplevel
        self.toy = toy
        tf.keras.utils.set_random_seed(0)
        self.query_tower = tf.keras.Sequential([
            tf.keras.layers.Embedding(toy.NUM_USERS, heads * dim),
            tf.keras.layers.Reshape([heads, dim])])
        self.candidate_tower = toy.CandidateTower(dim)
        cache = tfnegcache.NegativeCache(cache_size, toy.FEATURE_SPEC, dim, seed=0)
        items = tf.data.Dataset.from_tensor_slices(
            {k: tf.constant(v) for k, v in toy.item_table().items()})
        self.task = tfnegcache.CacheRetrieval(
            metrics=tfrs.metrics.FactorizedTopK(items.batch(64).map(self.candidate_tower)),
            batch_metrics=[tf.keras.metrics.AUC(from_logits=True, name="auc")],
            cache=cache, candidate_model=self.candidate_tower, num_negatives=2,
            temperature=0.5)

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        return self.task(self.query_tower(features["user_id"]), self.candidate_tower(candidates),
                         candidate_ids=features["item_id"], candidate_features=candidates)


def test_cached_model_with_a_multi_head_query_tower_trains():
    import toy  # pylint: disable=import-outside-toplevel
    model = MultiHeadModel()
    model.compile(tf.keras.optimizers.Adam(0.05))
    history = model.fit(toy.dataset(toy.interactions(64 * 6, seed=2), 64), epochs=2, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.isfinite(history.history["cache_staleness"]).all()
    assert history.history["cache_fill"][-1] == 1.0
    assert int(model.task.cache.num_filled.numpy()) == 128
    # Evaluation scores the cache too, and skips the factorized metrics (as TFRS).
    logs = model.evaluate(toy.dataset(toy.interactions(128, seed=3), 64), verbose=0,
                          return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 < logs["auc"] <= 1.0
    assert logs["factorized_top_k/top_100_categorical_accuracy"] == 0.0


# ------------------------------------------------------------------ input checks


def test_queries_of_the_wrong_rank_or_dimension_are_rejected():
    task, tower, cache = make_task()
    _, candidates, ids = multi_head_batch(tower, [1, 2])
    features = {"item_id": ids}
    for shape in ([2], [2, 1, HEADS, DIM]):
        with pytest.raises(ValueError, match=r"query_embeddings.*\[num_rows, 4\] or, multi-head, "
                           r"\[num_rows, num_heads, 4\]. Received shape " + re_shape(shape)):
            task(tf.zeros(shape), candidates, candidate_ids=ids, candidate_features=features)
    with pytest.raises(ValueError, match=r"dimension 3, but the cache stores embeddings of "
                       r"dimension 4.*Received shape \(2, 3, 3\)"):
        task(tf.zeros([2, HEADS, 3]), candidates, candidate_ids=ids, candidate_features=features)
    with pytest.raises(ValueError, match=r"Received shape \(2, 3, 3\)"):
        cache.sample(tf.zeros([2, HEADS, 3]))
    with pytest.raises(ValueError, match=r"Received shape \(2, 1, 3, 4\)"):
        cache.draw(tf.zeros([2, 1, HEADS, DIM]), 1)
    with pytest.raises(ValueError, match=r"floating point"):
        cache.sample(tf.zeros([2, HEADS, DIM], tf.int32))


def re_shape(shape):
    return r"\(" + ", ".join(map(str, shape)) + (r",\)" if len(shape) == 1 else r"\)")


if __name__ == "__main__":
    _sharded_scenario(sys.argv[1])
