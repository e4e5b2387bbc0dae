"""The tower-cost map (`benchmarks.rho_map`): its arithmetic, an exact resume, and the
`--quick` smoke run (a timing pass, a method of each kind, the report; about a minute)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from benchmarks import rho_map


def test_removed_misses_and_crossover():
    assert rho_map.removed(0.9, 0.8) == pytest.approx(0.5)
    assert rho_map.removed(0.8, 0.8) == pytest.approx(0.0)
    assert rho_map.removed(0.7, 0.8) == pytest.approx(-0.5)
    # -0.2 at rho 1, +0.2 at rho 4: zero half-way in log rho, at rho 2.
    assert rho_map.crossover([(4.0, 0.2), (1.0, -0.2), (0.1, -0.5)]) == pytest.approx(2.0)
    assert rho_map.crossover([(1.0, -0.2), (4.0, -0.1)]) is None


def test_recall_is_interpolated_in_log_steps_and_never_extrapolated():
    curve = [{"steps": 100, "recall@10": 0.2}, {"steps": 400, "recall@10": 0.4}]
    assert rho_map.recall_at_steps(curve, 200) == pytest.approx(0.3)
    assert rho_map.recall_at_steps(curve, 100) == pytest.approx(0.2)
    assert rho_map.recall_at_steps(curve, 401) is None
    assert rho_map.recall_at_steps(curve, 99) is None


def test_step_marks_are_the_steps_done_at_each_fraction_of_the_budget():
    # 100 ms steps after a 2 s warm start, 10 s budget: 8 s of steps at T, 0.5 s at T/8
    # (the warm start is not done by T/16: one step, the first evaluation).
    assert rho_map.step_marks(10.0, 100.0, 2.0, 5) == [1, 5, 30, 80]
    assert rho_map.step_marks(16.0, 1000.0, 0.0, 3) == [4, 8, 16]


def _args(**overrides):
    args = rho_map.make_parser().parse_args(["--train", "--setting", "mlp"])
    args.log2_items, args.num_test, args.seconds, args.timing_steps = 10, 100, 2.0, 3
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        tmp_path, monkeypatch):
    monkeypatch.setattr(rho_map, "RESULTS", str(tmp_path))
    monkeypatch.setattr(rho_map, "CHECKPOINTS", str(tmp_path / "ckpt"))
    quiet = lambda *_: None  # noqa: E731
    rho_map.timing(_args(methods=["mns+logq", "cache-k1"]), log=quiet)
    # The same timing under a second tag: one run straight through, one stopped and resumed.
    shutil.copy(tmp_path / "timing_mlp_n10_b64.json", tmp_path / "timing_mlp_n10_b64_b.json")
    for method in ("mns+logq", "cache-k1"):
        straight = rho_map.train(_args(method=method, tag="_b"), log=quiet)
        first = rho_map.train(_args(method=method), log=quiet, stop_after_marks=2)
        assert len(first["curve"]) == 2 and not first["complete"]
        resumed = rho_map.train(_args(method=method), log=quiet)
        assert resumed["complete"] and straight["complete"]
        assert [p["steps"] for p in resumed["curve"]] == straight["marks"]
        for a, b in zip(resumed["curve"], straight["curve"]):
            assert (a["steps"], a["loss"], a["recall@10"], a["recall@100"]) == \
                (b["steps"], b["loss"], b["recall@10"], b["recall@100"]), method


# Every code path of the map's methods, half of them: each baseline loss (plain, logQ, MNS), a
# 4B batch and the cache (k = 4); the other four differ from these only in B or k.
QUICK_METHODS = ["inbatch", "inbatch+logq-4b", "mns+logq", "cache-k4"]


@pytest.mark.slow
def test_quick_map_times_trains_every_method_and_reports(tmp_path, run_benchmark):
    run_benchmark("rho_map", "--quick", "--methods", *QUICK_METHODS, results=tmp_path,
                  timeout=600)
    with open(tmp_path / "timing_dense-32x1x8_n10_b64_quick.json", encoding="utf-8") as f:
        timing = json.load(f)
    assert set(timing["methods"]) == set(QUICK_METHODS)
    assert timing["rho"] > 0 and timing["scoring_ms"] > 0
    for method in QUICK_METHODS:
        with open(tmp_path / f"dense-32x1x8_n10_b64_s0_{method}_quick.json",
                  encoding="utf-8") as f:
            run = json.load(f)
        assert run["complete"], method
        steps = [p["steps"] for p in run["curve"]]
        assert steps == run["marks"] and steps == sorted(steps), method
        for p in run["curve"]:
            assert 0.0 <= p["recall@10"] <= p["recall@100"] <= 1.0
        if method in rho_map.CACHES:
            assert timing["methods"][method]["warm_start_s"] > 0
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    final = [c for c in summary["comparison"] if c["fraction"] == 1.0]
    assert len(final) == 1
    c = final[0]
    assert c["best_baseline"] in rho_map.BASELINES and c["cache"] in rho_map.CACHES
    assert c["removed"] == pytest.approx(rho_map.removed(c["cache_r@10"], c["baseline_r@10"]))
    baselines = [m for m in QUICK_METHODS if m in rho_map.BASELINES]
    assert c["baselines_run"] == sorted(baselines)
    assert c["baseline_r@10"] == max(c[f"{m}_r@10"] for m in baselines)
    assert (tmp_path / "rho_map.png").stat().st_size > 0
    assert (tmp_path / "rho_map_curves.png").stat().st_size > 0


def test_a_cache_size_without_its_own_baselines_is_compared_with_the_same_corpus_ones():
    def run(cache, method, recalls):
        config = rho_map.Config("rec-128x2x32", 0, 64, 18, cache, 1e-3, 2000)
        return {"config": dataclasses.asdict(config), "setting": "rec-128x2x32",
                "shape": "rec", "seed": 0, "method": method, "seconds": 4.0,
                "marks": [1, 2], "complete": True,
                "curve": [{"steps": s, "recall@10": r} for s, r in zip([1, 2], recalls)]}
    timing = {"rho": 2.0, "methods": {m: {"step_ms": 2000.0, "warm_start_s": 0.0}
                                      for m in rho_map.METHODS}}
    runs = [run(16, "inbatch", [0.1, 0.2]), run(16, "cache-k1", [0.1, 0.3]),
            run(18, "cache-k1", [0.2, 0.6])]
    timings = {"rec-128x2x32_n18_c16_b64": timing, "rec-128x2x32_n18_b64": timing}
    final = {c["group"]: c for c in rho_map.compare(runs, timings) if c["fraction"] == 1.0}
    assert final["rec-128x2x32_n18_b64"]["best_baseline"] == "inbatch"
    assert final["rec-128x2x32_n18_b64"]["removed"] == pytest.approx(1 - 0.4 / 0.8)
    assert final["rec-128x2x32_n18_c16_b64"]["removed"] == pytest.approx(1 - 0.7 / 0.8)


def test_runs_of_different_budgets_are_compared_at_their_common_marks_only():
    def run(method, seconds, steps, recalls):
        config = rho_map.Config("mlp", 0, 64, 16, 16, 1e-3, 2000)
        return {"config": dataclasses.asdict(config), "setting": "mlp", "shape": "mlp",
                "seed": 0, "method": method, "seconds": seconds, "marks": steps,
                "complete": True,
                "curve": [{"steps": s, "recall@10": r} for s, r in zip(steps, recalls)]}
    timing = {"rho": 1.0, "methods": {m: {"step_ms": 1000.0, "warm_start_s": 0.0}
                                      for m in rho_map.METHODS}}
    # The baseline ran to 8 s (marks 2, 4, 8 s); the cache stopped at 4 s (marks 2, 4 s).
    runs = [run("inbatch", 8.0, [2, 4, 8], [0.2, 0.4, 0.6]),
            run("cache-k1", 4.0, [2, 4], [0.1, 0.5])]
    rows = rho_map.compare(runs, {"mlp_n16_b64": timing})
    assert [r["seconds"] for r in rows] == [2.0, 4.0]      # nothing at 8 s: no cache there
    assert rows[1]["removed"] == pytest.approx(1 - 0.5 / 0.6)
    (summary,) = rho_map.summarise(rows)
    assert summary["seconds"] == 4.0 and summary["removed_mean"] == pytest.approx(1 - 0.5 / 0.6)
    assert summary["baseline_gain_last_doubling"] == "+0.200"
