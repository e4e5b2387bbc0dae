"""The few things `keras.ops` does not say the same way on JAX and TensorFlow: stateless random
streams, a sequential loop over chunks, in-place row scatters into a variable, compiling an
eager helper, and run-time row checks.

Everything else in `tfnegcache.keras3` is `keras.ops`. The PyTorch backend would need its own
version of each function here (and `torch.compile`-friendly fixed shapes are already what the
rest uses); it is not supported.
"""

import keras
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope

BACKEND = keras.backend.backend()
SUPPORTED = ("jax", "tensorflow")
INT32_MAX = 2**31 - 1


def check_backend() -> None:
    """Raises ImportError unless Keras runs on a supported backend."""
    if BACKEND not in SUPPORTED:
        raise ImportError(
            "tfnegcache.keras3 runs on the JAX and TensorFlow backends of Keras 3. Received: "
            f"KERAS_BACKEND={BACKEND!r}. Set KERAS_BACKEND=jax or KERAS_BACKEND=tensorflow "
            "before Keras is first imported.")


def is_jax() -> bool:
    return BACKEND == "jax"


# ---------------------------------------------------------------------------- random streams
# A key is a `[2]` integer tensor: jax's raw PRNG key (uint32) or TensorFlow's stateless seed
# (int64). The streams differ between backends; on one backend a draw is a function of its key.


def key(seed: int, stream: int):
    """The root key of the stream `stream` of a cache seeded with `seed`."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return jax.random.fold_in(jax.random.PRNGKey(seed), stream)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, stream], tf.int64), 0)


def fold_in(base, data):
    """A key derived from `base` and the integer scalar `data` (a tensor or a Python int)."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return jax.random.fold_in(base, ops.cast(data, "uint32"))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.random.experimental.stateless_fold_in(base, tf.cast(data, tf.int64))


def split(base, num: int):
    """`num` independent keys from `base`."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return list(jax.random.split(base, num))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.unstack(tf.random.experimental.stateless_split(base, num))


def uniform(shape, base, dtype="float32", minval=0.0, maxval=1.0):
    """Uniform on `[minval, maxval)` from the key `base`."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return jax.random.uniform(base, shape, dtype=dtype, minval=minval, maxval=maxval)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.random.stateless_uniform(shape, base, minval=minval, maxval=maxval, dtype=dtype)


# ---------------------------------------------------------------------------- loops


def map_chunks(fn, num: int, output_shapes):
    """`fn(i)` for i in `[0, num)`, one after the other (one tile alive at a time), stacked:
    a list of `[num, *shape]` tensors. `output_shapes` lists `(shape, dtype)` of `fn`'s outputs
    (`fn` returns a list or tuple of that length)."""
    if num == 1:
        return [ops.expand_dims(x, 0) for x in fn(ops.convert_to_tensor(0, "int32"))]
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
        return list(jax.lax.map(lambda i: tuple(fn(i)), jnp.arange(num, dtype=jnp.int32)))
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    signature = tuple(tf.TensorSpec(shape, dtype) for shape, dtype in output_shapes)
    # parallel_iterations=1: a while loop holding one tile at a time.
    return list(tf.map_fn(lambda i: tuple(fn(i)), tf.range(num), fn_output_signature=signature,
                          parallel_iterations=1))


def cond(pred, true_fn, false_fn):
    """`true_fn()` if `pred` else `false_fn()`, inside a compiled step (both traced)."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return jax.lax.cond(pred, true_fn, false_fn)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.cond(pred, true_fn, false_fn)


# ---------------------------------------------------------------------------- variables


def scatter_rows(variable, slots, rows) -> None:
    """`variable[slots] = rows` (`slots` `[S]` int32, in bounds; a slot given twice must carry
    the same row). Inside a `keras.StatelessScope` (a JAX step) the new value is recorded;
    otherwise the variable is updated in place."""
    rows = ops.cast(rows, variable.dtype)
    if BACKEND == "tensorflow" and not in_stateless_scope():
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        variable.value.scatter_update(tf.IndexedSlices(rows, tf.cast(slots, tf.int32)))
        return
    variable.assign(ops.scatter_update(variable.value, ops.expand_dims(slots, -1), rows))


def compile_function(fn, donate_first: bool = False):
    """`fn` compiled for eager callers: `jax.jit` (donating the first argument's buffers when
    asked, so a cache's arrays are updated in place) or `tf.function`."""
    if BACKEND == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return jax.jit(fn, donate_argnums=(0,) if donate_first else ())
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf.function(fn, reduce_retracing=True)


# ---------------------------------------------------------------------------- checks


def shape(tensor):
    """`tensor`'s shape: Python ints where static (always, under JAX), scalar tensors where
    TensorFlow knows a dimension at run time only (a dynamic batch). `keras.ops.shape` gives
    None for those."""
    static = tuple(tensor.shape)
    if all(d is not None for d in static):
        return tuple(int(d) for d in static)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    dynamic = tf.shape(tensor)
    return [int(d) if d is not None else dynamic[i] for i, d in enumerate(static)]


def num_rows(tensor):
    """The first dimension of `tensor` (see `shape`); the fixed-shape code works with both
    kinds."""
    return shape(tensor)[0]


def static_rows(tensor):
    """The first dimension of `tensor` as a Python int, or None when it is known at run time
    only (TensorFlow with a dynamic batch)."""
    dim = tensor.shape[0]
    return None if dim is None else int(dim)


def same_rows(tensor, num_rows_, what: str, of: str):
    """Raises ValueError now when `tensor`'s rows and `num_rows` are both static and differ;
    returns a `(message, ok)` run-time check (a bool scalar) when either is dynamic, else
    None."""
    if num_rows_ is None:
        return None
    rows = static_rows(tensor)
    if rows is not None and isinstance(num_rows_, int):
        if rows != num_rows_:
            raise ValueError(f"{what} has {rows} rows but there are {num_rows_} {of}. "
                             f"Received shape {tuple(tensor.shape)}.")
        return None
    ok = ops.equal(num_rows(tensor), num_rows_)
    return (f"{what} does not have one row per {of[:-1] if of.endswith('s') else of}", ok)
