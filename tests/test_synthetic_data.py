"""Tests of the planted-structure synthetic corpus (`benchmarks.synthetic`)."""

import time

import numpy as np
import pytest
from scipy import stats

import tfnegcache  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import tensorflow as tf
from benchmarks import synthetic
from benchmarks.synthetic import make_corpus, token_overlap

QUERY_KEYS = ("query_tokens", "candidate_id", "candidate_tokens", "sampling_probability")


@pytest.fixture(scope="module")
def corpus():
    """2^14 candidates with the default 32 x 8 = 256 fine clusters of 64."""
    return make_corpus(num_candidates=2**14, seed=3)


@pytest.fixture(scope="module")
def small():
    """2^10 candidates in 8 x 4 fine clusters of 32: enough draws per candidate for chi-square."""
    return make_corpus(num_candidates=2**10, num_coarse=8, fine_per_coarse=4, seed=5)


def assert_same_queries(a, b):
    assert set(a) == set(b) == set(QUERY_KEYS)
    for key in QUERY_KEYS:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shapes_dtypes_and_ids(corpus):
    n, t = corpus.num_candidates, corpus.tokens_per_candidate
    assert corpus.candidate_ids.shape == (n,) and corpus.candidate_ids.dtype == np.int64
    np.testing.assert_array_equal(corpus.candidate_ids, np.arange(n))
    assert corpus.candidate_tokens.shape == (n, t) and corpus.candidate_tokens.dtype == np.int32
    assert corpus.candidate_tokens.min() >= 1 and corpus.candidate_tokens.max() < corpus.vocab_size
    assert corpus.fine_cluster.shape == corpus.coarse_cluster.shape == (n,)
    assert corpus.popularity.shape == (n,) and corpus.popularity.dtype == np.float64
    np.testing.assert_allclose(corpus.popularity.sum(), 1.0)

    q = corpus.queries(100)
    assert q["query_tokens"].shape == (100, corpus.query_tokens)
    assert q["query_tokens"].dtype == np.int32
    assert q["candidate_id"].shape == (100,) and q["candidate_id"].dtype == np.int64
    assert q["candidate_tokens"].shape == (100, t) and q["candidate_tokens"].dtype == np.int32
    assert q["sampling_probability"].dtype == np.float32
    assert q["query_tokens"].min() >= 1 and q["query_tokens"].max() < corpus.vocab_size
    np.testing.assert_array_equal(q["candidate_tokens"], corpus.candidate_tokens[q["candidate_id"]])
    np.testing.assert_array_equal(
        q["sampling_probability"], corpus.popularity[q["candidate_id"]].astype(np.float32)
    )


