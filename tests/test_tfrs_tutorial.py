"""The TFRS basic retrieval tutorial, as TFRS documents it, with only the swap made.

The towers, the `FactorizedTopK` over the movies dataset (embeddings only, no identifiers),
batch 8192 and Adagrad 0.1 are the tutorial's; the data is a MovieLens-shaped fixture of the
same vocabulary sizes (TFDS cannot download here). The swap changes the base class and the
task, and passes the ids and features: nothing else.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs

import ml_fixture
import tfnegcache

# 8,192 training ratings: one of the tutorial's 8,192-row batches per epoch (a step also
# computes the tutorial's top-k metrics over every title: seconds on 2 cores).
NUM_RATINGS = 10_240


def tutorial_data():
    """The fixture as the tutorial's two datasets: rating dicts, and movie titles."""
    users, movies, titles, _, _ = ml_fixture.arrays(
        num_users=943, num_movies=1664, num_ratings=NUM_RATINGS, seed=3)
    ratings = tf.data.Dataset.from_tensor_slices({
        "user_id": np.char.mod("%d", users).astype(object).astype(bytes),
        "movie_title": np.asarray(titles, dtype=object)[movies - 1].astype(bytes)})
    return ratings, tf.data.Dataset.from_tensor_slices(np.asarray(titles).astype(bytes))


def run_tutorial(swap: bool, data=tutorial_data, num_ratings=NUM_RATINGS):
    """The tutorial (`swap`: with the cache) on `data()`, `(ratings, movies)` datasets of
    `num_ratings` ratings; returns `(model, fit history, evaluate results)`."""
    ratings, movies = data()
    # -- from here on, the tutorial --
    ratings = ratings.map(lambda x: {
        "movie_title": x["movie_title"],
        "user_id": x["user_id"],
    })
    tf.random.set_seed(42)
    shuffled = ratings.shuffle(100_000, seed=42, reshuffle_each_iteration=False)
    train = shuffled.take(int(num_ratings * 0.8))
    test = shuffled.skip(int(num_ratings * 0.8)).take(int(num_ratings * 0.2))

    movie_titles = movies.batch(1_000)
    user_ids = ratings.batch(1_000_000).map(lambda x: x["user_id"])
    unique_movie_titles = np.unique(np.concatenate(list(movie_titles)))
    unique_user_ids = np.unique(np.concatenate(list(user_ids)))

    embedding_dimension = 32
    user_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=unique_user_ids, mask_token=None),
        tf.keras.layers.Embedding(len(unique_user_ids) + 1, embedding_dimension)
    ])
    movie_model = tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=unique_movie_titles, mask_token=None),
        tf.keras.layers.Embedding(len(unique_movie_titles) + 1, embedding_dimension)
    ])
    metrics = tfrs.metrics.FactorizedTopK(candidates=movies.batch(128).map(movie_model))

    if not swap:
        task = tfrs.tasks.Retrieval(metrics=metrics)
        base = tfrs.Model
    else:   # the swap
        cache = tfnegcache.NegativeCache(
            size=4096, feature_spec={"movie_title": tf.TensorSpec([], tf.string)},
            embedding_dim=embedding_dimension, id_dtype=tf.string)
        task = tfnegcache.CacheRetrieval(
            metrics=metrics, cache=cache,
            candidate_model=lambda features: movie_model(features["movie_title"]))
        base = tfnegcache.CachedRetrievalModel

    class MovielensModel(base):

        def __init__(self, user_model, movie_model):
            super().__init__()
            self.movie_model: tf.keras.Model = movie_model
            self.user_model: tf.keras.Model = user_model
            self.task: tf.keras.layers.Layer = task

        def compute_loss(self, features, training=False) -> tf.Tensor:
            user_embeddings = self.user_model(features["user_id"])
            positive_movie_embeddings = self.movie_model(features["movie_title"])
            if not swap:
                return self.task(user_embeddings, positive_movie_embeddings)
            return self.task(user_embeddings, positive_movie_embeddings,   # the swap
                             candidate_ids=features["movie_title"],
                             candidate_features={"movie_title": features["movie_title"]})

    model = MovielensModel(user_model, movie_model)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate=0.1))
    cached_train = train.shuffle(100_000).batch(8192).cache()
    cached_test = test.batch(4096).cache()
    history = model.fit(cached_train, epochs=3, verbose=0)
    return model, history.history, model.evaluate(cached_test, return_dict=True, verbose=0)


@pytest.fixture(scope="module", name="runs")
def fixture_runs():
    return {swap: run_tutorial(swap) for swap in (False, True)}


def test_the_swapped_tutorial_trains_and_evaluates(runs):
    model, history, results = runs[True]
    assert np.all(np.isfinite(history["loss"]))
    # 8192-row batches hold at most 1,664 distinct titles: all fit the 4,096 slots.
    assert 0.3 < history["cache_fill"][-1] <= 1664 / 4096
    assert set(results) >= {"factorized_top_k/top_100_categorical_accuracy", "loss"}
    assert np.isfinite(results["loss"])


def test_the_swap_keeps_the_tutorial_metrics_meaningful(runs):
    # Score-based metrics as in the tutorial (the index has no identifiers): top-100 accuracy
    # of a model that learnt something, far above the 100 / 1664 = 0.06 of chance.
    plain = runs[False][2]["factorized_top_k/top_100_categorical_accuracy"]
    cached = runs[True][2]["factorized_top_k/top_100_categorical_accuracy"]
    assert plain > 0.2, plain
    # The swap must not make the tutorial worse beyond the noise of the held-out estimate:
    # three standard errors of the difference of two accuracies on the same 4,000 ratings
    # (binomial, about 0.03 at 0.24; measured 0.233 plain, 0.25 with the cache).
    held_out = int(NUM_RATINGS * 0.2)
    noise = 3 * np.sqrt(2 * plain * (1 - plain) / held_out)
    assert cached > plain - noise, (plain, cached, noise)
