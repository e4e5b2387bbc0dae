"""Smoke test of `python -m tfnegcache train` on a tiny MovieLens-layout fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import ml_fixture

ROOT = Path(__file__).resolve().parent.parent


def test_help_documents_the_options():
    out = subprocess.run([sys.executable, "-m", "tfnegcache", "train", "--help"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for option in ("--seeds", "--epochs", "--batch-size", "--cache-size", "--strategies",
                   "--split", "--data-dir", "--output-dir", "--verbose"):
        assert option in out.stdout


def test_train_writes_table_plot_and_export(tmp_path):
    data_dir = ml_fixture.write_grouplens(tmp_path / "ml-100k")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [
        sys.executable, "-m", "tfnegcache", "train", "--epochs", "1", "--seeds", "0,1",
        "--batch-size", "64", "--cache-size", "64", "--embedding-dim", "8",
        "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "results"),
        "--export-dir", str(tmp_path / "saved_models"), "--verbose", "0"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| negative-cache |" in out.stdout

    results = json.loads((tmp_path / "results" / "main_job.json").read_text())
    table = {row["strategy"]: row for row in results["table"]}
    assert list(table) == ["in-batch", "in-batch-logq", "full-softmax", "negative-cache"]
    for row in table.values():
        assert row["seeds"] == 2
        for key in ("recall@10", "recall@50", "recall@100", "mrr"):
            assert 0.0 <= row[key] <= 1.0
        assert row["recall@10"] <= row["recall@50"] <= row["recall@100"]
        assert row["seconds_per_epoch"] > 0
        assert len(row["recall@100_per_epoch"]) == 1
    assert results["config"]["num_train"] == 960 and results["config"]["num_test"] == 240
    cache_runs = [r for r in results["runs"] if r["strategy"] == "negative-cache"]
    assert all(r["cache_fill"][-1] > 0 for r in cache_runs)

    assert (tmp_path / "results" / "recall_at_100.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    export = tmp_path / "saved_models" / "movielens_negative_cache" / "1"
    assert (export / "saved_model.pb").exists()
    assert results["export"] == str(export)

    # `export` rebuilds the towers from train's checkpoint: the same top k as train's export.
    command = [sys.executable, "-m", "tfnegcache", "export", results["checkpoint"],
               "--export-dir", str(tmp_path / "again"), "--k", "5"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    users = tf.constant(["1", "2", "unknown-user"])
    first = tf.saved_model.load(str(export)).signatures["serving_default"](user_id=users)
    again = tf.saved_model.load(str(tmp_path / "again" / "movielens_negative_cache" / "1"))
    second = again.signatures["serving_default"](user_id=users)
    np.testing.assert_allclose(second["scores"].numpy(), first["scores"].numpy()[:, :5],
                               rtol=1e-5, atol=1e-6)
