"""Gumbel-Max sampling from the softmax over a cache of embeddings (docs/algorithm.md, 2-3).

Two functions do the work:

- `gumbel_max_sample`: the textbook draw over a full `[B, N]` logit matrix. It is the
  reference the fast sampler is tested against, and the baseline of the sampler benchmark.
- `sample_cache`: the draw the training step uses. It never holds the `[B, N]` score matrix:
  the cache is scored in chunks, each chunk reduced to per-block log-masses, and the sample is
  drawn in two exact stages (a block by Gumbel-Max over block log-masses, then a slot by
  Gumbel-Max inside the chosen block, re-scored from the cached embeddings). Because
  `P(slot) = P(block) P(slot | block)`, this is the same distribution as full Gumbel-Max, with
  `B k (N / b + b)` random numbers instead of `B k N`.

Queries may be `[B, d]` or multi-head `[B, H, d]`: a slot's score is then the max over heads
of `<q_ih, e_j>` ("maxsim", as `tfrs.tasks.Retrieval` scores multi-head queries), and every
sampler draws from the softmax of those scores.

All randomness is stateless (`tf.random.stateless_uniform`), keyed by a `[2]` int seed, so a
draw is reproducible from its seed and a restored checkpoint continues the same stream.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

NEG_INF = float("-inf")
# Elements of the `[B, chunk]` score tile scored at once: 2^20 float32 is 4 MiB, small enough
# that the tile stays in cache across the matmul and the logsumexp passes (2^22 was ~1.5x
# slower per score on a 2-core CPU; see benchmarks/sampler.py).
DEFAULT_TILE_ELEMENTS = 2**20


def gumbel_noise(shape, seed: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """Standard Gumbel noise `-log(-log(U))`, U uniform on (0, 1), from a stateless seed."""
    tiny = np.finfo(dtype.as_numpy_dtype).tiny
    uniform = tf.random.stateless_uniform(shape, seed, minval=tiny, maxval=1.0, dtype=dtype)
    return -tf.math.log(-tf.math.log(uniform))


def gumbel_max_sample(logits: tf.Tensor, num_samples: int, seed: tf.Tensor) -> tf.Tensor:
    """Draws `num_samples` indices per row from `softmax(logits)` by full Gumbel-Max.

    Args:
      logits: `[num_queries, num_items]` logits; `-inf` entries are never drawn.
      num_samples: draws per row, independent, with replacement.
      seed: `[2]` int seed for the stateless generator.

    Returns:
      `[num_queries, num_samples]` int32 indices into the last axis of `logits`.
    """
    shape = tf.concat([tf.shape(logits)[:1], [num_samples], tf.shape(logits)[1:]], axis=0)
    noise = gumbel_noise(shape, seed, logits.dtype)
    return tf.argmax(logits[:, None, :] + noise, axis=-1, output_type=tf.int32)


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """How `sample_cache` cuts `num_slots` into blocks (sampling) and chunks (scoring).

    Attributes:
      num_slots: N, the number of cache slots.
      block_size: b, slots per sampling block. Two-stage sampling draws `N / b` block noises
        and then re-scores the chosen block's `b` slots per draw, so `b ~ sqrt(N / (d + 1))`
        balances the two.
      blocks_per_chunk: blocks scored per tile; a tile is `[B, blocks_per_chunk * b]`.
      num_blocks: `ceil(N / b)`.
      num_chunks: `ceil(num_blocks / blocks_per_chunk)`.
    """

    num_slots: int
    block_size: int
    blocks_per_chunk: int

    @property
    def num_blocks(self) -> int:
        return -(-self.num_slots // self.block_size)

    @property
    def chunk_size(self) -> int:
        return self.block_size * self.blocks_per_chunk

    @property
    def num_chunks(self) -> int:
        return -(-self.num_blocks // self.blocks_per_chunk)


def plan_sampler(
    num_slots: int,
    embedding_dim: int,
    num_queries: Optional[int],
    block_size: Optional[int] = None,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
    num_heads: int = 1,
) -> SamplerPlan:
    """Chooses block and chunk sizes from the shapes.

    Args:
      num_slots: N.
      embedding_dim: d.
      num_queries: B if static, else None (then 512 is assumed for the memory budget).
      block_size: force b (tests use this); else the power of two nearest
        `sqrt(N / (H d + 1))` (re-scoring a slot in stage 2 costs `H d`).
      tile_elements: the largest `B * H * chunk` score tile to hold at once.
      num_heads: H, heads per query (`[B, H, d]` queries); 1 for `[B, d]`.

    Returns:
      A `SamplerPlan`.
    """
    if num_slots < 1:
        raise ValueError(f"`num_slots` must be >= 1. Received: num_slots={num_slots}.")
    if block_size is None:
        ideal = math.sqrt(num_slots / (num_heads * embedding_dim + 1))
        block_size = 2 ** max(0, round(math.log2(max(ideal, 1.0))))
    block_size = int(min(max(block_size, 1), num_slots))
    num_blocks = -(-num_slots // block_size)
    rows = (num_queries or 512) * num_heads
    blocks_per_chunk = max(1, tile_elements // (rows * block_size))
    return SamplerPlan(num_slots, block_size, int(min(blocks_per_chunk, num_blocks)))


@dataclasses.dataclass
class CacheDraw:
    """What `sample_cache` returns.

    Attributes:
      log_mass: `[B]`, `logsumexp_j` of the masked cached scores (`-inf` when nothing is
        eligible), the `M_i` of docs/algorithm.md step 5.
      slots: `[B, k]` int32 slots drawn, or None when no samples were asked for.
      perturbed: `[B, k]`, the winning perturbed score `max_j (s~_ij + G_ij)` of each draw:
        comparing it across disjoint caches (shards) picks the draw over their union.
    """

    log_mass: tf.Tensor
    slots: Optional[tf.Tensor] = None
    perturbed: Optional[tf.Tensor] = None


def query_heads(queries: tf.Tensor) -> int:
    """H of `[B, H, d]` queries; 1 for `[B, d]` queries or when H is not static (then only
    the tile budget assumes one head)."""
    if queries.shape.rank == 3:
        return queries.shape[1] or 1
    return 1


def _masked_scores(queries, embeddings, positions, slot_bias, excluded_slots, inv_temperature,
                   num_slots, scoring_dtype=None):
    """Scores queries against the slots at `positions` with every mask applied.

    `positions` is `[P]` (one tile shared by every query: a matmul) or `[B, k, P]` (a block per
    draw: a batched dot product). Positions `>= num_slots` are padding and score `-inf`.
    `[B, H, d]` queries score a slot by their best head. With a `scoring_dtype`, the scores are
    those of `block_log_masses`: `<q / T, e>` from inputs rounded to it, the result rounded to it
    (the same rounded scores, up to the order of the float32 accumulation inside the matmul).
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
    scores = tf.cast(scores, dtype) * inv_temperature + expand(tf.gather(slot_bias, safe))
    eligible = expand(valid)
    if excluded is not None:
        eligible = tf.logical_and(eligible, expand(positions) != excluded)
    return tf.where(eligible, scores, NEG_INF)


