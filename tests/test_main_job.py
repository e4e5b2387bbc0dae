"""Smoke test of `python -m tfnegcache train` on a tiny MovieLens-layout fixture."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import forkserver
import ml_fixture

ROOT = Path(__file__).resolve().parent.parent


# Runs tfnegcache/__main__.py with TensorFlow, tf_keras and TFRS unimportable and a bare package
# object for `tfnegcache` (its __init__ imports TensorFlow), so an argument check that reached
# for TensorFlow, or came after it, fails here with an ImportError instead of exit status 2.
NO_TENSORFLOW = """
import importlib.abc, runpy, sys, types

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked (test)")
        return None

sys.meta_path.insert(0, Block())
package = types.ModuleType("tfnegcache")
package.__path__ = [{package!r}]
sys.modules["tfnegcache"] = package
sys.argv = ["python -m tfnegcache"] + {argv!r}
runpy.run_path({main!r}, run_name="__main__")
"""
TENSORFLOW = ("tensorflow", "tf_keras", "tensorflow_recommenders")


def run_without_tensorflow(argv, cwd, blocked=TENSORFLOW):
    code = NO_TENSORFLOW.format(blocked=tuple(blocked), package=str(ROOT / "tfnegcache"),
                                argv=list(argv), main=str(ROOT / "tfnegcache" / "__main__.py"))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def run_cli(argv, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return forkserver.run([sys.executable, "-m", "tfnegcache", *argv], cwd=cwd, env=env,
                          timeout=timeout)


STRATEGY_NAMES = "in-batch, in-batch-logq, full-softmax, negative-cache"
DATA_DIR_EXPECTED = ("--data-dir must be a directory holding MovieLens 100k: u.data and u.item "
                     "(GroupLens layout) or ml-100k.inter and ml-100k.item (RecBole layout). "
                     "Received: --data-dir ")
CHECKPOINT_EXPECTED = ("checkpoint must be a directory written by `python -m tfnegcache train` "
                       "(<output-dir>/checkpoints/negative-cache-seed<N>, holding config.json "
                       "and towers.index). Received: ")

ARGUMENT_ERRORS = [
    (["--epochs", "0"], "--epochs must be an integer >= 1. Received: --epochs 0"),
    (["--epochs", "two"], "--epochs must be an integer >= 1. Received: --epochs two"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1. Received: --batch-size 0"),
    (["--cache-size", "0"],
     "--cache-size must be an integer >= 1 (slots in the cache). Received: --cache-size 0"),
    (["--seeds", "a"],
     "--seeds must be a comma-separated list of integers >= 0, e.g. 0,1,2. Received: --seeds a"),
    (["--strategies", "cache"],
     f"--strategies must be a comma-separated list of distinct names from {STRATEGY_NAMES}. "
     "Received: --strategies cache"),
    (["--num-negatives", "-1"],
     "--num-negatives must be an integer >= 1 (negatives drawn from the cache per query). "
     "Received: --num-negatives -1"),
    (["--temperature", "0"], "--temperature must be a number > 0. Received: --temperature 0"),
    (["--temperature", "-1"], "--temperature must be a number > 0. Received: --temperature -1"),
    (["--embedding-dim", "0"],
     "--embedding-dim must be an integer >= 1. Received: --embedding-dim 0"),
    (["--learning-rate", "0"],
     "--learning-rate must be a number > 0. Received: --learning-rate 0"),
    (["--verbose", "3"], "--verbose must be one of auto, 0, 1, 2. Received: --verbose 3"),
]


@pytest.mark.parametrize("argv,message", ARGUMENT_ERRORS, ids=[" ".join(a) for a, _ in ARGUMENT_ERRORS])
def test_argument_errors_name_the_value_and_come_before_tensorflow(tmp_path, argv, message):
    out = run_without_tensorflow(["train"] + argv, tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == f"python -m tfnegcache train: error: {message}\n"
    assert out.stdout == ""


def test_a_cache_smaller_than_a_batch_is_fine_without_the_cache_strategy(tmp_path):
    # The check passes, so main goes on to train, which needs TensorFlow: blocked here.
    out = run_without_tensorflow(["train", "--cache-size", "8", "--strategies", "in-batch"],
                                 tmp_path)
    assert "tensorflow is blocked (test)" in out.stderr


def test_data_dir_errors(tmp_path):
    missing = tmp_path / "nowhere"
    out = run_without_tensorflow(["train", "--data-dir", str(missing)], tmp_path)
    assert out.returncode == 2
    assert out.stderr == (f"python -m tfnegcache train: error: {DATA_DIR_EXPECTED}{missing}, "
                          "which does not exist\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ratings.csv").write_text("")
    out = run_without_tensorflow(["train", "--data-dir", str(tmp_path / "other")], tmp_path)
    assert out.returncode == 2
    assert out.stderr == (f"python -m tfnegcache train: error: {DATA_DIR_EXPECTED}"
                          f"{tmp_path / 'other'}, which holds ratings.csv\n")


def test_export_of_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    out = run_without_tensorflow(["export", "/nonexistent"], tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("python -m tfnegcache export: error: "
                          f"{CHECKPOINT_EXPECTED}/nonexistent, which does not exist\n")
    out = run_without_tensorflow(["export", str(tmp_path)], tmp_path)
    assert out.returncode == 2
    assert out.stderr == ("python -m tfnegcache export: error: "
                          f"{CHECKPOINT_EXPECTED}{tmp_path}, which has no config.json and no "
                          "towers.index\n")


def test_train_without_matplotlib_names_the_extra(tmp_path):
    out = run_without_tensorflow(["train"], tmp_path, blocked=TENSORFLOW + ("matplotlib",))
    assert out.returncode == 2
    assert out.stderr == (
        "python -m tfnegcache train: error: Plotting recall_at_100.png needs matplotlib, which "
        'is not installed. Install the examples extra: pip install "tfnegcache[examples]"\n')


def test_the_real_entry_point_reports_errors_in_one_line(tmp_path):
    for argv, message in [
            (["train", "--epochs", "0"],
             "train: error: --epochs must be an integer >= 1. Received: --epochs 0"),
            (["export", "/nonexistent"],
             f"export: error: {CHECKPOINT_EXPECTED}/nonexistent, which does not exist")]:
        out = run_cli(argv, tmp_path)
        assert out.returncode == 2
        assert f"python -m tfnegcache {message}\n" in out.stderr
        assert "Traceback" not in out.stderr


def help_entries(text):
    """{option: its help text} from argparse's "options:" section."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (-\S+)", line)
        if match:
            current = match.group(1).rstrip(",")
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command,options", [
    ("train", ["--seeds", "--epochs", "--batch-size", "--learning-rate", "--embedding-dim",
               "--temperature", "--cache-size", "--num-negatives", "--cache-with-in-batch",
               "--strategies", "--split", "--data-dir", "--output-dir", "--export-dir",
               "--no-export", "--verbose"]),
    ("export", ["--data-dir", "--k", "--export-dir", "--name", "--version", "--overwrite"]),
    ("cost", ["--steps", "--warmup"]),
])
def test_help_shows_every_option_with_help_and_default(tmp_path, command, options):
    out = run_without_tensorflow([command, "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    entries = help_entries(out.stdout)
    assert sorted(entries) == sorted(["-h"] + options)
    for option in options:
        assert "(default: " in entries[option], entries[option]
        assert len(entries[option].split("(default: ")[0].split(maxsplit=2)) > 2, option


def test_help_is_fast_and_loads_no_tensorflow(tmp_path):
    code = ("import runpy, sys\n"
            "sys.argv = ['tfnegcache', 'train', '--help']\n"
            "try:\n    runpy.run_module('tfnegcache', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('tensorflow', 'numpy') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    # `python -m tfnegcache` imports the package first: neither it nor the CLI's argument
    # handling may load TensorFlow or numpy.
    assert out.stdout.splitlines()[-1] == "[]"
    assert out.stderr == ""  # no TensorFlow log lines


@pytest.fixture(name="trained", scope="module")
def fixture_trained(tmp_path_factory):
    """One `train` run on the fixture, with the default --verbose (auto; stdout is a pipe)."""
    tmp_path = tmp_path_factory.mktemp("train")
    data_dir = ml_fixture.write_grouplens(tmp_path / "ml-100k")
    out = run_cli([
        "train", "--epochs", "1", "--seeds", "0,1", "--batch-size", "64", "--cache-size", "64",
        "--embedding-dim", "8", "--data-dir", str(data_dir),
        "--output-dir", str(tmp_path / "results"),
        "--export-dir", str(tmp_path / "saved_models")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path, out


def test_train_writes_table_plot_and_export(trained):
    tmp_path, out = trained
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
    out = run_cli(["export", results["checkpoint"], "--export-dir", str(tmp_path / "again"),
                   "--k", "5"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    users = tf.constant(["1", "2", "unknown-user"])
    first = tf.saved_model.load(str(export)).signatures["serving_default"](user_id=users)
    again = tf.saved_model.load(str(tmp_path / "again" / "movielens_negative_cache" / "1"))
    second = again.signatures["serving_default"](user_id=users)
    np.testing.assert_allclose(second["scores"].numpy(), first["scores"].numpy()[:, :5],
                               rtol=1e-5, atol=1e-6)


def test_train_summary_puts_each_path_on_its_own_line(trained):
    tmp_path, out = trained
    lines = out.stdout.rstrip("\n").splitlines()
    assert lines[-5] == "mean of seeds 0, 1; tutorial split; 1 epochs; total " + (
        lines[-5].split("total ")[1])
    assert lines[-4:] == [
        f"wrote {tmp_path / 'results' / 'main_job.json'} (config, table, every run's metrics)",
        f"wrote {tmp_path / 'results' / 'recall_at_100.png'} (held-out Recall@100 per epoch)",
        f"wrote {tmp_path / 'saved_models' / 'movielens_negative_cache' / '1'} (the seed 0 "
        "negative-cache model, a TF Serving SavedModel)",
        f"wrote {tmp_path / 'results' / 'checkpoints' / 'negative-cache-seed0'} (its towers, "
        "for `python -m tfnegcache export`)",
    ]


def test_train_prints_no_progress_bars_when_stdout_is_not_a_terminal(trained):
    _, out = trained
    assert "[====" not in out.stdout and "ETA" not in out.stdout and "\b" not in out.stdout
    # --verbose auto is 2 here: one line per epoch, 8 runs of 1 epoch of 15 steps.
    assert len(re.findall(r"^15/15 - \d+s - .*loss", out.stdout, re.MULTILINE)) == 8


def test_train_repeats_no_warning(trained):
    _, out = trained
    # TensorFlow's C++ start-up line ("before absl::InitializeLog() is called") comes once
    # per native library that logs, not from tfnegcache: not a repeated warning.
    warnings = [line for line in out.stderr.splitlines()
                if "WARNING" in line and "absl::InitializeLog" not in line]
    assert len(warnings) == len(set(warnings)), warnings


def test_verbose_1_forces_progress_bars(tmp_path):
    data_dir = ml_fixture.write_grouplens(tmp_path / "ml-100k")
    out = run_cli(["train", "--epochs", "1", "--seeds", "0", "--strategies", "in-batch",
                   "--batch-size", "64", "--embedding-dim", "8", "--data-dir", str(data_dir),
                   "--output-dir", str(tmp_path / "results"), "--no-export", "--verbose", "1"],
                  tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "15/15 [==============================]" in out.stdout
