"""Scoring the cache against a batch of queries, a tile at a time: the per-block log-masses
that the sampler draws from and the loss's log-mass sums (docs/algorithm.md, steps 2 and 5).

The cache is never scored as one `[B, N]` matrix: `SamplerPlan` cuts it into blocks (the
sampler's first stage draws a block) and chunks of blocks (a tile `[B, chunk]` scored at
once). `block_log_masses` is the hot path: every `B * N` score passes through it once, as
one matmul, one `exp` and one sum per tile.

Queries may be `[B, d]` or multi-head `[B, H, d]`: a slot's score is then the max over heads
of `<q_ih, e_j>` ("maxsim", as `tfrs.tasks.Retrieval` scores multi-head queries).
"""

from typing import Optional

import tensorflow as tf

# The sampler's plan (blocks and chunks) is pure Python, shared with the Keras 3 front end.
from tfnegcache._plan import DEFAULT_TILE_ELEMENTS, SamplerPlan, plan_sampler  # noqa: F401

NEG_INF = float("-inf")


def query_heads(queries: tf.Tensor) -> int:
    """H of `[B, H, d]` queries; 1 for `[B, d]` queries or when H is not static (then only
    the tile budget assumes one head)."""
    if queries.shape.rank == 3:
        return queries.shape[1] or 1
    return 1


def masked_scores(queries, embeddings, positions, slot_bias, excluded_slots, inv_temperature,
                   num_slots, scoring_dtype=None):
    """Scores queries against the slots at `positions` with every mask applied.

    `positions` is `[P]` (one tile shared by every query: a matmul) or `[B, k, P]` (a block per
    draw: a batched dot product). Positions `>= num_slots` are padding and score `-inf`.
    `[B, H, d]` queries score a slot by their best head. With a `scoring_dtype`, the scores are
    `<q / T, e>` from inputs rounded to it, the result rounded to it by the platform's kernel
    (a batched matmul here, a matmul in `block_log_masses`: on some CPUs the two round their
    output differently, so a draw reports the probability it actually used, `log_prob`).
    """
    valid = positions < num_slots
    safe = tf.minimum(positions, num_slots - 1)
    dtype, score_dtype = queries.dtype, _scoring_dtype(queries, scoring_dtype)
    cached = tf.cast(tf.gather(embeddings, safe), score_dtype)
    if score_dtype != dtype:
        queries = tf.cast(queries * tf.cast(inv_temperature, dtype), score_dtype)
        inv_temperature = 1.0
    multi_head = queries.shape.rank == 3
    if positions.shape.rank == 1:
        if multi_head:
            scores = tf.reduce_max(tf.einsum("bhd,pd->bhp", queries, cached), axis=1)
        else:
            scores = tf.matmul(queries, cached, transpose_b=True)
        expand = lambda x: x[None, :]  # noqa: E731
        excluded = excluded_slots[:, None] if excluded_slots is not None else None
    else:
        if multi_head:
            scores = tf.reduce_max(tf.einsum("bhd,bkpd->bkhp", queries, cached), axis=2)
        else:
            scores = tf.einsum("bd,bkpd->bkp", queries, cached)
        expand = lambda x: x  # noqa: E731
        excluded = excluded_slots[:, None, None] if excluded_slots is not None else None
    bias = tf.cast(tf.gather(slot_bias, safe), dtype)
    scores = tf.cast(scores, dtype) * tf.cast(inv_temperature, dtype) + expand(bias)
    eligible = expand(valid)
    if excluded is not None:
        eligible = tf.logical_and(eligible, expand(positions) != excluded)
    return tf.where(eligible, scores, NEG_INF)


def map_chunks(one_chunk, num_chunks: int, output_spec, num_rows):
    """`one_chunk(i)` for every chunk i, one after the other, each output `[B, w]` joined
    along its second axis into `[B, num_chunks * w]` (a structure of outputs is joined
    leaf by leaf)."""
    if num_chunks == 1:
        return one_chunk(0)
    # A while loop with parallel_iterations=1 holds one tile at a time: peak memory does
    # not grow with N.
    stacked = tf.map_fn(one_chunk, tf.range(num_chunks), fn_output_signature=output_spec,
                        parallel_iterations=1)
    return tf.nest.map_structure(
        lambda x: tf.reshape(tf.transpose(x, [1, 0, 2]), [num_rows, -1]), stacked)