def test_deterministic_per_seed():
    a, b, c = (make_corpus(2**12, seed=s) for s in (7, 7, 8))
    for field in ("candidate_tokens", "fine_cluster", "coarse_cluster", "popularity"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert not np.array_equal(getattr(a, field), getattr(c, field)), field
    for split in synthetic.SPLITS:
        assert_same_queries(a.queries(500, split), b.queries(500, split))
        other_seed = c.queries(500, split)["query_tokens"]
        assert not np.array_equal(a.queries(500, split)["query_tokens"], other_seed)
    train, test = a.queries(500, "train"), a.queries(500, "test")
    assert not np.array_equal(train["query_tokens"], test["query_tokens"])
    assert np.mean(train["candidate_id"] == test["candidate_id"]) < 0.05


def test_query_depends_only_on_its_index(corpus):
    full = corpus.queries(100, "test")
    part = corpus.queries(50, "test", start=30)
    assert_same_queries(part, {key: value[30:80] for key, value in full.items()})


def test_fine_clusters_nest_in_coarse_and_share_cluster_tokens(corpus):
    num_fine = corpus.num_coarse * corpus.fine_per_coarse
    k = corpus.cluster_tokens
    sizes = np.bincount(corpus.fine_cluster, minlength=num_fine)
    np.testing.assert_array_equal(sizes, corpus.num_candidates // num_fine)
    # Every fine cluster has exactly one coarse cluster.
    pairs = np.unique(np.stack([corpus.fine_cluster, corpus.coarse_cluster], axis=1), axis=0)
    np.testing.assert_array_equal(pairs[:, 0], np.arange(num_fine))
    assert len(np.unique(pairs[:, 1])) == corpus.num_coarse

    tokens = corpus.candidate_tokens
    for level, cluster, count in [
        (slice(0, k), corpus.coarse_cluster, corpus.num_coarse),
        (slice(k, 2 * k), corpus.fine_cluster, num_fine),
    ]:
        cluster_tokens = tokens[:, level]
        # One token set per cluster, shared by all its members, disjoint between clusters.
        _, first_member = np.unique(cluster, return_index=True)
        assert len(first_member) == count
        np.testing.assert_array_equal(cluster_tokens, cluster_tokens[first_member][cluster])
        assert len(np.unique(cluster_tokens)) == count * k
    low, high = corpus.item_token_range
    assert tokens[:, 2 * k :].min() >= low and tokens[:, 2 * k :].max() < high
    assert tokens[:, : 2 * k].max() < low


def test_query_composition(corpus):
    q = corpus.queries(1000)
    k = corpus.cluster_tokens
    for query, positive in zip(q["query_tokens"], q["candidate_tokens"]):
        assert np.isin(query, positive[:k]).sum() == corpus.query_cluster_tokens
        assert np.isin(query, positive[k : 2 * k]).sum() == corpus.query_cluster_tokens
        # Noise tokens may hit an item token of the positive by chance, never fewer than the quota.
        assert np.isin(query, positive[2 * k :]).sum() >= corpus.query_item_tokens


def test_positive_frequency_follows_popularity(small):
    num_queries = 200_000
    counts = np.bincount(small.queries(num_queries)["candidate_id"], minlength=small.num_candidates)
    expected = small.popularity * num_queries
    assert expected.min() > 5  # chi-square is valid
    _, p_value = stats.chisquare(counts, expected)
    assert p_value > 1e-3
    assert np.corrcoef(counts, expected)[0, 1] > 0.99
    # The skew is real: the head candidate is drawn far more often than the tail.
    assert counts.max() > 50 * counts.min()


def test_in_batch_negatives_rarely_share_the_fine_cluster(corpus):
    batch_size, num_batches = 256, 32
    ids = corpus.queries(batch_size * num_batches)["candidate_id"].reshape(num_batches, batch_size)
    fine = corpus.fine_cluster[ids]
    off_diagonal = ~np.eye(batch_size, dtype=bool)
    same_fine = (fine[:, :, None] == fine[:, None, :])[:, off_diagonal]
    same_item = (ids[:, :, None] == ids[:, None, :])[:, off_diagonal]
    same_fine_rate, same_item_rate = same_fine.mean(), same_item.mean()
    print(f"in-batch pairs: same fine cluster {same_fine_rate:.4f}, same item {same_item_rate:.4f}")
    assert same_fine_rate < 0.02
    # A popularity-drawn negative lands in the positive's fine cluster with probability
    # sum_f P(f)^2 (same item included); the measured rate must match it.
    mass = np.bincount(corpus.fine_cluster, weights=corpus.popularity)
    np.testing.assert_allclose(same_fine_rate, np.sum(mass**2), rtol=0.25)


def test_oracle_finds_the_positive_inside_its_fine_cluster(corpus):
    q = corpus.queries(500, "test")
    members = np.argsort(corpus.fine_cluster, kind="stable").reshape(
        corpus.num_coarse * corpus.fine_per_coarse, -1
    )
    first = []
    for query, positive in zip(q["query_tokens"], q["candidate_id"]):
        cluster = members[corpus.fine_cluster[positive]]
        scores = token_overlap(query, corpus.candidate_tokens[cluster])
        others = scores[cluster != positive]
        first.append(scores[cluster == positive][0] > others.max())
        # Cluster tokens alone cannot tell the members apart: every member matches them.
        assert others.min() >= 2 * corpus.query_cluster_tokens
    rate = np.mean(first)
    print(f"oracle ranks the positive strictly first in its fine cluster: {rate:.3f}")
    assert rate > 0.95


def test_queries_dataset_streams_queries_in_order(corpus):
    num_queries = 1000
    dataset = corpus.queries_dataset(num_queries, "test", chunk_size=300)
    assert dataset.element_spec["query_tokens"].shape == (corpus.query_tokens,)
    streamed = next(iter(dataset.batch(num_queries)))
    streamed = {key: value.numpy() for key, value in streamed.items()}
    assert_same_queries(streamed, corpus.queries(num_queries, "test"))


def test_candidates_dataset_streams_the_table(corpus):
    dataset = corpus.candidates_dataset(chunk_size=5000)
    streamed = next(iter(dataset.batch(corpus.num_candidates)))
    np.testing.assert_array_equal(streamed["candidate_id"].numpy(), corpus.candidate_ids)
    np.testing.assert_array_equal(streamed["candidate_tokens"].numpy(), corpus.candidate_tokens)
    assert streamed["candidate_tokens"].dtype == tf.int32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_candidates": 1000}, "num_candidates=1000 must be divisible"),
        ({"num_coarse": -1}, "num_coarse must be positive, got -1"),
        ({"popularity_exponent": -0.5}, "popularity_exponent must be >= 0, got -0.5"),
        ({"query_tokens": 8}, "query_tokens=8 must be >= "),
        ({"tokens_per_candidate": 12}, "tokens_per_candidate=12 leaves 4 item tokens"),
        ({"vocab_size": 1000}, "vocab_size=1000 leaves"),
        ({"query_cluster_tokens": 5}, "query_cluster_tokens=5 must be <= cluster_tokens=4"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_make_corpus_rejects_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_corpus(**{"num_candidates": 2**10, **kwargs})


def test_bad_query_arguments(small):
    with pytest.raises(ValueError, match="split must be one of"):
        small.queries(10, split="valid")
    with pytest.raises(ValueError, match="split must be one of"):
        small.queries_dataset(10, split="valid")
    with pytest.raises(ValueError, match="num_queries must be >= 0, got -1"):
        small.queries(-1)
    with pytest.raises(ValueError, match="start must be >= 0, got -2"):
        small.queries(1, start=-2)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        small.queries_dataset(10, chunk_size=0)


def test_generation_at_two_to_the_21():
    start = time.perf_counter()
    corpus = make_corpus(num_candidates=2**21, seed=1)
    elapsed = time.perf_counter() - start
    print(f"make_corpus(2**21): {elapsed:.2f} s")
    assert elapsed < 30
    assert corpus.candidate_tokens.shape == (2**21, 32)
    assert corpus.queries(4096)["query_tokens"].shape == (4096, 16)
