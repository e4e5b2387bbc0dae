"""The samplers draw from softmax over eligible slots; chunked statistics match a dense reference."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from tfnegcache import sampling, scoring


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def chi_square_p(draws, probabilities):
    """p-value of the draws (ints) against `probabilities`, over the support only."""
    support = probabilities > 0
    counts = np.bincount(draws, minlength=len(probabilities))
    assert counts[~support].sum() == 0, "drew an index of probability zero"
    expected = probabilities[support] * len(draws)
    return scipy.stats.chisquare(counts[support], expected).pvalue


def test_gumbel_max_sample_follows_softmax_and_skips_masked():
    logits = np.array([[0.0, 1.0, -1.0, 2.0, -np.inf, 0.5],
                       [3.0, -np.inf, 0.0, 0.0, 1.0, -2.0]], np.float32)
    draws = sampling.gumbel_max_sample(tf.constant(logits), 20000, tf.constant([7, 1])).numpy()
    for row in range(2):
        assert chi_square_p(draws[row], softmax(logits[row])) > 1e-3


def test_chi_square_has_power_against_a_wrong_temperature():
    # The check above can fail: draws at temperature 0.5 are rejected against T=1.
    logits = np.array([[0.0, 1.0, -1.0, 2.0, 0.5]], np.float32)
    draws = sampling.gumbel_max_sample(tf.constant(logits * 2), 20000, tf.constant([3, 3]))
    assert chi_square_p(draws.numpy()[0], softmax(logits[0])) < 1e-6


def _cache_problem(num_queries=3, num_slots=50, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    embeddings = rng.normal(size=(num_slots, dim)).astype(np.float32)
    bias = np.zeros(num_slots, np.float32)
    bias[[3, 17, 49]] = -np.inf          # masked for everyone (empty or in-batch)
    bias[40:] = -np.inf                   # an empty tail
    excluded = np.array([5, -1, 0][:num_queries], np.int32)  # per-query accidental hits
    return queries, embeddings, bias, excluded


def _reference_logits(queries, embeddings, bias, excluded, inv_temperature):
    logits = queries @ embeddings.T * inv_temperature + bias[None, :]
    for row, slot in enumerate(excluded):
        if slot >= 0:
            logits[row, slot] = -np.inf
    return logits


@pytest.mark.parametrize("block_size,tile_elements", [(8, 2**22), (8, 48), (1, 30), (50, 2**22), (7, 60)])
def test_sample_cache_log_mass_matches_dense_reference(block_size, tile_elements):
    queries, embeddings, bias, excluded = _cache_problem()
    plan = sampling.plan_sampler(50, 4, 3, block_size=block_size, tile_elements=tile_elements)
    draw = sampling.sample_cache(tf.constant(queries), tf.constant(embeddings), tf.constant(bias),
                                 0.5, 1, None, tf.constant(excluded), plan=plan)
    reference = _reference_logits(queries, embeddings, bias, excluded, 0.5)
    expected = scipy.special.logsumexp(reference, axis=1)
    np.testing.assert_allclose(draw.log_mass.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert draw.slots is None


@pytest.mark.parametrize("block_size,tile_elements", [(8, 48), (16, 2**22), (1, 30)])
def test_sample_cache_draws_follow_masked_softmax(block_size, tile_elements):
    queries, embeddings, bias, excluded = _cache_problem()
    plan = sampling.plan_sampler(50, 4, 3, block_size=block_size, tile_elements=tile_elements)
    assert plan.num_chunks > 1 or tile_elements > 1000
    draw = sampling.sample_cache(tf.constant(queries), tf.constant(embeddings), tf.constant(bias),
                                 0.5, 20000, tf.constant([11, 5]), tf.constant(excluded), plan=plan)
    reference = _reference_logits(queries, embeddings, bias, excluded, 0.5)
    slots = draw.slots.numpy()
    for row in range(3):
        assert chi_square_p(slots[row], softmax(reference[row])) > 1e-3
    # The winning perturbed score of a Gumbel-Max draw is Gumbel(log-mass): mean M + 0.5772.
    gamma = 0.5772156649
    np.testing.assert_allclose(draw.perturbed.numpy().mean(1), draw.log_mass.numpy() + gamma,
                               atol=0.05)


def test_sample_cache_reduced_precision_storage_scores_in_float32():
    queries, embeddings, bias, excluded = _cache_problem()
    half = tf.constant(embeddings, tf.bfloat16)
    draw = sampling.sample_cache(tf.constant(queries), half, tf.constant(bias), 1.0, 3,
                                 tf.constant([1, 2]), tf.constant(excluded))
    reference = _reference_logits(queries, tf.cast(half, tf.float32).numpy(), bias, excluded, 1.0)
    np.testing.assert_allclose(draw.log_mass.numpy(), scipy.special.logsumexp(reference, 1),
                               rtol=1e-6)
    assert draw.log_mass.dtype == tf.float32


def test_sample_cache_empty_cache_has_no_mass():
    draw = sampling.sample_cache(tf.ones([2, 3]), tf.zeros([10, 3]), tf.fill([10], -np.inf),
                                 1.0, 2, tf.constant([0, 0]))
    assert np.all(np.isneginf(draw.log_mass.numpy()))
    assert draw.slots.shape == (2, 2)


@pytest.mark.parametrize("num_slots,dim,expected_block", [(2**20, 64, 128), (2**14, 64, 16), (100, 3, 4), (1, 8, 1)])
def test_plan_sampler_balances_stages_and_bounds_tiles(num_slots, dim, expected_block):
    plan = sampling.plan_sampler(num_slots, dim, 256)
    assert plan.block_size == expected_block
    assert plan.num_blocks * plan.block_size >= num_slots
    assert 256 * plan.chunk_size <= max(scoring.DEFAULT_TILE_ELEMENTS, 256 * plan.block_size)
    assert plan.num_chunks * plan.chunk_size >= num_slots


def test_plan_sampler_rejects_empty_cache():
    with pytest.raises(ValueError, match="num_slots"):
        sampling.plan_sampler(0, 4, 2)


@pytest.mark.parametrize("num_slots", [2**14, 3 * 4096 + 100])
def test_default_plan_with_several_chunks_matches_dense_reference(num_slots):
    # The plan of a training step (B=256) with the default tile size: several chunks, evenly
    # cut (2^14, sliced chunks) or with a ragged, padded last chunk.
    dim, rng = 4, np.random.default_rng(3)
    plan = sampling.plan_sampler(num_slots, dim, 256)
    assert plan.num_chunks >= 3
    queries = (3.0 * rng.normal(size=(4, dim))).astype(np.float32)  # peaked: few heavy slots
    embeddings = rng.normal(size=(num_slots, dim)).astype(np.float32)
    bias = np.zeros(num_slots, np.float32)
    bias[rng.choice(num_slots, 500, replace=False)] = -np.inf
    bias[-50:] = -np.inf
    excluded = np.array([int(np.argmax(queries[0] @ embeddings.T)), -1, 7, num_slots - 60],
                        np.int32)
    draw = sampling.sample_cache(tf.constant(queries), tf.constant(embeddings),
                                 tf.constant(bias), 0.5, 20000, tf.constant([2, 4]),
                                 tf.constant(excluded), plan=plan)
    reference = _reference_logits(queries, embeddings, bias, excluded, 0.5)
    np.testing.assert_allclose(draw.log_mass.numpy(), scipy.special.logsumexp(reference, 1),
                               rtol=1e-5, atol=1e-5)
    slots = draw.slots.numpy()
    for row in range(4):
        probabilities = softmax(reference[row])
        counts = np.bincount(slots[row], minlength=num_slots)
        assert counts[probabilities == 0].sum() == 0
        expected = probabilities * slots.shape[1]
        small = expected < 5   # pool the tail so the chi-square approximation holds
        observed = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        keep = expected > 0
        assert scipy.stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3


# ---------------------------------------------------------------- the shifted tiles and bf16


def _several_chunks(scale, num_slots=1024, dim=8, num_queries=4, seed=5):
    """Queries aligned with their excluded slot (a cached positive) at a low temperature:
    every score is far below the positive's, the case where a shift taken from the positive
    would flush the rest of the row to zero."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(num_slots, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    excluded = np.array([3, 700, 1000, -1], np.int32)[:num_queries] % num_slots
    excluded[excluded == num_slots - 1] = -1
    queries = embeddings[np.maximum(excluded, 0)].copy()
    bias = np.zeros(num_slots, np.float32)
    bias[np.array([10, 500, 600]) % num_slots] = -np.inf
    bias[-20:] = -np.inf
    return queries, embeddings, bias, excluded, scale


