"""How training draws negatives from a cache, and the logit the cache's column gets.

A negative strategy has two jobs (docs/algorithm.md, steps 3-5):

- `draw`: k cached candidates per query, with their features (to re-encode), their stale
  embeddings and the log-probability with which each was drawn;
- `logit`: from the drawn negatives' fresh scores `s_ik`, the cache's column of the
  softmax, `[B]`.

`Gumbel` draws from the softmax over the stale cached scores (the paper's Gumbel-Max);
`Uniform` draws uniformly over the filled slots without scoring the cache (mixed negative
sampling with the cache as the corpus). Both use the corrected estimator by default:

    logit_i = log mean_k exp(s_ik - log p_ik)

the log of the importance-sampling estimate of the cached mass `sum_j exp(s_ij)` under the
current towers, `p_ik` the probability with which the draw picked slot `j_k`. Its exponential
is unbiased for that mass whatever the draw's distribution and however stale or rounded the
scores it drew with; the loss and its gradient, though, are a self-normalised estimate, with
a bias of order 1/k whenever the cache is stale (docs/algorithm.md, step 5). With a fresh
cache and Gumbel draws its value is the log-mass `M_i` and its gradient the paper's.
`Gumbel(estimator="stale")` keeps the paper's uncorrected logit `sg(M_i) + mean_k(s_ik -
sg(s_ik))`, whose weight follows the stale scores.
"""

import abc
import dataclasses
from typing import Dict, Optional

import tensorflow as tf
import tensorflow_recommenders as tfrs

# TFRS masks logits with this value; an empty cache's logit becomes it, so its softmax weight
# is exactly 0 and `0 * log(0)` never appears.
MIN_FLOAT = tfrs.tasks.retrieval.MIN_FLOAT
ESTIMATORS = ("corrected", "stale")


@dataclasses.dataclass
class CacheNegatives:
    """k negatives per query drawn from a cache for B queries (query-major rows).

    Attributes:
      slots: `[B * k]` int64 slots in the cache's addressing (what a write-back writes).
      features: `{name: [B * k, ...]}` their cached features.
      stale: `[B * k, d]` their cached embeddings.
      log_prob: `[B, k]` the log-probability with which each was drawn.
      valid: `[B, k]` bool, False for draws that do not count: a query with nothing eligible,
        a uniform draw on a slot ineligible for its query. They get no weight, no
        write-back and no staleness statistics.
      log_mass: `[B]` the stale log-mass of the eligible slots (Gumbel draws), or None.

    Example:

    >>> cache = tfnegcache.NegativeCache(8, {"item": tf.TensorSpec([], tf.int64)}, 2)
    >>> ids = tf.range(4, dtype=tf.int64)
    >>> cache.insert({"item": ids}, tf.zeros([4, 2]), ids)
    >>> negatives = cache.draw(tf.ones([3, 2]), num_samples=2)
    >>> negatives.slots.shape, negatives.features["item"].shape, negatives.log_prob.shape
    (TensorShape([6]), TensorShape([6]), TensorShape([3, 2]))
    >>> np.allclose(np.exp(negatives.log_prob), 1 / 4)      # equal scores: uniform over 4
    True
    """

    slots: tf.Tensor
    features: Dict[str, tf.Tensor]
    stale: tf.Tensor
    log_prob: tf.Tensor
    valid: tf.Tensor
    log_mass: Optional[tf.Tensor] = None


class Negatives(abc.ABC):
    """A negative strategy: what `CacheRetrieval` draws and how the cache enters its loss."""

    name: str

    def check(self, cache) -> None:
        """Raises ValueError when `cache` cannot serve this strategy."""

    @abc.abstractmethod
    def draw(self, cache, queries, num_samples: int, temperature, masked_ids, excluded_ids,
             seed) -> CacheNegatives:
        """k negatives per query, from `cache`."""

    def log_mass(self, cache, queries, temperature, masked_ids, excluded_ids) -> tf.Tensor:
        """`[B]` the exact (stale) log-mass of the cache, the cache's logit in evaluation."""
        return cache.log_mass(queries, temperature, masked_ids, excluded_ids)

    def logit(self, negatives: CacheNegatives, fresh_scores: tf.Tensor) -> tf.Tensor:
        """`[B]` the cache's training logit from the drawn negatives' fresh scores `[B, k]`
        (the corrected estimator); `MIN_FLOAT` for a query with no valid draw."""
        weights = tf.where(negatives.valid, fresh_scores - tf.cast(
            negatives.log_prob, fresh_scores.dtype), MIN_FLOAT)
        k = tf.cast(tf.shape(fresh_scores)[1], fresh_scores.dtype)
        estimate = tf.reduce_logsumexp(weights, axis=-1) - tf.math.log(k)
        return tf.where(tf.reduce_any(negatives.valid, axis=-1), estimate, MIN_FLOAT)


