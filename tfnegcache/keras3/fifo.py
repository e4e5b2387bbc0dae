"""The streaming cache's insert rule in fixed shapes (no host round-trip, jit-compatible): where
one call's candidates go, as a pure function of their ids and the ring's state.

The rule is the TF front end's (`tfnegcache.fifo`):

- a call's rows are deduplicated by id; a repeated id keeps its last row;
- an id already cached refreshes its own slot;
- new ids, in order of first appearance, take the oldest slots from the ring's cursor on,
  skipping slots whose candidate this call refreshes;
- more distinct ids than slots keeps the `size` whose last rows come latest.

Every output has the call's static row count M: one entry per *group* (a distinct id; the
groups past the number of distinct ids are padding), so the plan compiles once per batch
shape. A group that writes nothing targets slot `size`, the store's spare row.
"""

import dataclasses
from typing import Callable

from keras import ops

from tfnegcache.keras3 import _backend

INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class InsertPlan:
    """Where an insert's rows go; `[M]` per group unless said otherwise.

    Attributes:
      rows: int32, the input row each group writes (its id's last row).
      slots: int32, the slot it writes (`size`, the spare row, for groups that write nothing).
      ids: int32, the group's id.
      is_new: bool, the id enters the id index at `slots` (a new id, kept).
      num_new: int32 scalar, how many new ids enter.
      cursor: int32 scalar, the ring's cursor after the insert.
      num_filled: int32 scalar, filled slots after the insert.
    """

    rows: object
    slots: object
    ids: object
    is_new: object
    num_new: object
    cursor: object
    num_filled: object


def group_by_id(ids):
    """`(group_ids, first_row, last_row, valid)`, each `[M]`: the distinct ids of `ids` (`[M]`
    int32) in ascending order, the first and last row holding each, and which of the M group
    entries are real (the first `num_distinct`)."""
    num_rows = _backend.num_rows(ids)
    rows = ops.arange(num_rows, dtype="int32")
    order = ops.cast(ops.argsort(ids), "int32")
    sorted_ids = ops.take(ids, order)
    starts = ops.concatenate(
        [ops.ones([1], "bool"), ops.not_equal(sorted_ids[1:], sorted_ids[:-1])], 0)
    group = ops.cumsum(ops.cast(starts, "int32")) - 1            # [M], ascending
    num_groups = ops.sum(ops.cast(starts, "int32"))
    last = ops.segment_max(order, group, num_segments=num_rows)
    first = -ops.segment_max(-order, group, num_segments=num_rows)
    group_ids = ops.segment_max(sorted_ids, group, num_segments=num_rows)
    valid = rows < num_groups
    return (ops.where(valid, group_ids, INT32_MAX), ops.where(valid, first, 0),
            ops.where(valid, last, 0), valid)


def first_occurrences(keys, valid):
    """`[S]` bool: `valid` rows whose key no earlier valid row has (`keys` `[S]` int32)."""
    num_rows = _backend.num_rows(keys)
    if isinstance(num_rows, int) and num_rows == 0:
        return valid
    keys = ops.where(valid, keys, INT32_MAX)
    order = ops.cast(ops.argsort(keys), "int32")
    sorted_keys = ops.take(keys, order)
    starts = ops.concatenate(
        [ops.ones([1], "bool"), ops.not_equal(sorted_keys[1:], sorted_keys[:-1])], 0)
    group = ops.cumsum(ops.cast(starts, "int32")) - 1
    first = -ops.segment_max(-order, group, num_segments=num_rows)
    is_first_sorted = ops.equal(order, ops.take(first, group))
    # `order` is a permutation: scatter the flags back to row order.
    is_first = ops.scatter_update(ops.zeros([num_rows], "bool"), ops.expand_dims(order, -1),
                                  is_first_sorted)
    return ops.logical_and(is_first, valid)


def _mark(length: int, positions, mask):
    """`[length]` bool, True at `positions` where `mask` (positions in `[0, length)`)."""
    positions = ops.where(mask, positions, length)
    marks = ops.scatter_update(ops.zeros([length + 1], "int32"), ops.expand_dims(positions, -1),
                               ops.ones_like(positions))
    return marks[:length] > 0


def plan_insert(ids, lookup: Callable, cursor, num_filled, size: int) -> InsertPlan:
    """Plans the insert of `ids` (`[M]` int32, M static) into a ring of `size` slots.

    Args:
      ids: the call's candidate ids, one per row.
      lookup: maps `[M]` int32 ids to the slots holding them, -1 where not cached.
      cursor: the ring's next slot to fill (int32 scalar).
      num_filled: the number of filled slots (int32 scalar).
      size: the number of slots.

    Returns:
      An `InsertPlan`.
    """
    num_rows = _backend.num_rows(ids)
    cursor = ops.cast(cursor, "int32")
    num_filled = ops.cast(num_filled, "int32")
    group_ids, first, last, kept = group_by_id(ids)
    if not isinstance(num_rows, int) or num_rows > size:
        # More distinct ids than slots: keep the `size` groups whose last rows come latest.
        latest = ops.where(kept, last, -1)
        descending = -ops.sort(-latest)
        threshold = ops.take(descending, ops.minimum(num_rows, size) - 1)
        kept = ops.logical_and(kept, ops.logical_or(ops.convert_to_tensor(num_rows) <= size,
                                                    latest >= threshold))
    cached_slot = ops.cast(lookup(group_ids), "int32")
    cached = ops.logical_and(kept, cached_slot >= 0)
    new = ops.logical_and(kept, cached_slot < 0)
    num_new = ops.sum(ops.cast(new, "int32"))
    # New ids take the free window positions in order of their first row.
    firsts = ops.cast(_mark(num_rows, first, new), "int32")
    rank = ops.take(ops.cumsum(firsts) - firsts, first)
    # The window of min(M, size) slots from the cursor holds enough free slots: kept groups
    # (new + cached) number at most that, and only the cached ones block a window slot.
    width = min(num_rows, size) if isinstance(num_rows, int) else ops.minimum(num_rows, size)
    offset = ops.mod(cached_slot - cursor + size, size)
    blocked = _mark(width, offset, ops.logical_and(cached, offset < width))
    free_count = ops.cumsum(1 - ops.cast(blocked, "int32"))      # [width]
    position = ops.cast(ops.searchsorted(free_count, rank + 1, side="left"), "int32")
    position = ops.minimum(position, width - 1)
    new_slot = ops.mod(cursor + position, size)
    slots = ops.where(cached, cached_slot, ops.where(new, new_slot, size))
    last_position = ops.cast(
        ops.searchsorted(free_count, ops.expand_dims(ops.maximum(num_new, 1), 0),
                         side="left")[0], "int32")
    next_cursor = ops.where(num_new > 0, ops.mod(cursor + last_position + 1, size), cursor)
    return InsertPlan(rows=last, slots=ops.cast(slots, "int32"), ids=group_ids, is_new=new,
                      num_new=num_new, cursor=next_cursor,
                      num_filled=ops.minimum(num_filled + num_new, size))