# Four chunks of 256 slots, blocks of 16: the plan of the shifted-tile tests below.
FOUR_CHUNKS = sampling.plan_sampler(1024, 8, 4, block_size=16, tile_elements=4 * 256)


def _block_reference(queries, embeddings, bias, excluded, inv_temperature, plan=FOUR_CHUNKS):
    """`(reference logits [B, N], their per-block log-masses [B, num_blocks])`."""
    reference = _reference_logits(queries, embeddings, bias, excluded, inv_temperature)
    blocks = reference.reshape(len(queries), plan.num_blocks, plan.block_size)
    return reference, scipy.special.logsumexp(blocks, axis=2)


def _masses(queries, embeddings, bias, excluded, inv_temperature, plan, fallback=None,
            scoring_dtype=None):
    """The block log-masses; `fallback` (a list) receives whether exact tiles were used."""
    args = (tf.constant(queries), tf.constant(embeddings), tf.constant(bias),
            tf.constant(excluded), inv_temperature, plan, scoring_dtype)
    if fallback is not None:
        _, trouble, _ = scoring.tiled_block_log_masses(*args)
        fallback.append(trouble)
    return scoring.block_log_masses(*args)


@pytest.mark.parametrize("inv_temperature", [1.0, 20.0, 150.0])
def test_shifted_tiles_match_the_dense_reference_without_falling_back(inv_temperature):
    # At 1/T = 150 the positive scores 150 and the rest of its row at most ~100 less: an exact
    # log-mass needs the shift from the rest of the row, not from the excluded positive.
    queries, embeddings, bias, excluded, _ = _several_chunks(inv_temperature)
    plan = FOUR_CHUNKS
    assert plan.num_chunks == 4
    fallback = []
    masses = _masses(queries, embeddings, bias, excluded, inv_temperature, plan, fallback)
    assert not bool(fallback[0])
    reference, expected = _block_reference(queries, embeddings, bias, excluded, inv_temperature)
    masses = masses.numpy()
    np.testing.assert_allclose(scipy.special.logsumexp(masses, 1),
                               scipy.special.logsumexp(reference, 1), rtol=1e-6)
    # Every block within 60 nats of its row's total is exact; a block further below (less
    # than e^-60 of the mass) may be flushed to -inf, nothing eligible ever gets mass.
    total = scipy.special.logsumexp(expected, 1, keepdims=True)
    near = expected > total - 60
    assert near.sum() > 10
    if inv_temperature > 100:   # the case in point: eligible blocks far below the best
        assert (~near & np.isfinite(expected)).any()
    np.testing.assert_allclose(masses[near], expected[near], rtol=2e-6, atol=2e-5)
    assert np.all(np.isneginf(masses[np.isneginf(expected)]))
    assert np.all(masses[~near] <= (total - 60 + 1e-3).repeat(plan.num_blocks, 1)[~near])


