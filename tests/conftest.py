"""Imports tfnegcache first, so TensorFlow is loaded with Keras 2 in every test module."""

import os
import sys

import tfnegcache  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: runs subprocesses for about a minute (the benchmark smoke tests)")
