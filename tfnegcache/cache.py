"""The negative cache: candidate features, stale embeddings and ids in Keras variables.

`NegativeCache` holds the state and applies a step's writes as one transaction
(docs/algorithm.md, step 6): `prepare` computes every row the step will write and every check
of them, reading but never writing; `commit` then only scatters. `CacheUpdate` is what a
training step asks of the cache; `CacheNegatives` is what one draw returns.
"""

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

import tensorflow as tf

from tfnegcache import checks, distribute, sampling

FeatureSpec = Mapping[str, tf.TensorSpec]

# Folded into the cache seed so refresh choices never share a stream with the sampler's.
_REFRESH_STREAM = 0x726566
_INT64_MAX = 2**63 - 1


def _describe(spec_or_tensor) -> str:
    return f"shape={tuple(spec_or_tensor.shape)} dtype={spec_or_tensor.dtype.name}"


@dataclasses.dataclass
class CacheUpdate:
    """Everything one training step writes into a cache.

    Attributes:
      insert_features: `{name: [M, ...]}`, the batch's candidates (the streaming FIFO).
      insert_embeddings: `[M, d]` their embeddings.
      insert_ids: `[M]` their ids.
      write_back_slots: `[W]` cache slots of the re-encoded negatives, or None.
      write_back_embeddings: `[W, d]` their fresh embeddings.
      write_back_valid: `[W]` bool, False for rows not to write (draws from an empty cache).
      refresh_slots: `[R]` cache slots re-encoded by the random refresh, or None.
      refresh_embeddings: `[R, d]` their embeddings.

    Slots are in the cache's own addressing (`NegativeCache.draw` returns them so); every
    embedding was computed with the weights before the step's optimizer update.
    """

    insert_features: Optional[Dict[str, tf.Tensor]] = None
    insert_embeddings: Optional[tf.Tensor] = None
    insert_ids: Optional[tf.Tensor] = None
    write_back_slots: Optional[tf.Tensor] = None
    write_back_embeddings: Optional[tf.Tensor] = None
    write_back_valid: Optional[tf.Tensor] = None
    refresh_slots: Optional[tf.Tensor] = None
    refresh_embeddings: Optional[tf.Tensor] = None


@dataclasses.dataclass
class CacheNegatives:
    """One draw from a cache, for a batch of B queries and k draws each.

    Attributes:
      log_mass: `[B]` log-mass of the eligible cached scores (`-inf` when none is eligible);
        None for a uniform draw, which scores nothing.
      slots: `[B * k]` drawn slots (cache addressing), query-major; None without a draw.
      features: `{name: [B * k, ...]}` their cached features.
      stale: `[B * k, d]` their cached embeddings.
      log_weights: for a uniform draw, `[B, k]` importance log-weights: `log(filled / k)` for
        an eligible draw, `-inf` for one that hit an ineligible slot, so that
        `logsumexp_k(s_ik + log_weights_ik)` is the log of an unbiased estimate of the
        eligible cached mass `sum_j exp(s_ij)`. None for a Gumbel-Max draw.
    """

    log_mass: Optional[tf.Tensor]
    slots: Optional[tf.Tensor] = None
    features: Optional[Dict[str, tf.Tensor]] = None
    stale: Optional[tf.Tensor] = None
    log_weights: Optional[tf.Tensor] = None


@dataclasses.dataclass
class _Writes:
    """A prepared update: exactly the scatters `commit` performs (see `prepare`)."""

    checks: List
    slots: tf.Tensor                 # [S] int64 embedding-only writes (write-back, refresh)
    embeddings: tf.Tensor            # [S, d]
    insert_slots: tf.Tensor          # [I] int64
    insert_features: Dict[str, tf.Tensor]
    insert_embeddings: tf.Tensor     # [I, d]
    insert_ids: tf.Tensor            # [I]
    evicted_ids: tf.Tensor           # ids leaving the index
    new_ids: tf.Tensor               # ids entering the index ...
    new_slots: tf.Tensor             # ... at these slots
    cursor: tf.Tensor
    num_filled: tf.Tensor
    num_rows: tf.Tensor              # rows the step inserted (before dedupe); 0: empty batch
    advance_step: bool

    def tensors(self) -> list:
        return tf.nest.flatten(
            (self.slots, self.embeddings, self.insert_slots, self.insert_features,
             self.insert_embeddings, self.insert_ids, self.evicted_ids, self.new_ids,
             self.new_slots, self.cursor, self.num_filled, self.num_rows))


