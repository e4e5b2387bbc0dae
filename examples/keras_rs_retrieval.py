"""keras-rs's basic retrieval example, with its loss swapped for tfnegcache.keras3's.

    KERAS_BACKEND=jax python examples/keras_rs_retrieval.py                  # mse, in-batch, cache
    KERAS_BACKEND=tensorflow python examples/keras_rs_retrieval.py --loss cache
    KERAS_BACKEND=jax python examples/keras_rs_retrieval.py --quick          # 2 epochs
    ... --loss cache --export saved_models/keras_rs_cache    # then serve it from TensorFlow

The code in `run` is keras-rs's `examples/basic_retrieval.py` ("Recommending movies:
retrieval") as keras-rs writes it: two embedding towers, a `BruteForceRetrieval` layer sharing
the candidate table, `compute_loss` overridden, batches of 1,000, Adagrad 0.1, 50 epochs with
validation every 5. keras-rs trains it with mean squared error on the ratings (`--loss mse`).
Its changes are marked "the swap" (and one `int()` that Keras 3.15 needs):

- `--loss in-batch`: `keras.losses.MeanSquaredError()` becomes
  `tfnegcache.keras3.CacheRetrieval()`, the in-batch softmax of `tfrs.tasks.Retrieval`, and
  `compute_loss` passes the user and movie embeddings;
- `--loss cache`: the same with a `NegativeCache` of 2,048 slots (the whole catalogue fits),
  the model a `tfnegcache.keras3.CachedRetrievalModel`, and `compute_loss` also passes the
  movie ids and the features the cache keeps.

The data is MovieLens 100k from `tfnegcache_examples.movielens_data.load()` (the RecBole
wheel's copy, fetched once into the user cache) instead of `tfds.load`, with the same fields;
it is in timestamp order, not TFDS's, so the seeded shuffle makes a different 80,000 / 20,000
split of the same sizes. After training, the held-out top-100 accuracy is measured as TFRS's
tutorial measures it (is the rated movie among the user's 100 best-scored movies?), with a
`keras_rs.layers.BruteForceRetrieval(k=100)` over every movie, and printed next to the
tutorial's figure with `tfrs.tasks.Retrieval`, measured by this project. On MovieLens 100k the
results (accuracies, fit and evaluation seconds, the machine's load, the commit) also go to
`results/keras3/keras_rs_retrieval_<backend>_e<epochs>.json`, which docs/keras3.md quotes.
"""

# Keras 3 first: with `tfnegcache` imported, TensorFlow would otherwise load Keras 2.
import tfnegcache.keras3  # noqa: F401  pylint: disable=g-bad-import-order

import argparse
import json
import os
import sys
import time

import keras
import keras_rs
import numpy as np
import tensorflow as tf  # Needed for the dataset

# The TFRS tutorial's held-out top-100 accuracy with `tfrs.tasks.Retrieval`, as this project
# measured it (`python -m benchmarks.tfrs_tutorial` writes this file).
TFRS_TUTORIAL_RESULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "results", "benchmarks", "tfrs_tutorial.json")


def tfrs_tutorial_top_100():
    """The stored TFRS tutorial figure, or "not measured here" without the file."""
    try:
        with open(TFRS_TUTORIAL_RESULT, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
        return f"{next(r['top_100'] for r in rows if r['model'] == 'tfrs.tasks.Retrieval'):.4f}"
    except (OSError, KeyError, StopIteration, ValueError):
        return "not measured here"
LOSSES = ("mse", "in-batch", "cache")


def load_movielens(data_dir=None):
    """MovieLens 100k as the two datasets keras-rs's example gets from TFDS."""
    from tfnegcache_examples import movielens_data  # pylint: disable=import-outside-toplevel
    data = movielens_data.load(data_dir=data_dir, sources=("dir",) if data_dir else None)
    ratings = tf.data.Dataset.from_tensor_slices({
        "user_id": data.ratings["user_id"], "movie_id": data.ratings["movie_id"],
        "user_rating": data.ratings["user_rating"]})
    movies = tf.data.Dataset.from_tensor_slices({
        "movie_id": data.movies["movie_id"], "movie_title": data.movies["movie_title"]})
    return ratings, movies, len(data.ratings["user_id"])


def top_k_accuracy(model, test_ratings, movies_count, k=100):
    """Fraction of held-out ratings whose movie is among the user's k best-scored movies."""
    index = keras_rs.layers.BruteForceRetrieval(k=k, return_scores=False)
    index.update_candidates(model.candidate_embedding.embeddings[1:],   # ids 1..movies_count
                            np.arange(1, movies_count + 1, dtype="int32"))
    hits = total = 0
    for users, labels in test_ratings.as_numpy_iterator():
        top = keras.ops.convert_to_numpy(index(model.user_embedding(users)))
        hits += int(np.sum(np.any(top == labels["movie_id"][:, None], axis=1)))
        total += len(users)
    return hits / total


SEED = 42   # keras-rs's: the weights' and the split's seed
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results",
                       "keras3")


