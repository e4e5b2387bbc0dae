"""The id index of a Keras 3 cache: which slot holds an id, in fixed shapes.

JAX has no hash table, so the index is two `[N]` int32 arrays: the cached ids in ascending
order (empty entries hold `2**31 - 1`, after every id) and the slot of each. A lookup is a
binary search (`O(log N)` per id). An update removes the evicted ids and merges the new ones
in a single pass: each kept entry moves by the number of removed entries before it and new
ids below it, each new id lands after the kept entries and new ids below it; two scatters
write the merged arrays. That is `O(N)` memory traffic per training step (two 4 MiB arrays
at N = 2^20), against the `O(B N d)` of scoring the cache: measured in `docs/keras3.md`.

A dense `id -> slot` table would make updates `O(B)`, but needs ids bounded by a table size
that the cache does not know; the sorted arrays work for any int32 id.
"""

from keras import ops

from tfnegcache.keras3 import _backend

EMPTY = 2**31 - 1


def lookup(index_ids, index_slots, ids):
    """Slots holding `ids` (any shape, int32), -1 where an id is not cached."""
    num = index_ids.shape[0]
    flat = ops.reshape(ids, [-1])
    position = ops.minimum(ops.cast(ops.searchsorted(index_ids, flat, side="left"), "int32"),
                           num - 1)
    found = ops.equal(ops.take(index_ids, position), flat)
    slots = ops.where(found, ops.take(index_slots, position), -1)
    return ops.reshape(slots, _backend.shape(ids))


def update(index_ids, index_slots, removed_ids, removed, new_ids, new_slots, new):
    """The index after removing `removed_ids` where `removed` and adding `new_ids` at
    `new_slots` where `new` (`[E]` and `[J]` vectors; removed ids are cached, new ids are not,
    and the two sets are disjoint).

    Returns:
      `(index_ids, index_slots)`, each `[N]`.
    """
    num = index_ids.shape[0]
    # Entries to drop: the removed ids' positions (they are present).
    position = ops.minimum(
        ops.cast(ops.searchsorted(index_ids, removed_ids, side="left"), "int32"), num - 1)
    dropped = ops.scatter_update(
        ops.zeros([num + 1], "int32"),
        ops.expand_dims(ops.where(removed, position, num), -1),
        ops.ones_like(position))[:num] > 0
    kept = ops.logical_and(ops.logical_not(dropped), index_ids < EMPTY)
    kept_before = ops.concatenate(
        [ops.zeros([1], "int32"), ops.cumsum(ops.cast(kept, "int32"))], 0)   # [N + 1]
    # New ids in ascending order (absent ones sort last, as EMPTY).
    new_keys = ops.where(new, new_ids, EMPTY)
    order = ops.argsort(new_keys)
    sorted_new = ops.take(new_keys, order)
    sorted_slots = ops.take(new_slots, order)
    sorted_valid = sorted_new < EMPTY
    # Destinations: kept entries and valid new ids interleave in id order.
    new_below_entry = ops.cast(ops.searchsorted(sorted_new, index_ids, side="left"), "int32")
    entry_to = ops.where(kept, kept_before[:num] + new_below_entry, num)
    kept_below_new = ops.take(
        kept_before, ops.cast(ops.searchsorted(index_ids, sorted_new, side="left"), "int32"))
    new_to = ops.where(sorted_valid,
                       kept_below_new + ops.arange(_backend.num_rows(new_ids), dtype="int32"), num)
    destinations = ops.expand_dims(ops.concatenate([entry_to, new_to], 0), -1)
    merged_ids = ops.scatter_update(
        ops.full([num + 1], EMPTY, "int32"), destinations,
        ops.concatenate([index_ids, sorted_new], 0))[:num]
    merged_slots = ops.scatter_update(
        ops.full([num + 1], -1, "int32"), destinations,
        ops.concatenate([index_slots, ops.cast(sorted_slots, "int32")], 0))[:num]
    return merged_ids, merged_slots
