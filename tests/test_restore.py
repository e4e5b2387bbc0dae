"""Restores you can trust: every format keeps a working cache, or refuses before any change."""

import os

import numpy as np
import pytest
import tensorflow as tf

import tfnegcache
import toy
from test_transaction import assert_unchanged, full_state


def fitted(cache_size=128, steps=4, model_cls=toy.ToyModel, **kwargs):
    model = model_cls(cache_size=cache_size, **kwargs)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(64 * steps, seed=1), 64), epochs=1, verbose=0)
    model(tf.constant([0], tf.int64))   # built: `.h5` loading needs the model called once
    return model


def lookups(model):
    return model.task.cache.lookup(tf.constant(np.arange(toy.NUM_ITEMS), tf.int64)).numpy()


def test_h5_weights_restore_a_working_index(tmp_path):
    model = fitted()
    path = str(tmp_path / "w.h5")
    model.save_weights(path)
    restored = fitted(steps=1)          # built, with a different cache
    restored.load_weights(path)
    np.testing.assert_array_equal(lookups(restored), lookups(model))
    # Training on: every id still in one slot only.
    restored.fit(toy.dataset(toy.interactions(64 * 10, seed=4), 64), epochs=1, verbose=0)
    cache = restored.task.cache
    ids = cache.ids.numpy()[:int(cache.num_filled.numpy())]
    assert len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(cache.lookup(tf.constant(ids)).numpy(), np.arange(len(ids)))


class StringToy(toy.ToyModel):
    """The toy model with string ids in its cache."""

    def __init__(self, cache_size=64, **kwargs):
        super().__init__(cache_size=None, **kwargs)
        self.task.cache = tfnegcache.NegativeCache(
            cache_size, {"item_id": tf.TensorSpec([], tf.int64),
                         "tokens": tf.TensorSpec([toy.NUM_TOKENS], tf.int64)}, 16,
            id_dtype=tf.string)
        self.task.staleness = tf.keras.metrics.Mean(name="cache_staleness")

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        return self.task(
            self.query_tower(features["user_id"]), self.candidate_tower(candidates),
            candidate_ids=tf.strings.as_string(features["item_id"]),
            candidate_features=candidates, compute_metrics=False)


def test_h5_refuses_a_string_cache_before_writing(tmp_path):
    model = fitted(model_cls=StringToy)
    path = tmp_path / "w.h5"
    with pytest.raises(ValueError, match=r"\.h5 weights format cannot store string variables.*"
                                         r"negative_cache/ids:0.*TensorFlow format"):
        model.save_weights(str(path))
    assert not path.exists()
    model.save_weights(str(tmp_path / "w"))   # the TensorFlow format works
    restored = fitted(model_cls=StringToy, steps=1)
    restored.load_weights(str(tmp_path / "w"))
    probe = tf.constant([str(i) for i in range(toy.NUM_ITEMS)])
    np.testing.assert_array_equal(restored.task.cache.lookup(probe).numpy(),
                                  model.task.cache.lookup(probe).numpy())


class RenamedToy(toy.ToyModel):
    """The toy model whose cache calls `tokens` `words`, or keeps one more feature."""

    def __init__(self, spec, cache_size=128, **kwargs):
        super().__init__(cache_size=None, **kwargs)
        self.renames = {"words": "tokens"}
        self.task.cache = tfnegcache.NegativeCache(cache_size, spec, 16)
        self.task.staleness = tf.keras.metrics.Mean(name="cache_staleness")
        self.task.candidate_model = lambda f: self.candidate_tower(
            {"item_id": f["item_id"], "tokens": f.get("tokens", f.get("words"))})

    def compute_loss(self, features, training=False):
        candidates = {"item_id": features["item_id"], "tokens": features["tokens"]}
        cached = {key: features[self.renames.get(key, key)]
                  for key in self.task.cache.feature_spec}
        return self.task(
            self.query_tower(features["user_id"]), self.candidate_tower(candidates),
            candidate_ids=features["item_id"], candidate_features=cached,
            compute_metrics=False)


SPECS = {
    "renamed feature": {"item_id": tf.TensorSpec([], tf.int64),
                        "words": tf.TensorSpec([toy.NUM_TOKENS], tf.int64)},
    "added feature": {**toy.FEATURE_SPEC, "user_id": tf.TensorSpec([], tf.int64)},
}


@pytest.mark.parametrize("fmt", ["tf", "h5"])
@pytest.mark.parametrize("change", ["renamed feature", "added feature", "size"])
def test_a_changed_spec_is_refused_before_anything_is_restored(tmp_path, fmt, change):
    model = fitted()
    path = str(tmp_path / ("w.h5" if fmt == "h5" else "w"))
    model.save_weights(path)
    if change == "size":
        other = fitted(cache_size=256, steps=1)
        expected = r"size=256"
    else:
        other = RenamedToy(SPECS[change])
        other.compile(tf.keras.optimizers.Adam(0.05))
        other.fit(toy.dataset(toy.interactions(64, seed=2), 64), epochs=1, verbose=0)
        other(tf.constant([0], tf.int64))
        expected = "words" if change == "renamed feature" else "user_id"
    before = full_state(other)
    with pytest.raises(ValueError, match=rf"Cannot restore the cache 'negative_cache'.*saved as "
                                         rf"\[replicated, size=128.*tokens.*\], but the model's "
                                         rf"cache is \[.*{expected}.*Nothing was restored"):
        other.load_weights(path)
    assert_unchanged(before, other)


def test_check_checkpoint_guards_a_raw_checkpoint_restore(tmp_path):
    cache = fitted().task.cache
    path = tf.train.Checkpoint(cache=cache).write(str(tmp_path / "c"))
    same = tfnegcache.NegativeCache(128, toy.FEATURE_SPEC, 16)
    tfnegcache.check_checkpoint(tf.train.Checkpoint(cache=same), path)   # no error
    other = tfnegcache.NegativeCache(128, SPECS["renamed feature"], 16)
    checkpoint = tf.train.Checkpoint(cache=other)
    with pytest.raises(ValueError, match=r"saved as \[replicated, size=128.*tokens"):
        tfnegcache.check_checkpoint(checkpoint, path)
    np.testing.assert_array_equal(other.ids.numpy(), 0)


def test_a_checkpoint_without_the_cache_restores_the_towers_only(tmp_path):
    model = fitted()
    path = tf.train.Checkpoint(query_tower=model.query_tower).write(str(tmp_path / "towers"))
    other = fitted(steps=1)
    tf.train.Checkpoint(query_tower=other.query_tower).read(path).assert_consumed()
    np.testing.assert_array_equal(other.query_tower.embeddings.numpy(),
                                  model.query_tower.embeddings.numpy())
    assert os.path.exists(path + ".index")


@pytest.mark.parametrize("cache_type", [tfnegcache.NegativeCache, tfnegcache.ShardedNegativeCache])
def test_get_config_round_trips_both_cache_types(cache_type):
    spec = {"item_id": tf.TensorSpec([], tf.int64), "title": tf.TensorSpec([2], tf.string)}
    cache = cache_type(8, spec, 4, id_dtype=tf.string, embedding_dtype=tf.bfloat16, seed=3,
                       block_size=2, name="movies")
    rebuilt = cache_type.from_config(cache.get_config())
    assert type(rebuilt) is cache_type  # pylint: disable=unidiomatic-typecheck
    assert rebuilt.get_config() == cache.get_config()
    assert rebuilt.feature_spec == cache.feature_spec and rebuilt.name == "movies"
