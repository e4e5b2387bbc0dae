"""The TFRS basic retrieval tutorial on MovieLens 100k, as TFRS writes it and with the swap.

    python -m benchmarks.tfrs_tutorial            # the real MovieLens 100k (offline loader)
    python -m benchmarks.tfrs_tutorial --quick    # the test fixture instead (no download)

Runs `tests/test_tfrs_tutorial.py`'s `run_tutorial` (the tutorial's towers, FactorizedTopK over
the movies, batch 8192, Adagrad 0.1, 3 epochs; the swap adds a 4,096-slot cache) and prints the
held-out factorized top-k accuracies of both, with their fit + evaluate seconds.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from benchmarks import _common  # noqa: E402  first: imports tfnegcache (Keras 2)
import tensorflow as tf  # noqa: E402  pylint: disable=g-bad-import-order

import test_tfrs_tutorial as tutorial  # noqa: E402


def movielens_data():
    from tfnegcache_examples import movielens_data as movielens  # pylint: disable=import-outside-toplevel
    data = movielens.load()
    ratings = tf.data.Dataset.from_tensor_slices(
        {"user_id": data.ratings["user_id"], "movie_title": data.ratings["movie_title"]})
    return ratings, tf.data.Dataset.from_tensor_slices(data.movies["movie_title"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    data, size = ((tutorial.tutorial_data, tutorial.NUM_RATINGS) if args.quick
                  else (movielens_data, 100_000))
    rows = []
    for swap in (False, True):
        start = time.perf_counter()
        _, _, results = tutorial.run_tutorial(swap, data, size)
        rows.append({"model": "with the cache" if swap else "tfrs.tasks.Retrieval",
                     **{f"top_{k}": results[f"factorized_top_k/top_{k}_categorical_accuracy"]
                        for k in (1, 10, 50, 100)},
                     "seconds": time.perf_counter() - start})
    print(_common.table(rows, ["model", "top_1", "top_10", "top_50", "top_100", "seconds"]))
    path = _common.write_json("tfrs_tutorial", {"quick": args.quick, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