# The shifted tiles (see `block_log_masses`) subtract a per-query shift `c_i = m_i + margin`,
# `m_i` the query's best block log-mass in the first chunk (at least its best score there, at
# most `log b` above it). A score is lost to underflow only below `c_i - 87` (float32 `exp`
# flushes below e^-87.3), i.e. more than `67 - log b >= 60` below the query's best score: with
# N <= 2^30 slots the lost mass is under `2^30 e^-60 < 1e-17` of the total, far below float32
# resolution. A later score overflows only if it beats `m_i` by more than `88 + margin`; then
# the step falls back to exact max-shifted tiles.
_SHIFT_MARGIN = 20.0


def _scoring_dtype(queries, scoring_dtype):
    return tf.as_dtype(scoring_dtype) if scoring_dtype is not None else queries.dtype


def _chunk_rows(embeddings, slot_bias, plan, chunk_index, even):
    """The `[chunk, d]` embeddings and `[chunk]` bias of one chunk (`-inf` past `num_slots`)."""
    start = chunk_index * plan.chunk_size
    if even:
        bias = tf.slice(slot_bias, [start], [plan.chunk_size])
        if isinstance(embeddings, tf.Variable):
            # A gather of the chunk's rows, not a slice of a dense read: once a variable has
            # had sparse writes, TensorFlow copies all of it on every dense read.
            return tf.gather(embeddings, start + tf.range(plan.chunk_size)), bias
        return tf.slice(embeddings, [start, 0], [plan.chunk_size, -1]), bias
    positions = start + tf.range(plan.chunk_size)
    safe = tf.minimum(positions, plan.num_slots - 1)
    bias = tf.where(positions < plan.num_slots, tf.gather(slot_bias, safe), NEG_INF)
    return tf.gather(embeddings, safe), bias


def block_log_masses(queries, embeddings, slot_bias, excluded_slots, inv_temperature,
                     plan: SamplerPlan, scoring_dtype=None,
                     scattered_bias: bool = False) -> tf.Tensor:
    """Per-block `logsumexp` of masked scores, scoring one tile of the cache at a time: the
    shifted tiles of `tiled_block_log_masses`, or exact tiles where those cannot be used.

    Returns:
      `[B, num_blocks]` block log-masses in the queries' dtype (`-inf` for blocks with nothing
      eligible, and possibly for blocks more than 60 below the query's best, whose share of
      the mass is under e^-60).
    """
    shifted, trouble, exact = tiled_block_log_masses(
        queries, embeddings, slot_bias, excluded_slots, inv_temperature, plan, scoring_dtype,
        scattered_bias)
    if shifted is None:
        return exact()
    return tf.cond(trouble, exact, lambda: shifted)