def run(loss, ratings, movies, num_ratings, epochs=50, verbose=2):
    """keras-rs's example with `loss` ("mse", "in-batch" or "cache"); returns its results."""
    keras.utils.set_random_seed(SEED)
    load_before = os.getloadavg()
    start = time.perf_counter()
    # -- from here on, keras-rs's example --
    users_count = (
        ratings.map(lambda x: tf.strings.to_number(x["user_id"], out_type=tf.int32))
        .reduce(tf.constant(0, tf.int32), tf.maximum)
        .numpy()
    )
    movies_count = movies.cardinality().numpy()

    def preprocess_rating(x):
        return (
            # Input is the user IDs
            tf.strings.to_number(x["user_id"], out_type=tf.int32),
            # Labels are movie IDs + ratings between 0 and 1.
            {
                "movie_id": tf.strings.to_number(x["movie_id"], out_type=tf.int32),
                "rating": (x["user_rating"] - 1.0) / 4.0,
            },
        )

    num_train = int(num_ratings * 0.8)   # 80_000 of MovieLens 100k, as keras-rs
    shuffled_ratings = ratings.map(preprocess_rating).shuffle(
        100_000, seed=42, reshuffle_each_iteration=False
    )
    train_ratings = shuffled_ratings.take(num_train).batch(1000).cache()
    test_ratings = shuffled_ratings.skip(num_train).take(num_ratings - num_train).batch(
        1000).cache()

    base = (tfnegcache.keras3.CachedRetrievalModel if loss == "cache"   # the swap
            else keras.Model)

    class RetrievalModel(base):
        """Create the retrieval model with the provided parameters.

        Args:
          num_users: Number of entries in the user embedding table.
          num_candidates: Number of entries in the candidate embedding table.
          embedding_dimension: Output dimension for user and movie embedding tables.
        """

        def __init__(
            self,
            num_users,
            num_candidates,
            embedding_dimension=32,
            **kwargs,
        ):
            super().__init__(**kwargs)
            # Our query tower, simply an embedding table.
            self.user_embedding = keras.layers.Embedding(
                num_users, embedding_dimension
            )
            # Our candidate tower, simply an embedding table.
            self.candidate_embedding = keras.layers.Embedding(
                num_candidates, embedding_dimension
            )
            # The layer that performs the retrieval.
            self.retrieval = keras_rs.layers.BruteForceRetrieval(
                k=10, return_scores=False
            )
            if loss == "mse":
                self.loss_fn = keras.losses.MeanSquaredError()
            elif loss == "in-batch":   # the swap
                self.loss_fn = tfnegcache.keras3.CacheRetrieval()
            else:   # the swap
                self.loss_fn = tfnegcache.keras3.CacheRetrieval(
                    cache=tfnegcache.keras3.NegativeCache(
                        size=2048, feature_spec={"movie_id": ((), "int32")},
                        embedding_dim=embedding_dimension),
                    candidate_model=lambda f: self.candidate_embedding(f["movie_id"]))

        def build(self, input_shape):
            self.user_embedding.build(input_shape)
            self.candidate_embedding.build(input_shape)
            # In this case, the candidates are directly the movie embeddings.
            # We take a shortcut and directly reuse the variable.
            self.retrieval.candidate_embeddings = (
                self.candidate_embedding.embeddings
            )
            self.retrieval.build(input_shape)
            super().build(input_shape)

        def call(self, inputs, training=False):
            user_embeddings = self.user_embedding(inputs)
            result = {
                "user_embeddings": user_embeddings,
            }
            if not training:
                # Skip the retrieval of top movies during training as the
                # predictions are not used.
                result["predictions"] = self.retrieval(user_embeddings)
            return result

        def compute_loss(self, x, y, y_pred, sample_weight, training=True):
            candidate_id, rating = y["movie_id"], y["rating"]
            user_embeddings = y_pred["user_embeddings"]
            candidate_embeddings = self.candidate_embedding(candidate_id)

            if loss == "in-batch":   # the swap
                return self.loss_fn(user_embeddings, candidate_embeddings)
            if loss == "cache":   # the swap
                return self.loss_fn(user_embeddings, candidate_embeddings,
                                    candidate_ids=candidate_id,
                                    candidate_features={"movie_id": candidate_id})

            labels = keras.ops.expand_dims(rating, -1)
            # Compute the affinity score by multiplying the two embeddings.
            scores = keras.ops.sum(
                keras.ops.multiply(user_embeddings, candidate_embeddings),
                axis=1,
                keepdims=True,
            )
            return self.loss_fn(labels, scores, sample_weight)

    # int(): Keras 3.15's Embedding refuses the numpy integers the example passes.
    model = RetrievalModel(int(users_count) + 1, int(movies_count) + 1)
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate=0.1))

    history = model.fit(
        train_ratings, validation_data=test_ratings, validation_freq=5, epochs=epochs,
        verbose=verbose,
    )
    # -- end of keras-rs's example (it goes on to print user 42's top 10) --
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = top_k_accuracy(model, test_ratings, int(movies_count))
    return {"backend": keras.backend.backend(), "loss": loss, "epochs": epochs, "seed": SEED,
            "top_100_accuracy": accuracy, "fit_seconds": seconds,
            "eval_seconds": time.perf_counter() - start,
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "history": {k: [float(x) for x in v] for k, v in history.history.items()},
            "model": model}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=LOSSES + ("all",), default="all")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="2 epochs")
    parser.add_argument("--data-dir", help="MovieLens in the GroupLens ml-100k layout")
    parser.add_argument("--json", help="write the results here (default on MovieLens 100k: "
                                       "results/keras3/keras_rs_retrieval_<backend>_e<epochs>"
                                       "[_<loss>].json; with --data-dir: nowhere)")
    parser.add_argument("--export", help="export the last model's user tower and a top-100 "
                                         "index over every movie here (a SavedModel)")
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    epochs = 2 if args.quick else args.epochs
    ratings, movies, num_ratings = load_movielens(args.data_dir)
    results = []
    tfrs_figure = tfrs_tutorial_top_100()
    for loss in LOSSES if args.loss == "all" else (args.loss,):
        result = run(loss, ratings, movies, num_ratings, epochs, args.verbose)
        results.append(result)
        print(f"{result['backend']:10s} {loss:9s} held-out top-100 accuracy "
              f"{result['top_100_accuracy']:.4f} after {epochs} epochs "
              f"({result['fit_seconds']:.0f} s)   [TFRS tutorial, tfrs.tasks.Retrieval: "
              f"{tfrs_figure}]", flush=True)
    if args.export:
        from tfnegcache.keras3.export import export_retrieval_model  # pylint: disable=import-outside-toplevel
        model = results[-1]["model"]
        movies_count = model.candidate_embedding.embeddings.shape[0] - 1
        export_retrieval_model(
            model.user_embedding, model.candidate_embedding.embeddings[1:],
            np.arange(1, movies_count + 1, dtype="int32"), args.export, k=100,
            input_signature=[keras.InputSpec(shape=(None,), dtype="int32")], overwrite=True)
        print(f"exported the user tower and a top-100 index to {args.export}")
    path = args.json
    if path is None and args.data_dir is None:
        suffix = "" if args.loss == "all" else "_" + args.loss.replace("-", "_")
        path = os.path.join(RESULTS, f"keras_rs_retrieval_{keras.backend.backend()}"
                                     f"_e{epochs}{suffix}.json")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"command": "KERAS_BACKEND=" + keras.backend.backend()
                                  + " python examples/keras_rs_retrieval.py "
                                  + " ".join(argv if argv is not None else sys.argv[1:]),
                       "results": [{k: v for k, v in r.items() if k != "model"}
                                   for r in results],
                       "machine": _machine()}, f, indent=2)
        print("wrote", path)
    return results


def _machine():
    """What the results were measured with: the code's commit, versions, CPUs."""
    import importlib.metadata  # pylint: disable=import-outside-toplevel
    import platform  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", here, "status", "--porcelain", "--",
                                     ":/tfnegcache", ":/examples"], capture_output=True, text=True,
                                    check=False).stdout.strip())
    except OSError:
        commit, dirty = None, None
    versions = {}
    for name in ("keras", "keras-rs", "jax", "tensorflow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": commit, "uncommitted_changes": dirty, "cpus": os.cpu_count(),
            "platform": platform.platform(), "versions": versions}


if __name__ == "__main__":
    main(sys.argv[1:])
