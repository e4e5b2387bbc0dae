"""Reduced-precision cache storage and scoring (float16, bfloat16) train as well as float32."""

import numpy as np
import pytest
import tensorflow as tf

import toy

# Held-out recall@10 of the toy model after 2 epochs with float32 storage, measured when this
# test was written: 0.7535, 0.7560, 0.7533 for seeds 0, 1, 2 (float16 and bfloat16, seed 0:
# 0.7535 both). The recall is over 4000 held-out pairs, so its binomial standard error is
# ~0.007, and a different held-out draw moves it by that much. A half-precision cache only
# perturbs the stale scores the negatives are drawn from (relative error 2^-11 for float16,
# 2^-8 for bfloat16); gradients and fresh scores stay float32. We allow 0.02 (~3 standard
# errors): within noise, yet a cache that broke sampling (in-batch-like recall, ~0.65 in
# test_model.py) would fail.
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def data():
    return toy.interactions(12000, seed=1), toy.interactions(4000, seed=2)


def train(data, embedding_dtype, seed=0, scoring_dtype=None):
    model = toy.ToyModel(cache_size=512, seed=seed, embedding_dtype=embedding_dtype,
                         scoring_dtype=scoring_dtype)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(data[0], 128), epochs=2, verbose=0)
    return model


@pytest.fixture(scope="module")
def float32_recall(data):
    return toy.recall_at(train(data, tf.float32), data[1])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_cache_matches_float32_recall(data, float32_recall, dtype):
    model = train(data, dtype)
    cache = model.task.cache
    assert cache.embeddings.dtype == dtype
    assert cache.embedding_dtype == dtype
    assert cache.embeddings.numpy().itemsize == 2
    assert cache.fill_fraction().numpy() > 0.5
    recall = toy.recall_at(model, data[1])
    assert abs(recall - float32_recall) <= TOLERANCE, (dtype.name, recall, float32_recall)
    # The written embeddings are the rounded fresh ones: finite, and not all zero.
    stored = tf.cast(cache.embeddings[: int(cache.num_filled.numpy())], tf.float32).numpy()
    assert np.all(np.isfinite(stored)) and np.abs(stored).sum() > 0


def test_float32_is_the_default_storage(data):
    assert toy.ToyModel(cache_size=512).task.cache.embeddings.dtype == tf.float32


def test_bfloat16_scoring_matches_float32_recall(data, float32_recall):
    # The sampler scores rounded queries and embeddings (relative error 2^-8 per score, as
    # bfloat16 storage gives); the loss stays float32. Same tolerance as storage.
    model = train(data, tf.float32, scoring_dtype=tf.bfloat16)
    assert model.task.cache.scoring_dtype == tf.bfloat16
    assert model.task.cache.embeddings.dtype == tf.float32
    recall = toy.recall_at(model, data[1])
    assert abs(recall - float32_recall) <= TOLERANCE, (recall, float32_recall)
