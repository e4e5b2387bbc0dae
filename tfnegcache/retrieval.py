"""`CacheRetrieval`: `tfrs.tasks.Retrieval` with negatives sampled from a negative cache."""

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Text, Union

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import checks
from tfnegcache.cache import CacheUpdate, NegativeCache
from tfnegcache.sharded import ShardedNegativeCache

# TFRS masks logits with this value (tfrs.tasks.retrieval.MIN_FLOAT); an empty cache's
# log-mass becomes it, so its softmax weight is exactly 0 and `0 * log(0)` never appears.
MIN_FLOAT = tfrs.tasks.retrieval.MIN_FLOAT


def _own_scores(queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """Scores of each query with its own candidates.

    Args:
      queries: `[B, d]`, or `[B, H, d]` multi-head queries (scored by their best head, the
        maxsim of `tfrs.tasks.Retrieval`).
      candidates: `[B, k, d]`, k candidates per query.

    Returns:
      `[B, k]` scores (no temperature).
    """
    if queries.shape.rank == 3:
        return tf.reduce_max(tf.einsum("bhd,bkd->bkh", queries, candidates), axis=-1)
    return tf.reduce_sum(queries[:, None, :] * candidates, axis=-1)


class CacheRetrieval(tfrs.tasks.Retrieval):
    """A retrieval task whose softmax also ranges over a large cache of candidates.

    A drop-in for `tfrs.tasks.Retrieval`: it takes the same arguments and its `call` the same
    inputs, plus the batch's candidate features and ids. Besides the in-batch negatives
    (kept by default), each query's softmax includes every candidate in `cache`, scored with
    the cached (stale) embeddings. In training, `num_negatives` negatives per query are drawn
    from that softmax by Gumbel-Max and re-encoded by `candidate_model` with gradients, so the
    loss

        loss_i = -s_i+ + logsumexp([s_i+, in-batch scores_i..., cache logit_i])
        cache logit_i = sg(M_i) + log mean_k exp(s_{i,j_k} - sg(s~_{i,j_k}))

    (`M_i` the log-mass of the cache over the stale scores `s~`, `s` the drawn negatives'
    fresh scores). `exp(cache logit_i)` is an unbiased estimate of the cache's mass under the
    *current* candidate tower (the draw is an importance sample from the stale softmax), so
    the cache's softmax weight, and with it the gradient, follows the fresh scores even when
    the cached embeddings are stale; with fresh embeddings the logit's value is `M_i` and its
    gradient `mean_k grad s_{i,j_k}`, the estimator of Lindgren et al. whose expectation over
    the draw is the full softmax's gradient. `estimator="stale"` keeps that uncorrected
    estimator, `sg(M_i) + mean_k(s - sg(s))` (value `M_i` however stale the cache), which can
    diverge when the towers move fast (docs/knobs.md, "Staleness and the defaults"). The
    correction is folded into the cache's logit, so any `loss` (reduction, `sample_weight`)
    gives the estimator without special cases.

    The cache never changes here. In training the task records a `CacheUpdate` (insert the
    batch's candidates, write back the re-encoded negatives, the random refresh) that
    `CachedRetrievalModel.train_step` checks and applies with the optimizer step, as one
    transaction; evaluation neither draws nor updates.

    With `cache=None`, or while the cache is empty, loss and metrics are those of
    `tfrs.tasks.Retrieval` for the same arguments.

    Multi-head queries: as in `tfrs.tasks.Retrieval`, query embeddings may be
    `[num_queries, num_heads, d]`, and a candidate then scores `max_h <q_ih, v> / T`
    ("maxsim"): the in-batch candidates as TFRS scores them, every cached candidate with its
    stale embedding (that score is what the cache's softmax, the draw, `top_m` and `M_i`
    use), and the re-encoded negatives with their fresh embeddings. The loss is the cross
    entropy above with maxsim scores; factorized metrics are skipped, as TFRS skips them.

    Example (the TFRS tutorial's model, with the cache):

    ```python
    cache = tfnegcache.NegativeCache(
        size=2048, feature_spec={"movie_title": tf.TensorSpec([], tf.string)},
        embedding_dim=32)
    task = tfnegcache.CacheRetrieval(
        metrics=tfrs.metrics.FactorizedTopK(candidates=movies.batch(128).map(movie_model)),
        cache=cache,
        candidate_model=lambda features: movie_model(features["movie_title"]))
    # in compute_loss:
    return task(user_embeddings, movie_embeddings,
                candidate_ids=features["movie_title"],
                candidate_features={"movie_title": features["movie_title"]})
    ```
    """

    def __init__(
        self,
        loss: Optional[tf.keras.losses.Loss] = None,
        metrics: Optional[Union[Sequence[tfrs.metrics.Factorized], tfrs.metrics.Factorized]] = None,
        batch_metrics: Optional[List[tf.keras.metrics.Metric]] = None,
        loss_metrics: Optional[List[tf.keras.metrics.Metric]] = None,
        temperature: Optional[float] = None,
        num_hard_negatives: Optional[int] = None,
        remove_accidental_hits: bool = False,
        name: Optional[Text] = None,
        *,
        cache: Optional[NegativeCache] = None,
        candidate_model: Optional[Callable[[Mapping[str, tf.Tensor]], tf.Tensor]] = None,
        num_negatives: int = 1,
        use_in_batch_negatives: bool = True,
        id_based_metrics: Optional[bool] = None,
        top_m: Optional[int] = None,
        refresh_per_step: int = 0,
        write_back: bool = True,
        sampling: str = "gumbel",
        estimator: str = "corrected",
    ) -> None:
        """Initializes the task.

        Args:
          loss, metrics, batch_metrics, loss_metrics, temperature, num_hard_negatives,
          remove_accidental_hits, name: as in `tfrs.tasks.Retrieval`. `batch_metrics`,
            `num_hard_negatives` and `remove_accidental_hits` act on the in-batch negatives
            only. `candidate_sampling_probability` (the logQ correction, a `call` argument)
            also changes how the cache is combined with the in-batch negatives: see "logQ
            with a cache" below.
          cache: the `NegativeCache` to draw negatives from; None disables it (then this is
            `tfrs.tasks.Retrieval`).
          candidate_model: maps a dict of cached candidate features (`[M, ...]` per key of the
            cache's `feature_spec`) to `[M, d]` embeddings: the candidate tower, re-encoding
            sampled negatives with the current weights. Required with a cache.
          num_negatives: k, negatives drawn from the cache per query per step.
          use_in_batch_negatives: also use the batch's other candidates as negatives (the
            default). Cached copies of the batch's candidates are then masked so each
            candidate counts once. When False, the softmax is over [positive, cache], and only
            the query's own positive is masked in the cache.
          id_based_metrics: whether the factorized metrics compare `candidate_ids` with the
            identifiers of their top-k index (True, as TFRS does when ids are given) or compare
            scores (False, as TFRS does without ids). None, the default, decides per metric:
            id-based when the metric's index carries identifiers of the ids' dtype (e.g.
            `FactorizedTopK(candidates=movies.batch(128).map(lambda t: (t, model(t))))`),
            score-based when it holds embeddings only (the TFRS tutorial's
            `movies.batch(128).map(movie_model)`), so passing `candidate_ids` for the cache
            never changes what the metrics compute.
          top_m: restrict each query's cache softmax to its `top_m` highest cached scores
            (the reference code's option; None, the default, uses the whole cache). Negatives
            are drawn from the softmax restricted to those m slots, and the cache logit's
            value is their log-mass only, so the loss is the cross entropy over [positive,
            in-batch, top-m cached] (a lower bound on the whole-cache loss) and its gradient
            is biased toward the hardest negatives relative to the full softmax's. Chunked
            (`sampling.top_m_scores`): no `[B, N]` matrix.
          refresh_per_step: R, slots re-encoded per training step besides the write-back: R
            distinct filled slots drawn uniformly from (cache seed, step), re-encoded by
            `candidate_model` without gradients, with the weights the step starts from (so
            they are one optimizer step old when written, like the inserted positives).
            Refresh rate R / N. 0 disables it.
          write_back: write the re-encoded negatives' fresh embeddings back into the cache
            (the default refresh policy). False leaves sampled slots stale.
          sampling: how training draws its k negatives from the cache.
            `"gumbel"` (the default): from the softmax over the stale cached scores, by
            Gumbel-Max; the cache's logit is its exact (stale) log-mass plus the gradient
            correction above. `"uniform"`: uniformly over the filled slots, without scoring
            the cache (mixed negative sampling, Yang et al. 2020, with the cache as the
            corpus; with a warm-started whole-corpus cache it is exactly MNS). The cache's
            logit is then `log(filled / k) + logsumexp_k(s_ik)` over the eligible draws'
            fresh scores (a draw on a masked slot or on the query's own positive counts
            zero), so `exp(logit)` is an unbiased estimate of the eligible cached mass and the
            loss estimates the same cross entropy over [positive, in-batch, cache] as
            `"gumbel"`, with fresh instead of stale embeddings. Its value is the log of an
            unbiased estimate of the softmax's denominator (so on average slightly below the
            exact loss) and its gradient is the self-normalised importance-sampling one:
            consistent, with a bias that shrinks as 1/k. Evaluation uses the exact log-mass
            in both modes. Not with `top_m` or a `ShardedNegativeCache`.
          estimator: the cache's logit in training with `sampling="gumbel"`.
            `"corrected"` (the default): `M_i + log mean_k exp(s_ik - s~_ik)`, the stale
            log-mass reweighted by the drawn negatives' fresh-over-stale scores, so that its
            exponential is an unbiased estimate of the cached mass under the current tower
            and the cache's weight in the softmax follows the fresh scores. Equal to
            `"stale"` when the drawn embeddings are fresh; costs nothing (the drawn slots'
            stale embeddings are read anyway). `"stale"`: the value `M_i` (the cross entropy
            with the stale cache) and gradient `P_i mean_k grad s_ik`, with `P_i` from the
            stale mass: the paper's estimator, whose weight can stay near 1 while the fresh
            scores fall, a feedback that made norms and loss explode with unnormalised dot
            products and fast-moving towers (docs/knobs.md). Evaluation uses the exact stale
            log-mass with both.

        logQ with a cache. Without `candidate_sampling_probability` the in-batch negatives
        are exact terms: the softmax is over [positive, in-batch negatives, the cache minus
        the batch's candidates], each candidate counted once. With it, the in-batch columns
        get TFRS's correction `s_ij - log Q_j` (positive included), which makes them
        importance samples: with n in-batch candidates, `sum_{j != i} exp(s_ij) / Q_j`
        estimates `(n - 1)` times the softmax mass of the whole corpus. The cache's mass must
        enter on that scale, and must not be counted twice, so the task then
          - keeps in-batch column j of row i only if j is the positive or candidate j is
            not cached (the uncached mass is what the samples estimate), and
          - gives the cache the logit `M_i + log(n - 1)`, `M_i` now over every cached
            candidate but query i's own positive.
        The denominator estimates `(n - 1) x` (cached mass, exact and stale + uncached
        mass, importance-sampled), the quantity TFRS's logQ softmax estimates with in-batch
        negatives alone: with an empty cache the loss is TFRS's exactly, and with a cache
        of the whole corpus it is the full softmax with TFRS's logQ offset on the positive.
        `Q_j` must then be a probability (the chance that one in-batch candidate is j,
        summing to 1 over the corpus), not just proportional to one: TFRS alone is
        indifferent to its scale, the cache's weight is not. (Added unscaled, the cache's
        log-mass would be about `1 / ((n - 1) Q)` times too light next to the corrected
        columns, and the cache would barely touch the loss.) With
        `use_in_batch_negatives=False` there are no samples to correct, and passing
        `candidate_sampling_probability` is an error. Not supported with a sharded cache
        (which cannot tell locally whether an in-batch candidate is cached anywhere).

        What the cached softmax estimates when the cache holds a subset of a larger corpus:
        the softmax over [positive, in-batch, the cached subset]. Its loss and gradient are
        those of a *partial* softmax, a biased estimate of the full-corpus one (it misses the
        uncached candidates' mass, so the loss is a lower bound). With the streaming FIFO the
        subset is the most recent distinct positives, i.e. popularity-weighted: popular
        candidates are almost always cached, rare ones rarely, so the cache mostly supplies
        popular hard negatives. Warm-starting with the whole corpus (size >= corpus) makes
        it the full softmax up to staleness.
        """
        temperature = checks.temperature(temperature)
        num_negatives = checks.integer("num_negatives", num_negatives, 1)
        top_m = checks.integer("top_m", top_m, 1, allow_none=True)
        refresh_per_step = checks.integer("refresh_per_step", refresh_per_step, 0)
        num_hard_negatives = checks.integer("num_hard_negatives", num_hard_negatives, 1,
                                            allow_none=True)
        super().__init__(
            loss=loss, metrics=metrics, batch_metrics=batch_metrics, loss_metrics=loss_metrics,
            temperature=temperature, num_hard_negatives=num_hard_negatives,
            remove_accidental_hits=remove_accidental_hits, name=name)
        if cache is not None:
            if not isinstance(cache, (NegativeCache, ShardedNegativeCache)):
                raise ValueError(
                    "`cache` must be a tfnegcache.NegativeCache, a "
                    f"tfnegcache.ShardedNegativeCache or None. Received: {cache!r}.")
            if candidate_model is None or not callable(candidate_model):
                raise ValueError(
                    "`candidate_model` must be given with a cache: a callable mapping a dict of "
                    f"cached features {sorted(cache.feature_spec)} to embeddings, used to "
                    f"re-encode sampled negatives. Received: {candidate_model!r}.")
        self.cache = cache
        self.candidate_model = candidate_model
        self.num_negatives = num_negatives
        self.use_in_batch_negatives = bool(use_in_batch_negatives)
        self.id_based_metrics = None if id_based_metrics is None else bool(id_based_metrics)
        self.in_train_step = False
        self._pending_update: Optional[CacheUpdate] = None
        if sampling not in ("gumbel", "uniform"):
            raise ValueError(
                "`sampling` must be 'gumbel' (Gumbel-Max over the cached softmax) or 'uniform' "
                f"(mixed negative sampling). Received: sampling={sampling!r}.")
        if sampling == "uniform" and top_m is not None:
            raise ValueError(
                "`top_m` restricts the Gumbel-Max draw to the best cached scores; a uniform "
                f"draw scores nothing. Received: top_m={top_m!r} with sampling='uniform'.")
        self.sampling = sampling
        if estimator not in ("corrected", "stale"):
            raise ValueError(
                "`estimator` must be 'corrected' (the cached log-mass reweighted by the drawn "
                "negatives' fresh-over-stale scores) or 'stale' (the cached log-mass as it is). "
                f"Received: estimator={estimator!r}.")
        self.estimator = estimator
        if cache is not None:
            cache.check_sampling(top_m, sampling)
        self.top_m = top_m
        self.refresh_per_step = refresh_per_step
        self.write_back = bool(write_back)
        if cache is not None:
            self.staleness = tf.keras.metrics.Mean(name="cache_staleness")

    def _id_based(self, metric, candidate_ids) -> bool:
        """Whether `metric` gets `candidate_ids` (see `id_based_metrics`)."""
        if self.id_based_metrics is not None or candidate_ids is None:
            return bool(self.id_based_metrics) and candidate_ids is not None
        index = getattr(metric, "_candidates", None)
        if isinstance(index, tfrs.layers.factorized_top_k.Streaming):
            spec = index._candidates.element_spec  # pylint: disable=protected-access
            id_dtype = spec[0].dtype if isinstance(spec, tuple) else None
        elif isinstance(index, tfrs.layers.factorized_top_k.TopK):
            identifiers = getattr(index, "_identifiers", None)
            id_dtype = identifiers.dtype if identifiers is not None else None
        else:
            return True   # not a top-k index: as TFRS, pass the ids
        # An index built without identifiers numbers its rows (int32): positions, not ids.
        return id_dtype is not None and id_dtype != tf.int32 and id_dtype == candidate_ids.dtype

    def pop_update(self) -> Optional[CacheUpdate]:
        """Returns and forgets the `CacheUpdate` recorded by the last training call."""
        update, self._pending_update = self._pending_update, None
        return update

    def _in_batch_logits(self, query_embeddings, candidate_embeddings, candidate_sampling_probability,
                         candidate_ids, score_mask, covered=None):
        """Scores and labels over the in-batch candidates, as `tfrs.tasks.Retrieval` makes them.

        `covered`: optional `[num_candidates]` bool, candidates the cache holds (logQ with a
        cache): their columns are masked except where they are the row's positive, since the
        cache's exact sum already counts them.
        """
        if query_embeddings.shape.rank == 3:
            # Multi-head: maxsim, with TFRS's own ops, so an empty cache gives its loss exactly.
            scores = tf.einsum("qne,ce->qnc", query_embeddings, candidate_embeddings)
            scores = tf.math.reduce_max(scores, axis=1)
        else:
            scores = tf.linalg.matmul(query_embeddings, candidate_embeddings, transpose_b=True)
        labels = tf.eye(tf.shape(scores)[0], tf.shape(scores)[1])
        if self._temperature is not None:
            scores = scores / self._temperature
        if candidate_sampling_probability is not None:
            scores = tfrs.layers.loss.SamplingProbablityCorrection()(
                scores, candidate_sampling_probability)
        if self._remove_accidental_hits:
            scores = tfrs.layers.loss.RemoveAccidentalHits()(labels, scores, candidate_ids)
        if covered is not None:
            keep = tf.logical_or(labels > 0, tf.logical_not(covered)[None, :])
            scores = tf.where(keep, scores, MIN_FLOAT)
        if score_mask is not None:
            scores = tf.where(score_mask, scores, MIN_FLOAT)
        if self._num_hard_negatives is not None:
            scores, labels = tfrs.layers.loss.HardNegativeMining(self._num_hard_negatives)(
                scores, labels)
        return scores, labels

    def _importance_weighting(self, candidate_ids):
        """logQ with a cache: which in-batch candidates the cache covers, and the cache's
        log-weight `log(num_candidates - 1)` (see `__init__`, "logQ with a cache")."""
        covered = self.cache.lookup(candidate_ids) >= 0
        num_samples = tf.maximum(tf.size(candidate_ids) - 1, 1)
        return covered, tf.math.log(tf.cast(num_samples, tf.float32))

    def _check_inputs(self, query_embeddings, candidate_embeddings, candidate_ids,
                      candidate_features):
        if candidate_ids is None or candidate_features is None:
            raise ValueError(
                "With a negative cache, `candidate_ids` ([num_candidates]) and "
                "`candidate_features` (a dict with keys "
                f"{sorted(self.cache.feature_spec)}) must be passed to the task. Received: "
                f"candidate_ids={'None' if candidate_ids is None else 'a tensor'}, "
                f"candidate_features={'None' if candidate_features is None else 'a dict'}.")
        self.cache.check_queries(query_embeddings, "query_embeddings")
        self.cache.check_embeddings(candidate_embeddings, "candidate_embeddings")
        candidate_ids = self.cache.check_ids(candidate_ids)
        rows_match = checks.same_rows(candidate_ids, tf.shape(candidate_embeddings)[0],
                                      "`candidate_ids`", "candidate embeddings")
        with tf.control_dependencies([rows_match]):
            candidate_ids = tf.identity(candidate_ids)
        num_rows = candidate_embeddings.shape[0]
        features = self.cache.check_features(candidate_features, num_rows)
        return candidate_ids, features

    def _encode(self, features: Mapping[str, tf.Tensor], dtype) -> tf.Tensor:
        """The candidate tower on cached features: `[M, d]` in `dtype` (with gradients)."""
        embeddings = self.candidate_model(features)
        if not isinstance(embeddings, (tf.Tensor, tf.Variable)) and not hasattr(
                embeddings, "__array__"):
            raise ValueError(
                "`candidate_model` must return one tensor of embeddings, [num_candidates, "
                f"{self.cache.embedding_dim}], for a dict of cached features. Received: "
                f"{type(embeddings).__name__}"
                + (f" with keys {sorted(embeddings)}" if isinstance(embeddings, Mapping) else "")
                + ".")
        embeddings = self.cache.check_embeddings(tf.convert_to_tensor(embeddings),
                                                 "candidate_model output")
        first = next(iter(features.values()))
        rows = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
        check = checks.same_rows(embeddings, rows, "`candidate_model` output",
                                 "cached candidates given to it")
        with tf.control_dependencies([check]):
            return tf.cast(embeddings, dtype)

    def _cache_logit(self, query_embeddings, candidate_ids, training, log_weight=None):
        """The cache's column of the logits, `[B]`, and the write-back rows of the draw.

        `log_weight`: None (the in-batch negatives are exact terms: the cache masks them), or
        a scalar added to the log-mass (logQ: in-batch negatives are importance samples of the
        uncached mass, the cache keeps them and excludes only each query's own positive).
        """
        cache, k = self.cache, self.num_negatives
        num_queries = tf.shape(query_embeddings)[0]
        exact_in_batch = self.use_in_batch_negatives and log_weight is None
        masked_ids = candidate_ids if exact_in_batch else None
        excluded_ids = None if exact_in_batch else candidate_ids[:num_queries]
        uniform = training and self.sampling == "uniform"
        if uniform:
            negatives = cache.draw_uniform(num_queries, k, masked_ids, excluded_ids)
        else:
            negatives = cache.draw(
                query_embeddings, num_samples=k, temperature=self._temperature,
                masked_ids=masked_ids, excluded_ids=excluded_ids, draw=training,
                top_m=self.top_m)
            has_mass = tf.math.is_finite(negatives.log_mass)
            log_mass = negatives.log_mass
            if log_weight is not None:
                log_mass = log_mass + tf.cast(log_weight, log_mass.dtype)
            log_mass = tf.stop_gradient(tf.where(has_mass, log_mass, MIN_FLOAT))
            if not training:
                return log_mass, None

        fresh = self._encode(negatives.features, query_embeddings.dtype)
        fresh_scores = _own_scores(query_embeddings,
                                   tf.reshape(fresh, [num_queries, k, self.cache.embedding_dim]))
        if self._temperature is not None:
            fresh_scores = fresh_scores / self._temperature
        if uniform:
            eligible = tf.math.is_finite(negatives.log_weights)
            has_mass = tf.reduce_any(eligible, axis=-1)
            # MIN_FLOAT, not -inf, for ineligible draws: a logsumexp over no eligible draw
            # stays finite, so its (unselected) gradient below is 0, not NaN.
            weighted = tf.where(eligible, fresh_scores + tf.cast(
                negatives.log_weights, fresh_scores.dtype), MIN_FLOAT)
            estimate = tf.reduce_logsumexp(weighted, axis=-1)
            if log_weight is not None:
                estimate = estimate + tf.cast(log_weight, estimate.dtype)
            cache_logit = tf.where(has_mass, estimate, MIN_FLOAT)
            valid = tf.reshape(eligible, [-1])
        elif self.estimator == "corrected":
            dtype = query_embeddings.dtype
            stale = tf.reshape(tf.cast(negatives.stale, dtype),
                               [num_queries, k, self.cache.embedding_dim])
            rounded = getattr(self.cache, "scoring_dtype", None)
            if rounded is not None and rounded != dtype:
                # The scores the draw used: rounded queries / T and embeddings (exact products
                # in float32), the score rounded too (NegativeCache(scoring_dtype=...)).
                inv_temperature = 1.0 / self._temperature if self._temperature else 1.0
                round_ = lambda x: tf.cast(tf.cast(x, rounded), dtype)  # noqa: E731
                stale_scores = round_(_own_scores(round_(query_embeddings * inv_temperature),
                                                  round_(stale)))
            else:
                stale_scores = _own_scores(query_embeddings, stale)
                if self._temperature is not None:
                    stale_scores = stale_scores / self._temperature
            log_ratio = fresh_scores - tf.stop_gradient(stale_scores)
            correction = tf.reduce_logsumexp(log_ratio, axis=-1) - tf.math.log(
                tf.cast(k, log_ratio.dtype))
            valid = tf.repeat(has_mass, k)
            cache_logit = log_mass + tf.where(has_mass, correction, tf.zeros_like(correction))
        else:
            correction = tf.reduce_mean(fresh_scores - tf.stop_gradient(fresh_scores), axis=-1)
            valid = tf.repeat(has_mass, k)
            # Draws from an empty cache are arbitrary slots: no gradient, no write-back, no
            # stats.
            cache_logit = log_mass + tf.where(has_mass, correction, tf.zeros_like(correction))

        fresh_sg = tf.stop_gradient(fresh)
        stale = tf.cast(negatives.stale, fresh_sg.dtype)
        staleness = tf.reduce_sum(tf.square(stale - fresh_sg), -1) / tf.maximum(
            tf.reduce_sum(tf.square(fresh_sg), -1), 1e-12)
        self.staleness.update_state(staleness, sample_weight=tf.cast(valid, staleness.dtype))
        return cache_logit, (negatives.slots, fresh_sg, valid)

    def _cache_update(self, features, candidate_embeddings, candidate_ids,
                      write_back) -> CacheUpdate:
        """What this step writes: the batch's candidates, the re-encoded negatives (unless
        `write_back=False`) and `refresh_per_step` random slots re-encoded now, with the
        weights before the optimizer step, by the task's candidate tower."""
        update = CacheUpdate(features, tf.stop_gradient(candidate_embeddings), candidate_ids)
        if self.write_back:
            (update.write_back_slots, update.write_back_embeddings,
             update.write_back_valid) = write_back
        if self.refresh_per_step > 0:
            slots, cached = self.cache.refresh_candidates(self.refresh_per_step)
            update.refresh_slots = slots
            update.refresh_embeddings = tf.stop_gradient(
                self._encode(cached, candidate_embeddings.dtype))
        return update

    def call(
        self,
        query_embeddings: tf.Tensor,
        candidate_embeddings: tf.Tensor,
        sample_weight: Optional[tf.Tensor] = None,
        candidate_sampling_probability: Optional[tf.Tensor] = None,
        candidate_ids: Optional[tf.Tensor] = None,
        compute_metrics: bool = True,
        compute_batch_metrics: bool = True,
        score_mask: Optional[tf.Tensor] = None,
        candidate_features: Optional[Dict[str, tf.Tensor]] = None,
        training: Optional[bool] = None,
    ) -> tf.Tensor:
        """Computes the loss (and updates metrics); records the cache update in training.

        Args:
          query_embeddings: `[num_queries, d]`, or `[num_queries, num_heads, d]`: a
            candidate (in-batch, cached or re-encoded) then scores the max over heads of
            `<q_ih, v>` ("maxsim", as `tfrs.tasks.Retrieval`), and factorized metrics are
            skipped.
          candidate_embeddings: `[num_candidates, d]`, the first `num_queries` rows the
            positives (extra rows are extra in-batch negatives, as in TFRS).
          sample_weight, candidate_sampling_probability, compute_metrics,
          compute_batch_metrics, score_mask: as in `tfrs.tasks.Retrieval.call`.
          candidate_ids: `[num_candidates]` ids; required with a cache (masking, dedupe).
          candidate_features: `{name: [num_candidates, ...]}`, the candidates' features for
            the cache's `feature_spec`; required with a cache. Keys outside the spec are
            ignored (the cache stores only the spec'd features).
          training: whether to draw negatives and record a cache update. None means "inside
            `CachedRetrievalModel.train_step`" (the model sets `in_train_step`).

        Dtypes: embeddings may be any float dtype. The cache is scored, and re-encoded
        negatives are combined, in the query embeddings' dtype (stale embeddings are cast to
        it); inserted and written-back embeddings are stored in the cache's
        `embedding_dtype`. An empty batch gives loss 0, as in TFRS, and no cache update.

        Returns:
          The loss: a scalar (or what `loss` reduces to).
        """
        if self.cache is None:
            return super().call(
                query_embeddings, candidate_embeddings, sample_weight=sample_weight,
                candidate_sampling_probability=candidate_sampling_probability,
                candidate_ids=candidate_ids, compute_metrics=compute_metrics,
                compute_batch_metrics=compute_batch_metrics, score_mask=score_mask)
        if training is None:
            training = self.in_train_step
        if query_embeddings.shape[0] == 0:
            # An empty batch: loss 0 as TFRS gives it, zero gradients, no draw, no update.
            return 0.0 * (tf.reduce_sum(query_embeddings)
                          + tf.reduce_sum(tf.cast(candidate_embeddings, query_embeddings.dtype)))
        candidate_ids, features = self._check_inputs(
            query_embeddings, candidate_embeddings, candidate_ids, candidate_features)

        covered, log_weight = None, None
        if not self.use_in_batch_negatives and candidate_sampling_probability is not None:
            raise ValueError(
                "`candidate_sampling_probability` (logQ) corrects the sampling of in-batch "
                "negatives, but this task has use_in_batch_negatives=False: its softmax is over "
                "[positive, cache], which needs no correction. Received a sampling probability; "
                "drop it, or set use_in_batch_negatives=True.")
        if self.use_in_batch_negatives and candidate_sampling_probability is not None:
            covered, log_weight = self._importance_weighting(candidate_ids)
        if self.use_in_batch_negatives:
            scores, labels = self._in_batch_logits(
                query_embeddings, candidate_embeddings, candidate_sampling_probability,
                candidate_ids, score_mask, covered)
        else:
            num_queries = tf.shape(query_embeddings)[0]
            scores = _own_scores(query_embeddings, candidate_embeddings[:num_queries, None, :])
            if self._temperature is not None:
                scores = scores / self._temperature
            labels = tf.ones_like(scores)
        cache_logit, write_back = self._cache_logit(query_embeddings, candidate_ids, training,
                                                    log_weight)
        all_scores = tf.concat([scores, cache_logit[:, None]], axis=1)
        all_labels = tf.concat([labels, tf.zeros_like(labels[:, :1])], axis=1)
        loss = self._loss(y_true=all_labels, y_pred=all_scores, sample_weight=sample_weight)
        if training:
            self._pending_update = self._cache_update(
                features, candidate_embeddings, candidate_ids, write_back)

        update_ops = [metric.update_state(loss) for metric in self._loss_metrics]
        # As TFRS: top-k indexes score single-vector queries only.
        if compute_metrics and query_embeddings.shape.rank == 2:
            for metric in self._factorized_metrics:
                update_ops.append(metric.update_state(
                    query_embeddings, candidate_embeddings[:tf.shape(query_embeddings)[0]],
                    true_candidate_ids=(candidate_ids if self._id_based(metric, candidate_ids)
                                        else None),
                    sample_weight=sample_weight))
        if compute_batch_metrics and self.use_in_batch_negatives:
            for metric in self._batch_metrics:
                update_ops.append(metric.update_state(labels, scores, sample_weight=sample_weight))
        with tf.control_dependencies([op for op in update_ops if op is not None]):
            return tf.identity(loss)