def tiled_block_log_masses(queries, embeddings, slot_bias, excluded_slots, inv_temperature,
                           plan: SamplerPlan, scoring_dtype=None, scattered_bias: bool = False):
    """The block log-masses by shifted tiles, and whether they must be recomputed exactly.

    The tile loop is the sampler's hot path (it touches all `B * N` scores), so a tile costs one
    matmul, one `exp` and one sum, and nothing else:

    - the temperature is folded into the queries;
    - the first chunk is reduced exactly (a max-shifted `logsumexp` of `[B, chunk]` scores,
      the slot bias riding in the matmul as a column, `[q, 1] . [e, bias] = q . e + bias`);
      its best block mass `m_i` gives each query a shift `c_i = m_i + margin` (see
      `_SHIFT_MARGIN` for why this is exact in float32);
    - later tiles are transposed, `[chunk, B]`: the chunk's cached rows times the queries, the
      shift added per query by a bias add, then `exp` and the sums over each block's
      contiguous rows;
    - a query's excluded slot (its positive) is not masked in the tiles: the one block that
      holds it is re-scored exactly afterwards (`[B, b]` work, not `[B, N]`);
    - slots ineligible for every query ride in the later tiles as a bias column when they
      are scattered (`scattered_bias`: masked in-batch candidates); when they are only the
      empty tail and padding, the tiles skip them and the blocks holding one are re-scored
      with the bias;
    - if any later tile overflows the shift, or the first chunk has nothing eligible for some
      query, every block is recomputed by exact max-shifted tiles.

    `[B, H, d]` queries are scored as `B * H` rows by the same matmul, and each tile is reduced
    to its max over heads first: the bias and the shift are the same for every head of a
    query, so they commute with the max.

    `scoring_dtype` (e.g. `tf.bfloat16`): the matmul's dtype (queries and cached embeddings
    are rounded to it, and so are the scores it returns); the shift, `exp` and sums stay in
    the queries' dtype. Default: the queries' dtype.

    Returns:
      `(masses, trouble, exact)`: the `[B, num_blocks]` masses of the shifted tiles (None
      with a single chunk, which is reduced exactly), a bool tensor, True when they cannot be
      used, and a function computing the masses by exact max-shifted tiles.
    """
    dtype = queries.dtype
    score_dtype = _scoring_dtype(queries, scoring_dtype)
    num_rows = tf.shape(queries)[0]
    multi_head = queries.shape.rank == 3
    num_heads = tf.shape(queries)[1] if multi_head else 1
    if multi_head:
        dim = queries.shape[2] if queries.shape[2] is not None else tf.shape(queries)[2]
        queries = tf.reshape(queries, [num_rows * num_heads, dim])
    scaled = queries * tf.cast(inv_temperature, dtype)
    slot_bias = tf.cast(slot_bias, dtype)
    even = plan.num_slots % plan.chunk_size == 0

    def scores(left, chunk_index):
        cached, bias = _chunk_rows(embeddings, slot_bias, plan, chunk_index, even)
        columns = [tf.cast(cached, score_dtype), tf.cast(bias, score_dtype)[:, None]]
        tile = tf.matmul(left, tf.concat(columns, axis=1), transpose_b=True)
        if multi_head:
            tile = tf.reduce_max(tf.reshape(tile, [num_rows, num_heads, plan.chunk_size]), 1)
        return tf.cast(tile, dtype)   # [B, chunk]

    left = tf.cast(tf.concat([scaled, tf.ones_like(scaled[:, :1])], axis=1), score_dtype)

    def exact_chunk(chunk_index):
        tile = scores(left, chunk_index)
        if excluded_slots is not None:
            positions = chunk_index * plan.chunk_size + tf.range(plan.chunk_size)
            tile = tf.where(positions[None, :] != excluded_slots[:, None], tile, NEG_INF)
        blocks = tf.reshape(tile, [num_rows, plan.blocks_per_chunk, plan.block_size])
        return tf.reduce_logsumexp(blocks, axis=-1)

    def exact():
        return map_chunks(exact_chunk, plan.num_chunks,
                           tf.TensorSpec([None, plan.blocks_per_chunk], dtype), num_rows)

    def exact_masses():
        return exact()[:, : plan.num_blocks]

    if plan.num_chunks == 1:
        return None, tf.constant(True), exact_masses

    # The block holding each query's excluded slot, re-scored exactly with the slot masked:
    # later tiles and the first one score every slot, and these values replace theirs.
    if excluded_slots is not None:
        fixed_block, fixed_mass = _excluded_blocks(
            tf.reshape(queries, [num_rows, num_heads, -1]) if multi_head else queries,
            embeddings, slot_bias, excluded_slots, inv_temperature, plan, scoring_dtype)
    first = scores(left, 0)
    first_masses = tf.reduce_logsumexp(
        tf.reshape(first, [num_rows, plan.blocks_per_chunk, plan.block_size]), axis=-1)
    if excluded_slots is not None:
        first_masses = _replace(first_masses, fixed_block, fixed_mass)
    best = tf.reduce_max(first_masses, axis=-1)              # [B], >= the best score
    shift = tf.where(tf.math.is_finite(best), best + _SHIFT_MARGIN, 0.0)
    # Later tiles: the shift by a bias add (oneDNN fuses it into the matmul). When the bias
    # masks only the empty tail (whole dead blocks and one partial block), the tiles skip it
    # and the one block is re-scored (`_rescore_bias_holes`). Masks scattered over the cache
    # (a batch's candidates) ride in the tiles as a bias column: re-scoring a block per
    # masked slot cost more (at B = 256, 2^14-2^18 slots: +6 to +23 ms, where the column
    # costs at most 4% over clean tiles).
    clean = not scattered_bias and (
        plan.num_slots >= 2 * ((queries.shape[0] or 512) + 2) * plan.block_size)
    plain = tf.cast(scaled, score_dtype)

    def shifted_chunk(chunk_index):
        cached, bias = _chunk_rows(embeddings, slot_bias, plan, chunk_index + 1, even)
        cached = tf.cast(cached, score_dtype)
        if clean:
            tile = tf.matmul(cached, plain, transpose_b=True)
        else:
            tile = tf.matmul(tf.concat([cached, tf.cast(bias, score_dtype)[:, None]], 1), left,
                             transpose_b=True)
        tile = tf.cast(tile, dtype)
        if multi_head:
            tile = tf.reduce_max(tf.reshape(tile, [plan.chunk_size, num_rows, num_heads]), -1)
        tile = tf.nn.bias_add(tile, -shift)
        sums = tf.reduce_sum(
            tf.exp(tf.reshape(tile, [plan.blocks_per_chunk, plan.block_size, num_rows])), 1)
        return tf.math.log(sums)   # [blocks_per_chunk, B]

    if plan.num_chunks == 2:
        rest = shifted_chunk(0)
    else:
        rest = tf.map_fn(shifted_chunk, tf.range(plan.num_chunks - 1), parallel_iterations=1,
                         fn_output_signature=tf.TensorSpec([plan.blocks_per_chunk, None], dtype))
        rest = tf.reshape(rest, [-1, num_rows])
    masses = tf.concat([tf.transpose(first_masses), rest + shift[None, :]], axis=0)
    masses = masses[: plan.num_blocks]   # [num_blocks, B]
    if clean:
        masses = _rescore_bias_holes(masses, queries if not multi_head else tf.reshape(
            queries, [num_rows, num_heads, -1]), embeddings, slot_bias, inv_temperature, plan,
            scoring_dtype)
    masses = tf.transpose(masses)
    if excluded_slots is not None:
        masses = _replace(masses, fixed_block, fixed_mass)
    # A first chunk with nothing eligible for some query gives no shift; a later score far
    # above the first chunk's best overflows: both fall back to exact tiles.
    trouble = tf.logical_or(
        tf.reduce_any(tf.logical_not(tf.math.is_finite(best))),
        tf.reduce_any(tf.logical_or(tf.math.is_nan(masses), masses > dtype.max)))
    return masses, trouble, exact_masses


