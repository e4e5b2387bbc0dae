"""Drawing from the softmax over a cache of embeddings (docs/algorithm.md, steps 2-3).

- `gumbel_argmax`: the one Gumbel-Max draw every sampler here uses.
- `gumbel_max_sample`: the textbook draw over a full `[B, N]` logit matrix; the reference the
  fast sampler is tested against.
- `sample_cache`: the draw training uses. It never holds the `[B, N]` scores: the cache is
  scored in tiles reduced to per-block log-masses (`scoring.block_log_masses`), a block is
  drawn by inverting the blocks' cumulative mass, then a slot inside it by Gumbel-Max over
  its re-computed scores. `P(slot) = P(block) P(slot | block)` is the softmax over all slots,
  with `B k (N / b + b)` random numbers instead of `B k N`.
- `sample_cache_top_m`: the same softmax restricted to each query's m best slots.

Every draw reports the log-probability with which it drew each slot (`log_prob`), computed
from the very numbers the draw used, so an importance weight `exp(s) / p` is exact even when
the scores were rounded (`scoring_dtype`). All randomness is stateless, keyed by a `[2]` int
seed: a draw is a function of its seed.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from tfnegcache import scoring
from tfnegcache.scoring import NEG_INF, SamplerPlan, plan_sampler, query_heads  # noqa: F401


def gumbel_noise(shape, seed: tf.Tensor, dtype=tf.float32) -> tf.Tensor:
    """Standard Gumbel noise `-log(-log(U))`, U uniform on (0, 1), from a stateless seed."""
    tiny = np.finfo(dtype.as_numpy_dtype).tiny
    uniform = tf.random.stateless_uniform(shape, seed, minval=tiny, maxval=1.0, dtype=dtype)
    return -tf.math.log(-tf.math.log(uniform))


def gumbel_argmax(logits: tf.Tensor, seed: tf.Tensor):
    """One Gumbel-Max draw along the last axis of `logits` (`-inf` entries are never drawn).

    Returns:
      `(index int32 [...], perturbed [...])`: the winner and its perturbed logit (comparing
      perturbed logits across disjoint sets picks a draw over their union).
    """
    perturbed = logits + gumbel_noise(tf.shape(logits), seed, logits.dtype)
    return (tf.argmax(perturbed, axis=-1, output_type=tf.int32),
            tf.reduce_max(perturbed, axis=-1))


def gumbel_max_sample(logits: tf.Tensor, num_samples: int, seed: tf.Tensor) -> tf.Tensor:
    """Draws `num_samples` indices per row from `softmax(logits)` by full Gumbel-Max.

    Args:
      logits: `[num_queries, num_items]`; `-inf` entries are never drawn.
      num_samples: draws per row, independent, with replacement.
      seed: `[2]` int seed.

    Returns:
      `[num_queries, num_samples]` int32 indices into the last axis of `logits`.

    Example:

    >>> draws = tfnegcache.gumbel_max_sample(
    ...     tf.constant([[0.0, -np.inf, 0.0]]), 1000, tf.constant([1, 2]))
    >>> draws.shape, sorted(set(draws.numpy()[0].tolist()))
    (TensorShape([1, 1000]), [0, 2])
    """
    tiled = tf.repeat(logits[:, None, :], num_samples, axis=1)
    return gumbel_argmax(tiled, seed)[0]


@dataclasses.dataclass
class SlotDraw:
    """What the samplers return for B queries.

    Attributes:
      log_mass: `[B]`, `logsumexp_j` of the masked cached scores (`-inf` when nothing is
        eligible): the `M_i` of docs/algorithm.md step 5.
      slots: `[B, k]` int32 slots drawn; None when only the log-mass was asked for.
      log_prob: `[B, k]` the log-probability with which each slot was drawn (0 for a query
        with nothing eligible, whose draws are arbitrary).
      perturbed: `[B, k]` the winning perturbed score of each draw, `Gumbel(log_mass)`
        distributed, independent of the slot (shards compare it).
    """

    log_mass: tf.Tensor
    slots: Optional[tf.Tensor] = None
    log_prob: Optional[tf.Tensor] = None
    perturbed: Optional[tf.Tensor] = None


def _invert(weights, num_samples, seed):
    """`[B, k]` int32 indices drawn with probability proportional to `weights [B, 1 or k, W]`
    (one uniform per draw; `num_samples` draws per row when the middle axis is 1)."""
    cumulative = tf.math.cumsum(weights, axis=-1)
    shape = tf.shape(cumulative)[:2]
    if num_samples is not None:
        shape = tf.stack([shape[0], num_samples])
    uniform = tf.random.stateless_uniform(shape, seed, dtype=weights.dtype)
    total = cumulative[..., -1]
    width = tf.shape(cumulative)[-1]
    cumulative = tf.broadcast_to(cumulative, tf.concat([shape, [width]], 0))
    # tf.searchsorted(cumulative, u * total, side="right") on the rows of the `[B, k, W]`
    # cumulative sums, as the one `[B * k, W]` search it makes: 9 graph ops instead of 28.
    index = tf.raw_ops.UpperBound(sorted_inputs=tf.reshape(cumulative, [-1, width]),
                                  values=tf.reshape(uniform * total, [-1, 1]),
                                  out_type=tf.int32)
    return tf.minimum(tf.reshape(index, shape), width - 1)


def _prepare(queries, embeddings, excluded_slots):
    queries = tf.stop_gradient(queries)
    if not isinstance(embeddings, tf.Variable):   # a variable is only ever gathered from
        embeddings = tf.convert_to_tensor(embeddings)
    if excluded_slots is not None:
        excluded_slots = tf.cast(excluded_slots, tf.int32)
    return queries, embeddings, excluded_slots


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
    scattered_bias: bool = False,
) -> SlotDraw:
    """The cache's log-mass per query and, with a `seed`, exact draws from its softmax.

    The softmax is over `<q_i, e_j> * inv_temperature + slot_bias_j` for the slots j not
    excluded for query i (`max_h <q_ih, e_j>` for `[B, H, d]` queries).

    Args:
      queries: `[B, d]` or `[B, H, d]` (treated as constants).
      embeddings: `[N, d]` cached embeddings (any float dtype; a variable is read a chunk at a
        time).
      slot_bias: `[N]`: 0 for eligible slots, `-inf` for empty or masked ones.
      inv_temperature: `1 / T`.
      num_samples: k draws per query, independent, with replacement.
      seed: `[2]` int seed, or None for the log-mass alone.
      excluded_slots: optional `[B]`, a slot excluded for query i alone; negative: none.
      plan: block and chunk sizes; `plan_sampler` chooses them when None.
      scoring_dtype: score in this dtype (e.g. `tf.bfloat16`; see `scoring.block_log_masses`);
        the log-mass and `log_prob` stay in the queries' dtype.
      scattered_bias: whether `slot_bias` masks slots scattered over the cache (a batch's
        candidates) rather than only its empty tail (a hint for the scoring's speed).

    Returns:
      A `SlotDraw`.

    Example:

    >>> embeddings = tf.random.stateless_normal([1000, 8], [0, 1])
    >>> draw = tfnegcache.sample_cache(tf.ones([4, 8]), embeddings, tf.zeros([1000]), 1.0,
    ...                                2, tf.constant([0, 1]))
    >>> draw.slots.shape, draw.log_mass.shape
    (TensorShape([4, 2]), TensorShape([4]))
    """
    queries, embeddings, excluded_slots = _prepare(queries, embeddings, excluded_slots)
    if plan is None:
        plan = plan_sampler(embeddings.shape[0], embeddings.shape[1], queries.shape[0],
                            num_heads=query_heads(queries))
    block_masses = scoring.block_log_masses(queries, embeddings, slot_bias, excluded_slots,
                                            inv_temperature, plan, scoring_dtype,
                                            scattered_bias)
    log_mass = tf.reduce_logsumexp(block_masses, axis=-1)
    if seed is None:
        return SlotDraw(log_mass=log_mass)

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
    scores = scoring.masked_scores(queries, embeddings, positions, slot_bias, excluded_slots,
                                   inv_temperature, plan.num_slots, scoring_dtype)
    within, _ = gumbel_argmax(scores, slot_seed)
    slots = tf.minimum(tf.gather(positions, within, batch_dims=2), plan.num_slots - 1)
    # P(slot) = P(block) P(slot | block), each from the numbers its stage used.
    log_prob = (tf.gather(block_masses, blocks, batch_dims=1) - safe_mass[:, None]
                + tf.gather(scores, within, batch_dims=2)
                - tf.reduce_logsumexp(scores, axis=-1))
    log_prob = tf.where(has_mass[:, None], log_prob, 0.0)
    return SlotDraw(log_mass=log_mass, slots=slots, log_prob=log_prob, perturbed=perturbed)


def top_m_scores(queries, embeddings, slot_bias, excluded_slots, inv_temperature, m: int,
                 chunk_size: Optional[int] = None,
                 tile_elements: int = scoring.DEFAULT_TILE_ELEMENTS, scoring_dtype=None):
    """Each query's `m` highest masked cached scores, chunked: no `[B, N]` matrix.

    Each `[B, chunk]` tile keeps its own top `min(m, chunk)`, and the winners of every chunk
    are merged by a last `top_k`: exact, since the global top m lie in the union of every
    chunk's top m. `[B, H, d]` queries rank slots by their maxsim score.

    Args:
      queries, embeddings, slot_bias, excluded_slots, inv_temperature: as in `sample_cache`.
      m: slots kept per query (capped at N).
      chunk_size: slots per tile; default from `tile_elements` (at least m).
      tile_elements: the largest `B * H * chunk` tile to hold at once.

    Returns:
      `(scores [B, m], slots [B, m] int32)`, best first; where fewer than m slots are
      eligible the rest score `-inf` (their slots are arbitrary).
    """
    queries, embeddings, excluded_slots = _prepare(queries, embeddings, excluded_slots)
    num_slots = int(embeddings.shape[0])
    m = int(min(max(1, m), num_slots))
    if chunk_size is None:
        rows = (queries.shape[0] or 512) * query_heads(queries)
        chunk_size = max(m, tile_elements // rows)
    chunk_size = int(min(max(chunk_size, 1), num_slots))
    per_chunk = min(m, chunk_size)
    num_chunks = -(-num_slots // chunk_size)

    def one_chunk(chunk_index):
        positions = chunk_index * chunk_size + tf.range(chunk_size)
        scores = scoring.masked_scores(queries, embeddings, positions, slot_bias,
                                       excluded_slots, inv_temperature, num_slots,
                                       scoring_dtype)
        top = tf.math.top_k(scores, k=per_chunk, sorted=False)
        return top.values, tf.gather(positions, top.indices)

    specs = (tf.TensorSpec([None, per_chunk], queries.dtype),
             tf.TensorSpec([None, per_chunk], tf.int32))
    values, slots = scoring.map_chunks(one_chunk, num_chunks, specs, tf.shape(queries)[0])
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
) -> SlotDraw:
    """`sample_cache` restricted to each query's top `m` cached scores (the reference code's
    option): draws follow the softmax over those m slots, and `log_mass` is their
    `logsumexp` only (a lower bound on the whole cache's log-mass)."""
    scores, top_slots = top_m_scores(queries, embeddings, slot_bias, excluded_slots,
                                     inv_temperature, m, chunk_size, scoring_dtype=scoring_dtype)
    log_mass = tf.reduce_logsumexp(scores, axis=-1)
    if seed is None:
        return SlotDraw(log_mass=log_mass)
    tiled = tf.repeat(scores[:, None, :], num_samples, axis=1)      # [B, k, m]
    within, perturbed = gumbel_argmax(tiled, seed)
    has_mass = tf.math.is_finite(log_mass)
    log_prob = (tf.gather(scores, within, batch_dims=1)
                - tf.where(has_mass, log_mass, 0.0)[:, None])
    log_prob = tf.where(has_mass[:, None], log_prob, 0.0)
    return SlotDraw(log_mass=log_mass, slots=tf.gather(top_slots, within, batch_dims=1),
                    log_prob=log_prob, perturbed=perturbed)
