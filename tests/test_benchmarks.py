"""Smoke test: each benchmark's `--quick` mode runs and writes its JSON and plot.

Runs `python -m benchmarks.<name> --quick` from the repository root in subprocesses, with
results redirected to a temporary directory. step_time spawns one process per configuration,
so this is the slowest test module (~2 min on 2 shared cores, most of it step_time's
four child processes importing TensorFlow; marked `slow`).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["sampler", "step_time", "quality_at_time"])
def test_quick_benchmark_writes_json_and_plot(name, tmp_path):
    env = dict(os.environ, TFNEGCACHE_BENCHMARK_DIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / f"{name}.json", encoding="utf-8") as f:
        result = json.load(f)
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert result["machine"]["cpus"] >= 1
    assert "targets" in result
    assert "wrote" in proc.stdout
