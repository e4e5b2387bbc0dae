"""Drawing from the softmax over a Keras 3 cache of embeddings (docs/algorithm.md, steps 2-3),
in fixed shapes and `keras.ops`, as the TF front end's `tfnegcache.sampling` does:

- `gumbel_argmax`: the one Gumbel-Max draw every sampler here uses;
- `gumbel_max_sample`: the textbook draw over a full `[B, N]` logit matrix (the reference);
- `sample_cache`: the two-stage exact draw training uses: per-block log-masses by tiles
  (`scoring.block_log_masses`), a block by inverting the blocks' cumulative mass in two
  levels, then a slot inside it by Gumbel-Max over its re-computed scores. Each draw reports
  the log-probability with which it drew its slot.

All randomness comes from keys (`_backend.fold_in`/`split`): a draw is a function of its key.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
from keras import ops

from tfnegcache._plan import SamplerPlan, plan_sampler
from tfnegcache.keras3 import _backend, scoring

NEG_INF = float("-inf")


def gumbel_noise(shape, key, dtype="float32"):
    """Standard Gumbel noise `-log(-log(U))`, U uniform on (0, 1)."""
    tiny = float(np.finfo(np.float32).tiny)
    uniform = _backend.uniform(shape, key, dtype, minval=tiny, maxval=1.0)
    return -ops.log(-ops.log(uniform))


def gumbel_argmax(logits, key):
    """One Gumbel-Max draw along the last axis of `logits` (`-inf` entries are never drawn):
    `(index int32 [...], perturbed [...])`."""
    perturbed = logits + gumbel_noise(_backend.shape(logits), key, logits.dtype)
    return ops.cast(ops.argmax(perturbed, axis=-1), "int32"), ops.max(perturbed, axis=-1)


def gumbel_max_sample(logits, num_samples: int, key):
    """`[B, num_samples]` int32 indices drawn per row from `softmax(logits)` (`[B, N]`) by
    full Gumbel-Max: the textbook reference the fast sampler is tested against.

    Example:

    >>> from tfnegcache.keras3 import _backend, sampling
    >>> sampling.gumbel_max_sample(keras.ops.zeros([2, 5]), 3, _backend.key(0, 0)).shape
    (2, 3)
    """
    tiled = ops.repeat(ops.expand_dims(logits, 1), num_samples, axis=1)
    return gumbel_argmax(tiled, key)[0]


@dataclasses.dataclass
class SlotDraw:
    """What the sampler returns for B queries.

    Attributes:
      log_mass: `[B]` `logsumexp_j` of the masked cached scores (`-inf`: nothing eligible).
      slots: `[B, k]` int32 slots drawn, or None (log-mass only).
      log_prob: `[B, k]` the log-probability with which each slot was drawn (0 for a query
        with nothing eligible, whose draws are arbitrary).
    """

    log_mass: object
    slots: Optional[object] = None
    log_prob: Optional[object] = None


def _invert(weights, uniforms):
    """`[B, k]` int32 indices drawn with probability proportional to `weights`
    (`[B, 1 or k, W]`, non-negative), one uniform `[B, k]` per draw: the first index whose
    cumulative weight exceeds `u * total` (a zero weight is never drawn)."""
    cumulative = ops.cumsum(weights, axis=-1)
    total = cumulative[..., -1]
    target = ops.expand_dims(uniforms * total, -1)
    index = ops.sum(ops.cast(cumulative <= target, "int32"), axis=-1)
    return ops.minimum(index, weights.shape[-1] - 1)


def sample_cache(queries, embeddings, slot_bias, inv_temperature: float, num_samples: int,
                 key=None, excluded_slots=None, plan: Optional[SamplerPlan] = None) -> SlotDraw:
    """The cache's log-mass per query and, with a `key`, exact draws from its softmax over
    `<q_i, e_j> * inv_temperature + slot_bias_j` (slots not excluded for query i).

    Args:
      queries: `[B, d]` (treated as constants).
      embeddings: `[R, d]` cached embeddings, `R >= N` (the store's rows).
      slot_bias: `[N]`: 0 for eligible slots, `-inf` for empty or masked ones.
      inv_temperature: `1 / T`.
      num_samples: k draws per query, independent, with replacement.
      key: the draw's key (`_backend.key`/`fold_in`), or None for the log-mass alone.
      excluded_slots: optional `[B]` int32, a slot excluded for query i alone; negative: none.
      plan: block and chunk sizes; `plan_sampler` chooses them when None.

    Returns:
      A `SlotDraw`.

    Example:

    >>> from tfnegcache.keras3 import _backend, sampling
    >>> draw = sampling.sample_cache(keras.ops.ones([2, 4]), keras.ops.ones([10, 4]),
    ...                              keras.ops.zeros([10]), 1.0, 3, _backend.key(0, 0))
    >>> draw.slots.shape
    (2, 3)
    """
    queries = ops.stop_gradient(ops.convert_to_tensor(queries))
    dtype = queries.dtype
    num_slots = slot_bias.shape[0]
    num_rows = _backend.num_rows(queries)
    if plan is None:
        plan = plan_sampler(num_slots, embeddings.shape[1], queries.shape[0])
    if excluded_slots is not None:
        excluded_slots = ops.cast(excluded_slots, "int32")
    scaled = queries * ops.cast(inv_temperature, dtype)
    block_masses = scoring.block_log_masses(scaled, embeddings, slot_bias, excluded_slots, plan)
    log_mass = ops.logsumexp(block_masses, axis=-1)
    if key is None:
        return SlotDraw(log_mass=log_mass)

    group_key, member_key, slot_key = _backend.split(key, 3)
    # Stage 1: a block per draw from softmax(block log-masses), by inversion in two levels: a
    # group of about sqrt(num_blocks) blocks by its mass, then a block inside it (short
    # cumulative sums, no [B, num_blocks] noise).
    has_mass = ops.isfinite(log_mass)
    safe_mass = ops.where(has_mass, log_mass, 0.0)
    probabilities = ops.exp(block_masses - ops.expand_dims(safe_mass, -1))
    num_blocks = plan.num_blocks
    group_width = 2 ** max(0, math.ceil(math.log2(num_blocks) / 2))
    num_groups = -(-num_blocks // group_width)
    if num_groups * group_width > num_blocks:
        probabilities = ops.pad(probabilities,
                                ((0, 0), (0, num_groups * group_width - num_blocks)))
    grouped = ops.reshape(probabilities, (-1, num_groups, group_width))
    groups = _invert(ops.expand_dims(ops.sum(grouped, axis=-1), 1),
                     _backend.uniform((num_rows, num_samples), group_key, dtype))
    members = _invert(ops.take_along_axis(grouped, ops.expand_dims(groups, -1), axis=1),
                      _backend.uniform((num_rows, num_samples), member_key, dtype))
    blocks = ops.minimum(groups * group_width + members, num_blocks - 1)
    # Stage 2: a slot inside the chosen block, by Gumbel-Max over its re-computed scores.
    positions = (ops.expand_dims(blocks, -1) * plan.block_size
                 + ops.arange(plan.block_size, dtype="int32"))                 # [B, k, b]
    scores = scoring.masked_scores(scaled, embeddings, positions, slot_bias, excluded_slots,
                                   num_slots)
    within, _ = gumbel_argmax(scores, slot_key)
    within_ = ops.expand_dims(within, -1)
    slots = ops.minimum(ops.take_along_axis(positions, within_, axis=-1)[..., 0],
                        num_slots - 1)
    # P(slot) = P(block) P(slot | block), each from the numbers its stage used.
    log_prob = (ops.take_along_axis(block_masses, blocks, axis=1)
                - ops.expand_dims(safe_mass, -1)
                + ops.take_along_axis(scores, within_, axis=-1)[..., 0]
                - ops.logsumexp(scores, axis=-1))
    log_prob = ops.where(ops.expand_dims(has_mass, -1), log_prob, 0.0)
    return SlotDraw(log_mass=log_mass, slots=ops.cast(slots, "int32"), log_prob=log_prob)