def _in_sorted(sorted_values: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """`[len(values)]` bool: whether each value occurs in `sorted_values` (ascending)."""
    padded = tf.concat([sorted_values, tf.constant([-1], sorted_values.dtype)], 0)
    position = tf.searchsorted(sorted_values, values, out_type=tf.int64)
    return tf.equal(tf.gather(padded, position), values)


class NegativeCache(tf.keras.layers.Layer):
    """A fixed-size store of candidates to sample hard negatives from.

    Each of the `size` slots holds a candidate's input features (enough for the candidate
    tower to re-encode it), its embedding as computed at some earlier step (stale), and its
    id. Scoring a batch of queries against every slot is one pass over the `[size, d]`
    embeddings, with no tower work; a sampled slot can be re-encoded with the current weights
    because its features are kept.

    Writes are O(batch) scatters into the variables, applied as one transaction per call
    (`update`, `insert`, `write_embeddings`): every row is computed and checked first (row
    counts, finiteness), and a failing check raises before any variable or the id index
    changes.

    - Insert is FIFO over distinct ids: the batch is deduplicated by id (a repeated id keeps
      its last row); an id already cached refreshes its own slot (an id-to-slot hash table
      finds it without a scan); new ids take the oldest slots that hold no candidate of the
      same call, so a candidate inserted by a call is in the cache after it. When a call has
      more distinct ids than the cache has slots, the `size` whose last rows come latest are
      kept, as if the rows were inserted one at a time.
    - Write-back and refresh overwrite the embeddings of given slots; a slot the same call's
      insert rewrites or evicts keeps the insert's row.

    Bookkeeping per slot: `inserted_at` (the cache step at which its candidate was inserted
    or last re-inserted) and `updated_at` (the step its embedding was last written), so
    `step - updated_at` is the embedding's age. Nothing non-finite is ever written.

    Under a `tf.distribute` strategy the variables are mirrored: every replica holds the same
    `size` slots, each step's rows are all-gathered and written once to every copy. For
    per-replica shards see `tfnegcache.ShardedNegativeCache`.

    Example:

    >>> cache = tfnegcache.NegativeCache(
    ...     size=4096,
    ...     feature_spec={"movie_title": tf.TensorSpec([], tf.string)},
    ...     embedding_dim=32, id_dtype=tf.string)
    >>> titles = tf.constant(["Heat (1995)", "Up (2009)"])
    >>> cache.insert({"movie_title": titles}, tf.random.normal([2, 32]), titles)
    >>> draw = cache.sample(tf.random.normal([8, 32]), num_samples=1)
    >>> draw.slots.shape
    TensorShape([8, 1])
    """

    def __init__(
        self,
        size: int,
        feature_spec: FeatureSpec,
        embedding_dim: int,
        id_dtype: tf.DType = tf.int64,
        embedding_dtype: tf.DType = tf.float32,
        seed: int = 0,
        block_size: Optional[int] = None,
        name: str = "negative_cache",
        scoring_dtype: Optional[tf.DType] = None,
        **kwargs,
    ) -> None:
        """Creates an empty cache.

        Args:
          size: N, the number of slots.
          feature_spec: the candidate features to store, `{name: tf.TensorSpec(shape, dtype)}`
            with the shape of one candidate's feature (no batch dimension). Any dtype, strings
            included.
          embedding_dim: d, the candidate tower's output size.
          id_dtype: dtype of candidate ids: `tf.int64` (int32 ids are widened) or `tf.string`.
          embedding_dtype: storage dtype of the embeddings: `tf.float32` (default), or
            `tf.float16` / `tf.bfloat16` to halve their memory. Scores are always computed in
            the queries' dtype.
          seed: seeds the Gumbel noise; draws are a function of (seed, step, draw index).
          block_size: the sampler's block size; chosen from the shapes when None.
          name: layer name (prefix of the variables' names).
          scoring_dtype: None (default) scores the cache in the queries' dtype. `tf.bfloat16`
            or `tf.float16` run the sampler's matmul in that dtype: queries and cached
            embeddings are rounded to it, and so are the scores the draw and the log-mass
            use (the shift, `exp` and sums stay in the queries' dtype). The rounding is part
            of the cache's staleness: the loss on the positives and on the re-encoded
            negatives stays in the towers' dtype.
          **kwargs: passed to `tf.keras.layers.Layer`.
        """
        if "layout" in kwargs:
            layout = kwargs.pop("layout")
            if layout != "replicated":
                raise ValueError(
                    "`NegativeCache` is the replicated layout (every replica holds the same "
                    "slots). For per-replica shards use `tfnegcache.ShardedNegativeCache` with "
                    f"the same arguments. Received: layout={layout!r}.")
        kwargs.pop("trainable", None)   # a cache is never trainable (get_config has it)
        super().__init__(name=name, trainable=False, **kwargs)
        size = checks.integer("size", size, 1)
        embedding_dim = checks.integer("embedding_dim", embedding_dim, 1)
        seed = checks.integer("seed", seed, None)
        block_size = checks.integer("block_size", block_size, 1, size, "size", allow_none=True)
        if scoring_dtype is not None:
            scoring_dtype = tf.as_dtype(scoring_dtype)
            if scoring_dtype not in (tf.float32, tf.bfloat16, tf.float16):
                raise ValueError(
                    "`scoring_dtype` must be None (the queries' dtype), tf.float32, "
                    f"tf.bfloat16 or tf.float16. Received: scoring_dtype={scoring_dtype!r}.")
        if not isinstance(feature_spec, Mapping) or not feature_spec:
            raise ValueError(
                "`feature_spec` must be a non-empty dict naming the candidate features to "
                "store, {name: tf.TensorSpec(shape, dtype)}. Received: "
                f"feature_spec={feature_spec!r}.")
        spec = {}
        for key, value in feature_spec.items():
            if not isinstance(value, tf.TensorSpec) or not value.shape.is_fully_defined():
                raise ValueError(
                    f"`feature_spec[{key!r}]` must be a tf.TensorSpec with a fully defined "
                    f"per-candidate shape. Received: {value!r}.")
            spec[key] = value
        id_dtype = tf.as_dtype(id_dtype)
        if id_dtype not in (tf.int64, tf.string):
            raise ValueError(f"`id_dtype` must be tf.int64 or tf.string. Received: {id_dtype}.")
        embedding_dtype = tf.as_dtype(embedding_dtype)
        if not embedding_dtype.is_floating:
            raise ValueError(
                f"`embedding_dtype` must be a float dtype. Received: {embedding_dtype}.")

        self.size = size
        self.embedding_dim = embedding_dim
        self.feature_spec: Dict[str, tf.TensorSpec] = dict(sorted(spec.items()))
        self.id_dtype = id_dtype
        self.embedding_dtype = embedding_dtype
        self.seed = seed
        self.block_size = block_size
        self.scoring_dtype = scoring_dtype
        self._draws_this_step = 0
        # True for the shards of a ShardedNegativeCache: variables of one replica, written
        # from its replica context, never gathered.
        self._per_replica = False

        def variable(name, shape, dtype):
            fill = "" if dtype == tf.string else 0
            return self.add_weight(
                name=name, shape=shape, dtype=dtype, trainable=False,
                initializer=lambda shape, dtype: tf.fill(shape, tf.constant(fill, dtype)))

        # Scoped by the layer's name, so variables read `negative_cache/embeddings:0`.
        with tf.name_scope(self.name):
            n = self.size
            self.features = {
                key: variable(f"features/{key}", [n, *s.shape.as_list()], s.dtype)
                for key, s in self.feature_spec.items()
            }
            self.embeddings = variable("embeddings", [n, self.embedding_dim], embedding_dtype)
            self.ids = variable("ids", [n], id_dtype)
            self.inserted_at = variable("inserted_at", [n], tf.int64)
            self.updated_at = variable("updated_at", [n], tf.int64)
            self.num_filled = variable("num_filled", [], tf.int64)
            self.cursor = variable("cursor", [], tf.int64)
            self.step = variable("step", [], tf.int64)
        self.index = tf.lookup.experimental.MutableHashTable(
            key_dtype=id_dtype, value_dtype=tf.int64, default_value=-1, name="id_to_slot")

    # ------------------------------------------------------------------ validation

    def check_features(self, features: Mapping[str, tf.Tensor], num_rows=None,
                       what: str = "candidate_features") -> Dict[str, tf.Tensor]:
        """Checks features against the spec at trace time and returns the spec'd ones.

        Extra keys are ignored (the candidate tower may read only the spec'd ones).

        Raises:
          ValueError: a key is missing, or a feature's per-candidate shape or dtype differs
            from the spec, or the number of rows differs from `num_rows` (when both are
            static).
        """
        if not isinstance(features, Mapping):
            raise ValueError(
                f"`{what}` must be a dict of tensors with keys {sorted(self.feature_spec)}. "
                f"Received: {type(features).__name__}.")
        missing = sorted(set(self.feature_spec) - set(features))
        if missing:
            raise ValueError(
                f"`{what}` is missing feature(s) {missing} of the cache's feature_spec. "
                f"Received keys: {sorted(features)}; expected: {sorted(self.feature_spec)}.")
        checked = {}
        for key, spec in self.feature_spec.items():
            value = features[key]
            if isinstance(value, tf.RaggedTensor) or isinstance(value, tf.SparseTensor):
                raise ValueError(
                    f"`{what}[{key!r}]` must be a dense tensor of per-candidate {_describe(spec)}. "
                    f"Received: {type(value).__name__}. Pad it to a fixed shape first.")
            value = tf.convert_to_tensor(value)
            if value.dtype != spec.dtype:
                raise ValueError(
                    f"`{what}[{key!r}]` has dtype {value.dtype.name}, but the cache's "
                    f"feature_spec says {spec.dtype.name} (per-candidate shape "
                    f"{tuple(spec.shape)}).")
            if value.shape.rank is not None and (
                    value.shape.rank != spec.shape.rank + 1
                    or not spec.shape.is_compatible_with(value.shape[1:])):
                raise ValueError(
                    f"`{what}[{key!r}]` has shape {tuple(value.shape)}, but the cache expects "
                    f"[num_candidates, *{tuple(spec.shape)}] (feature_spec {_describe(spec)}).")
            checked[key] = value
        if num_rows is not None:
            for key, value in checked.items():
                rows = value.shape[0]
                if rows is not None and isinstance(num_rows, int) and rows != num_rows:
                    raise ValueError(
                        f"`{what}[{key!r}]` has {rows} rows, but there are {num_rows} "
                        f"candidates (rows of the embeddings/ids). Received shape "
                        f"{tuple(value.shape)}.")
        return checked

    def check_embeddings(self, embeddings: tf.Tensor, what: str = "embeddings") -> tf.Tensor:
        """Checks that embeddings are `[rows, embedding_dim]` floats; returns them."""
        embeddings = tf.convert_to_tensor(embeddings)
        if not embeddings.dtype.is_floating:
            raise ValueError(
                f"`{what}` must be floating point. Received dtype {embeddings.dtype.name}.")
        if embeddings.shape.rank is not None and (
                embeddings.shape.rank != 2
                or embeddings.shape[1] not in (None, self.embedding_dim)):
            raise ValueError(
                f"`{what}` must have shape [num_rows, {self.embedding_dim}] (the cache's "
                f"embedding_dim). Received shape {tuple(embeddings.shape)}.")
        return embeddings

    def check_queries(self, queries: tf.Tensor, what: str = "query_embeddings") -> tf.Tensor:
        """Checks that queries are `[B, embedding_dim]` or `[B, H, embedding_dim]` (multi-head)
        floats; returns them."""
        queries = tf.convert_to_tensor(queries)
        if not queries.dtype.is_floating:
            raise ValueError(
                f"`{what}` must be floating point. Received dtype {queries.dtype.name}.")
        shapes = (f"[num_rows, {self.embedding_dim}] or, multi-head, "
                  f"[num_rows, num_heads, {self.embedding_dim}]")
        rank = queries.shape.rank
        if rank is not None and rank not in (2, 3):
            raise ValueError(
                f"`{what}` must have shape {shapes}. Received shape {tuple(queries.shape)}.")
        if rank is not None and queries.shape[-1] not in (None, self.embedding_dim):
            raise ValueError(
                f"`{what}` have dimension {queries.shape[-1]}, but the cache stores embeddings "
                f"of dimension {self.embedding_dim}: they must have shape {shapes}. Received "
                f"shape {tuple(queries.shape)}.")
        return queries

    def check_ids(self, ids: tf.Tensor, what: str = "candidate_ids") -> tf.Tensor:
        """Checks that ids are a vector of the cache's id dtype (int32 is widened)."""
        ids = tf.convert_to_tensor(ids)
        if ids.dtype == tf.int32 and self.id_dtype == tf.int64:
            ids = tf.cast(ids, tf.int64)
        if ids.dtype != self.id_dtype:
            raise ValueError(
                f"`{what}` has dtype {ids.dtype.name}, but the cache's id_dtype is "
                f"{self.id_dtype.name}.")
        if ids.shape.rank is not None and ids.shape.rank != 1:
            raise ValueError(
                f"`{what}` must be a vector [num_candidates]. Received shape "
                f"{tuple(ids.shape)}.")
        return ids

    def check_sampling(self, top_m: Optional[int], sampling_mode: str = "gumbel") -> None:
        """Raises ValueError for sampling options this cache cannot serve (none here)."""
        del top_m, sampling_mode

    # ------------------------------------------------------------------ reading

    def fill_fraction(self) -> tf.Tensor:
        """The fraction of slots that hold a candidate, a float32 scalar."""
        return tf.cast(self.num_filled, tf.float32) / float(self.size)

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        """Slots holding `ids`, int32 of the same shape, -1 where an id is not cached."""
        return tf.cast(self.index.lookup(self.check_ids(ids)), tf.int32)

    def gather(self, slots: tf.Tensor) -> Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
        """Features, stale embeddings and ids of `slots` (int, any shape S).

        Returns:
          (features `{name: [*S, *feature_shape]}`, embeddings `[*S, d]`, ids `[*S]`).
        """
        features = {k: tf.gather(v, slots) for k, v in self.features.items()}
        return features, tf.gather(self.embeddings, slots), tf.gather(self.ids, slots)

    def slot_bias(self, masked_slots: Optional[tf.Tensor] = None) -> tf.Tensor:
        """`[N]` float32: 0 for filled slots, `-inf` for empty ones and `masked_slots`."""
        filled = tf.range(self.size, dtype=tf.int64) < self.num_filled
        bias = tf.where(filled, 0.0, sampling.NEG_INF)
        if masked_slots is not None:
            masked_slots = tf.reshape(masked_slots, [-1])
            masked_slots = tf.boolean_mask(masked_slots, masked_slots >= 0)
            bias = tf.tensor_scatter_nd_update(
                bias, masked_slots[:, None],
                tf.fill(tf.shape(masked_slots), sampling.NEG_INF))
        return bias

    def begin_step(self) -> None:
        """Restarts the numbering of draws within a step (a training step calls it first)."""
        self._draws_this_step = 0

    def _next_draw_seed(self) -> tf.Tensor:
        """The `[2]` seed of the next draw: a function of (seed, step, draw index in the step,
        replica), so evaluation, restores and replicas never share or disturb a stream."""
        seed = tf.random.experimental.stateless_fold_in(
            tf.constant([self.seed, 0x6E6567], tf.int64), self.step)
        seed = tf.random.experimental.stateless_fold_in(seed, self._draws_this_step)
        self._draws_this_step += 1
        return distribute.replica_seed(seed)

    def sample(
        self,
        queries: tf.Tensor,
        num_samples: int = 1,
        temperature: Optional[float] = None,
        masked_ids: Optional[tf.Tensor] = None,
        excluded_ids: Optional[tf.Tensor] = None,
        draw: bool = True,
        top_m: Optional[int] = None,
    ) -> sampling.CacheDraw:
        """Scores queries against the cache; draws Gumbel-Max samples when `draw`.

        Args:
          queries: `[B, d]` query embeddings, or `[B, H, d]` multi-head ones: a slot then
            scores `max_h <q_ih, e_j> / T` (maxsim over heads, as `tfrs.tasks.Retrieval`),
            and that score is what the softmax, the draw, `top_m` and the log-mass use.
          num_samples: k draws per query.
          temperature: the softmax temperature T (scores are `<q, e> / T`).
          masked_ids: ids never drawn for any query (the batch's candidates, when they are
            also used as in-batch negatives).
          excluded_ids: `[B]`, an id never drawn for query i (its positive: an accidental
            hit).
          draw: False to compute only the log-mass (evaluation); nothing is drawn.
          top_m: restrict each query to its `top_m` highest eligible cached scores: draws
            follow the softmax over those m slots and `log_mass` sums over them only (see
            `CacheRetrieval(top_m=...)` for what that means for the loss). None: all slots.

        Returns:
          A `sampling.CacheDraw`; `slots` is None when `draw` is False. The noise is a
          function of (seed, step, the index of this draw within the step), so evaluation
          and a restored checkpoint do not disturb the stream.
        """
        num_samples = checks.integer("num_samples", num_samples, 1)
        queries = self.check_queries(queries)
        masked = self.lookup(masked_ids) if masked_ids is not None else None
        excluded = self.lookup(excluded_ids) if excluded_ids is not None else None
        seed = self._next_draw_seed() if draw else None
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        if top_m is not None:
            return sampling.sample_cache_top_m(
                queries, self.embeddings, self.slot_bias(masked), inv_temperature, num_samples,
                seed, top_m, excluded_slots=excluded, scoring_dtype=self.scoring_dtype)
        plan = sampling.plan_sampler(self.size, self.embedding_dim, queries.shape[0],
                                     self.block_size,
                                     num_heads=sampling.query_heads(queries))
        return sampling.sample_cache(
            queries, self.embeddings, self.slot_bias(masked), inv_temperature, num_samples,
            seed, excluded_slots=excluded, plan=plan, scoring_dtype=self.scoring_dtype)

    def draw(self, queries: tf.Tensor, num_samples: int, temperature: Optional[float] = None,
             masked_ids: Optional[tf.Tensor] = None, excluded_ids: Optional[tf.Tensor] = None,
             draw: bool = True, top_m: Optional[int] = None) -> CacheNegatives:
        """`sample`, plus the drawn slots' features and stale embeddings (what the task
        re-encodes). Arguments as in `sample` (queries `[B, d]` or `[B, H, d]`)."""
        result = self.sample(queries, num_samples, temperature, masked_ids, excluded_ids,
                             draw, top_m)
        if not draw:
            return CacheNegatives(log_mass=result.log_mass)
        slots = tf.reshape(result.slots, [-1])
        features, stale, _ = self.gather(slots)
        return CacheNegatives(result.log_mass, slots, features, stale)

    def draw_uniform(self, num_queries, num_samples: int,
                     masked_ids: Optional[tf.Tensor] = None,
                     excluded_ids: Optional[tf.Tensor] = None) -> CacheNegatives:
        """k slots per query drawn uniformly, with replacement, over the filled slots: no
        scoring of the cache (mixed negative sampling's draw, with the cache as the corpus).

        A draw that lands on a slot ineligible for its query (masked for every query, or the
        query's own excluded id) gets log-weight `-inf`; the others `log(filled / k)`. So the
        eligible mass is estimated without bias while every query draws from one uniform
        distribution. Arguments as in `sample`; `num_queries` is B (a scalar, may be a
        tensor).
        """
        num_samples = checks.integer("num_samples", num_samples, 1)
        seed = self._next_draw_seed()
        filled = tf.maximum(self.num_filled, 1)
        slots = tf.random.stateless_uniform(
            tf.stack([tf.cast(num_queries, tf.int32), num_samples]), seed, minval=0,
            maxval=filled, dtype=tf.int64)
        masked = self.lookup(masked_ids) if masked_ids is not None else None
        eligible = tf.math.is_finite(tf.gather(self.slot_bias(masked), slots))
        if excluded_ids is not None:
            excluded = tf.cast(self.lookup(excluded_ids), tf.int64)
            eligible = tf.logical_and(eligible, tf.not_equal(slots, excluded[:, None]))
        log_weight = tf.math.log(tf.cast(self.num_filled, tf.float32) / float(num_samples))
        log_weights = tf.where(eligible, log_weight, sampling.NEG_INF)
        flat = tf.reshape(slots, [-1])
        features, stale, _ = self.gather(flat)
        return CacheNegatives(None, flat, features, stale, log_weights)

    def random_filled_slots(self, num_slots: int, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
        """`min(num_slots, filled)` distinct filled slots, uniformly at random, int64 `[R']`.

        Each slot gets a stateless uniform key and the `num_slots` largest keys among the
        filled slots win (`top_k` over N keys, no tower calls). With `num_slots >= size`
        every filled slot is chosen, in slot order, and no randomness is used.

        Args:
          num_slots: R.
          seed: `[2]` int seed; default from (cache seed, cache step), a stream of its own.
        """
        num_slots = checks.integer("num_slots", num_slots, 0)
        if num_slots >= self.size:
            return tf.range(self.num_filled, dtype=tf.int64)
        if num_slots < 1:
            return tf.zeros([0], tf.int64)
        if seed is None:
            seed = refresh_seed(self.seed, self.step)
        keys = tf.random.stateless_uniform([self.size], seed, dtype=tf.float32)
        filled = tf.range(self.size, dtype=tf.int64) < self.num_filled
        keys = tf.where(filled, keys, -1.0)
        top = tf.math.top_k(keys, k=num_slots, sorted=True)
        slots = tf.cast(top.indices, tf.int64)
        return tf.boolean_mask(slots, top.values >= 0.0)

    def refresh_candidates(self, num_slots: int) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
        """The random refresh of this step: `(slots [R'], their features)` to re-encode."""
        slots = self.random_filled_slots(num_slots)
        features, _, _ = self.gather(slots)
        return slots, features

    # ------------------------------------------------------------------ the transaction

    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> _Writes:
        """Computes every write of `update` and the checks that must pass first.

        Reads the cache, writes nothing. Under a strategy (replica context) the replicas'
        inserts and write-backs are all-gathered first, so every replica prepares the same
        writes.

        Raises:
          ValueError: at trace time, for rows that do not match the cache (the message names
            what was received and what was expected).
        """
        checks_ = []
        insert = update.insert_ids is not None
        if insert:
            ids = self.check_ids(update.insert_ids, "candidate_ids")
            embeddings = self.check_embeddings(update.insert_embeddings, "candidate embeddings")
            features = self.check_features(update.insert_features)
            num_rows = tf.shape(embeddings, out_type=tf.int64)[0]
            checks_.append(checks.same_rows(ids, num_rows, "`candidate_ids`",
                                            "candidate embeddings"))
            checks_ += [checks.same_rows(v, num_rows, f"feature `{k}` of `candidate_features`",
                                         "candidates") for k, v in features.items()]
        written = []  # (slots, embeddings, valid, what)
        if update.write_back_slots is not None:
            written.append((update.write_back_slots, update.write_back_embeddings,
                            update.write_back_valid, "write-back embeddings"))
        if update.refresh_slots is not None:
            written.append((update.refresh_slots, update.refresh_embeddings, None,
                            "refreshed embeddings"))
        for i, (slots, rows, valid, what) in enumerate(written):
            rows = self.check_embeddings(rows, what)
            slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
            checks_.append(checks.same_rows(rows, tf.size(slots), f"`{what}`", "slots"))
            if valid is None:
                valid = tf.ones_like(slots, tf.bool)
            written[i] = (slots, rows, tf.reshape(valid, [-1]), what)

        if distribute.in_replica_context() and not self._per_replica:
            # The same writes on every replica: the union of the replicas' rows. A refresh
            # is the same on every replica (same slots, same weights) and is not gathered.
            with tf.control_dependencies(checks_):
                if insert:
                    ids, embeddings = distribute.all_gather(ids), distribute.all_gather(embeddings)
                    features = {k: distribute.all_gather(v) for k, v in features.items()}
                if update.write_back_slots is not None:
                    written[0] = tuple(distribute.all_gather(x) for x in written[0][:3]) + (
                        written[0][3],)

        # Finiteness of every row that could be written, before anything else reads them.
        if insert:
            embeddings = checks.finite(embeddings, "`embeddings to insert`")
        written = [(s, checks.finite(r, f"`{what}`"), v, what) for s, r, v, what in written]
        checks_ += ([embeddings] if insert else []) + [r for _, r, _, _ in written]

        with tf.control_dependencies(checks_):
            if insert:
                plan = self._plan_insert(features, embeddings, ids)
            else:
                plan = self._plan_insert(None, None, None)
            insert_slots = plan["slots"]
            # Embedding-only writes: filled slots the insert does not rewrite or evict.
            touched = tf.sort(insert_slots)
            slots, rows, seen = [], [], tf.zeros([0], tf.int64)
            for s, r, v, _ in written:
                keep = tf.logical_and(v, s < self.num_filled)
                keep = tf.logical_and(keep, tf.logical_not(_in_sorted(touched, s)))
                # A refreshed slot that is also written back keeps the write-back row.
                keep = tf.logical_and(keep, tf.logical_not(_in_sorted(tf.sort(seen), s)))
                s, r = tf.boolean_mask(s, keep), tf.boolean_mask(r, keep)
                slots.append(s)
                rows.append(tf.cast(r, self.embedding_dtype))
                seen = tf.concat([seen, s], 0)
            slots = tf.concat(slots, 0) if slots else tf.zeros([0], tf.int64)
            rows = (tf.concat(rows, 0) if rows
                    else tf.zeros([0, self.embedding_dim], self.embedding_dtype))
        writes = _Writes(
            checks=checks_, slots=slots, embeddings=rows, insert_slots=insert_slots,
            insert_features=plan["features"], insert_embeddings=plan["embeddings"],
            insert_ids=plan["ids"], evicted_ids=plan["evicted_ids"], new_ids=plan["new_ids"],
            new_slots=plan["new_slots"], cursor=plan["cursor"], num_filled=plan["num_filled"],
            num_rows=tf.size(ids, out_type=tf.int64) if insert else tf.constant(1, tf.int64),
            advance_step=advance_step)
        writes.checks = checks_ + writes.tensors()
        return writes

    def _plan_insert(self, features, embeddings, ids) -> dict:
        """Where an insert's rows go (see the class docstring), computed from the state."""
        if ids is None:
            empty = tf.zeros([0], tf.int64)
            return {
                "slots": empty, "ids": tf.zeros([0], self.id_dtype),
                "features": {k: tf.zeros([0, *s.shape.as_list()], s.dtype)
                             for k, s in self.feature_spec.items()},
                "embeddings": tf.zeros([0, self.embedding_dim], self.embedding_dtype),
                "evicted_ids": tf.zeros([0], self.id_dtype), "new_ids": tf.zeros([0], self.id_dtype),
                "new_slots": empty, "cursor": tf.identity(self.cursor),
                "num_filled": tf.identity(self.num_filled)}
        size = tf.constant(self.size, tf.int64)
        unique_ids, position = tf.unique(ids, out_idx=tf.int64)
        num_unique = tf.size(unique_ids, out_type=tf.int64)
        last_row = tf.math.unsorted_segment_max(
            tf.range(tf.size(ids, out_type=tf.int64)), position, num_unique)
        # More distinct ids than slots: keep the `size` whose last rows come latest.
        ranked = tf.concat([tf.sort(last_row), [_INT64_MAX]], 0)
        kept = last_row >= ranked[tf.maximum(num_unique - size, 0)]
        unique_ids = tf.boolean_mask(unique_ids, kept)
        rows = tf.boolean_mask(last_row, kept)
        slots = tf.reshape(self.index.lookup(unique_ids), [-1])

        cached = tf.where(slots >= 0)[:, 0]
        new = tf.where(slots < 0)[:, 0]
        protected = tf.gather(slots, cached)
        num_new = tf.size(new, out_type=tf.int64)
        # New ids take the oldest slots from the cursor on, skipping slots whose candidate
        # this call re-inserts: the window of num_new + |protected| slots always has enough.
        width = num_new + tf.size(protected, out_type=tf.int64)
        window = (self.cursor + tf.range(width)) % size
        offset = (protected - self.cursor) % size
        offset = tf.boolean_mask(offset, offset < width)
        blocked = tf.scatter_nd(offset[:, None], tf.ones_like(offset, tf.int32), [width]) > 0
        take = tf.where(tf.logical_not(blocked))[:num_new, 0]
        new_slots = tf.gather(window, take)
        cursor = tf.cond(num_new > 0, lambda: (self.cursor + take[-1] + 1) % size,
                         lambda: tf.identity(self.cursor))
        evicted = tf.boolean_mask(tf.gather(self.ids, new_slots), new_slots < self.num_filled)

        order = tf.concat([cached, new], 0)
        rows = tf.gather(rows, order)
        return {
            "slots": tf.concat([protected, new_slots], 0),
            "ids": tf.gather(unique_ids, order),
            "features": {k: tf.gather(v, rows) for k, v in features.items()},
            "embeddings": tf.cast(tf.gather(embeddings, rows), self.embedding_dtype),
            "evicted_ids": evicted, "new_ids": tf.gather(unique_ids, new),
            "new_slots": new_slots, "cursor": cursor,
            "num_filled": tf.minimum(self.num_filled + num_new, size)}

    def commit(self, writes: _Writes) -> None:
        """Applies prepared writes: scatters only, nothing that checks or can fail on data.

        Under a strategy (replica context) they are applied once, in cross-replica context,
        to every copy of the variables and to the worker's id index.
        """
        if distribute.in_replica_context() and not self._per_replica:
            values = {f.name: getattr(writes, f.name) for f in dataclasses.fields(writes)
                      if f.name not in ("checks", "advance_step")}
            distribute.run_once(
                lambda first: self._commit(dataclasses.replace(writes, **first)), values)
        else:
            self._commit(writes)
        self._draws_this_step = 0

    def _commit(self, writes: _Writes) -> None:
        stamp = self.step.read_value()
        self.embeddings.scatter_update(tf.IndexedSlices(writes.embeddings, writes.slots))
        self.updated_at.scatter_update(
            tf.IndexedSlices(tf.fill(tf.shape(writes.slots), stamp), writes.slots))
        slots = writes.insert_slots
        stamps = tf.fill(tf.shape(slots), stamp)
        for key, variable in self.features.items():
            variable.scatter_update(tf.IndexedSlices(writes.insert_features[key], slots))
        self.embeddings.scatter_update(tf.IndexedSlices(writes.insert_embeddings, slots))
        self.ids.scatter_update(tf.IndexedSlices(writes.insert_ids, slots))
        self.inserted_at.scatter_update(tf.IndexedSlices(stamps, slots))
        self.updated_at.scatter_update(tf.IndexedSlices(stamps, slots))
        self.index.remove(writes.evicted_ids)
        self.index.insert(writes.new_ids, writes.new_slots)
        self.cursor.assign(writes.cursor)
        self.num_filled.assign(writes.num_filled)
        if writes.advance_step:
            # A training step advances the cache's step; an empty batch changes nothing.
            self.step.assign_add(tf.cast(writes.num_rows > 0, tf.int64))

    def update(self, update: Optional[CacheUpdate] = None, advance_step: bool = True) -> None:
        """`prepare` then `commit`: one transaction. With `advance_step`, `step` advances
        by one (a training step's update); a failing check raises with nothing changed."""
        writes = self.prepare(update if update is not None else CacheUpdate(),
                              advance_step=advance_step)
        with tf.control_dependencies(writes.checks):
            self.commit(writes)

    def insert(self, features: Mapping[str, tf.Tensor], embeddings: tf.Tensor,
               ids: tf.Tensor) -> None:
        """Inserts candidates (FIFO over distinct ids, see the class docstring); `step`
        does not advance.

        Args:
          features: `{name: [M, *feature_shape]}` for every key of the feature spec.
          embeddings: `[M, d]` embeddings of these candidates (finite).
          ids: `[M]` ids.

        Raises:
          ValueError: at trace time, for features, embeddings or ids that do not match the
            cache (the message names what was received and what was expected).
          tf.errors.InvalidArgumentError: row counts that differ, or non-finite embeddings;
            nothing is written.
        """
        self.update(CacheUpdate(features, embeddings, ids), advance_step=False)

    def write_embeddings(self, slots: tf.Tensor, embeddings: tf.Tensor,
                         valid: Optional[tf.Tensor] = None) -> None:
        """Overwrites the stale embeddings of `slots` (a refresh); `step` does not advance.
        Rows with `valid` False, and slots that are empty, are skipped.

        Args:
          slots: `[M]` int slots.
          embeddings: `[M, d]` fresh embeddings.
          valid: optional `[M]` bool.
        """
        slots = tf.reshape(slots, [-1])
        self.update(CacheUpdate(write_back_slots=slots, write_back_embeddings=embeddings,
                                write_back_valid=valid), advance_step=False)

    # ------------------------------------------------------------------ refresh policies

    def encode(self, slots: tf.Tensor, encoder) -> tf.Tensor:
        """`encoder`'s embeddings of the cached features of `slots`, `[M, d]`, no gradient."""
        features, _, _ = self.gather(slots)
        embeddings = tf.convert_to_tensor(encoder(features))
        return tf.stop_gradient(self.check_embeddings(embeddings, "encoder output"))

    def refresh(self, slots: tf.Tensor, encoder) -> None:
        """Re-encodes `slots` from their cached features with `encoder` (no gradient) and
        writes the embeddings; empty slots are skipped, nothing else changes."""
        slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
        self.write_embeddings(slots, self.encode(slots, encoder))

    def refresh_all(self, encoder, batch_size: int = 1024) -> int:
        """Re-encodes every filled slot, `batch_size` per encoder call; returns the count.

        Runs eagerly over chunks (each chunk's tower call and write in one `tf.function` with
        a fixed chunk shape, so it traces once); empty slots are never touched.
        """
        batch_size = min(checks.integer("batch_size", batch_size, 1), self.size)
        key = (id(encoder), batch_size)
        memo = self.__dict__.setdefault("_refreshers", {})
        if key not in memo:
            @tf.function
            def refresh_chunk(start):
                slots = start + tf.range(batch_size, dtype=tf.int64)
                valid = slots < self.num_filled
                slots = tf.minimum(slots, self.size - 1)
                self.write_embeddings(slots, self.encode(slots, encoder), valid=valid)

            memo[key] = refresh_chunk
        filled = int(self.num_filled.numpy())
        for start in range(0, filled, batch_size):
            memo[key](tf.constant(start, tf.int64))
        return filled

    def warm_start(self, dataset: tf.data.Dataset, candidate_model, id_key: str = "id",
                   batch_size: int = 1024, batched: bool = False) -> int:
        """Fills the cache from a candidate dataset before training; returns rows read.

        Each element is a dict of one candidate's features (or of `[M, ...]` rows when
        `batched`), holding every key of the `feature_spec` plus the id under `id_key` (extra
        keys are ignored). Candidates are encoded by `candidate_model` with the current
        weights and inserted in dataset order: ids are deduped (a repeated id refreshes its
        slot), and a dataset larger than the cache leaves its last `size` distinct
        candidates (FIFO). The cache's `step` does not advance.

        Args:
          dataset: candidates, e.g. the movie table as a `tf.data.Dataset`.
          candidate_model: the candidate tower, mapping a feature dict to `[M, d]`.
          id_key: the element key holding the candidate id.
          batch_size: candidates per tower call and insert (capped at the cache size).
          batched: whether `dataset` already yields batches.
        """
        batch_size = min(checks.integer("batch_size", batch_size, 1), self.size)
        if not batched:
            dataset = dataset.batch(batch_size)
        elif batch_size < self.size:
            dataset = dataset.unbatch().batch(batch_size)

        @tf.function
        def insert(element):
            features = self.check_features(element, what="warm_start dataset element")
            embeddings = tf.stop_gradient(tf.convert_to_tensor(candidate_model(features)))
            self.insert(features, embeddings, element[id_key])
            return tf.shape(embeddings)[0]

        rows = 0
        for element in dataset:
            if id_key not in element:
                raise ValueError(
                    f"warm_start: dataset elements must hold the candidate id under `id_key` "
                    f"({id_key!r}). Received keys: {sorted(element)}.")
            rows += int(insert(element))
        return rows

    def rebuild_index(self) -> None:
        """Rebuilds the id-to-slot index from `ids` and `num_filled` (after a restore from a
        format that keeps variables only, such as `.h5`)."""
        keys, _ = self.index.export()
        self.index.remove(keys)
        filled = self.num_filled.read_value()
        self.index.insert(self.ids[:filled], tf.range(filled, dtype=tf.int64))

    def local_caches(self) -> List["NegativeCache"]:
        """The caches this process holds: itself (a sharded cache returns its shards)."""
        return [self]

    def get_config(self):
        config = super().get_config()
        config.update({
            "size": self.size,
            "feature_spec": {k: {"shape": s.shape.as_list(), "dtype": s.dtype.name}
                             for k, s in self.feature_spec.items()},
            "embedding_dim": self.embedding_dim,
            "id_dtype": self.id_dtype.name,
            "embedding_dtype": self.embedding_dtype.name,
            "seed": self.seed,
            "block_size": self.block_size,
            "scoring_dtype": None if self.scoring_dtype is None else self.scoring_dtype.name,
        })
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**spec_from_config(config))


def spec_from_config(config: dict) -> dict:
    """A cache's `get_config()` with its `feature_spec` turned back into `tf.TensorSpec`s."""
    config = dict(config)
    config["feature_spec"] = {
        k: tf.TensorSpec(v["shape"], tf.as_dtype(v["dtype"]))
        for k, v in config["feature_spec"].items()}
    return config


def refresh_seed(cache_seed: int, step) -> tf.Tensor:
    """The `[2]` stateless seed of the random refresh at cache step `step`."""
    return tf.random.experimental.stateless_fold_in(
        tf.constant([cache_seed, _REFRESH_STREAM], tf.int64), tf.cast(step, tf.int64))
