"""`CacheRetrieval`: `tfrs.tasks.Retrieval` with one more softmax column, the cache."""

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Text, Union

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import checks, negatives, step
from tfnegcache.cache import Cache, CacheUpdate, draw_seed
from tfnegcache.negatives import MIN_FLOAT
from tfnegcache._autograph import as_user_code


def own_scores(queries: tf.Tensor, candidates: tf.Tensor) -> tf.Tensor:
    """`[B, k]` scores of each query with its own k candidates `[B, k, d]` (no temperature);
    `[B, H, d]` queries score a candidate by their best head (maxsim)."""
    if queries.shape.rank == 3:
        return tf.reduce_max(tf.einsum("bhd,bkd->bkh", queries, candidates), axis=-1)
    return tf.reduce_sum(queries[:, None, :] * candidates, axis=-1)


def compute_dtype(*tensors) -> tf.DType:
    """The dtype the task computes in: float64 if any input is, else float32 (half-precision
    towers, as under a mixed-precision policy, are scored and lossed in float32)."""
    return tf.float64 if any(t.dtype == tf.float64 for t in tensors) else tf.float32


class CacheRetrieval(tfrs.tasks.Retrieval):
    """A retrieval task whose softmax also ranges over a cache of candidates.

    A drop-in for `tfrs.tasks.Retrieval`: the same arguments and `call` inputs, plus the
    batch's candidate ids and features. Each query's softmax is over its positive, the
    in-batch negatives (kept by default) and one more column for every cached candidate
    together. In training that column's logit is estimated from `num_negatives` negatives per
    query drawn from the cache and re-encoded by `candidate_model` with gradients
    (`tfnegcache.negatives`); in evaluation it is the exact log-mass of the stale cached
    scores. The cache never changes here: in training the task records the `CacheUpdate` of
    the step (insert the batch's candidates, write back the re-encoded negatives, the random
    refresh), which `CachedRetrievalModel.train_step` applies with the optimizer step as one
    transaction. With `cache=None`, or an empty cache, loss and metrics are
    `tfrs.tasks.Retrieval`'s. What the loss estimates, logQ with a cache and partial caches:
    docs/knobs.md.

    Args:
      loss, metrics, batch_metrics, loss_metrics, temperature, num_hard_negatives,
        remove_accidental_hits, name: as `tfrs.tasks.Retrieval` (`batch_metrics`,
        `num_hard_negatives` and `remove_accidental_hits` act on the in-batch columns).
      cache: a `NegativeCache` or `ShardedNegativeCache`; None is `tfrs.tasks.Retrieval`.
      candidate_model: `{feature: [M, ...]} -> [M, d]`, the candidate tower (with a cache).
      num_negatives: k, negatives drawn per query per step.
      use_in_batch_negatives: keep the batch's other candidates (their cached copies are
        then masked, so each candidate counts once).
      id_based_metrics: whether factorized metrics compare ids (None: when their index has
        identifiers of the ids' dtype, else scores, as in the TFRS tutorial).
      top_m: restrict each query's cache softmax to its m best cached scores.
      refresh_per_step: R random filled slots re-encoded per step (refresh rate R / N).
      write_back: write the re-encoded negatives' embeddings back.
      sampling: `"gumbel"` (the softmax over stale scores) or `"uniform"` (mixed negative
        sampling over the filled slots, no scoring).
      estimator: the cache's training logit with `"gumbel"`: `"corrected"` (unbiased for the
        cached mass under the current towers) or `"stale"` (the paper's).

    Example:

    >>> items = tf.keras.layers.Embedding(100, 8)
    >>> cache = tfnegcache.NegativeCache(
    ...     size=64, feature_spec={"item": tf.TensorSpec([], tf.int64)}, embedding_dim=8)
    >>> task = tfnegcache.CacheRetrieval(
    ...     cache=cache, candidate_model=lambda f: items(f["item"]))
    >>> ids = tf.range(4, dtype=tf.int64)
    >>> loss = task(tf.random.normal([4, 8]), items(ids), candidate_ids=ids,
    ...             candidate_features={"item": ids})
    >>> float(loss) > 0
    True
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
        cache: Optional[Cache] = None,
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
        temperature = checks.temperature(temperature)
        num_negatives = checks.integer("num_negatives", num_negatives, 1)
        top_m = checks.integer("top_m", top_m, 1, allow_none=True)
        refresh_per_step = checks.integer("refresh_per_step", refresh_per_step, 0)
        num_hard_negatives = checks.integer("num_hard_negatives", num_hard_negatives, 1,
                                            allow_none=True)
        strategy = negatives.make(sampling, estimator, top_m)
        super().__init__(
            loss=loss, metrics=metrics, batch_metrics=batch_metrics, loss_metrics=loss_metrics,
            temperature=temperature, num_hard_negatives=num_hard_negatives,
            remove_accidental_hits=remove_accidental_hits, name=name)
        if cache is not None:
            if not isinstance(cache, Cache):
                raise ValueError(
                    "`cache` must be a tfnegcache.NegativeCache, a "
                    f"tfnegcache.ShardedNegativeCache or None. Received: {cache!r}.")
            if candidate_model is None or not callable(candidate_model):
                raise ValueError(
                    "`candidate_model` must be given with a cache: a callable mapping a dict of "
                    f"cached features {sorted(cache.feature_spec)} to embeddings, used to "
                    f"re-encode sampled negatives. Received: {candidate_model!r}.")
            strategy.check(cache)
            self.staleness = tf.keras.metrics.Mean(name="cache_staleness")
        self.cache = cache
        self.candidate_model = candidate_model
        self.negatives = strategy
        self.num_negatives = num_negatives
        self.use_in_batch_negatives = bool(use_in_batch_negatives)
        self.id_based_metrics = None if id_based_metrics is None else bool(id_based_metrics)
        self.sampling, self.estimator, self.top_m = sampling, estimator, top_m
        self.refresh_per_step = refresh_per_step
        self.write_back = bool(write_back)

    # ------------------------------------------------------------------ inputs

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

    @staticmethod
    def _metric_dtype(metric, id_based: bool, dtype: tf.DType) -> tf.DType:
        """The dtype `metric` is given embeddings in: its top-k index's compute dtype (the
        dtype policy it was built under), else the task's `dtype`.

        Raises:
          ValueError: the metric cannot work in that dtype: TFRS's streaming index keeps its
            top-k scores in float32, and its score-based accuracy (`tf.math.in_top_k`)
            ranks float32 scores only.
        """
        index = getattr(metric, "_candidates", None)
        index_dtype = getattr(index, "compute_dtype", None)
        if index_dtype is None:
            return dtype
        index_dtype = tf.as_dtype(index_dtype)
        streaming = isinstance(index, tfrs.layers.factorized_top_k.Streaming)
        if index_dtype != tf.float32 and (streaming or not id_based):
            what = ("its streaming index (FactorizedTopK(candidates=dataset)) keeps its "
                    "top-k scores" if streaming else
                    "score-based top-k accuracy (an index without the candidates' ids) "
                    "ranks scores")
            raise ValueError(
                f"The factorized metric {metric.name!r} cannot run in {index_dtype.name}, "
                f"the compute dtype of its candidate index (built under the "
                f"{index.dtype_policy.name!r} dtype policy): in TFRS, {what} in float32 "
                "only. Index the candidates with their ids, "
                "`tfrs.layers.factorized_top_k.BruteForce().index_from_dataset("
                "candidates.map(lambda c: (c[id_key], candidate_model(c))))`, with ids of the "
                "dtype of `candidate_ids` (id-based accuracy works in any dtype), or build "
                "the metric's index under the float32 policy over float32 embeddings.")
        return index_dtype

    def _check_inputs(self, query_embeddings, candidate_embeddings, candidate_ids,
                      candidate_features):
        spec = self.cache.spec
        if candidate_ids is None or candidate_features is None:
            raise ValueError(
                "With a negative cache, `candidate_ids` ([num_candidates]) and "
                f"`candidate_features` (a dict with keys {sorted(spec.feature_spec)}) must be "
                "passed to the task. Received: "
                f"candidate_ids={'None' if candidate_ids is None else 'a tensor'}, "
                f"candidate_features={'None' if candidate_features is None else 'a dict'}.")
        spec.check_queries(query_embeddings, "query_embeddings")
        spec.check_embeddings(candidate_embeddings, "candidate_embeddings")
        candidate_ids = spec.check_ids(candidate_ids)
        rows_match = checks.same_rows(candidate_ids, tf.shape(candidate_embeddings)[0],
                                      "`candidate_ids`", "candidate embeddings")
        with tf.control_dependencies([rows_match]):
            candidate_ids = tf.identity(candidate_ids)
        features = spec.check_features(candidate_features, candidate_embeddings.shape[0])
        return candidate_ids, features

    def _encode(self, features: Mapping[str, tf.Tensor], dtype) -> tf.Tensor:
        """The candidate tower on cached features: `[M, d]` in `dtype` (with gradients)."""
        embeddings = as_user_code(self.candidate_model)(features)
        if not isinstance(embeddings, (tf.Tensor, tf.Variable)) and not hasattr(
                embeddings, "__array__"):
            raise ValueError(
                "`candidate_model` must return one tensor of embeddings, [num_candidates, "
                f"{self.cache.embedding_dim}], for a dict of cached features. Received: "
                f"{type(embeddings).__name__}"
                + (f" with keys {sorted(embeddings)}" if isinstance(embeddings, Mapping) else "")
                + ".")
        embeddings = self.cache.spec.check_embeddings(tf.convert_to_tensor(embeddings),
                                                      "candidate_model output")
        first = next(iter(features.values()))
        rows = first.shape[0] if first.shape[0] is not None else tf.shape(first)[0]
        check = checks.same_rows(embeddings, rows, "`candidate_model` output",
                                 "cached candidates given to it")
        with tf.control_dependencies([check]):
            return tf.cast(embeddings, dtype)

    # ------------------------------------------------------------------ the columns

    def _in_batch_logits(self, query_embeddings, candidate_embeddings,
                         candidate_sampling_probability, candidate_ids, score_mask,
                         covered=None):
        """Scores and labels over the in-batch candidates, as `tfrs.tasks.Retrieval` makes
        them; with `covered` (`[n]` bool, logQ with a cache) the columns of cached candidates
        are masked except where they are the row's positive."""
        if query_embeddings.shape.rank == 3:
            scores = tf.einsum("qne,ce->qnc", query_embeddings, candidate_embeddings)
            scores = tf.math.reduce_max(scores, axis=1)
        else:
            scores = tf.linalg.matmul(query_embeddings, candidate_embeddings, transpose_b=True)
        labels = tf.eye(tf.shape(scores)[0], tf.shape(scores)[1], dtype=scores.dtype)
        if self._temperature is not None:
            scores = scores / self._temperature
        if candidate_sampling_probability is not None:
            scores = tfrs.layers.loss.SamplingProbablityCorrection()(
                scores, tf.cast(candidate_sampling_probability, scores.dtype))
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

    def _cache_column(self, query_embeddings, candidate_ids, training, log_weight=None):
        """The cache's column of the logits, `[B]`, and in training the draw's write-back
        rows `(slots, fresh embeddings, valid)`.

        `log_weight`: None (the in-batch negatives are exact terms: the cache masks them), or
        the scalar `log(n - 1)` added to the cache's logit under logQ (the in-batch negatives
        are importance samples of the uncached mass; only each query's positive is masked).
        """
        cache, k, strategy = self.cache, self.num_negatives, self.negatives
        num_queries = tf.shape(query_embeddings)[0]
        exact_in_batch = self.use_in_batch_negatives and log_weight is None
        masked_ids = candidate_ids if exact_in_batch else None
        excluded_ids = None if exact_in_batch else candidate_ids[:num_queries]
        dtype = query_embeddings.dtype
        if not training:
            log_mass = strategy.log_mass(cache, query_embeddings, self._temperature,
                                         masked_ids, excluded_ids)
            logit = tf.where(tf.math.is_finite(log_mass), tf.cast(log_mass, dtype), MIN_FLOAT)
            if log_weight is not None:
                logit = tf.where(logit > MIN_FLOAT, logit + tf.cast(log_weight, dtype),
                                 MIN_FLOAT)
            return tf.stop_gradient(logit), None

        record = step.current()
        seed = draw_seed(cache.seed, cache.step_counter(), record.next_draw(cache))
        drawn = strategy.draw(cache, query_embeddings, k, self._temperature, masked_ids,
                              excluded_ids, seed)
        fresh = self._encode(drawn.features, dtype)
        fresh_scores = own_scores(query_embeddings,
                                  tf.reshape(fresh, [num_queries, k, cache.embedding_dim]))
        if self._temperature is not None:
            fresh_scores = fresh_scores / self._temperature
        logit = strategy.logit(drawn, fresh_scores)
        if log_weight is not None:
            logit = tf.where(logit > MIN_FLOAT, logit + tf.cast(log_weight, dtype), MIN_FLOAT)
        valid = tf.reshape(drawn.valid, [-1])
        fresh_sg = tf.stop_gradient(fresh)
        stale = tf.cast(drawn.stale, fresh_sg.dtype)
        staleness = tf.reduce_sum(tf.square(stale - fresh_sg), -1) / tf.maximum(
            tf.reduce_sum(tf.square(fresh_sg), -1), 1e-12)
        self.staleness.update_state(staleness, sample_weight=tf.cast(valid, staleness.dtype))
        return logit, (drawn.slots, fresh_sg, valid)

    def _cache_update(self, features, candidate_embeddings, candidate_ids,
                      write_back) -> CacheUpdate:
        """What this step writes: the batch's candidates, the re-encoded negatives (unless
        `write_back=False`) and `refresh_per_step` random slots encoded now, with the weights
        before the optimizer step."""
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

    # ------------------------------------------------------------------ the loss

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
        """The loss (and the metrics' updates); in training, draws and records the update.

        Args:
          query_embeddings: `[B, d]`, or `[B, H, d]` multi-head (maxsim; factorized metrics
            are then skipped, as in TFRS).
          candidate_embeddings: `[n, d]`, the first B rows the positives.
          sample_weight, candidate_sampling_probability, compute_metrics,
            compute_batch_metrics, score_mask: as `tfrs.tasks.Retrieval.call`.
          candidate_ids: `[n]` ids; required with a cache.
          candidate_features: `{name: [n, ...]}` for the cache's `feature_spec` (other keys
            are ignored); required with a cache.
          training: whether to draw negatives and record the cache update; None: inside a
            training step (`tfnegcache.step.run_step`, `CachedRetrievalModel.fit`).

        Embeddings may be any float dtype: the task computes in float32 (float64 if either
        input is), so under a mixed-precision policy the loss and the log-mass are float32.

        Returns:
          The loss.
        """
        if self.cache is None or step.caches_ignored():
            # TFRS's task, converted (unbound: AutoGraph would take a bound method for ours).
            return as_user_code(super().call.__func__)(
                self, query_embeddings, candidate_embeddings, sample_weight=sample_weight,
                candidate_sampling_probability=candidate_sampling_probability,
                candidate_ids=candidate_ids, compute_metrics=compute_metrics,
                compute_batch_metrics=compute_batch_metrics, score_mask=score_mask)
        record = step.current()
        if training is None:
            training = record is not None
        if training and record is None:
            raise ValueError(
                "CacheRetrieval was called with training=True outside a training step: its "
                "draws and cache update must belong to one. Train with "
                "CachedRetrievalModel.fit, or call the task inside "
                "`tfnegcache.step.run_step(...)`.")
        query_embeddings = tf.convert_to_tensor(query_embeddings)
        candidate_embeddings = tf.convert_to_tensor(candidate_embeddings)
        dtype = compute_dtype(query_embeddings, candidate_embeddings)
        if query_embeddings.shape[0] == 0:
            # An empty batch: loss 0 as TFRS gives it, zero gradients, no draw, no update.
            return 0.0 * (tf.reduce_sum(tf.cast(query_embeddings, dtype))
                          + tf.reduce_sum(tf.cast(candidate_embeddings, dtype)))
        candidate_ids, features = self._check_inputs(
            query_embeddings, candidate_embeddings, candidate_ids, candidate_features)
        query_embeddings = tf.cast(query_embeddings, dtype)
        candidate_embeddings = tf.cast(candidate_embeddings, dtype)

        covered, log_weight = None, None
        if candidate_sampling_probability is not None:
            if not self.use_in_batch_negatives:
                raise ValueError(
                    "`candidate_sampling_probability` (logQ) corrects the sampling of in-batch "
                    "negatives, but this task has use_in_batch_negatives=False: its softmax is "
                    "over [positive, cache], which needs no correction. Received a sampling "
                    "probability; drop it, or set use_in_batch_negatives=True.")
            if not self.cache.supports_logq:
                raise ValueError(
                    "`candidate_sampling_probability` (logQ) with in-batch negatives needs to "
                    "know which in-batch candidates the whole cache holds, which a "
                    f"{type(self.cache).__name__} cannot answer locally (not implemented). "
                    "Use a NegativeCache, or use_in_batch_negatives=False, or no logQ.")
            covered = self.cache.covers(candidate_ids)
            num_samples = tf.maximum(tf.size(candidate_ids) - 1, 1)
            log_weight = tf.math.log(tf.cast(num_samples, dtype))
        if self.use_in_batch_negatives:
            scores, labels = self._in_batch_logits(
                query_embeddings, candidate_embeddings, candidate_sampling_probability,
                candidate_ids, score_mask, covered)
        else:
            num_queries = tf.shape(query_embeddings)[0]
            scores = own_scores(query_embeddings, candidate_embeddings[:num_queries, None, :])
            if self._temperature is not None:
                scores = scores / self._temperature
            labels = tf.ones_like(scores)
        cache_logit, write_back = self._cache_column(query_embeddings, candidate_ids, training,
                                                     log_weight)
        all_scores = tf.concat([scores, cache_logit[:, None]], axis=1)
        all_labels = tf.concat([labels, tf.zeros_like(labels[:, :1])], axis=1)
        loss = self._loss(y_true=all_labels, y_pred=all_scores, sample_weight=sample_weight)
        if training:
            record.record(self.cache, self._cache_update(
                features, candidate_embeddings, candidate_ids, write_back), self.name)

        update_ops = [metric.update_state(loss) for metric in self._loss_metrics]
        # As TFRS: top-k indexes score single-vector queries only.
        if compute_metrics and query_embeddings.shape.rank == 2:
            for metric in self._factorized_metrics:
                id_based = self._id_based(metric, candidate_ids)
                metric_dtype = self._metric_dtype(metric, id_based, dtype)
                update_ops.append(metric.update_state(
                    tf.cast(query_embeddings, metric_dtype),
                    tf.cast(candidate_embeddings[:tf.shape(query_embeddings)[0]], metric_dtype),
                    true_candidate_ids=candidate_ids if id_based else None,
                    sample_weight=sample_weight))
        if compute_batch_metrics and self.use_in_batch_negatives:
            for metric in self._batch_metrics:
                update_ops.append(metric.update_state(labels, scores, sample_weight=sample_weight))
        with tf.control_dependencies([op for op in update_ops if op is not None]):
            return tf.identity(loss)
