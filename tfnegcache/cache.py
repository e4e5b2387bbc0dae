"""The negative cache: candidate features, stale embeddings and ids in Keras variables."""

from typing import Dict, Mapping, Optional, Tuple

import tensorflow as tf

from tfnegcache import distribute, sampling
from tfnegcache import refresh as refresh_lib

FeatureSpec = Mapping[str, tf.TensorSpec]


def _describe(spec_or_tensor) -> str:
    return f"shape={tuple(spec_or_tensor.shape)} dtype={spec_or_tensor.dtype.name}"


class NegativeCache(tf.keras.layers.Layer):
    """A fixed-size store of candidates to sample hard negatives from.

    Each of the `size` slots holds a candidate's input features (enough for the candidate
    tower to re-encode it), its embedding as computed at some earlier step (stale), and its
    id. Scoring a batch of queries against every slot is one pass over the `[size, d]`
    embeddings, with no tower work; a sampled slot can be re-encoded with the current weights
    because its features are kept.

    Updates are in-place scatters into the variables, O(batch) per step:

    - `insert` adds candidates in FIFO order: the oldest slot is evicted once the cache is
      full. An id already cached refreshes its own slot instead of taking a second one (an
      id-to-slot hash table finds it without a scan over the cache).
    - `write_embeddings` overwrites the embeddings of given slots (the write-back of
      re-encoded negatives, or any other refresh policy).
    - `update` does one training step's worth of both and advances `step`; it is what
      `CachedRetrievalModel.train_step` calls after the optimizer step.

    Bookkeeping per slot: `inserted_at` (the cache step at which its candidate was inserted
    or last re-inserted) and `updated_at` (the step its embedding was last written), so
    `step - updated_at` is the embedding's age. Nothing non-finite is ever written: a write
    of NaN or Inf embeddings fails with `tf.errors.InvalidArgumentError` before any variable
    changes.

    Example:

    >>> cache = tfnegcache.NegativeCache(
    ...     size=4096,
    ...     feature_spec={"movie_id": tf.TensorSpec([], tf.string),
    ...                   "title_tokens": tf.TensorSpec([8], tf.int64)},
    ...     embedding_dim=32)
    >>> cache.insert(features, embeddings, ids)   # dict of [B, ...], [B, 32], [B]
    >>> draw = cache.sample(query_embeddings, num_samples=1)
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
        layout: str = "replicated",
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
          layout: how the cache is laid out over the replicas of a `tf.distribute` strategy
            (see `tfnegcache.distribute`): `"replicated"` (every replica holds the same
            `size` slots) or `"sharded"` (each replica holds its own `size` slots; the
            cache sampled from is the union). Without a strategy both are one cache.
          **kwargs: passed to `tf.keras.layers.Layer`.
        """
        super().__init__(name=name, trainable=False, **kwargs)
        if int(size) < 1:
            raise ValueError(f"`size` must be a positive number of slots. Received: size={size}.")
        if int(embedding_dim) < 1:
            raise ValueError(
                f"`embedding_dim` must be positive. Received: embedding_dim={embedding_dim}.")
        if not feature_spec:
            raise ValueError(
                "`feature_spec` must name at least one candidate feature, as "
                "{name: tf.TensorSpec(shape, dtype)}. Received: "
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

        self.size = int(size)
        self.embedding_dim = int(embedding_dim)
        self.feature_spec: Dict[str, tf.TensorSpec] = dict(sorted(spec.items()))
        self.id_dtype = id_dtype
        self.embedding_dtype = embedding_dtype
        self.seed = int(seed)
        self.block_size = block_size
        if layout not in distribute.LAYOUTS:
            raise ValueError(
                f"`layout` must be one of {distribute.LAYOUTS}. Received: layout={layout!r}.")
        self.layout = layout
        self._draws_this_step = 0
        if layout == "sharded":
            # One plain sub-cache per local replica, each on its replica's device.
            self.shards = []
            for r, device in enumerate(distribute.shard_devices()):
                with distribute.local_variables(device):
                    self.shards.append(NegativeCache(
                        size, feature_spec, embedding_dim, id_dtype, embedding_dtype, seed,
                        block_size, name=f"{name}_shard_{r}"))
            return

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
        self._draws_this_step = 0

    # ------------------------------------------------------------------ validation

    def check_features(self, features: Mapping[str, tf.Tensor], num_rows=None,
                       what: str = "candidate_features") -> Dict[str, tf.Tensor]:
        """Checks features against the spec at trace time and returns the spec'd ones.

        Extra keys are ignored (the candidate tower may read only the spec'd ones).

        Raises:
          ValueError: a key is missing, or a feature's per-candidate shape or dtype differs
            from the spec, or the number of rows differs from `num_rows`.
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

    def check_batch_fits(self, num_rows) -> None:
        """Fails at trace time when a batch has more candidates than the cache has slots."""
        if isinstance(num_rows, int) and num_rows > self.size:
            raise ValueError(
                f"The cache has {self.size} slots but a batch inserts {num_rows} candidates: "
                f"the batch would evict itself. Use a cache of at least the batch size "
                f"(size >= {num_rows}) or a smaller batch.")

    # ------------------------------------------------------------------ reading

    def fill_fraction(self) -> tf.Tensor:
        """The fraction of slots that hold a candidate, a float32 scalar."""
        if self.layout == "sharded":
            return distribute.sharded_fill_fraction(self)
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
          queries: `[B, d]` query embeddings.
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
        if num_samples < 1:
            raise ValueError(
                f"`num_samples` must be >= 1 negatives per query. Received: {num_samples}.")
        if queries.shape.rank is not None and queries.shape[-1] not in (None, self.embedding_dim):
            raise ValueError(
                f"Query embeddings have dimension {queries.shape[-1]}, but the cache stores "
                f"embeddings of dimension {self.embedding_dim}. Received query shape "
                f"{tuple(queries.shape)}.")
        masked = self.lookup(masked_ids) if masked_ids is not None else None
        excluded = self.lookup(excluded_ids) if excluded_ids is not None else None
        seed = self._next_draw_seed() if draw else None
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        if top_m is not None:
            return sampling.sample_cache_top_m(
                queries, self.embeddings, self.slot_bias(masked), inv_temperature, num_samples,
                seed, top_m, excluded_slots=excluded)
        plan = sampling.plan_sampler(self.size, self.embedding_dim, queries.shape[0],
                                     self.block_size)
        return sampling.sample_cache(
            queries, self.embeddings, self.slot_bias(masked), inv_temperature, num_samples,
            seed, excluded_slots=excluded, plan=plan)

    # ------------------------------------------------------------------ writing

    def assert_finite(self, embeddings: tf.Tensor, what: str) -> tf.Tensor:
        """`embeddings`, checked: running it fails with `InvalidArgumentError` naming the cache
        and `what` if any value is NaN or Inf. Writes made under its control dependency do
        not happen then."""
        return tf.debugging.assert_all_finite(
            embeddings,
            f"{self.name}: refusing to write non-finite (NaN or Inf) {what} into the cache; "
            "the cache was left unchanged.")

    def write_embeddings(self, slots: tf.Tensor, embeddings: tf.Tensor,
                         valid: Optional[tf.Tensor] = None) -> None:
        """Overwrites the stale embeddings of `slots` (refresh). Rows with `valid` False, or
        slots that are empty, are skipped.

        Args:
          slots: `[M]` int slots.
          embeddings: `[M, d]` fresh embeddings.
          valid: optional `[M]` bool.
        """
        embeddings = self.check_embeddings(embeddings, "embeddings to write back")
        slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
        keep = slots < self.num_filled
        if valid is not None:
            keep = tf.logical_and(keep, tf.reshape(valid, [-1]))
        slots = tf.boolean_mask(slots, keep)
        embeddings = tf.boolean_mask(embeddings, keep)
        with tf.control_dependencies([self.assert_finite(embeddings, "write-back embeddings")]):
            self.embeddings.scatter_update(
                tf.IndexedSlices(tf.cast(embeddings, self.embedding_dtype), slots))
            self.updated_at.scatter_update(
                tf.IndexedSlices(tf.fill(tf.shape(slots), self.step.read_value()), slots))

    def _write_slots(self, slots, features, embeddings, ids):
        stamp = tf.fill(tf.shape(slots), self.step.read_value())
        for key, variable in self.features.items():
            variable.scatter_update(tf.IndexedSlices(features[key], slots))
        self.embeddings.scatter_update(
            tf.IndexedSlices(tf.cast(embeddings, self.embedding_dtype), slots))
        self.ids.scatter_update(tf.IndexedSlices(ids, slots))
        self.inserted_at.scatter_update(tf.IndexedSlices(stamp, slots))
        self.updated_at.scatter_update(tf.IndexedSlices(stamp, slots))

    def insert(self, features: Mapping[str, tf.Tensor], embeddings: tf.Tensor,
               ids: tf.Tensor) -> None:
        """Inserts candidates, FIFO: new ids take the oldest slots; cached ids are refreshed.

        Within one call, a repeated id keeps its last row.

        Args:
          features: `{name: [M, *feature_shape]}` for every key of the feature spec.
          embeddings: `[M, d]` embeddings of these candidates (finite).
          ids: `[M]` ids.

        Raises:
          ValueError: at trace time, for features, embeddings or ids that do not match the
            cache (the message names what was received and what was expected), or M > size.
          tf.errors.InvalidArgumentError: non-finite embeddings; nothing is written.
        """
        ids = self.check_ids(ids)
        embeddings = self.check_embeddings(embeddings, "embeddings to insert")
        num_rows = ids.shape[0]
        features = self.check_features(features, num_rows)
        self.check_batch_fits(num_rows)
        checks = [
            self.assert_finite(embeddings, "embeddings to insert"),
            tf.debugging.assert_equal(
                tf.shape(embeddings)[0], tf.shape(ids)[0],
                message="`embeddings` and `ids` to insert must have the same number of rows"),
            tf.debugging.assert_less_equal(
                tf.size(ids, out_type=tf.int64), tf.constant(self.size, tf.int64),
                message=f"more candidates to insert than the cache's {self.size} slots"),
        ]
        with tf.control_dependencies(checks):
            unique_ids, position = tf.unique(ids)
            # Keep the last row of an id repeated within the batch.
            last_row = tf.math.unsorted_segment_max(
                tf.range(tf.size(ids)), position, tf.size(unique_ids))
            features = {k: tf.gather(v, last_row) for k, v in features.items()}
            embeddings = tf.gather(embeddings, last_row)
            slots = tf.cast(self.index.lookup(unique_ids), tf.int64)

        cached = tf.where(slots >= 0)[:, 0]
        self._write_slots(
            tf.gather(slots, cached), {k: tf.gather(v, cached) for k, v in features.items()},
            tf.gather(embeddings, cached), tf.gather(unique_ids, cached))

        new = tf.where(slots < 0)[:, 0]
        num_new = tf.size(new, out_type=tf.int64)
        new_slots = (self.cursor + tf.range(num_new)) % self.size
        evicted = tf.boolean_mask(tf.gather(self.ids, new_slots), new_slots < self.num_filled)
        self.index.remove(evicted)
        new_ids = tf.gather(unique_ids, new)
        self._write_slots(new_slots, {k: tf.gather(v, new) for k, v in features.items()},
                          tf.gather(embeddings, new), new_ids)
        self.index.insert(new_ids, new_slots)
        self.cursor.assign((self.cursor + num_new) % self.size)
        self.num_filled.assign(tf.minimum(self.num_filled + num_new, self.size))

    def update(self, insert: Optional[Tuple] = None, write_back: Optional[Tuple] = None,
               refresh: Optional[Tuple] = None) -> None:
        """One training step's cache update; then advances `step`.

        Args:
          insert: `(features, embeddings, ids)` to `insert`, or None.
          write_back: `(slots, embeddings, valid)` for `write_embeddings`, or None. Written
            before the insert, so an insert that evicts a written slot wins.
          refresh: `(num_slots, encoder)`, or None: `num_slots` filled slots chosen at random
            from (seed, step) are re-encoded with `encoder` (the weights after the optimizer
            step), encoded before any write and written last, except to slots whose
            candidate the insert evicted.

        Every embedding to be written (refreshed ones included) is checked before the first
        write: a non-finite value fails the update with `InvalidArgumentError` and changes
        nothing.
        """
        checks = []
        if write_back is not None:
            checks.append(self.assert_finite(write_back[1], "write-back embeddings"))
        if insert is not None:
            checks.append(self.assert_finite(insert[1], "embeddings to insert"))
        refreshed = None
        if refresh is not None and int(refresh[0]) > 0:
            slots = refresh_lib.choose_refresh_slots(self, refresh[0])
            refreshed = (slots, tf.gather(self.ids, slots),
                         refresh_lib.encode_slots(self, slots, refresh[1]))
            checks.append(self.assert_finite(refreshed[2], "refreshed embeddings"))
        with tf.control_dependencies(checks):
            if write_back is not None:
                self.write_embeddings(*write_back)
            if insert is not None:
                self.insert(*insert)
            if refreshed is not None:
                slots, ids_encoded, embeddings = refreshed
                still_there = tf.equal(tf.gather(self.ids, slots), ids_encoded)
                self.write_embeddings(slots, embeddings, valid=still_there)
            self.step.assign_add(1)
        self._draws_this_step = 0

    # ------------------------------------------------------------------ refresh policies
    # (issue 7; the policies themselves live in `tfnegcache/refresh.py`)

    def refresh(self, slots: tf.Tensor, encoder) -> None:
        """Re-encodes `slots` from their cached features with `encoder` (no gradient) and
        writes the embeddings; empty slots are skipped, nothing else changes."""
        refresh_lib.refresh_slots(self, slots, encoder)

    def refresh_all(self, encoder, batch_size: int = 1024) -> int:
        """Re-encodes every filled slot, `batch_size` per encoder call; returns the count."""
        return refresh_lib.refresh_all(self, encoder, batch_size)

    def warm_start(self, dataset: tf.data.Dataset, candidate_model, id_key: str = "id",
                   batch_size: int = 1024, batched: bool = False) -> int:
        """Fills the cache from a candidate dataset through `insert` (dataset order, id
        dedupe, FIFO); see `refresh.warm_start`. Returns the number of rows read."""
        return refresh_lib.warm_start(self, dataset, candidate_model, id_key=id_key,
                                      batch_size=batch_size, batched=batched)

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
            "layout": self.layout,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["feature_spec"] = {
            k: tf.TensorSpec(v["shape"], tf.as_dtype(v["dtype"]))
            for k, v in config["feature_spec"].items()}
        return cls(**config)