class Gumbel(Negatives):
    """Draws from the softmax over the stale cached scores, by Gumbel-Max.

    Args:
      estimator: `"corrected"` (`Negatives.logit`) or `"stale"` (the paper's: the value is
        the stale log-mass, the gradient `P_i mean_k grad s_ik` with the stale `P_i`).
      top_m: restrict each query to its `top_m` best cached scores: draws and the log-mass
        range over those m slots only.
    """

    name = "gumbel"

    def __init__(self, estimator: str = "corrected", top_m: Optional[int] = None):
        if estimator not in ESTIMATORS:
            raise ValueError(
                "`estimator` must be 'corrected' (the cached mass reweighted by the drawn "
                "negatives' fresh scores over their draw probabilities) or 'stale' (the "
                f"cached log-mass as it is). Received: estimator={estimator!r}.")
        self.estimator = estimator
        self.top_m = top_m

    def check(self, cache) -> None:
        if self.top_m is not None and not cache.supports_top_m:
            raise ValueError(
                f"`top_m` is not supported with a {type(cache).__name__} (it needs a "
                "cross-shard merge of the per-shard top m, which is not implemented). "
                f"Received: top_m={self.top_m!r}; use a NegativeCache.")

    def draw(self, cache, queries, num_samples, temperature, masked_ids, excluded_ids, seed):
        return cache.draw(queries, num_samples, temperature, masked_ids, excluded_ids, seed,
                          top_m=self.top_m)

    def log_mass(self, cache, queries, temperature, masked_ids, excluded_ids):
        return cache.log_mass(queries, temperature, masked_ids, excluded_ids, top_m=self.top_m)

    def logit(self, negatives, fresh_scores):
        if self.estimator == "corrected":
            return super().logit(negatives, fresh_scores)
        log_mass = tf.cast(negatives.log_mass, fresh_scores.dtype)
        has_mass = tf.math.is_finite(log_mass)
        correction = tf.reduce_mean(fresh_scores - tf.stop_gradient(fresh_scores), axis=-1)
        return tf.where(has_mass, tf.stop_gradient(log_mass) + correction, MIN_FLOAT)


class Uniform(Negatives):
    """Draws uniformly, with replacement, over the filled slots: no scoring of the cache.

    A draw on a slot ineligible for its query (masked, or its own positive) does not count,
    so every query draws from one distribution while the estimate covers the eligible mass;
    `p = 1 / filled` for the others. With a cache warm-started with the whole catalogue this
    is mixed negative sampling (Yang et al. 2020).
    """

    name = "uniform"

    def check(self, cache) -> None:
        if not cache.supports_uniform:
            raise ValueError(
                f"A {type(cache).__name__} draws by Gumbel-Max over the union of its shards; "
                "uniform draws over the union are not implemented. Received: "
                "sampling='uniform'; use a NegativeCache.")

    def draw(self, cache, queries, num_samples, temperature, masked_ids, excluded_ids, seed):
        del temperature   # nothing is scored
        return cache.draw_uniform(tf.shape(queries)[0], num_samples, masked_ids, excluded_ids,
                                  seed)


def make(sampling: str, estimator: str, top_m: Optional[int]) -> Negatives:
    """The strategy of `CacheRetrieval(sampling=..., estimator=..., top_m=...)` (a uniform
    draw always uses the corrected estimator)."""
    if sampling in ("gumbel", "uniform"):
        Gumbel(estimator)   # checks the estimator's name
    if sampling == "gumbel":
        return Gumbel(estimator, top_m)
    if sampling == "uniform":
        if top_m is not None:
            raise ValueError(
                "`top_m` restricts the Gumbel-Max draw to the best cached scores; a uniform "
                f"draw scores nothing. Received: top_m={top_m!r} with sampling='uniform'.")
        return Uniform()
    raise ValueError(
        "`sampling` must be 'gumbel' (Gumbel-Max over the cached softmax) or 'uniform' "
        f"(mixed negative sampling). Received: sampling={sampling!r}.")
