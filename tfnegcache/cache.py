"""The negative cache: what a task and a training step need of one (`Cache`), and the cache
replicated over a strategy's replicas (`NegativeCache`).

One training step asks its cache for a draw (`draw`, `draw_uniform`, or `log_mass` in
evaluation), then writes into it as one transaction (docs/algorithm.md, step 6): `prepare`
computes every row the step writes and every check of them, reading but never writing;
`commit` only scatters. `CacheUpdate` is what a step asks to write.
"""

import abc
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import tensorflow as tf

from tfnegcache import checks, distribute, refresh, sampling
from tfnegcache.negatives import CacheNegatives
from tfnegcache.spec import CacheSpec
from tfnegcache.store import CacheStore, CacheUpdate, Writes

# Folded into the cache seed so each use of randomness has a stream of its own.
_DRAW_STREAM, _REFRESH_STREAM = 0x6E6567, 0x726566


def draw_seed(cache_seed: int, step, index: int) -> tf.Tensor:
    """The `[2]` stateless seed of draw `index` of a training step at cache step `step`, on
    this replica: evaluation, restores and replicas never share or disturb a stream."""
    seed = tf.random.experimental.stateless_fold_in(
        tf.constant([cache_seed, _DRAW_STREAM], tf.int64), tf.cast(step, tf.int64))
    return distribute.replica_seed(tf.random.experimental.stateless_fold_in(seed, index))


def refresh_seed(cache_seed: int, step) -> tf.Tensor:
    """The `[2]` stateless seed of the random refresh at cache step `step`."""
    return tf.random.experimental.stateless_fold_in(
        tf.constant([cache_seed, _REFRESH_STREAM], tf.int64), tf.cast(step, tf.int64))


def when_true(when: Optional[tf.Tensor], fn: Callable[[], None]) -> None:
    """Runs `fn()` (writes, returning nothing), only if `when` is True when it is given.
    (A `tf.cond` in cross-replica or single-replica context: never around a `merge_call`.)"""
    if when is None:
        fn()
    else:
        tf.cond(when, fn, lambda: None)


