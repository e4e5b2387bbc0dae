"""How training draws negatives from a Keras 3 cache, and the logit the cache's column gets:
the TF front end's `tfnegcache.negatives`, in `keras.ops`.

- `draw`: k cached candidates per query, with their features (to re-encode), their stale
  embeddings and the log-probability with which each was drawn;
- `logit`: from the drawn negatives' fresh scores `s_ik`, the cache's column of the softmax.

The corrected estimator (the default) is `logit_i = log mean_k exp(s_ik - log p_ik)`: its
exponential is an unbiased estimate of the cached mass under the current towers, whatever the
draw's distribution and however stale the scores it drew with; the loss is a self-normalised
estimate, with a bias of order 1/k while the cache is stale (docs/algorithm.md, step 5).
`Gumbel(estimator="stale")` keeps the paper's `sg(M_i) + mean_k(s_ik - sg(s_ik))`.
"""

import abc
import dataclasses
from typing import Dict, Optional

import numpy as np
from keras import ops

from tfnegcache.keras3 import _backend

# The value TFRS (and keras-rs) mask logits with: an empty cache's logit becomes it, so its
# softmax weight is exactly 0.
MIN_FLOAT = float(np.finfo(np.float32).min) / 100.0
ESTIMATORS = ("corrected", "stale")


@dataclasses.dataclass
class CacheNegatives:
    """k negatives per query drawn from a cache for B queries (query-major rows).

    Attributes:
      slots: `[B * k]` int32 slots (what a write-back writes).
      features: `{name: [B * k, ...]}` their cached features.
      stale: `[B * k, d]` their cached embeddings.
      log_prob: `[B, k]` the log-probability with which each was drawn.
      valid: `[B, k]` bool, False for draws that do not count (a query with nothing
        eligible, a uniform draw on a slot ineligible for its query).
      log_mass: `[B]` the stale log-mass of the eligible slots (Gumbel draws), or None.
    """

    slots: object
    features: Dict[str, object]
    stale: object
    log_prob: object
    valid: object
    log_mass: Optional[object] = None


class Negatives(abc.ABC):
    """A negative strategy: what `CacheRetrieval` draws and how the cache enters its loss."""

    name: str

    @abc.abstractmethod
    def draw(self, cache, queries, num_samples: int, temperature, masked_ids, excluded_ids,
             key) -> CacheNegatives:
        """k negatives per query, from `cache`."""

    def logit(self, negatives: CacheNegatives, fresh_scores):
        """`[B]` the cache's training logit from the drawn negatives' fresh scores `[B, k]`
        (the corrected estimator); `MIN_FLOAT` for a query with no valid draw."""
        weights = ops.where(negatives.valid,
                            fresh_scores - ops.cast(negatives.log_prob, fresh_scores.dtype),
                            MIN_FLOAT)
        k = float(fresh_scores.shape[1])
        estimate = ops.logsumexp(weights, axis=-1) - np.log(k)
        return ops.where(ops.any(negatives.valid, axis=-1), estimate, MIN_FLOAT)


class Gumbel(Negatives):
    """Draws from the softmax over the stale cached scores, by Gumbel-Max.

    Args:
      estimator: `"corrected"` (`Negatives.logit`) or `"stale"` (the paper's).
    """

    name = "gumbel"

    def __init__(self, estimator: str = "corrected"):
        if estimator not in ESTIMATORS:
            raise ValueError(
                "`estimator` must be 'corrected' (the cached mass reweighted by the drawn "
                "negatives' fresh scores over their draw probabilities) or 'stale' (the "
                f"cached log-mass as it is). Received: estimator={estimator!r}.")
        self.estimator = estimator

    def draw(self, cache, queries, num_samples, temperature, masked_ids, excluded_ids, key):
        return cache.draw(queries, num_samples, temperature, masked_ids, excluded_ids, key)

    def logit(self, negatives, fresh_scores):
        if self.estimator == "corrected":
            return super().logit(negatives, fresh_scores)
        log_mass = ops.cast(negatives.log_mass, fresh_scores.dtype)
        correction = ops.mean(fresh_scores - ops.stop_gradient(fresh_scores), axis=-1)
        return ops.where(ops.isfinite(log_mass),
                         ops.stop_gradient(log_mass) + correction, MIN_FLOAT)


class Uniform(Negatives):
    """Draws uniformly, with replacement, over the filled slots: no scoring of the cache
    (mixed negative sampling with the cache as the corpus). A draw on a slot ineligible for
    its query does not count; `p = 1 / filled` for the others."""

    name = "uniform"

    def draw(self, cache, queries, num_samples, temperature, masked_ids, excluded_ids, key):
        del temperature   # nothing is scored
        return cache.draw_uniform(_backend.num_rows(queries), num_samples, masked_ids, excluded_ids, key)


def make(sampling: str, estimator: str) -> Negatives:
    """The strategy of `CacheRetrieval(sampling=..., estimator=...)` (a uniform draw always
    uses the corrected estimator)."""
    if sampling == "gumbel":
        return Gumbel(estimator)
    if sampling == "uniform":
        Gumbel(estimator)   # checks the estimator's name
        return Uniform()
    raise ValueError(
        "`sampling` must be 'gumbel' (Gumbel-Max over the cached softmax) or 'uniform' "
        f"(mixed negative sampling). Received: sampling={sampling!r}.")
