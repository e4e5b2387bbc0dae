"""The streaming cache's insert rule: where one call's candidates go (docs/algorithm.md,
step 6), as a pure function of the ids and the cache's ring state.

- A call's rows are deduplicated by id; a repeated id keeps its last row.
- An id already cached refreshes its own slot.
- New ids take the oldest slots from the ring's cursor on, skipping slots whose candidate
  this call refreshes, so every candidate of a call is cached after it.
- More distinct ids than slots keeps the `size` whose last rows come latest, as if the rows
  were inserted one at a time.
"""

import dataclasses
from typing import Callable

import tensorflow as tf

_INT64_MAX = 2**63 - 1


@dataclasses.dataclass
class InsertPlan:
    """Where an insert's rows go.

    Attributes:
      rows: `[I]` int64, the rows of the call's inputs that are written, ...
      slots: `[I]` int64, ... into these slots (cached ids first, then new ones).
      new_rows: `[J]` int64, the rows whose ids enter the id index ...
      new_slots: `[J]` int64, ... at these slots (a suffix of `slots`).
      evicted_slots: `[E]` int64, filled slots that new ids take: their old ids leave the
        index.
      cursor: the ring's cursor after the insert.
      num_filled: the number of filled slots after the insert.
    """

    rows: tf.Tensor
    slots: tf.Tensor
    new_rows: tf.Tensor
    new_slots: tf.Tensor
    evicted_slots: tf.Tensor
    cursor: tf.Tensor
    num_filled: tf.Tensor


def rows_where(values: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """The rows of `values` (`[R, ...]`) where `keep` (`[R]` bool) is true, in order: what
    `tf.boolean_mask(values, keep)` returns, in 5 graph ops instead of about 27 (each op costs
    tracing time, once per traced step)."""
    return tf.gather(values, tf.reshape(tf.where(keep), [-1]))


def empty_plan(cursor: tf.Tensor, num_filled: tf.Tensor) -> InsertPlan:
    """The plan of a call that inserts nothing."""
    empty = tf.zeros([0], tf.int64)
    return InsertPlan(empty, empty, empty, empty, empty, tf.identity(cursor),
                      tf.identity(num_filled))


def plan_insert(ids: tf.Tensor, lookup: Callable[[tf.Tensor], tf.Tensor], cursor: tf.Tensor,
                num_filled: tf.Tensor, size: int) -> InsertPlan:
    """Plans the insert of `ids` (`[M]`) into a ring of `size` slots.

    Args:
      ids: the call's candidate ids, one per row.
      lookup: maps `[U]` ids to the slots holding them, int64, -1 where not cached.
      cursor: the ring's next slot to fill (int64 scalar).
      num_filled: the number of filled slots (int64 scalar).
      size: the number of slots.

    Returns:
      An `InsertPlan`.
    """
    size_t = tf.constant(size, tf.int64)
    unique_ids, position = tf.unique(ids, out_idx=tf.int64)
    num_unique = tf.size(unique_ids, out_type=tf.int64)
    last_row = tf.math.unsorted_segment_max(
        tf.range(tf.size(ids, out_type=tf.int64)), position, num_unique)
    # More distinct ids than slots: keep the `size` whose last rows come latest.
    ranked = tf.concat([tf.sort(last_row), [_INT64_MAX]], 0)
    kept = last_row >= ranked[tf.maximum(num_unique - size_t, 0)]
    unique_ids = rows_where(unique_ids, kept)
    rows = rows_where(last_row, kept)
    slots = tf.reshape(lookup(unique_ids), [-1])

    cached = tf.where(slots >= 0)[:, 0]
    new = tf.where(slots < 0)[:, 0]
    protected = tf.gather(slots, cached)
    num_new = tf.size(new, out_type=tf.int64)
    # The window of num_new + |protected| slots from the cursor always has enough free ones.
    width = num_new + tf.size(protected, out_type=tf.int64)
    window = (cursor + tf.range(width)) % size_t
    offset = (protected - cursor) % size_t
    offset = rows_where(offset, offset < width)
    blocked = tf.scatter_nd(offset[:, None], tf.ones_like(offset, tf.int32), [width]) > 0
    take = tf.where(tf.logical_not(blocked))[:num_new, 0]
    new_slots = tf.gather(window, take)
    next_cursor = tf.cond(num_new > 0, lambda: (cursor + take[-1] + 1) % size_t,
                          lambda: tf.identity(cursor))
    new_rows = tf.gather(rows, new)
    return InsertPlan(
        rows=tf.concat([tf.gather(rows, cached), new_rows], 0),
        slots=tf.concat([protected, new_slots], 0),
        new_rows=new_rows, new_slots=new_slots,
        evicted_slots=rows_where(new_slots, new_slots < num_filled),
        cursor=next_cursor, num_filled=tf.minimum(num_filled + num_new, size_t))