def _excluded_blocks(queries, embeddings, slot_bias, excluded_slots, inv_temperature, plan,
                     scoring_dtype):
    """`(block [B], log_mass [B])`: the block holding each query's excluded slot and its
    log-mass with that slot masked (block -1 for queries with no excluded slot, `< 0`)."""
    has = excluded_slots >= 0
    block = tf.where(has, excluded_slots // plan.block_size, 0)
    positions = block[:, None, None] * plan.block_size + tf.range(plan.block_size)  # [B,1,b]
    block_scores = masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
                                  inv_temperature, plan.num_slots, scoring_dtype)
    return tf.where(has, block, -1), tf.reduce_logsumexp(block_scores[:, 0, :], axis=-1)


def _rescore_bias_holes(masses, queries, embeddings, slot_bias, inv_temperature, plan,
                        scoring_dtype):
    """`masses [num_blocks, B]` with the blocks that hold an ineligible slot fixed: `-inf` where
    nothing in the block is eligible, re-scored exactly with the bias where some slots are."""
    padding = plan.num_blocks * plan.block_size - plan.num_slots
    bias = tf.reshape(tf.pad(slot_bias, [[0, padding]], constant_values=NEG_INF),
                      [plan.num_blocks, plan.block_size])
    dead = tf.reduce_all(tf.math.is_inf(bias) & (bias < 0), axis=-1)
    holes = tf.logical_and(tf.reduce_any(tf.not_equal(bias, 0.0), axis=-1),
                           tf.logical_not(dead))
    blocks = tf.cast(tf.where(holes)[:, 0], tf.int32)
    masses = tf.where(dead[:, None], tf.cast(NEG_INF, masses.dtype), masses)
    # A tile's worth of blocks at a time, so this never holds more than a tile.
    per = plan.blocks_per_chunk
    num = tf.shape(blocks)[0]
    steps = tf.maximum((num + per - 1) // per, 1)
    padded = tf.pad(blocks, [[0, steps * per - num]])

    def one(i):
        positions = tf.reshape(
            padded[i * per:(i + 1) * per, None] * plan.block_size + tf.range(plan.block_size),
            [-1])
        scores = masked_scores(queries, embeddings, positions, slot_bias, None,
                                inv_temperature, plan.num_slots, scoring_dtype)
        return tf.transpose(tf.reduce_logsumexp(
            tf.reshape(scores, [tf.shape(scores)[0], per, plan.block_size]), axis=-1))

    def rescore():
        fixed = tf.map_fn(one, tf.range(steps), parallel_iterations=1,
                          fn_output_signature=tf.TensorSpec([per, None], masses.dtype))
        fixed = tf.reshape(fixed, [steps * per, -1])[:num]
        return tf.tensor_scatter_nd_update(masses, blocks[:, None], fixed)

    return tf.cond(num > 0, rescore, lambda: masses)


def _replace(masses, block, value):
    """`masses [B, n]` with `masses[i, block[i]] = value[i]` where `0 <= block[i] < n`."""
    inside = tf.logical_and(block >= 0, block < tf.shape(masses)[1])
    safe = tf.where(inside, block, 0)
    rows = tf.range(tf.shape(masses)[0])
    current = tf.gather(masses, safe, batch_dims=1)
    return tf.tensor_scatter_nd_update(masses, tf.stack([rows, safe], 1),
                                       tf.where(inside, value, current))
