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
                   num_slots):
    """Scores queries against the slots at `positions` with every mask applied.

    `positions` is `[P]` (one tile shared by every query: a matmul) or `[B, k, P]` (a block per
    draw: a batched dot product). Positions `>= num_slots` are padding and score `-inf`.
    `[B, H, d]` queries score a slot by their best head.
    """
    valid = positions < num_slots
    safe = tf.minimum(positions, num_slots - 1)
    cached = tf.cast(tf.gather(embeddings, safe), queries.dtype)
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
    scores = scores * inv_temperature + expand(tf.gather(slot_bias, safe))
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


def block_log_masses(queries, embeddings, slot_bias, excluded_slots, inv_temperature,
                     plan: SamplerPlan) -> tf.Tensor:
    """Per-block `logsumexp` of masked scores, scoring one `[B, chunk]` tile at a time.

    The tile loop is the sampler's hot path (it touches all `B * N` scores), so each tile costs
    one matmul and the `logsumexp` passes, and almost nothing else: the temperature is folded
    into the queries, and the slot bias (with `-inf` for padding past `num_slots`) rides in
    the matmul as an extra column, `[q, 1] . [e, bias] = q . e + bias`, instead of a `[B, chunk]`
    add and mask. Only per-query exclusions (when given) still need a `[B, chunk]` select.

    `[B, H, d]` queries are scored as `B * H` rows by the same matmul, and each tile is
    reduced to its max over heads (`[B, H, chunk] -> [B, chunk]`) before the log-masses: the
    bias column adds the same value to every head, so it commutes with the max.

    Returns:
      `[B, num_blocks]` block log-masses (`-inf` for blocks with nothing eligible).
    """
    num_rows = tf.shape(queries)[0]
    multi_head = queries.shape.rank == 3
    if multi_head:
        num_heads = tf.shape(queries)[1]
        dim = queries.shape[2] if queries.shape[2] is not None else tf.shape(queries)[2]
        queries = tf.reshape(queries, [num_rows * num_heads, dim])
    scaled = tf.concat([queries * tf.cast(inv_temperature, queries.dtype),
                        tf.ones_like(queries[:, :1])], axis=1)
    slot_bias = tf.cast(slot_bias, queries.dtype)
    # Contiguous chunks are slices; only a ragged last chunk needs padded (gathered) rows.
    even = plan.num_slots % plan.chunk_size == 0

    def one_chunk(chunk_index):
        start = chunk_index * plan.chunk_size
        if even:
            cached = tf.slice(embeddings, [start, 0], [plan.chunk_size, -1])
            bias = tf.slice(slot_bias, [start], [plan.chunk_size])
        else:
            positions = start + tf.range(plan.chunk_size)
            safe = tf.minimum(positions, plan.num_slots - 1)
            cached = tf.gather(embeddings, safe)
            bias = tf.where(positions < plan.num_slots, tf.gather(slot_bias, safe), NEG_INF)
        cached = tf.concat([tf.cast(cached, queries.dtype), bias[:, None]], axis=1)
        scores = tf.matmul(scaled, cached, transpose_b=True)
        if multi_head:
            scores = tf.reduce_max(
                tf.reshape(scores, [num_rows, num_heads, plan.chunk_size]), axis=1)
        if excluded_slots is not None:
            positions = start + tf.range(plan.chunk_size)
            scores = tf.where(positions[None, :] != excluded_slots[:, None], scores, NEG_INF)
        tiles = tf.reshape(scores, [num_rows, plan.blocks_per_chunk, plan.block_size])
        return tf.reduce_logsumexp(tiles, axis=-1)

    masses = _map_chunks(one_chunk, plan.num_chunks,
                         tf.TensorSpec([None, plan.blocks_per_chunk], queries.dtype), num_rows)
    return masses[:, : plan.num_blocks]


def sample_cache(
    queries: tf.Tensor,
    embeddings: tf.Tensor,
    slot_bias: tf.Tensor,
    inv_temperature: float,
    num_samples: int,
    seed: Optional[tf.Tensor],
    excluded_slots: Optional[tf.Tensor] = None,
    plan: Optional[SamplerPlan] = None,
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

    Returns:
      A `CacheDraw`.
    """
    queries = tf.stop_gradient(queries)
    embeddings = tf.convert_to_tensor(embeddings)
    if plan is None:
        plan = plan_sampler(embeddings.shape[0], embeddings.shape[1], queries.shape[0],
                            num_heads=query_heads(queries))
    if excluded_slots is not None:
        excluded_slots = tf.cast(excluded_slots, tf.int32)
    block_masses = block_log_masses(queries, embeddings, slot_bias, excluded_slots,
                                    inv_temperature, plan)
    log_mass = tf.reduce_logsumexp(block_masses, axis=-1)
    if seed is None:
        return CacheDraw(log_mass=log_mass)

    num_rows = tf.shape(queries)[0]
    block_seed, slot_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    # Stage 1: a block per draw, by Gumbel-Max over the block log-masses.
    block_noise = gumbel_noise([num_rows, num_samples, plan.num_blocks], block_seed,
                               queries.dtype)
    perturbed_blocks = block_masses[:, None, :] + block_noise
    blocks = tf.argmax(perturbed_blocks, axis=-1, output_type=tf.int32)
    perturbed = tf.reduce_max(perturbed_blocks, axis=-1)
    # Stage 2: a slot inside the chosen block, by Gumbel-Max over its re-computed scores.
    positions = blocks[..., None] * plan.block_size + tf.range(plan.block_size)
    scores = _masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
                            inv_temperature, plan.num_slots)
    slot_noise = gumbel_noise([num_rows, num_samples, plan.block_size], slot_seed,
                              queries.dtype)
    within = tf.argmax(scores + slot_noise, axis=-1, output_type=tf.int32)
    slots = tf.gather(positions, within, batch_dims=2)
    slots = tf.minimum(slots, plan.num_slots - 1)
    return CacheDraw(log_mass=log_mass, slots=slots, perturbed=perturbed)


# ------------------------------------------------------------------ top-m restriction


def top_m_scores(queries, embeddings, slot_bias, excluded_slots, inv_temperature, m: int,
                 chunk_size: Optional[int] = None, tile_elements: int = DEFAULT_TILE_ELEMENTS):
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
                                inv_temperature, num_slots)
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
                                     inv_temperature, m, chunk_size)
    log_mass = tf.reduce_logsumexp(scores, axis=-1)
    if seed is None:
        return CacheDraw(log_mass=log_mass)
    num_rows = tf.shape(scores)[0]
    noise = gumbel_noise([num_rows, num_samples, tf.shape(scores)[1]], seed, scores.dtype)
    perturbed = scores[:, None, :] + noise
    within = tf.argmax(perturbed, axis=-1, output_type=tf.int32)
    slots = tf.gather(top_slots, within, batch_dims=1)
    return CacheDraw(log_mass=log_mass, slots=slots, perturbed=tf.reduce_max(perturbed, -1))
