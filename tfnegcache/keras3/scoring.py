"""Scoring a Keras 3 cache against a batch of queries, a tile at a time: the per-block
log-masses the sampler draws from and the evaluation loss's log-mass (docs/algorithm.md,
steps 2 and 5).

The cache is never scored as one `[B, N]` matrix: `SamplerPlan` (shared with the TF front end,
`tfnegcache._plan`) cuts it into blocks and chunks of blocks, and a sequential loop
(`lax.map` on JAX, a `tf.map_fn` with one iteration in flight on TensorFlow) scores one
`[B, chunk]` tile at a time: a matmul, the masks, and a `logsumexp` per block. Under XLA the
masks, `exp` and sums fuse into the passes over the tile (see docs/keras3.md for what this CPU
does with them). The TF front end's tricks for TensorFlow's unfused kernels (a shift from the
first chunk instead of per-block maxima, the excluded slot's block re-scored afterwards) are
not needed here.
"""

from keras import ops

from tfnegcache._plan import DEFAULT_TILE_ELEMENTS, SamplerPlan, plan_sampler  # noqa: F401
from tfnegcache.keras3 import _backend

NEG_INF = float("-inf")


def _tile(left, cached, bias, positions, excluded_slots):
    """`[P, B]` masked scores of the slots `cached` `[P, d]` (bias `[P]`, slots `positions`)
    against `left` = `[queries / T, 1]` `[B, d + 1]`.

    The bias rides in the matmul as a column, `[e, bias] . [q, 1] = q . e + bias`: XLA's CPU
    dot takes no epilogue, so a separate add would be one more pass over the tile (30% of
    the log-mass at 2^16 on this CPU). The tile is transposed so that a block's `logsumexp`
    reduces over a middle axis with the B queries minor, which XLA vectorises (a reduce over
    the minor axis of `[B, blocks, b]` was 1.2-3x slower).
    """
    rows = ops.concatenate([ops.cast(cached, left.dtype),
                            ops.expand_dims(ops.cast(bias, left.dtype), 1)], axis=1)
    scores = ops.einsum("pd,bd->pb", rows, left)
    if excluded_slots is not None:
        hit = ops.equal(ops.expand_dims(positions, 1), ops.expand_dims(excluded_slots, 0))
        scores = ops.where(hit, NEG_INF, scores)
    return scores


def _block_masses(tile, block):
    """`[P / block, B]` log-masses of the `block`-slot blocks of a `[P, B]` tile."""
    return ops.logsumexp(ops.reshape(tile, (-1, block, _backend.shape(tile)[1])), axis=1)


def block_log_masses(queries, embeddings, slot_bias, excluded_slots, plan: SamplerPlan):
    """Per-block `logsumexp` of the masked scores, one tile at a time.

    Args:
      queries: `[B, d]`, already multiplied by `1 / T` (no gradient flows here).
      embeddings: `[R, d]` with `R >= plan.num_slots` (the store's rows; rows past the slots,
        such as the spare row, are never read).
      slot_bias: `[N]`: 0 for eligible slots, `-inf` for empty or masked ones.
      excluded_slots: `[B]` int32, a slot excluded for query i alone (negative: none), or None.
      plan: blocks and chunks.

    Returns:
      `[B, num_blocks]` block log-masses (`-inf` for blocks with nothing eligible).
    """
    num_rows = queries.shape[0]   # None: dynamic (TensorFlow); reshapes use -1
    dim = queries.shape[1]
    size, block, per_chunk = plan.num_slots, plan.block_size, plan.blocks_per_chunk
    chunk = plan.chunk_size
    num_full = size // chunk
    left = ops.concatenate([queries, ops.ones_like(queries[:, :1])], axis=1)

    def one_chunk(index):
        start = index * chunk
        cached = ops.slice(embeddings, (start, 0), (chunk, dim))
        bias = ops.slice(slot_bias, (start,), (chunk,))
        positions = start + ops.arange(chunk, dtype="int32")
        return [_block_masses(_tile(left, cached, bias, positions, excluded_slots), block)]

    parts = []
    if num_full:
        (stacked,) = _backend.map_chunks(one_chunk, num_full,
                                         [((per_chunk, num_rows), queries.dtype)])
        parts.append(ops.reshape(stacked, (num_full * per_chunk, -1)))
    tail = size - num_full * chunk
    if tail:
        # The ragged last chunk, padded with -inf to whole blocks.
        start = num_full * chunk
        positions = start + ops.arange(tail, dtype="int32")
        tile = _tile(left, embeddings[start:size], slot_bias[start:size], positions,
                     excluded_slots)
        blocks = -(-tail // block)
        if blocks * block > tail:
            tile = ops.pad(tile, ((0, blocks * block - tail), (0, 0)),
                           constant_values=NEG_INF)
        parts.append(_block_masses(tile, block))
    masses = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)
    return ops.transpose(masses)   # [B, num_blocks]


def masked_scores(queries, embeddings, positions, slot_bias, excluded_slots, num_slots):
    """Scores of each draw's slots: `queries` `[B, d]` (temperature folded in) against the
    slots at `positions` `[B, k, P]`, every mask applied; positions `>= num_slots` are
    padding and score `-inf`."""
    valid = positions < num_slots
    safe = ops.minimum(positions, num_slots - 1)
    cached = ops.cast(ops.take(embeddings, safe, axis=0), queries.dtype)     # [B, k, P, d]
    scores = ops.einsum("bd,bkpd->bkp", queries, cached)
    scores = scores + ops.cast(ops.take(slot_bias, safe), queries.dtype)
    eligible = valid
    if excluded_slots is not None:
        eligible = ops.logical_and(
            eligible, ops.not_equal(positions, ops.reshape(excluded_slots, (-1, 1, 1))))
    return ops.where(eligible, scores, NEG_INF)