def test_a_later_score_far_above_the_first_chunk_falls_back_to_exact_tiles():
    queries, embeddings, bias, excluded, _ = _several_chunks(1.0)
    embeddings[900] = 300.0 * queries[1]   # 300 nats above anything in the first chunk
    plan = FOUR_CHUNKS
    fallback = []
    masses = _masses(queries, embeddings, bias, excluded, 1.0, plan, fallback)
    assert bool(fallback[0])
    reference, expected = _block_reference(queries, embeddings, bias, excluded, 1.0)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(masses.numpy()[finite], expected[finite], rtol=2e-6, atol=2e-5)


def test_a_first_chunk_with_nothing_eligible_falls_back_to_exact_tiles():
    queries, embeddings, bias, excluded, _ = _several_chunks(1.0)
    bias[:256] = -np.inf                   # the whole first chunk is masked
    plan = FOUR_CHUNKS
    fallback = []
    masses = _masses(queries, embeddings, bias, excluded, 1.0, plan, fallback)
    assert bool(fallback[0])
    reference, expected = _block_reference(queries, embeddings, bias, excluded, 1.0)
    np.testing.assert_array_equal(np.isfinite(masses.numpy()), np.isfinite(expected))


def _rounded_logits(queries, embeddings, bias, excluded, inv_temperature, dtype):
    """The scores `scoring_dtype` promises: rounded queries and embeddings, their product
    rounded by the platform's matmul in that dtype (oneDNN on some CPUs truncates where a
    cast rounds to nearest)."""
    q = tf.cast(tf.constant(queries * inv_temperature), dtype)
    e = tf.cast(tf.constant(embeddings), dtype)
    scores = tf.cast(tf.matmul(q, e, transpose_b=True), tf.float32).numpy()
    return _reference_logits(scores, np.eye(scores.shape[1], dtype=np.float32), bias,
                             excluded, 1.0)


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_reduced_precision_scoring_draws_follow_the_softmax_of_the_rounded_scores(dtype):
    queries, embeddings, bias, excluded, _ = _several_chunks(4.0, num_slots=256, num_queries=3)
    queries = queries + 0.3 * np.random.default_rng(1).normal(size=queries.shape)
    queries = queries.astype(np.float32)
    plan = sampling.plan_sampler(256, 8, 3, block_size=16, tile_elements=3 * 64)
    assert plan.num_chunks == 4
    num_draws = 20000
    draw = sampling.sample_cache(tf.constant(queries), tf.constant(embeddings),
                                 tf.constant(bias), 4.0, num_draws, tf.constant([4, 2]),
                                 tf.constant(excluded), plan=plan, scoring_dtype=dtype)
    rounded = _rounded_logits(queries, embeddings, bias, excluded, 4.0, dtype)
    exact = _reference_logits(queries, embeddings, bias, excluded, 4.0)
    # The tiles round with the matmul; the few blocks re-scored exactly (the excluded slot's)
    # with the batched matmul, which may round to nearest: the log-mass lies between the two.
    nearest = _reference_logits(tf.cast(tf.cast(
        tf.cast(tf.cast(queries * 4.0, dtype), tf.float32).numpy()
        @ tf.cast(tf.cast(embeddings, dtype), tf.float32).numpy().T, dtype), tf.float32).numpy(),
        np.eye(256, dtype=np.float32), bias, excluded, 1.0)
    bounds = np.sort([scipy.special.logsumexp(rounded, 1),
                      scipy.special.logsumexp(nearest, 1)], axis=0)
    mass = draw.log_mass.numpy()
    assert np.all(mass >= bounds[0] * (1 - 1e-5)) and np.all(mass <= bounds[1] * (1 + 1e-5))
    assert draw.log_mass.dtype == tf.float32
    slots, log_prob = draw.slots.numpy(), draw.log_prob.numpy()
    for row in range(3):
        # Each draw reports the probability it drew its slot with (one value per slot) ...
        reported = np.full(256, np.nan)
        for slot, value in zip(slots[row], log_prob[row]):
            assert np.isnan(reported[slot]) or reported[slot] == pytest.approx(value, abs=1e-5)
            reported[slot] = value
        drawn = ~np.isnan(reported)
        p = np.exp(reported[drawn])
        assert 0.995 < p.sum() <= 1.0 + 1e-4        # the slots never drawn carry < 0.5%
        # ... the draws follow those probabilities ...
        counts = np.bincount(slots[row], minlength=256)[drawn]
        assert scipy.stats.chisquare(counts, num_draws * p / p.sum()).pvalue > 1e-3
        # ... and they are the softmax of the rounded scores, up to the kernels' rounding
        # (the within-block scores come from a batched matmul, which may round differently).
        target = softmax(rounded[row])[drawn]
        np.testing.assert_allclose(p, target, rtol=0.35)
    # The rounding is visible: the scores differ from the float32 ones.
    assert np.max(np.abs(rounded - exact)[np.isfinite(exact)]) > 1e-3


def test_a_masked_slot_far_above_the_rest_is_rescored_without_falling_back():
    # An in-batch candidate's cached copy (masked for everyone) scoring 300 nats above the
    # rest overflows its tile; its block is re-scored with the bias, so no fallback is needed.
    queries, embeddings, bias, excluded, _ = _several_chunks(1.0)
    embeddings[600] = 300.0 * queries[1]
    bias[600] = -np.inf
    plan = FOUR_CHUNKS
    fallback = []
    masses = _masses(queries, embeddings, bias, excluded, 1.0, plan, fallback)
    assert not bool(fallback[0])
    reference, expected = _block_reference(queries, embeddings, bias, excluded, 1.0)
    np.testing.assert_array_equal(np.isfinite(masses.numpy()), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(masses.numpy()[finite], expected[finite], rtol=2e-6, atol=2e-5)
