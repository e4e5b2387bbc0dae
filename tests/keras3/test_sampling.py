"""The Keras 3 sampler: the tiled log-mass against a dense reference and the TF front end, and
draws that follow the masked softmax (chi-square with fixed seeds, and a check that a wrong
distribution is rejected)."""

import numpy as np
import pytest
import scipy.special
import scipy.stats
from keras import ops

import cases
import k3help
from tfnegcache.keras3 import _backend, sampling
from tfnegcache._plan import plan_sampler


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def chi_square_p(draws, probabilities):
    """p-value of the draws (ints) against `probabilities`, tail pooled below 5 expected."""
    counts = np.bincount(draws, minlength=len(probabilities))
    assert counts[probabilities == 0].sum() == 0, "drew an index of probability zero"
    expected = probabilities * len(draws)
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return scipy.stats.chisquare(observed[keep], expected[keep]).pvalue


def _problem(num_queries=3, num_slots=50, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    embeddings = rng.normal(size=(num_slots + 1, dim)).astype(np.float32)   # + the spare row
    embeddings[-1] = 1e6                                                     # never read
    bias = np.zeros(num_slots, np.float32)
    bias[[3, 17, 49]] = -np.inf
    bias[40:] = -np.inf
    excluded = np.array([5, -1, 0][:num_queries], np.int32)
    return queries, embeddings, bias, excluded


def _reference(queries, embeddings, bias, excluded, inv_temperature):
    logits = queries @ embeddings[:len(bias)].T * inv_temperature + bias[None, :]
    for row, slot in enumerate(excluded):
        if slot >= 0:
            logits[row, slot] = -np.inf
    return logits


def _sample(queries, embeddings, bias, excluded, inv_temperature, k, seed, plan):
    """The sampler compiled as one function (as in a training step)."""
    def run(queries, embeddings, bias, excluded):
        key = _backend.fold_in(_backend.key(seed, 1), 0) if k else None
        draw = sampling.sample_cache(queries, embeddings, bias, inv_temperature, k, key,
                                     excluded, plan=plan)
        return draw.log_mass, draw.slots, draw.log_prob
    log_mass, slots, log_prob = k3help.compiled(run)(
        *(ops.convert_to_tensor(x) for x in (queries, embeddings, bias, excluded)))
    return sampling.SlotDraw(log_mass, slots, log_prob)


# (block size, tile elements): one chunk; several chunks; blocks of 1; a ragged last chunk.
PLANS = [(8, 2**22), (8, 48), (1, 30), (7, 60)]


@pytest.mark.parametrize("block_size,tile_elements", PLANS)
def test_log_mass_matches_the_dense_reference(block_size, tile_elements):
    queries, embeddings, bias, excluded = _problem()
    plan = plan_sampler(50, 4, 3, block_size=block_size, tile_elements=tile_elements)
    draw = _sample(queries, embeddings, bias, excluded, 0.5, 0, 0, plan)
    expected = scipy.special.logsumexp(_reference(queries, embeddings, bias, excluded, 0.5), 1)
    np.testing.assert_allclose(k3help.numpy(draw.log_mass), expected, rtol=1e-6, atol=1e-6)
    assert draw.slots is None


def test_log_mass_agrees_with_the_tf_front_end(tf_reference):
    case = cases.log_mass_case()
    for block_size in (None, 4):
        cache = k3help.cache(case["size"], block_size=block_size)
        cache.insert({"item_id": case["ids"]}, case["embeddings"], case["ids"])
        mass = cache.log_mass(case["queries"], case["temperature"], case["masked"],
                              case["excluded"])
        np.testing.assert_allclose(k3help.numpy(mass), tf_reference["log_mass"][str(block_size)],
                                   rtol=1e-6)


@pytest.mark.parametrize("block_size,tile_elements", [(8, 48), (1, 30), (7, 60)])
def test_draws_follow_the_masked_softmax_and_report_their_probability(block_size,
                                                                      tile_elements):
    queries, embeddings, bias, excluded = _problem()
    plan = plan_sampler(50, 4, 3, block_size=block_size, tile_elements=tile_elements)
    assert plan.num_chunks > 1
    draw = _sample(queries, embeddings, bias, excluded, 0.5, 20000, 11, plan)
    reference = _reference(queries, embeddings, bias, excluded, 0.5)
    slots, log_prob = k3help.numpy(draw.slots), k3help.numpy(draw.log_prob)
    for row in range(3):
        probabilities = softmax(reference[row])
        assert chi_square_p(slots[row], probabilities) > 1e-3
        # Each draw's reported log-probability is its slot's, under the same softmax.
        np.testing.assert_allclose(np.exp(log_prob[row]), probabilities[slots[row]],
                                   rtol=1e-4)


def test_the_chi_square_check_rejects_a_wrong_temperature():
    # The check above can fail: draws at 1/T = 1.0 are rejected against the softmax at 0.5.
    queries, embeddings, bias, excluded = _problem()
    plan = plan_sampler(50, 4, 3, block_size=8, tile_elements=48)
    draw = _sample(queries, embeddings, bias, excluded, 1.0, 20000, 11, plan)
    reference = _reference(queries, embeddings, bias, excluded, 0.5)
    slots = k3help.numpy(draw.slots)
    assert max(chi_square_p(slots[row], softmax(reference[row])) for row in range(3)) < 1e-6


def test_gumbel_max_sample_follows_the_softmax_and_skips_masked():
    logits = np.array([[0.0, 1.0, -1.0, 2.0, -np.inf, 0.5],
                       [3.0, -np.inf, 0.0, 0.0, 1.0, -2.0]], np.float32)
    draws = k3help.numpy(sampling.gumbel_max_sample(ops.convert_to_tensor(logits), 20000,
                                                   _backend.key(7, 1)))
    for row in range(2):
        assert chi_square_p(draws[row], softmax(logits[row])) > 1e-3
    wrong = softmax(2 * logits[0])
    assert chi_square_p(draws[0], wrong) < 1e-6


def test_a_query_with_nothing_eligible_has_no_mass():
    draw = _sample(np.ones([2, 3], np.float32), np.zeros([11, 3], np.float32),
                   np.full([10], -np.inf, np.float32), np.array([0, 0], np.int32), 1.0, 2, 0,
                   None)
    assert np.all(np.isneginf(k3help.numpy(draw.log_mass)))
    assert k3help.numpy(draw.slots).shape == (2, 2)
    np.testing.assert_array_equal(k3help.numpy(draw.log_prob), 0.0)


def test_uniform_draws_cover_the_filled_slots_evenly_and_mark_ineligible_ones():
    cache = k3help.cache(16)
    ids = np.arange(10, dtype=np.int32) * 2
    cache.insert({"item_id": ids}, np.ones([10, 4], np.float32), ids)
    drawn = cache.draw_uniform(2, 6000, masked_ids=np.array([4], np.int32),
                               excluded_ids=np.array([0, 8], np.int32),
                               key=_backend.key(3, 2))
    slots = k3help.numpy(drawn.slots).reshape(2, -1)
    valid = k3help.numpy(drawn.valid)
    assert slots.max() < 10                                   # filled slots only
    for row in range(2):
        assert chi_square_p(slots[row], np.full(10, 0.1)) > 1e-3
    masked_slot, excluded = 2, [0, 4]                         # id 4 at slot 2; ids 0 and 8
    for row in range(2):
        expected = (slots[row] != masked_slot) & (slots[row] != excluded[row])
        np.testing.assert_array_equal(valid[row], expected)
    np.testing.assert_allclose(k3help.numpy(drawn.log_prob), -np.log(10), rtol=1e-6)