class Cache(tf.keras.layers.Layer, abc.ABC):
    """What `CacheRetrieval` and `CachedRetrievalModel` need of a negative cache.

    `spec` holds what it stores; `stores()` the `CacheStore`s this process holds. Draws
    address slots in the cache's own numbering, which `CacheUpdate` uses too.

    Example:

    >>> cache = tfnegcache.NegativeCache(8, {"item": tf.TensorSpec([], tf.int64)}, 4)
    >>> isinstance(cache, tfnegcache.Cache), cache.size, cache.embedding_dim
    (True, 8, 4)
    """

    spec: CacheSpec
    supports_uniform = True   # `draw_uniform`
    supports_top_m = True     # `draw(..., top_m=m)`
    supports_logq = True      # `covers`: which in-batch candidates the cache holds

    # The spec's fields, read directly (`cache.size`, `cache.feature_spec`, ...).
    size = property(lambda self: self.spec.size)
    feature_spec = property(lambda self: self.spec.feature_spec)
    embedding_dim = property(lambda self: self.spec.embedding_dim)
    id_dtype = property(lambda self: self.spec.id_dtype)
    embedding_dtype = property(lambda self: self.spec.embedding_dtype)
    seed = property(lambda self: self.spec.seed)
    block_size = property(lambda self: self.spec.block_size)
    scoring_dtype = property(lambda self: self.spec.scoring_dtype)

    @abc.abstractmethod
    def stores(self) -> List[CacheStore]:
        """The stores this process holds (a sharded cache: one per local replica)."""

    @abc.abstractmethod
    def step_counter(self) -> tf.Variable:
        """The cache step this replica's draws are keyed by."""

    @abc.abstractmethod
    def fill_fraction(self) -> tf.Tensor:
        """The fraction of slots in use, a float32 scalar."""

    @abc.abstractmethod
    def log_mass(self, queries, temperature=None, masked_ids=None, excluded_ids=None,
                 top_m=None) -> tf.Tensor:
        """`[B]` the log-mass of the cached scores eligible for each query (no draw)."""

    @abc.abstractmethod
    def draw(self, queries, num_samples: int, temperature=None, masked_ids=None,
             excluded_ids=None, seed=None, top_m=None) -> CacheNegatives:
        """k negatives per query from the softmax over the cached scores.

        Args:
          queries: `[B, d]`, or `[B, H, d]` (a slot scores `max_h <q_ih, e_j> / T`).
          num_samples: k.
          temperature: T; None is 1.
          masked_ids: ids never drawn for any query (in-batch candidates that are also
            negatives).
          excluded_ids: `[B]`, an id never drawn for query i (its positive).
          seed: the `[2]` seed; None: `draw_seed(seed, step, 0)`.
          top_m: draw from each query's m best slots only.
        """

    @abc.abstractmethod
    def refresh_candidates(self, num_slots: int) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
        """This step's random refresh: `(slots [R'], their features)` to re-encode."""

    @abc.abstractmethod
    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> Writes:
        """Every write of `update` and the checks that must pass first; writes nothing.

        Raises:
          ValueError: at trace time, for rows that do not match the cache (the message names
            what was received and what was expected).
        """

    @abc.abstractmethod
    def commit(self, writes: Writes, when: Optional[tf.Tensor] = None) -> None:
        """Applies prepared writes: scatters only; with `when` (a bool scalar, the same on
        every replica), only if it is True (a step its loss-scale optimizer skipped writes
        nothing)."""

    def update(self, update: Optional[CacheUpdate] = None, advance_step: bool = True) -> None:
        """`prepare` then `commit`: one transaction. With `advance_step` the cache's step
        advances by one (a training step's update); a failing check raises with nothing
        changed."""
        writes = self.prepare(update if update is not None else CacheUpdate(),
                              advance_step=advance_step)
        with tf.control_dependencies(writes.checks):
            self.commit(writes)

    def write_embeddings(self, slots: tf.Tensor, embeddings: tf.Tensor,
                         valid: Optional[tf.Tensor] = None) -> None:
        """Overwrites the embeddings of `slots` `[M]` with `embeddings` `[M, d]` (rows with
        `valid` False, and empty slots, are skipped); `step` does not advance."""
        self.update(CacheUpdate(write_back_slots=tf.reshape(slots, [-1]),
                                write_back_embeddings=embeddings, write_back_valid=valid),
                    advance_step=False)

    def refresh(self, slots: tf.Tensor, encoder) -> None:
        """Re-encodes `slots` from their cached features with `encoder` (no gradient)."""
        refresh.refresh_slots(self, slots, encoder)

    def refresh_all(self, encoder, batch_size: int = 1024) -> int:
        """Re-encodes every filled slot, `batch_size` per encoder call; returns the count."""
        return refresh.refresh_all(self, encoder, batch_size)


