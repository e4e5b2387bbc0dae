"""The statistical tests' draws: what a stochastic step gives at cache steps 0, 1, ..., n - 1."""

import tfnegcache  # noqa: F401  first: it selects Keras 2 before TensorFlow loads

import tensorflow as tf


def draws(one, num, dtype=tf.float32):
    """`np.stack([one(tf.constant(s, tf.int64)) for s in range(num)])` (per output, when `one`
    returns a tuple: `dtype` is then a tuple too).

    As one `tf.map_fn` loop in one `tf.function` call rather than `num` calls: the same draws,
    bit for bit (each iteration's step seeds its sampler), with about a third less CPU for the
    tests that use it (docs/tests.md). The iterations run one at a time
    (`parallel_iterations=1`), since `one` sets the cache's step variable."""

    @tf.function
    def every_step():
        return tf.map_fn(one, tf.range(num, dtype=tf.int64), fn_output_signature=dtype,
                         parallel_iterations=1)

    return tf.nest.map_structure(lambda t: t.numpy(), every_step())
