"""A short run of the keras-rs swap example (`examples/keras_rs_retrieval.py`) on a small
MovieLens look-alike: the swapped model trains, keeps its cache, and ranks held-out movies
far better than chance."""

import importlib.util
from pathlib import Path

import numpy as np

import ml_fixture

ROOT = Path(__file__).resolve().parent.parent.parent


def _example():
    spec = importlib.util.spec_from_file_location(
        "keras_rs_retrieval", ROOT / "examples" / "keras_rs_retrieval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_swapped_keras_rs_example_trains_with_a_cache(tmp_path):
    # 5,000 ratings: 4,000 to train on and 1,000 to validate on, whole batches of 1,000 each,
    # so each program is compiled for one batch shape.
    num_movies = 500
    directory = ml_fixture.write_grouplens(tmp_path / "ml-100k", num_users=100,
                                           num_movies=num_movies, num_ratings=5000, seed=1)
    (result,) = _example().main(["--loss", "cache", "--epochs", "6", "--data-dir",
                                 str(directory), "--verbose", "0"])
    history = result["history"]
    assert np.all(np.isfinite(history["loss"])) and history["skipped_steps"][-1] == 0.0
    assert 0.8 * num_movies / 2048 < history["cache_fill"][-1] <= num_movies / 2048
    assert "val_loss" in history                      # validation every 5 epochs, as keras-rs
    # A planted preference: far above the 100 / 500 of chance.
    assert result["top_100_accuracy"] > 0.5, result["top_100_accuracy"]
