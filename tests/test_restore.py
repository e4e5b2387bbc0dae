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


# ------------------------------------------------------------------ every save format


class SavableToy(toy.ToyModel):
    """The toy model as `model.save` needs it: a config, and a `call` that builds both towers."""

    def __init__(self, cache_size=128, **kwargs):
        super().__init__(cache_size=cache_size, **kwargs)

    def get_config(self):
        return {"cache_size": self.task.cache.size}

    def call(self, features):
        return self.query_tower(features["user_id"]), self.candidate_tower(
            {"item_id": features["item_id"], "tokens": features["tokens"]})


def savable(steps=4, model_cls=SavableToy, cache_size=128):
    """A model after `steps` steps, built (called once) as saving and loading need."""
    model = model_cls(cache_size=cache_size)
    model.compile(tf.keras.optimizers.Adam(0.05))
    model.fit(toy.dataset(toy.interactions(64 * steps, seed=1), 64), epochs=1, verbose=0)
    if model_cls is SavableToy:
        model({k: tf.constant(v) for k, v in toy.interactions(2, seed=0).items()})
    else:
        model(tf.constant([0], tf.int64))
    return model


def state(model):
    """Every weight, optimizer variable and id index of `model`, in order (names differ
    between two instances of one model)."""
    values = [v.numpy() for v in model.weights] + [v.numpy() for v in model.optimizer.variables()]
    for task in model.cache_tasks():
        for store in task.cache.stores():
            keys, slots = (t.numpy() for t in store.index.export())
            order = np.argsort(keys)
            values += [keys[order], slots[order]]
    return values


def assert_same_state(a, b):
    first, second = state(a), state(b)
    assert len(first) == len(second)
    for i, (x, y) in enumerate(zip(first, second)):
        np.testing.assert_array_equal(x, y, err_msg=f"state entry {i}")


def assert_index_matches_ids(model):
    cache = model.task.cache
    filled = int(cache.num_filled.numpy())
    ids = cache.ids.numpy()[:filled]
    assert len(np.unique(ids)) == filled
    assert int(cache.index.size().numpy()) == filled
    np.testing.assert_array_equal(cache.lookup(tf.constant(ids)).numpy(), np.arange(filled))


def more_steps(*models):
    data = toy.dataset(toy.interactions(64 * 3, seed=4), 64)
    for model in models:
        model.fit(data, epochs=1, verbose=0)


def test_keras_format_restores_the_cache_with_its_index_and_resumes_exactly(tmp_path):
    model = savable()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = tf.keras.models.load_model(path, custom_objects={"SavableToy": SavableToy})
    assert_same_state(model, loaded)     # the optimizer and the id index included
    more_steps(model, loaded)
    assert_same_state(model, loaded)
    assert_index_matches_ids(loaded)


@pytest.mark.parametrize("model_cls", [toy.ToyModel, StringToy])
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_keras_format_weights_restore_the_index_into_a_built_model(tmp_path, suffix, model_cls):
    model = savable(model_cls=model_cls, cache_size=64)
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".keras":
        model.save(path)
    else:
        model.save_weights(path)
    restored = savable(steps=1, model_cls=model_cls, cache_size=64)   # another cache state
    restored.load_weights(path)
    assert_same_state(model, restored)
    more_steps(model, restored)
    assert_same_state(model, restored)
    assert_index_matches_ids(restored)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_keras_format_weights_of_another_cache_are_refused_before_anything_is_restored(
        tmp_path, suffix):
    model = savable()
    path = str(tmp_path / f"w{suffix}")
    model.save(path) if suffix == ".keras" else model.save_weights(path)
    other = savable(steps=1, cache_size=256)
    before = full_state(other)
    with pytest.raises(ValueError, match=r"Cannot restore the cache 'negative_cache'.*saved as "
                                         r"\[replicated, size=128, .*\], but the model's cache "
                                         r"is \[replicated, size=256, .*Nothing was restored"):
        other.load_weights(path)
    assert_unchanged(before, other)


def test_savedmodel_keeps_the_cache_and_its_index(tmp_path):
    model = savable()
    model.save(str(tmp_path / "saved"))
    loaded = tf.keras.models.load_model(str(tmp_path / "saved"),
                                        custom_objects={"SavableToy": SavableToy})
    # The TensorFlow SavedModel keeps every variable and the index (Keras does not restore
    # an optimizer from it: its state starts afresh).
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    np.testing.assert_array_equal(lookups(loaded), lookups(model))
    assert int(loaded.task.cache.index.size().numpy()) == 128
    loaded.compile(tf.keras.optimizers.Adam(0.05))
    more_steps(loaded)
    assert_index_matches_ids(loaded)


def test_tf_checkpoint_and_set_weights_keep_the_index(tmp_path):
    model = savable()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = savable(steps=1)
    tf.train.Checkpoint(model=restored).read(path).assert_existing_objects_matched()
    assert_same_state(model, restored)
    more_steps(model, restored)
    assert_same_state(model, restored)
    copied = savable(steps=1)
    copied.set_weights(model.get_weights())
    np.testing.assert_array_equal(lookups(copied), lookups(model))
    assert_index_matches_ids(copied)
