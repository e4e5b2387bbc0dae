"""Helpers of the Keras 3 tests: numbers out of tensors, gradients on either backend, a table
tower."""

import keras
import numpy as np
from keras import ops

import tfnegcache.keras3 as k3
from tfnegcache.keras3 import _backend

BACKEND = keras.backend.backend()


def numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def state(*layers):
    """Every variable of `layers` (and optimizers): `[(path, numpy array)]` in their order, so
    two instances of one model compare position by position."""
    return [(variable.path, numpy(variable.value).copy())
            for layer in layers for variable in layer.variables]


def assert_same_state(before, after):
    """Bit-identical (NaN equal to NaN), variable by variable."""
    assert len(before) == len(after)
    changed = [path for (path, a), (_, b) in zip(before, after)
               if a.shape != b.shape or not np.array_equal(a, b, equal_nan=True)]
    assert not changed, f"changed: {changed}"


def value_and_grad(fn, *args):
    """`(fn(*args), [d fn / d arg])` on the current backend (`fn` returns a scalar)."""
    if BACKEND == "jax":
        import jax
        return jax.value_and_grad(fn, argnums=tuple(range(len(args))))(*args)
    import tensorflow as tf
    args = [tf.convert_to_tensor(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args)
        value = fn(*args)
    return value, tape.gradient(value, args)


def compiled(fn):
    return _backend.compile_function(fn)


class TableTower(keras.layers.Layer):
    """Candidate tower: a trainable embedding table indexed by item id."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = self.add_weight(shape=table.shape, name="table",
                                     initializer=keras.initializers.Constant(table))

    def call(self, features):
        return ops.take(self.table, features["item_id"], axis=0)


SPEC = {"item_id": ((), "int32")}


def fill(cache, tower, ids):
    ids = np.asarray(ids, np.int32)
    cache.insert({"item_id": ids}, tower({"item_id": ids}), ids)


def cache(size, seed=0, **kwargs):
    return k3.NegativeCache(size, SPEC, 4, seed=seed, **kwargs)
