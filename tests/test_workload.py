"""The negatives-matter workload: generator invariants and a smoke run of its experiment.

`python -m benchmarks.choose_workload --quick` runs in a subprocess (forked from the suite's
server that has imported TensorFlow, `tests/forkserver.py`: a few seconds); the rest are fast
numpy checks.
"""

import json

import numpy as np
import pytest

from benchmarks import choose_workload
from benchmarks import workload as W

SMALL = dict(num_coarse=4, fine_per_coarse=4, fine_size=8, latent_dim=8)


def test_generator_is_deterministic_for_a_seed():
    a, b, c = W.make_workload(seed=3, **SMALL), W.make_workload(seed=3, **SMALL), \
        W.make_workload(seed=4, **SMALL)
    assert a.num_items == 4 * 4 * 8
    for field in ("features", "fine_cluster", "coarse_cluster", "popularity"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.features, c.features)
    qa, qb = a.queries(300, "train"), b.queries(300, "train")
    for key in qa:
        np.testing.assert_array_equal(qa[key], qb[key])


def test_queries_do_not_depend_on_the_slice_and_splits_differ():
    w = W.make_workload(seed=0, **SMALL)
    whole = w.queries(700, "train")
    part = w.queries(301, "train", start=250)
    for key in whole:
        np.testing.assert_array_equal(part[key], whole[key][250:551])
    assert not np.array_equal(w.queries(50, "test")["query"], whole["query"][:50])


def test_clusters_are_equal_sized_and_nested():
    w = W.make_workload(seed=1, **SMALL)
    assert np.all(np.bincount(w.fine_cluster) == 8)
    assert np.array_equal(w.coarse_cluster, w.fine_cluster // 4)
    assert abs(w.popularity.sum() - 1.0) < 1e-12 and np.all(w.popularity > 0)


@pytest.mark.parametrize("method", ["inbatch+logq", "mns+logq"])
def test_logq_probabilities_sum_to_one(method):
    w = W.make_workload(seed=0, **SMALL)
    q = W.sampling_probability(w, method, batch=32, mns_negatives=16)
    assert q.shape == (w.num_items,) and np.all(q > 0)
    assert abs(q.sum() - 1.0) < 1e-12
    if method == "mns+logq":  # the mixture: 2/3 popularity, 1/3 uniform
        np.testing.assert_allclose(q, (2 * w.popularity + 1.0 / w.num_items) / 3)
    assert W.sampling_probability(w, "inbatch", 32) is None
    assert W.sampling_probability(w, "full", 32) is None


def test_oracle_ranks_the_positive_first_without_noise():
    w = W.make_workload(seed=0, query_noise=1e-3, popularity_exponent=0.0, **SMALL)
    test = w.queries(50, "test")
    assert W.oracle_recall(w, test, ks=(1,))["recall@1"] == 1.0


def test_plateau_reads_the_trend_not_the_noise():
    flat = [{"steps": s, "recall@10": r} for s, r in
            [(100, 0.5), (200, 0.7), (300, 0.8), (400, 0.81), (500, 0.79), (600, 0.80),
             (700, 0.81), (800, 0.79)]]
    p = W.plateau(flat)
    assert p["plateaued"] and p["plateau_step"] == 300
    assert abs(p["plateau_level"] - 0.80) < 1e-9
    rising = [{"steps": s, "recall@10": s / 1000} for s in (100, 200, 300, 400)]
    p = W.plateau(rising)
    assert not p["plateaued"] and abs(p["gain_last_quarter"] - 0.1) < 1e-9


def test_same_order_allows_only_tied_swaps():
    assert choose_workload.same_order(["a", "b", "c"], ["b", "a", "c"], [["a", "b"]])
    assert not choose_workload.same_order(["a", "b", "c"], ["b", "a", "c"], [])


@pytest.mark.slow
def test_quick_run_writes_a_sane_json(tmp_path, run_benchmark):
    proc = run_benchmark("choose_workload", "--quick", results=tmp_path)
    assert "wrote" in proc.stdout
    with open(tmp_path / "quick.json", encoding="utf-8") as f:
        result = json.load(f)
    steps = result["config"]["steps"]
    assert set(result["summary"]) == set(W.METHODS)
    for method, entry in result["summary"].items():
        assert entry["steps"] == steps
        for key in ("recall@10", "recall@100"):
            assert 0.0 <= entry[key]["mean"] <= 1.0
        assert entry["recall@10"]["mean"] <= entry["recall@100"]["mean"]
        assert entry["ms_per_step"] > 0
    (seed,) = result["per_seed"]
    for row in seed["rows"]:
        assert row["at_equal_steps"]["steps"] == steps
        assert [p["steps"] for p in row["curve"]] == sorted(p["steps"] for p in row["curve"])
        assert row["curve"][-1]["steps"] == row["steps"]
        if row["method"] == "full":
            assert row["steps"] == steps
        else:
            assert row["steps"] == result["config"]["baseline_steps"]
            assert set(row["plateau"]) == {"gain_last_quarter", "raw_gain_last_quarter",
                                           "plateaued", "plateau_level", "plateau_step"}
    # The removed fraction is what the misses say it is.
    comp = seed["comparison"]
    misses = comp["misses_at_equal_steps"]
    best = min(choose_workload.BASELINES, key=lambda m: misses[m])
    assert comp["best_baseline"] == best
    assert abs(comp["removed_at_equal_steps"] - (1 - misses["full"] / misses[best])) < 1e-12
    assert 0.0 <= seed["oracle"]["recall@10"] <= seed["oracle"]["recall@100"] <= 1.0
    assert result["wide"]["hidden"] == 2 * result["config"]["hidden"]
    assert sorted(result["wide"]["order_wide"]) == sorted(W.METHODS)
    assert set(result["criterion"]) >= {"1_negatives_matter", "2_baselines_plateaued",
                                        "3_full_recall@100_below_0.99", "3_wide_same_order",
                                        "4_num_items_at_least_2^16", "pass"}
    assert result["num_items"] == 128 and result["criterion"]["4_num_items_at_least_2^16"] is False