class NegativeCache(CacheStore, Cache):
    """A fixed-size store of candidates to sample hard negatives from.

    Each of the `size` slots holds a candidate's features (enough for the candidate tower to
    re-encode it), its embedding as computed at some earlier step (stale) and its id. Scoring
    a batch of queries against every slot is one pass over the `[size, d]` embeddings with no
    tower work. Writes are O(batch) scatters applied as one checked transaction. Inserts are
    FIFO over distinct ids (`tfnegcache.fifo`). Under a `tf.distribute` strategy every
    replica holds the same slots (each step's rows are all-gathered and written once to every
    copy); for per-replica shards see `ShardedNegativeCache`.

    Args:
      size: N, the number of slots.
      feature_spec: `{name: tf.TensorSpec(per-candidate shape, dtype)}`, any dtype.
      embedding_dim: d, the candidate tower's output size.
      id_dtype: `tf.int64` (int32 ids are widened) or `tf.string`.
      embedding_dtype: storage of the embeddings (`tf.bfloat16`/`tf.float16` halve it).
      seed: the draws are a function of (seed, step, draw index).
      block_size: the sampler's block size in [1, size]; None chooses it from the shapes.
      scoring_dtype: None scores in the queries' dtype; `tf.bfloat16`/`tf.float16` run the
        scoring matmul rounded to it (draws then follow the softmax of rounded scores).

    Example:

    >>> cache = tfnegcache.NegativeCache(
    ...     size=1024, feature_spec={"title": tf.TensorSpec([], tf.string)},
    ...     embedding_dim=4, id_dtype=tf.string)
    >>> titles = tf.constant(["Heat (1995)", "Up (2009)"])
    >>> cache.insert({"title": titles}, tf.ones([2, 4]), titles)
    >>> cache.draw(tf.ones([3, 4]), num_samples=2).slots.shape
    TensorShape([6])
    """

    supports_uniform = supports_top_m = supports_logq = True

    def __init__(self, size: int, feature_spec, embedding_dim: int,
                 id_dtype: tf.DType = tf.int64, embedding_dtype: tf.DType = tf.float32,
                 seed: int = 0, block_size: Optional[int] = None,
                 name: str = "negative_cache", scoring_dtype: Optional[tf.DType] = None,
                 **kwargs) -> None:
        spec = CacheSpec.build(size, feature_spec, embedding_dim, id_dtype, embedding_dtype,
                               seed, block_size, scoring_dtype)
        super().__init__(spec, name=name, **kwargs)

    def stores(self) -> List[CacheStore]:
        return [self]

    def step_counter(self) -> tf.Variable:
        return self.step

    def covers(self, ids: tf.Tensor) -> tf.Tensor:
        """`[n]` bool: whether the cache holds each id."""
        return self.lookup(ids) >= 0

    def insert(self, features, embeddings, ids) -> None:
        self.update(CacheUpdate(features, embeddings, ids), advance_step=False)

    def warm_start(self, dataset, candidate_model, id_key: str = "id",
                   batch_size: int = 1024, batched: bool = False) -> int:
        """Fills the cache from a candidate dataset before training; returns rows read (see
        `refresh.warm_start`)."""
        return refresh.warm_start(self, dataset, candidate_model, id_key, batch_size, batched)

    # ------------------------------------------------------------------ drawing

    def _masks(self, masked_ids, excluded_ids):
        masked = self.lookup(masked_ids) if masked_ids is not None else None
        excluded = self.lookup(excluded_ids) if excluded_ids is not None else None
        return self.slot_bias(masked), excluded

    def sample(self, queries, num_samples: int = 1, temperature: Optional[float] = None,
               masked_ids=None, excluded_ids=None, top_m: Optional[int] = None,
               seed=None) -> sampling.SlotDraw:
        """The draw of `draw` as slots `[B, k]` int32 with the log-mass and log-probability
        (`sampling.SlotDraw`); arguments as in `draw`."""
        num_samples = checks.integer("num_samples", num_samples, 1)
        queries = self.spec.check_queries(queries)
        bias, excluded = self._masks(masked_ids, excluded_ids)
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        if seed is None:
            seed = draw_seed(self.spec.seed, self.step, 0)
        if top_m is not None:
            return sampling.sample_cache_top_m(
                queries, self.embeddings, bias, inv_temperature, num_samples, seed, top_m,
                excluded_slots=excluded, scoring_dtype=self.spec.scoring_dtype)
        plan = sampling.plan_sampler(self.spec.size, self.spec.embedding_dim, queries.shape[0],
                                     self.spec.block_size,
                                     num_heads=sampling.query_heads(queries))
        return sampling.sample_cache(queries, self.embeddings, bias, inv_temperature,
                                     num_samples, seed, excluded_slots=excluded, plan=plan,
                                     scoring_dtype=self.spec.scoring_dtype,
                                     scattered_bias=masked_ids is not None)

    def log_mass(self, queries, temperature=None, masked_ids=None, excluded_ids=None,
                 top_m=None) -> tf.Tensor:
        queries = self.spec.check_queries(queries)
        bias, excluded = self._masks(masked_ids, excluded_ids)
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        if top_m is not None:
            return sampling.sample_cache_top_m(
                queries, self.embeddings, bias, inv_temperature, 1, None, top_m,
                excluded_slots=excluded, scoring_dtype=self.spec.scoring_dtype).log_mass
        plan = sampling.plan_sampler(self.spec.size, self.spec.embedding_dim, queries.shape[0],
                                     self.spec.block_size,
                                     num_heads=sampling.query_heads(queries))
        return sampling.sample_cache(queries, self.embeddings, bias, inv_temperature, 1, None,
                                     excluded_slots=excluded, plan=plan,
                                     scoring_dtype=self.spec.scoring_dtype,
                                     scattered_bias=masked_ids is not None).log_mass

    def draw(self, queries, num_samples: int, temperature=None, masked_ids=None,
             excluded_ids=None, seed=None, top_m=None) -> CacheNegatives:
        result = self.sample(queries, num_samples, temperature, masked_ids, excluded_ids,
                             top_m, seed)
        slots = tf.reshape(tf.cast(result.slots, tf.int64), [-1])
        features, stale, _ = self.gather(slots)
        valid = tf.broadcast_to(tf.math.is_finite(result.log_mass)[:, None],
                                tf.shape(result.log_prob))
        return CacheNegatives(slots, features, stale, result.log_prob, valid, result.log_mass)

    def draw_uniform(self, num_queries, num_samples: int, masked_ids=None, excluded_ids=None,
                     seed=None) -> CacheNegatives:
        """k slots per query uniformly, with replacement, over the filled slots: no scoring
        (mixed negative sampling's draw). A draw on a slot ineligible for its query (masked,
        or its own excluded id) is not valid. `num_queries` is B (may be a tensor)."""
        num_samples = checks.integer("num_samples", num_samples, 1)
        if seed is None:
            seed = draw_seed(self.spec.seed, self.step, 0)
        filled = tf.maximum(self.num_filled, 1)
        slots = tf.random.stateless_uniform(
            tf.stack([tf.cast(num_queries, tf.int32), num_samples]), seed, minval=0,
            maxval=filled, dtype=tf.int64)
        bias, excluded = self._masks(masked_ids, excluded_ids)
        valid = tf.math.is_finite(tf.gather(bias, slots))
        if excluded is not None:
            valid = tf.logical_and(valid, tf.not_equal(slots, tf.cast(excluded, tf.int64)[:, None]))
        log_prob = tf.fill(tf.shape(slots), -tf.math.log(tf.cast(self.num_filled, tf.float32)))
        flat = tf.reshape(slots, [-1])
        features, stale, _ = self.gather(flat)
        return CacheNegatives(flat, features, stale, log_prob, valid)

    def refresh_candidates(self, num_slots: int):
        slots = self.random_filled_slots(num_slots, refresh_seed(self.spec.seed, self.step))
        features, _, _ = self.gather(slots)
        return slots, features

    # ------------------------------------------------------------------ the transaction

    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> Writes:
        """Every write of `update` and its checks (see `Cache.prepare`). Under a strategy the
        replicas' inserts and write-backs are all-gathered first, so every replica prepares
        the same writes (a refresh is the same on every replica and is not gathered)."""
        insert, written, checks_ = self.checked(update)
        if distribute.in_replica_context():
            with tf.control_dependencies(checks_):
                if insert is not None:
                    features, embeddings, ids = insert
                    insert = ({k: distribute.all_gather(v) for k, v in features.items()},
                              distribute.all_gather(embeddings), distribute.all_gather(ids))
                if update.write_back_slots is not None:
                    slots, rows, valid, what = written[0]
                    written[0] = (distribute.all_gather(slots), distribute.all_gather(rows),
                                  distribute.all_gather(valid), what)
        return self.plan(insert, written, checks_, advance_step)

    def commit(self, writes: Writes, when: Optional[tf.Tensor] = None) -> None:
        """Applies prepared writes, once per worker in cross-replica context under a
        strategy, to every copy of the variables and to the worker's id index (if `when`)."""
        values = writes.tensors()
        if when is not None:
            values["when"] = when

        def apply(values):
            values = dict(values)
            when = values.pop("when", None)
            when_true(when, lambda: self.apply(dataclasses.replace(writes, **values)))

        distribute.run_once(apply, values)

    def get_config(self):
        config = super().get_config()
        config.update(self.spec.config())
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**CacheSpec.arguments_from_config(config))
