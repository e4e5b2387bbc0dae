"""Imports tfnegcache first, so TensorFlow is loaded with Keras 2 in every test module; and
`run_benchmark`, the way the tests run a benchmark's command line.

The Keras 3 tests (`tests/keras3/`) need Keras 3 and a backend fixed per process: the main
suite runs them in subprocesses, one per backend (`tests/test_keras3.py`), and skips the
directory itself unless it is named on the command line.
"""

import os
import sys
from pathlib import Path

import pytest

import tfnegcache  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))

import forkserver  # noqa: E402  (from this directory)

KERAS3_TESTS = Path(__file__).resolve().parent / "keras3"


def pytest_ignore_collect(collection_path, config):
    if Path(collection_path).resolve() != KERAS3_TESTS:
        return None
    named = any(Path(str(arg).split("::")[0]).resolve().is_relative_to(KERAS3_TESTS)
                for arg in config.args)
    return None if named else True


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The variables through which the benchmarks take their results directories.
RESULT_DIRS = ("TFNEGCACHE_BENCHMARK_DIR", "TFNEGCACHE_WORKLOAD_DIR", "TFNEGCACHE_TIME_MAP_DIR",
               "TFNEGCACHE_RHO_MAP_DIR")


# The test files by their CPU seconds in a whole-suite run on 2 cores (docs/tests.md), longest
# first, down to about 10 s; the others follow in their own order. With `-n 2 --dist loadfile`
# a worker takes the next file when it is almost done with its last one, so in this order the
# run ends on small files, with both workers busy almost to the end.
LONGEST_FIRST = ("test_distribute.py", "test_keras3.py", "test_benchmarks.py", "test_rho_map.py",
                 "test_restore.py", "test_export.py", "test_precision.py",
                 "test_tfrs_tutorial.py", "test_model.py", "test_time_map.py", "test_refresh.py",
                 "test_transaction.py", "test_retrieval.py", "test_defaults.py",
                 "test_main_job.py", "test_notebook.py", "test_mns.py", "test_multihead.py",
                 "test_keras_guard.py", "test_cost.py")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs subprocesses for about a minute (the benchmark smoke tests)")
    if hasattr(config.option, "loadscopereorder"):
        # pytest-xdist would order the files by their number of tests; keep ours.
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)   # stable: in-file order, and the other files' order, are kept


def _run_benchmark(name, *args, results, timeout=300):
    """Runs `python -m benchmarks.<name> <args>` from the repository root (forked from the
    server that has imported TensorFlow, `tests/forkserver.py`), this checkout's packages
    first on its path and every benchmark's results in the directory `results`; asserts that
    it exits 0 and returns the finished process (its output as text)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{variable: str(results) for variable in RESULT_DIRS})
    proc = forkserver.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=ROOT,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session", name="run_benchmark")
def fixture_run_benchmark():
    """`run_benchmark(name, *args, results=directory, timeout=300)`: see `_run_benchmark`.
    Session-scoped, so module-scoped fixtures that share one run can use it."""
    return _run_benchmark
