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


def stacked(fn, xs):
    """`[fn(x) for x in xs]` stacked, as one loop inside the program being traced (`jax.lax.map`
    or `tf.map_fn`): a statistical test's thousands of draws in one call, not one call each.
    `fn` returns one float32 tensor. The draws are those of one call each: bit for bit on
    TensorFlow, to float32 rounding (6e-8) on JAX, whose loop body XLA compiles as a whole."""
    if BACKEND == "jax":
        import jax
        return jax.lax.map(fn, xs)
    import tensorflow as tf
    return tf.map_fn(fn, xs, fn_output_signature=tf.float32)


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
