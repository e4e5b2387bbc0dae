"""`CacheRetrieval`: a Keras 3 retrieval loss, in-batch softmax with logQ and accidental-hit
removal, plus one more softmax column for a negative cache (the TF front end's
`tfnegcache.CacheRetrieval`, which is `tfrs.tasks.Retrieval` plus the cache)."""

from typing import Callable, Dict, Mapping, Optional

import keras
import keras_rs
import numpy as np
from keras import ops

from tfnegcache import _args, _record
from tfnegcache.keras3 import _backend, negatives
from tfnegcache.keras3.cache import NegativeCache
from tfnegcache.keras3.negatives import MIN_FLOAT
from tfnegcache.keras3.store import CacheUpdate


def remove_accidental_hits(labels, logits, candidate_ids):
    """`logits` with every column whose candidate has the row's positive id, other than the
    positive itself, pushed to `MIN_FLOAT` (as `tfrs.layers.loss.RemoveAccidentalHits`).

    keras-rs 0.4's `RemoveAccidentalHits` adds `finfo(float32).smallest_normal / 100`, a
    positive number that masks nothing, so it is not used here.

    Args:
      labels: `[B, n]` one-hot, the positive of each row.
      logits: `[B, n]`.
      candidate_ids: `[n]` the candidates' ids.
    """
    positives = ops.take(candidate_ids, ops.argmax(labels, axis=1))
    duplicate = ops.cast(
        ops.equal(ops.expand_dims(positives, 1), ops.expand_dims(candidate_ids, 0)),
        logits.dtype) - ops.cast(labels, logits.dtype)
    return logits + duplicate * MIN_FLOAT


def own_scores(queries, candidates):
    """`[B, k]` scores of each query `[B, d]` with its own k candidates `[B, k, d]`."""
    return ops.sum(ops.expand_dims(queries, 1) * candidates, axis=-1)


