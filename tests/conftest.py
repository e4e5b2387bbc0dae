"""Imports tfnegcache first, so TensorFlow is loaded with Keras 2 in every test module.

The Keras 3 tests (`tests/keras3/`) need Keras 3 and a backend fixed per process: the main
suite runs them in subprocesses, one per backend (`tests/test_keras3.py`), and skips the
directory itself unless it is named on the command line.
"""

import os
import sys
from pathlib import Path

import tfnegcache  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))

KERAS3_TESTS = Path(__file__).resolve().parent / "keras3"


def pytest_ignore_collect(collection_path, config):
    if Path(collection_path).resolve() != KERAS3_TESTS:
        return None
    named = any(Path(str(arg).split("::")[0]).resolve().is_relative_to(KERAS3_TESTS)
                for arg in config.args)
    return None if named else True


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs subprocesses for about a minute (the benchmark smoke tests)")
