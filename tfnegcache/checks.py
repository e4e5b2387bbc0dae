"""Checks with messages that name what was wrong and what was expected.

- Arguments, at construction (`integer`, `temperature`): a `ValueError` before any state
  exists, in the keras-rs style "`x` must be ... Received: x=...".
- The run-time checks of a training step (`finite`, `same_rows`): each returns an op (or a
  checked tensor) for `tf.control_dependencies`; the step puts all of them in front of its
  first write, so a failing check leaves every variable as it was. In eager mode they raise
  as soon as they run, which is also before the first write.
"""

import tensorflow as tf

# The argument checks are pure Python, shared with the Keras 3 front end.
from tfnegcache._args import integer, temperature  # noqa: F401


def finite(tensor, what: str) -> tf.Tensor:
    """`tensor` (dense, or a `tf.IndexedSlices`' values), checked: fails with
    `InvalidArgumentError` "`what` has NaN or Inf" when any value is not finite."""
    if isinstance(tensor, tf.IndexedSlices):
        tensor = tensor.values
    tensor = tf.convert_to_tensor(tensor)
    if not tensor.dtype.is_floating:
        return tensor
    return tf.debugging.assert_all_finite(
        tensor, f"{what} has NaN or Inf (non-finite values); the step changed nothing")


def same_rows(tensor, num_rows, what: str, of: str) -> tf.Operation:
    """Fails with "`what` has R rows but there are N `of`" unless the first dimension of
    `tensor` is `num_rows`: a `ValueError` now when both are static, else an op that fails
    with `InvalidArgumentError` when it runs."""
    static_rows = tensor.shape[0]
    static_num = num_rows if isinstance(num_rows, int) else tf.get_static_value(num_rows)
    if static_rows is not None and static_num is not None:
        if static_rows != int(static_num):
            raise ValueError(f"{what} has {static_rows} rows but there are {int(static_num)} "
                             f"{of}. Received shape {tuple(tensor.shape)}.")
        return tf.no_op()
    rows = tf.shape(tensor, out_type=tf.int64)[0]
    num_rows = tf.cast(num_rows, tf.int64)
    escape = lambda text: text.replace("{", "{{").replace("}", "}}")  # noqa: E731
    template = f"{escape(what)} has {{}} rows but there are {{}} {escape(of)}; the step changed nothing"
    message = tf.strings.format(template, (rows, num_rows))
    return tf.debugging.Assert(tf.equal(rows, num_rows), [message])
