"""Smoke test: each benchmark's `--quick` mode runs and writes its JSON and plot.

Runs `python -m benchmarks.<name> --quick` from the repository root in subprocesses (forked
from the suite's server that has imported TensorFlow: `tests/forkserver.py`), with results
redirected to a temporary directory. step_time starts a fresh process of its own per
configuration (the machine's peak and four modes), half of this module's CPU time, most of
it importing TensorFlow and tracing; marked `slow`.
"""

import json
import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["sampler", "step_time", "quality_at_time"])
def test_quick_benchmark_writes_json_and_plot(name, tmp_path, run_benchmark):
    proc = run_benchmark(name, "--quick", results=tmp_path)
    with open(tmp_path / f"{name}.json", encoding="utf-8") as f:
        result = json.load(f)
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert result["machine"]["cpus"] >= 1
    assert "targets" in result
    assert "wrote" in proc.stdout
    if name == "step_time":
        # The reference towers' row carries the step, its floor and every part of it.
        row, = result["rows"]
        assert row["towers"] == "reference"
        for key in ("cache_ms", "inbatch_ms", "matmul_ms", "parts_step_ms", "scoring_ms",
                    "sampling_ms", "reencode_ms", "cache_update_ms", "checks_ms",
                    "towers_fwd_bwd_ms", "optimizer_apply_ms", "cache/(inbatch+matmul)"):
            assert np.isfinite(row[key]), key
        assert row["cache_ms"] > 0 and row["scoring_ms"] > 0
        assert result["peak"]["matmul_2048_float32_gflops"] > 0
        assert result["peak"]["matmul_2048_bfloat16_gflops"] > 0


def test_quick_quality_per_step_trains_every_method_the_same_steps(tmp_path, run_benchmark):
    methods = ["inbatch+logq", "cache-only", "full-softmax"]
    run_benchmark("quality_at_time", "--quick", "--equal-steps", "10", "--methods", *methods,
                  results=tmp_path)
    with open(tmp_path / "quality_per_step.json", encoding="utf-8") as f:
        result = json.load(f)
    assert (tmp_path / "quality_per_step.png").stat().st_size > 0
    assert [r["method"] for r in result["rows"]] == methods
    assert [r["steps"] for r in result["rows"]] == [10, 10, 10]
    assert 0.0 < result["same_fine_cluster_rate"] < 1.0


def test_same_fine_cluster_rate_matches_simulated_batches():
    """The benchmark's printed rate against batches drawn by popularity (fixed seed)."""
    import numpy as np

    from benchmarks import quality_at_time
    from benchmarks import synthetic

    corpus = synthetic.make_corpus(num_candidates=2**12, num_coarse=4, fine_per_coarse=4,
                                   popularity_exponent=1.0, seed=3)
    test = corpus.queries(300, split="test")
    batch = 16
    rate = quality_at_time.same_fine_cluster_rate(corpus, test, batch)
    rng = np.random.default_rng(0)
    trials = 400
    hits = 0
    for positive in test["candidate_id"]:
        draws = rng.choice(corpus.num_candidates, size=(trials, batch - 1), p=corpus.popularity)
        same = (corpus.fine_cluster[draws] == corpus.fine_cluster[positive]) & (draws != positive)
        hits += same.any(axis=1).sum()
    simulated = hits / (trials * len(test["candidate_id"]))
    # 120k Bernoulli trials: the standard error is about 0.0014.
    assert abs(rate - simulated) < 0.006, (rate, simulated)
    assert 0.3 < rate < 0.9  # 16 fine clusters and 15 negatives: neither rare nor certain


def test_hash_buckets_and_hidden_flags_reach_both_towers_of_every_method():
    """`--hash-buckets` and `--hidden` (the capacity probes in README) size both towers, for
    every method `build` makes, and tokens hash modulo the bucket count."""
    import numpy as np

    from benchmarks import quality_at_time
    from benchmarks import synthetic

    args = quality_at_time.make_parser().parse_args(
        ["--hash-buckets", "300", "--hidden", "20", "--dim", "12", "--cache-size", "64"])
    corpus = synthetic.make_corpus(num_candidates=2**8, num_coarse=2, fine_per_coarse=2)
    for method in quality_at_time.METHODS:
        model = quality_at_time.build(method, corpus, args)
        for tower in (model.query_tower, model.candidate_tower):
            out = tower(corpus.candidate_tokens[:3])
            assert out.shape == (3, 12), method
            assert tower.table.input_dim == 300 and tower.hidden.units == 20, method
            np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=-1), 1.0, rtol=1e-5)
    # 1, 301 and 601 share a row of a 300-bucket table.
    same = model.query_tower(np.full([1, 8], 1, dtype=np.int32))
    alias = model.query_tower(np.array([[301, 601, 1, 301, 601, 1, 301, 601]], dtype=np.int32))
    np.testing.assert_allclose(same.numpy(), alias.numpy(), rtol=1e-6)


def test_quick_ab_step_time_compares_the_library_with_the_previous_commit(tmp_path,
                                                                          run_benchmark):
    """Both sides run, each reporting wall and CPU time, and the temporary checkout goes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    parent = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    if head.returncode != 0 or parent.returncode != 0:
        pytest.skip("needs a git checkout with at least two commits")
    out = tmp_path / "ab.json"
    run_benchmark("ab_step_time", "--quick", "--output", out, results=tmp_path, timeout=600)
    result = json.loads(out.read_text())
    assert result["base"] == parent.stdout.strip() and result["head"] == head.stdout.strip()
    for side in ("base", "head"):
        assert len(result["step_ms"][side]) == 1 and min(result["step_ms"][side]) > 0
        assert min(result["step_cpu_ms"][side]) > 0
        # The setup (model, cache warm start, the first step with its trace) outlasts a step.
        assert min(result["setup_s"][side]) > 1e-3 * max(result["step_ms"][side])
        assert min(result["setup_cpu_s"][side]) > 0
    assert result["head_over_base"]["median_ms"] > 0
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    assert not any(line.split()[0].endswith("/base") for line in worktrees.splitlines())


def test_quick_transaction_cost_times_both_steps(tmp_path, run_benchmark):
    run_benchmark("transaction_cost", "--quick", results=tmp_path)
    result = json.loads((tmp_path / "transaction_cost.json").read_text())
    assert result["calls"] == 6 and result["N"] == 2**10
    assert all(v > 0 for v in result["median_ms"].values())
    assert result["with_over_without"] == pytest.approx(
        result["median_ms"]["with_checks"] / result["median_ms"]["without_checks"])