class CacheRetrieval(keras.layers.Layer):
    """A retrieval loss whose softmax also ranges over a cache of candidates.

    Each query's softmax is over its positive, the in-batch negatives (kept by default) and
    one more column for every cached candidate together. In training that column's logit is
    estimated from `num_negatives` negatives per query drawn from the cache and re-encoded by
    `candidate_model` with gradients (`tfnegcache.keras3.negatives`); in evaluation it is the
    exact log-mass of the stale cached scores. The cache never changes here: in training the
    layer records the step's `CacheUpdate`, which `CachedRetrievalModel`'s `train_step`
    applies with the optimizer step as one transaction. With `cache=None` it is the in-batch
    softmax loss of `tfrs.tasks.Retrieval` (logQ, accidental-hit removal, hard negatives),
    which keras-rs lacks.

    Args:
      loss: a Keras loss of `(one-hot labels, logits)`; default
        `CategoricalCrossentropy(from_logits=True, reduction="sum")`, as TFRS.
      temperature: scores are divided by it (None: 1).
      num_hard_negatives: keep only that many in-batch negatives per row, the hardest
        (`keras_rs.layers.HardNegativeMining`).
      remove_accidental_hits: mask in-batch columns holding a row's positive id (needs
        `candidate_ids`).
      name: the layer's name.
      cache: a `tfnegcache.keras3.NegativeCache`, or None.
      candidate_model: `{feature: [M, ...]} -> [M, d]`, the candidate tower (with a cache).
      num_negatives: k, negatives drawn per query per step.
      use_in_batch_negatives: keep the batch's other candidates (their cached copies are
        then masked, so each candidate counts once).
      refresh_per_step: R random filled slots re-encoded per step.
      write_back: write the re-encoded negatives' embeddings back.
      sampling: `"gumbel"` (the softmax over stale scores) or `"uniform"` (mixed negative
        sampling over the filled slots).
      estimator: `"corrected"` or `"stale"` (see `tfnegcache.keras3.negatives`).

    Example:

    >>> items = keras.layers.Embedding(100, 8)
    >>> task = tfnegcache.keras3.CacheRetrieval()
    >>> ids = np.arange(4, dtype="int32")
    >>> loss = task(np.random.normal(size=(4, 8)).astype("float32"), items(ids),
    ...             candidate_ids=ids)
    >>> float(loss) > 0
    True
    """

    def __init__(
        self,
        loss: Optional[keras.losses.Loss] = None,
        temperature: Optional[float] = None,
        num_hard_negatives: Optional[int] = None,
        remove_accidental_hits: bool = False,
        name: Optional[str] = None,
        *,
        cache: Optional[NegativeCache] = None,
        candidate_model: Optional[Callable[[Mapping[str, object]], object]] = None,
        num_negatives: int = 1,
        use_in_batch_negatives: bool = True,
        refresh_per_step: int = 0,
        write_back: bool = True,
        sampling: str = "gumbel",
        estimator: str = "corrected",
        **kwargs,
    ) -> None:
        temperature = _args.temperature(temperature)
        num_negatives = _args.integer("num_negatives", num_negatives, 1)
        refresh_per_step = _args.integer("refresh_per_step", refresh_per_step, 0)
        num_hard_negatives = _args.integer("num_hard_negatives", num_hard_negatives, 1,
                                           allow_none=True)
        strategy = negatives.make(sampling, estimator)
        if cache is not None:
            if not isinstance(cache, NegativeCache):
                raise ValueError(
                    "`cache` must be a tfnegcache.keras3.NegativeCache or None. Received: "
                    f"{cache!r}.")
            if candidate_model is None or not callable(candidate_model):
                raise ValueError(
                    "`candidate_model` must be given with a cache: a callable mapping a dict of "
                    f"cached features {sorted(cache.feature_spec)} to embeddings, used to "
                    f"re-encode sampled negatives. Received: {candidate_model!r}.")
        super().__init__(name=name, **kwargs)
        self._loss = loss if loss is not None else keras.losses.CategoricalCrossentropy(
            from_logits=True, reduction="sum")
        self._temperature = temperature
        self._num_hard_negatives = num_hard_negatives
        self._remove_accidental_hits = bool(remove_accidental_hits)
        self._logq = keras_rs.layers.SamplingProbabilityCorrection()
        self._hard_negatives = (keras_rs.layers.HardNegativeMining(num_hard_negatives)
                                if num_hard_negatives is not None else None)
        self.cache = cache
        self.candidate_model = candidate_model
        self.negatives = strategy
        self.num_negatives = num_negatives
        self.use_in_batch_negatives = bool(use_in_batch_negatives)
        self.sampling, self.estimator = sampling, estimator
        self.refresh_per_step = refresh_per_step
        self.write_back = bool(write_back)
        if cache is not None:
            self.staleness = keras.metrics.Mean(name="cache_staleness")
        self.built = True

    # ------------------------------------------------------------------ inputs

    def _check_inputs(self, query_embeddings, candidate_embeddings, candidate_ids,
                      candidate_features):
        spec = self.cache.spec
        if candidate_ids is None or candidate_features is None:
            raise ValueError(
                "With a negative cache, `candidate_ids` ([num_candidates]) and "
                f"`candidate_features` (a dict with keys {sorted(spec.feature_spec)}) must be "
                "passed to the loss. Received: "
                f"candidate_ids={'None' if candidate_ids is None else 'a tensor'}, "
                f"candidate_features={'None' if candidate_features is None else 'a dict'}.")
        spec.check_queries(query_embeddings, "query_embeddings")
        spec.check_embeddings(candidate_embeddings, "candidate_embeddings")
        candidate_ids, id_check = spec.check_ids(candidate_ids)
        rows = _backend.static_rows(candidate_embeddings)
        row_check = _backend.same_rows(
            candidate_ids, rows if rows is not None else _backend.shape(candidate_embeddings)[0],
            "`candidate_ids`", "candidate embeddings")
        features = spec.check_features(candidate_features, rows)
        return candidate_ids, features, [c for c in (id_check, row_check) if c is not None]

    def _encode(self, features, dtype):
        """The candidate tower on cached features: `[M, d]` in `dtype` (with gradients)."""
        embeddings = self.candidate_model(features)
        if isinstance(embeddings, Mapping) or not hasattr(embeddings, "shape"):
            raise ValueError(
                "`candidate_model` must return one tensor of embeddings, [num_candidates, "
                f"{self.cache.embedding_dim}], for a dict of cached features. Received: "
                f"{type(embeddings).__name__}"
                + (f" with keys {sorted(embeddings)}" if isinstance(embeddings, Mapping) else "")
                + ".")
        embeddings = self.cache.spec.check_embeddings(embeddings, "candidate_model output")
        # Checked when both are static (a tower that drops rows fails the reshape otherwise).
        _backend.same_rows(embeddings, _backend.static_rows(next(iter(features.values()))),
                           "`candidate_model` output", "cached candidates given to it")
        return ops.cast(embeddings, dtype)

    # ------------------------------------------------------------------ the columns

    def _in_batch_logits(self, query_embeddings, candidate_embeddings,
                         candidate_sampling_probability, candidate_ids, score_mask,
                         covered=None):
        """Scores and labels over the in-batch candidates, as `tfrs.tasks.Retrieval` makes
        them; with `covered` (`[n]` bool, logQ with a cache) the columns of cached candidates
        are masked except where they are the row's positive."""
        scores = ops.matmul(query_embeddings, ops.transpose(candidate_embeddings))
        labels = ops.cast(ops.equal(
            ops.expand_dims(ops.arange(_backend.num_rows(scores), dtype="int32"), 1),
            ops.expand_dims(ops.arange(_backend.shape(scores)[1], dtype="int32"), 0)), scores.dtype)
        if self._temperature is not None:
            scores = scores / self._temperature
        if candidate_sampling_probability is not None:
            scores = self._logq(scores, ops.cast(candidate_sampling_probability, scores.dtype))
        if self._remove_accidental_hits:
            if candidate_ids is None:
                raise ValueError("When accidental hit removal is enabled, `candidate_ids` "
                                 "must be supplied. Received: candidate_ids=None.")
            scores = remove_accidental_hits(labels, scores, candidate_ids)
        if covered is not None:
            keep = ops.logical_or(labels > 0, ops.expand_dims(ops.logical_not(covered), 0))
            scores = ops.where(keep, scores, MIN_FLOAT)
        if score_mask is not None:
            scores = ops.where(score_mask, scores, MIN_FLOAT)
        if self._hard_negatives is not None:
            scores, labels = self._hard_negatives(scores, labels)
        return scores, labels

    def _cache_column(self, query_embeddings, candidate_ids, training, record,
                      log_weight=None):
        """The cache's column of the logits, `[B]`, and in training the draw's write-back
        rows `(slots, fresh embeddings, valid)` (see the TF front end's `CacheRetrieval`)."""
        cache, k, strategy = self.cache, self.num_negatives, self.negatives
        num_queries = _backend.num_rows(query_embeddings)
        exact_in_batch = self.use_in_batch_negatives and log_weight is None
        masked_ids = candidate_ids if exact_in_batch else None
        excluded_ids = None if exact_in_batch else candidate_ids[:num_queries]
        dtype = query_embeddings.dtype
        if not training:
            log_mass = cache.log_mass(query_embeddings, self._temperature, masked_ids,
                                      excluded_ids)
            logit = ops.where(ops.isfinite(log_mass), ops.cast(log_mass, dtype), MIN_FLOAT)
            if log_weight is not None:
                logit = ops.where(logit > MIN_FLOAT, logit + log_weight, MIN_FLOAT)
            return ops.stop_gradient(logit), None

        key = cache.draw_key(record.next_draw(cache))
        drawn = strategy.draw(cache, query_embeddings, k, self._temperature, masked_ids,
                              excluded_ids, key)
        fresh = self._encode(drawn.features, dtype)
        fresh_scores = own_scores(
            query_embeddings, ops.reshape(fresh, (-1, k, cache.embedding_dim)))
        if self._temperature is not None:
            fresh_scores = fresh_scores / self._temperature
        logit = strategy.logit(drawn, fresh_scores)
        if log_weight is not None:
            logit = ops.where(logit > MIN_FLOAT, logit + log_weight, MIN_FLOAT)
        valid = ops.reshape(drawn.valid, [-1])
        fresh_sg = ops.stop_gradient(fresh)
        stale = ops.cast(drawn.stale, fresh_sg.dtype)
        staleness = ops.sum(ops.square(stale - fresh_sg), -1) / ops.maximum(
            ops.sum(ops.square(fresh_sg), -1), 1e-12)
        self.staleness.update_state(staleness, sample_weight=ops.cast(valid, staleness.dtype))
        return logit, (drawn.slots, fresh_sg, valid)

    def _cache_update(self, features, candidate_embeddings, candidate_ids,
                      write_back) -> CacheUpdate:
        """What this step writes: the batch's candidates, the re-encoded negatives (unless
        `write_back=False`) and `refresh_per_step` random slots encoded with the weights
        before the optimizer step."""
        update = CacheUpdate(features, ops.stop_gradient(candidate_embeddings), candidate_ids)
        if self.write_back:
            (update.write_back_slots, update.write_back_embeddings,
             update.write_back_valid) = write_back
        if self.refresh_per_step > 0:
            slots, valid, cached = self.cache.refresh_candidates(self.refresh_per_step)
            update.refresh_slots, update.refresh_valid = slots, valid
            update.refresh_embeddings = ops.stop_gradient(
                self._encode(cached, candidate_embeddings.dtype))
        return update

    # ------------------------------------------------------------------ the loss

    def call(self, query_embeddings, candidate_embeddings, sample_weight=None,
             candidate_sampling_probability=None, candidate_ids=None, score_mask=None,
             candidate_features: Optional[Dict[str, object]] = None, training=None):
        """The loss; in a training step, also draws and records the cache update.

        Args:
          query_embeddings: `[B, d]`.
          candidate_embeddings: `[n, d]`, the first B rows the positives.
          sample_weight: `[B]` per-query weights of the loss.
          candidate_sampling_probability: `[n]` logQ: the probability of each in-batch
            candidate (a probability, at most 1).
          candidate_ids: `[n]` int32 ids; required with a cache or accidental-hit removal.
          score_mask: `[B, n]` bool, False for in-batch columns to ignore.
          candidate_features: `{name: [n, ...]}` for the cache's `feature_spec` (other keys
            are ignored); required with a cache.
          training: whether to draw negatives and record the cache update; None: inside a
            training step (`CachedRetrievalModel.fit`).

        Returns:
          The loss, a float32 scalar.
        """
        query_embeddings = ops.cast(ops.convert_to_tensor(query_embeddings), "float32")
        candidate_embeddings = ops.cast(ops.convert_to_tensor(candidate_embeddings), "float32")
        if query_embeddings.shape[0] == 0:
            # An empty batch: loss 0 as TFRS gives it, zero gradients, no draw, no update.
            return 0.0 * (ops.sum(query_embeddings) + ops.sum(candidate_embeddings))
        if self.cache is None:
            if candidate_ids is not None:
                candidate_ids = ops.convert_to_tensor(candidate_ids)
            scores, labels = self._in_batch_logits(
                query_embeddings, candidate_embeddings, candidate_sampling_probability,
                candidate_ids, score_mask)
            return self._loss(labels, scores, sample_weight=sample_weight)
        record = _record.current()
        if training is None:
            training = record is not None
        if training and record is None:
            raise ValueError(
                "CacheRetrieval was called with training=True outside a training step: its "
                "draws and cache update must belong to one. Train with "
                "tfnegcache.keras3.CachedRetrievalModel.fit.")
        candidate_ids, features, input_checks = self._check_inputs(
            query_embeddings, candidate_embeddings, candidate_ids, candidate_features)

        covered, log_weight = None, None
        if candidate_sampling_probability is not None:
            if not self.use_in_batch_negatives:
                raise ValueError(
                    "`candidate_sampling_probability` (logQ) corrects the sampling of in-batch "
                    "negatives, but this loss has use_in_batch_negatives=False: its softmax is "
                    "over [positive, cache], which needs no correction. Received a sampling "
                    "probability; drop it, or set use_in_batch_negatives=True.")
            covered = self.cache.covers(candidate_ids)
            num = _backend.num_rows(candidate_ids)
            log_weight = (float(np.log(max(num - 1, 1))) if isinstance(num, int) else
                          ops.log(ops.cast(ops.maximum(num - 1, 1), "float32")))
        if self.use_in_batch_negatives:
            scores, labels = self._in_batch_logits(
                query_embeddings, candidate_embeddings, candidate_sampling_probability,
                candidate_ids, score_mask, covered)
        else:
            num_queries = _backend.num_rows(query_embeddings)
            scores = own_scores(query_embeddings,
                                ops.expand_dims(candidate_embeddings[:num_queries], 1))
            if self._temperature is not None:
                scores = scores / self._temperature
            labels = ops.ones_like(scores)
        cache_logit, write_back = self._cache_column(query_embeddings, candidate_ids, training,
                                                     record, log_weight)
        all_scores = ops.concatenate([scores, ops.expand_dims(cache_logit, 1)], axis=1)
        all_labels = ops.concatenate([labels, ops.zeros_like(labels[:, :1])], axis=1)
        loss = self._loss(all_labels, all_scores, sample_weight=sample_weight)
        if training:
            update = self._cache_update(features, candidate_embeddings, candidate_ids,
                                        write_back)
            record.record(self.cache, (update, input_checks), self.name)
        return loss