def _map_chunks(one_chunk, num_chunks: int, output_spec, num_rows):
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
                     plan: SamplerPlan, scoring_dtype=None, _fallback=None) -> tf.Tensor:
    """Per-block `logsumexp` of masked scores, scoring one tile of the cache at a time.

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
    - slots ineligible for every query (masked in-batch candidates, the empty tail, padding)
      are skipped the same way when they are few against N (the blocks holding one are
      re-scored with the bias); otherwise the bias rides in the later tiles as a column;
    - if any later tile overflows the shift, or the first chunk has nothing eligible for some
      query, every block is recomputed by exact max-shifted tiles.

    `[B, H, d]` queries are scored as `B * H` rows by the same matmul, and each tile is reduced
    to its max over heads first: the bias and the shift are the same for every head of a
    query, so they commute with the max.

    `scoring_dtype` (e.g. `tf.bfloat16`): the matmul's dtype (queries and cached embeddings
    are rounded to it, and so are the scores it returns); the shift, `exp` and sums stay in
    the queries' dtype. Default: the queries' dtype.

    Returns:
      `[B, num_blocks]` block log-masses in the queries' dtype (`-inf` for blocks with nothing
      eligible, and possibly for blocks more than 60 below the query's best, whose share of
      the mass is under e^-60). (Tests pass a list as `_fallback`; it receives the bool
      tensor that says whether the exact tiles were used.)
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
        return _map_chunks(exact_chunk, plan.num_chunks,
                           tf.TensorSpec([None, plan.blocks_per_chunk], dtype), num_rows)

    if plan.num_chunks == 1:
        if _fallback is not None:
            _fallback.append(tf.constant(True))
        return exact()[:, : plan.num_blocks]

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
    # Later tiles: the shift by a bias add (oneDNN fuses it into the matmul). With few
    # slot-bias holes against N, the tiles skip the bias (`_rescore_bias_holes` after).
    # (Measured at 2^16: the bias column cost 1.5x the clean tiles' scoring; re-scoring the
    # holes' blocks costs less while they are at most half the slots.)
    clean = plan.num_slots >= 2 * ((queries.shape[0] or 512) + 2) * plan.block_size
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
    if _fallback is not None:
        _fallback.append(trouble)
    return tf.cond(trouble, lambda: exact()[:, : plan.num_blocks], lambda: masses)


def _excluded_blocks(queries, embeddings, slot_bias, excluded_slots, inv_temperature, plan,
                     scoring_dtype):
    """`(block [B], log_mass [B])`: the block holding each query's excluded slot and its
    log-mass with that slot masked (block -1 for queries with no excluded slot, `< 0`)."""
    has = excluded_slots >= 0
    block = tf.where(has, excluded_slots // plan.block_size, 0)
    positions = block[:, None, None] * plan.block_size + tf.range(plan.block_size)  # [B,1,b]
    block_scores = _masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
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
        scores = _masked_scores(queries, embeddings, positions, slot_bias, None,
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


def _invert(weights, num_samples, seed):
    """`[B, k]` int32 indices drawn with probability proportional to `weights [B, 1 or k, W]`
    (one uniform per draw; `num_samples` draws per row when the middle axis is 1)."""
    cumulative = tf.math.cumsum(weights, axis=-1)
    shape = tf.shape(cumulative)[:2]
    if num_samples is not None:
        shape = tf.stack([shape[0], num_samples])
    uniform = tf.random.stateless_uniform(shape, seed, dtype=weights.dtype)
    total = cumulative[..., -1]
    cumulative = tf.broadcast_to(cumulative, tf.concat([shape, tf.shape(cumulative)[2:]], 0))
    index = tf.searchsorted(cumulative, (uniform * total)[..., None], side="right",
                            out_type=tf.int32)[..., 0]
    return tf.minimum(index, tf.shape(weights)[-1] - 1)


def sample_cache(
    queries: tf.Tensor,
    embeddings: tf.Tensor,
    slot_bias: tf.Tensor,
    inv_temperature: float,
    num_samples: int,
    seed: Optional[tf.Tensor],
    excluded_slots: Optional[tf.Tensor] = None,
    plan: Optional[SamplerPlan] = None,
    scoring_dtype=None,
) -> CacheDraw:
    """Log-mass of the cache per query and, if `seed` is given, exact Gumbel-Max draws.

    The distribution drawn from is `softmax_j(<q_i, e_j> * inv_temperature + slot_bias_j)` over
    the slots j that are not excluded for query i; for `[B, H, d]` queries the score is
    `max_h <q_ih, e_j>` (maxsim), in the block log-masses and the within-block draw alike.

    Args:
      queries: `[B, d]` or `[B, H, d]` query embeddings (treated as constants).
      embeddings: `[N, d]` cached embeddings (any float dtype; scored in `queries.dtype`).
      slot_bias: `[N]` added to every query's score of slot j: 0 for eligible slots, `-inf`
        for empty or masked ones.
      inv_temperature: `1 / T`.
      num_samples: k draws per query, independent, with replacement.
      seed: `[2]` int seed, or None to compute only the log-mass (evaluation).
      excluded_slots: optional `[B]` int32, a slot excluded for query i alone (its positive's
        slot, an accidental hit); negative means none.
      plan: block and chunk sizes; `plan_sampler` chooses them when None.
      scoring_dtype: score in this dtype (e.g. `tf.bfloat16`): the distribution is then the
        softmax of the scores of the rounded queries and embeddings, themselves rounded (see
        `block_log_masses`); `log_mass` and the sums stay in the queries' dtype.

    Returns:
      A `CacheDraw`.
    """
    queries = tf.stop_gradient(queries)
    if not isinstance(embeddings, tf.Variable):   # a variable is read a chunk at a time
        embeddings = tf.convert_to_tensor(embeddings)
    if plan is None:
        plan = plan_sampler(embeddings.shape[0], embeddings.shape[1], queries.shape[0],
                            num_heads=query_heads(queries))
    if excluded_slots is not None:
        excluded_slots = tf.cast(excluded_slots, tf.int32)
    block_masses = block_log_masses(queries, embeddings, slot_bias, excluded_slots,
                                    inv_temperature, plan, scoring_dtype)
    log_mass = tf.reduce_logsumexp(block_masses, axis=-1)
    if seed is None:
        return CacheDraw(log_mass=log_mass)

    num_rows = tf.shape(queries)[0]
    block_seed, slot_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    block_seed, race_seed = tf.unstack(tf.random.experimental.stateless_split(block_seed, 2))
    # Stage 1: a block per draw from softmax(block log-masses), by inversion in two levels:
    # a group of blocks by its mass, then a block inside it (`B N / b` exps and sums, and
    # cumulative sums over `sqrt(N / b)` entries only). Zero-probability blocks are never
    # drawn: a uniform below a cumulative total never stops on a step of 0.
    has_mass = tf.math.is_finite(log_mass)
    safe_mass = tf.where(has_mass, log_mass, 0.0)
    probabilities = tf.exp(block_masses - safe_mass[:, None])
    group_width = 2 ** max(0, math.ceil(math.log2(plan.num_blocks) / 2))
    num_groups = -(-plan.num_blocks // group_width)
    probabilities = tf.pad(probabilities,
                           [[0, 0], [0, num_groups * group_width - plan.num_blocks]])
    grouped = tf.reshape(probabilities, [num_rows, num_groups, group_width])
    group_seed, member_seed = tf.unstack(tf.random.experimental.stateless_split(block_seed, 2))
    groups = _invert(tf.reduce_sum(grouped, -1)[:, None, :], num_samples, group_seed)
    members = _invert(tf.gather(grouped, groups, batch_dims=1), None, member_seed)
    blocks = tf.minimum(groups * group_width + members, plan.num_blocks - 1)
    # The winning perturbed score of a Gumbel-Max draw over all slots is Gumbel(log_mass),
    # independent of which slot wins: drawn directly (shards compare it, `sharded.py`).
    perturbed = log_mass[:, None] + gumbel_noise([num_rows, num_samples], race_seed,
                                                 queries.dtype)
    # Stage 2: a slot inside the chosen block, by Gumbel-Max over its re-computed scores.
    positions = blocks[..., None] * plan.block_size + tf.range(plan.block_size)
    scores = _masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
                            inv_temperature, plan.num_slots, scoring_dtype)
    slot_noise = gumbel_noise([num_rows, num_samples, plan.block_size], slot_seed,
                              queries.dtype)
    within = tf.argmax(scores + slot_noise, axis=-1, output_type=tf.int32)
    slots = tf.gather(positions, within, batch_dims=2)
    slots = tf.minimum(slots, plan.num_slots - 1)
    return CacheDraw(log_mass=log_mass, slots=slots, perturbed=perturbed)


# ------------------------------------------------------------------ top-m restriction


def top_m_scores(queries, embeddings, slot_bias, excluded_slots, inv_temperature, m: int,
                 chunk_size: Optional[int] = None, tile_elements: int = DEFAULT_TILE_ELEMENTS,
                 scoring_dtype=None):
    """Each query's `m` highest masked cached scores, chunked: no `[B, N]` matrix.

    The cache is scored one `[B, chunk]` tile at a time; each tile keeps its own top
    `min(m, chunk)` (`tf.math.top_k`), and the per-chunk winners, `[B, num_chunks * m]`, are
    merged by a last `top_k`. Exact: the global top m of a query lies within the union of
    every chunk's top m. `[B, H, d]` queries rank slots by their maxsim score.

    Args:
      queries, embeddings, slot_bias, excluded_slots, inv_temperature: as in `sample_cache`.
      m: how many slots to keep per query (capped at N).
      chunk_size: slots per tile; default from `tile_elements` (at least m).
      tile_elements: the largest `B * H * chunk` tile to hold at once.

    Returns:
      `(scores [B, m], slots [B, m] int32)`, best first. Where fewer than m slots are
      eligible the rest score `-inf` (their slots are arbitrary).
    """
    queries = tf.stop_gradient(queries)
    if not isinstance(embeddings, tf.Variable):   # a variable is only ever gathered from
        embeddings = tf.convert_to_tensor(embeddings)
    num_slots = int(embeddings.shape[0])
    m = int(min(max(1, m), num_slots))
    if chunk_size is None:
        rows = (queries.shape[0] or 512) * query_heads(queries)
        chunk_size = max(m, tile_elements // rows)
    chunk_size = int(min(max(chunk_size, 1), num_slots))
    per_chunk = min(m, chunk_size)
    num_chunks = -(-num_slots // chunk_size)
    if excluded_slots is not None:
        excluded_slots = tf.cast(excluded_slots, tf.int32)

    def one_chunk(chunk_index):
        positions = chunk_index * chunk_size + tf.range(chunk_size)
        scores = _masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
                                inv_temperature, num_slots, scoring_dtype)
        top = tf.math.top_k(scores, k=per_chunk, sorted=False)
        return top.values, tf.gather(positions, top.indices)

    specs = (tf.TensorSpec([None, per_chunk], queries.dtype),
             tf.TensorSpec([None, per_chunk], tf.int32))
    values, slots = _map_chunks(one_chunk, num_chunks, specs, tf.shape(queries)[0])
    top = tf.math.top_k(values, k=m, sorted=True)
    slots = tf.minimum(tf.gather(slots, top.indices, batch_dims=1), num_slots - 1)
    return top.values, slots


def sample_cache_top_m(
    queries: tf.Tensor,
    embeddings: tf.Tensor,
    slot_bias: tf.Tensor,
    inv_temperature: float,
    num_samples: int,
    seed: Optional[tf.Tensor],
    m: int,
    excluded_slots: Optional[tf.Tensor] = None,
    chunk_size: Optional[int] = None,
    scoring_dtype=None,
) -> CacheDraw:
    """`sample_cache` restricted to each query's top `m` cached scores (the reference code's
    option).

    Draws are Gumbel-Max over the m kept scores, so they follow the softmax restricted to
    them and never leave them; `log_mass` is the `logsumexp` of those m scores only (a lower
    bound on the whole cache's log-mass). This biases the gradient toward the hardest
    negatives: it is the exact (up to staleness) gradient of the cross entropy over
    [positive, in-batch, top-m cached], not of the one over the whole cache.

    Returns:
      A `CacheDraw` (`slots` `[B, k]` cache slots; None without `seed`).
    """
    scores, top_slots = top_m_scores(queries, embeddings, slot_bias, excluded_slots,
                                     inv_temperature, m, chunk_size, scoring_dtype=scoring_dtype)
    log_mass = tf.reduce_logsumexp(scores, axis=-1)
    if seed is None:
        return CacheDraw(log_mass=log_mass)
    num_rows = tf.shape(scores)[0]
    noise = gumbel_noise([num_rows, num_samples, tf.shape(scores)[1]], seed, scores.dtype)
    perturbed = scores[:, None, :] + noise
    within = tf.argmax(perturbed, axis=-1, output_type=tf.int32)
    slots = tf.gather(top_slots, within, batch_dims=1)
    return CacheDraw(log_mass=log_mass, slots=slots, perturbed=tf.reduce_max(perturbed, -1))
