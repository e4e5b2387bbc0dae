"""`CacheStore`: the variables of one cache (or of one shard) and the id index over them.

A store knows nothing of replicas: it reads its own variables, plans a step's writes into them
(`plan`: reads only, and every check first) and applies a plan (`apply`: scatters only).
`NegativeCache` is one store whose variables are mirrored over the replicas;
`ShardedNegativeCache` holds one store per replica.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from tfnegcache import checks, fifo
from tfnegcache.spec import CacheSpec

NEG_INF = float("-inf")


@dataclasses.dataclass
class CacheUpdate:
    """Everything one training step writes into a cache.

    Attributes:
      insert_features: `{name: [M, ...]}`, the batch's candidates (the streaming FIFO).
      insert_embeddings: `[M, d]` their embeddings.
      insert_ids: `[M]` their ids.
      write_back_slots: `[W]` slots of the re-encoded negatives, or None.
      write_back_embeddings: `[W, d]` their fresh embeddings.
      write_back_valid: `[W]` bool, False for rows not to write.
      refresh_slots: `[R]` slots re-encoded by the random refresh, or None.
      refresh_embeddings: `[R, d]` their embeddings.

    Slots are in the cache's own addressing (as `Cache.draw` returns them); every embedding
    was computed with the weights before the step's optimizer update.

    Example:

    >>> cache = tfnegcache.NegativeCache(8, {"item": tf.TensorSpec([], tf.int64)}, 2)
    >>> ids = tf.constant([3, 5], tf.int64)
    >>> cache.update(tfnegcache.CacheUpdate(
    ...     insert_features={"item": ids}, insert_embeddings=tf.ones([2, 2]), insert_ids=ids))
    >>> int(cache.num_filled), int(cache.step)
    (2, 1)
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
class Writes:
    """A planned update of one store: exactly the scatters `CacheStore.apply` performs.

    `checks` must pass before any of it is applied (the step's guard runs them first).
    """

    checks: List
    slots: tf.Tensor                 # [S] int64: embedding-only writes (write-back, refresh)
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
    advance: tf.Tensor               # int64 0 or 1: how far the store's step moves

    def tensors(self) -> Dict[str, object]:
        """Every field but `checks`, by name (what a replicated commit hands over)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "checks"}


def _in_sorted(sorted_values: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
    """`[len(values)]` bool: whether each value occurs in `sorted_values` (ascending)."""
    padded = tf.concat([sorted_values, tf.constant([-1], sorted_values.dtype)], 0)
    # tf.searchsorted(sorted_values, values), the 1-D case alone: 7 graph ops instead of 20.
    position = tf.squeeze(tf.raw_ops.LowerBound(
        sorted_inputs=tf.expand_dims(sorted_values, 0), values=tf.expand_dims(values, 0),
        out_type=tf.int64), 0)
    return tf.equal(tf.gather(padded, position), values)


class CacheStore(tf.keras.layers.Layer):
    """The state of `spec.size` cache slots: features, embeddings, ids, per-slot steps.

    Variables (non-trainable, named under the layer): `features/<name>` `[N, ...]`,
    `embeddings` `[N, d]`, `ids` `[N]`, `inserted_at` and `updated_at` `[N]` (the store's step
    at which a slot's candidate was inserted and its embedding last written), `num_filled`,
    `cursor` (the FIFO ring's next slot) and `step`. Slots `[0, num_filled)` are filled. The
    id index (`index`, id -> slot) is a hash table kept in step with `ids`; a restore from a
    format that keeps variables only rebuilds it (`rebuild_index`).
    """

    def __init__(self, spec: CacheSpec, name: str, **kwargs) -> None:
        kwargs.pop("trainable", None)   # never trainable (get_config carries it)
        super().__init__(name=name, trainable=False, **kwargs)
        self.spec = spec

        def variable(var_name, shape, dtype):
            fill = "" if dtype == tf.string else 0
            return self.add_weight(
                name=var_name, shape=shape, dtype=dtype, trainable=False,
                initializer=lambda shape, dtype: tf.fill(shape, tf.constant(fill, dtype)))

        # Scoped by the layer's name, so variables read `negative_cache/embeddings:0`.
        with tf.name_scope(self.name):
            n = spec.size
            self.features = {
                key: variable(f"features/{key}", [n, *s.shape.as_list()], s.dtype)
                for key, s in spec.feature_spec.items()}
            self.embeddings = variable("embeddings", [n, spec.embedding_dim],
                                       spec.embedding_dtype)
            self.ids = variable("ids", [n], spec.id_dtype)
            self.inserted_at = variable("inserted_at", [n], tf.int64)
            self.updated_at = variable("updated_at", [n], tf.int64)
            self.num_filled = variable("num_filled", [], tf.int64)
            self.cursor = variable("cursor", [], tf.int64)
            self.step = variable("step", [], tf.int64)
        self.built = True   # every variable exists now (a SavedModel serializes it fully)
        self.index = tf.lookup.experimental.MutableHashTable(
            key_dtype=spec.id_dtype, value_dtype=tf.int64, default_value=-1, name="id_to_slot")

    # ------------------------------------------------------------------ reading

    def fill_fraction(self) -> tf.Tensor:
        """The fraction of slots that hold a candidate, a float32 scalar."""
        return tf.cast(self.num_filled, tf.float32) / float(self.spec.size)

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        """Slots holding `ids`, int32 of the same shape, -1 where an id is not cached."""
        return tf.cast(self.index.lookup(self.spec.check_ids(ids)), tf.int32)

    def gather(self, slots: tf.Tensor) -> Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]:
        """`(features {name: [*S, ...]}, embeddings [*S, d], ids [*S])` of `slots` (any shape
        S)."""
        features = {k: tf.gather(v, slots) for k, v in self.features.items()}
        return features, tf.gather(self.embeddings, slots), tf.gather(self.ids, slots)

    def slot_bias(self, masked_slots: Optional[tf.Tensor] = None) -> tf.Tensor:
        """`[N]` float32: 0 for filled slots, `-inf` for empty ones and `masked_slots`."""
        filled = tf.range(self.spec.size, dtype=tf.int64) < self.num_filled
        bias = tf.where(filled, 0.0, NEG_INF)
        if masked_slots is not None:
            masked_slots = tf.reshape(masked_slots, [-1])
            masked_slots = fifo.rows_where(masked_slots, masked_slots >= 0)
            bias = tf.tensor_scatter_nd_update(
                bias, masked_slots[:, None], tf.fill(tf.shape(masked_slots), NEG_INF))
        return bias

    def random_filled_slots(self, num_slots: int, seed: tf.Tensor) -> tf.Tensor:
        """`min(num_slots, filled)` distinct filled slots, uniformly at random, int64 `[R']`.

        Each slot gets a stateless uniform key from `seed` (`[2]` int) and the `num_slots`
        largest keys among the filled slots win (`top_k` over N keys). With
        `num_slots >= size` every filled slot is chosen, in slot order.
        """
        num_slots = checks.integer("num_slots", num_slots, 0)
        if num_slots >= self.spec.size:
            return tf.range(self.num_filled, dtype=tf.int64)
        if num_slots < 1:
            return tf.zeros([0], tf.int64)
        keys = tf.random.stateless_uniform([self.spec.size], seed, dtype=tf.float32)
        filled = tf.range(self.spec.size, dtype=tf.int64) < self.num_filled
        keys = tf.where(filled, keys, -1.0)
        top = tf.math.top_k(keys, k=num_slots, sorted=True)
        return fifo.rows_where(tf.cast(top.indices, tf.int64), top.values >= 0.0)

    # ------------------------------------------------------------------ writing

    def checked(self, update: CacheUpdate):
        """`(insert, written, checks)` of `update`, checked against the spec (the arguments
        of `plan`)."""
        spec, checks_, insert = self.spec, [], None
        if update.insert_ids is not None:
            ids = spec.check_ids(update.insert_ids, "candidate_ids")
            embeddings = spec.check_embeddings(update.insert_embeddings, "candidate embeddings")
            features = spec.check_features(update.insert_features)
            num_rows = tf.shape(embeddings, out_type=tf.int64)[0]
            checks_.append(checks.same_rows(ids, num_rows, "`candidate_ids`",
                                            "candidate embeddings"))
            checks_ += [checks.same_rows(v, num_rows, f"feature `{k}` of `candidate_features`",
                                         "candidates") for k, v in features.items()]
            insert = (features, embeddings, ids)
        written = []
        for slots, rows, valid, what in (
                (update.write_back_slots, update.write_back_embeddings, update.write_back_valid,
                 "write-back embeddings"),
                (update.refresh_slots, update.refresh_embeddings, None, "refreshed embeddings")):
            if slots is None:
                continue
            rows = spec.check_embeddings(rows, what)
            slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
            checks_.append(checks.same_rows(rows, tf.size(slots), f"`{what}`", "slots"))
            valid = tf.ones_like(slots, tf.bool) if valid is None else tf.reshape(valid, [-1])
            written.append((slots, rows, valid, what))
        return insert, written, checks_


    def plan(self, insert: Optional[tuple], written: List[tuple], checks_: List,
             advance: bool) -> Writes:
        """Every write of one update of this store, after `checks_` and the finiteness of
        every row; reads, never writes.

        Args:
          insert: `(features, embeddings [M, d], ids [M])` checked against the spec, or None.
          written: `[(slots [W] int64, embeddings [W, d], valid [W] bool, what)]`, embedding
            writes in order of precedence (a slot written twice keeps the first row); rows of
            empty slots, of invalid rows, and of slots the insert rewrites are dropped.
          checks_: checks (ops) that must pass before the rows are read.
          advance: whether a non-empty update advances the store's step.
        """
        checks_ = list(checks_)
        if insert is not None:
            features, embeddings, ids = insert
            embeddings = checks.finite(embeddings, "`embeddings to insert`")
            checks_.append(embeddings)
        written = [(s, checks.finite(r, f"`{what}`"), v) for s, r, v, what in written]
        checks_ += [r for _, r, _ in written]
        with tf.control_dependencies(checks_):
            if insert is not None:
                plan = fifo.plan_insert(ids, lambda x: self.index.lookup(x), self.cursor,
                                        self.num_filled, self.spec.size)
                insert_ids = tf.gather(ids, plan.rows)
                insert_features = {k: tf.gather(v, plan.rows) for k, v in features.items()}
                insert_embeddings = tf.cast(tf.gather(embeddings, plan.rows),
                                            self.spec.embedding_dtype)
                new_ids = tf.gather(ids, plan.new_rows)
                num_rows = tf.size(ids, out_type=tf.int64)
            else:
                plan = fifo.empty_plan(self.cursor, self.num_filled)
                insert_ids, new_ids = (tf.zeros([0], self.spec.id_dtype),) * 2
                insert_features = {k: tf.zeros([0, *s.shape.as_list()], s.dtype)
                                   for k, s in self.spec.feature_spec.items()}
                insert_embeddings = tf.zeros([0, self.spec.embedding_dim],
                                             self.spec.embedding_dtype)
                num_rows = tf.constant(1, tf.int64)
            # Embedding-only writes: filled slots the insert does not rewrite or evict.
            touched = tf.sort(plan.slots)
            slots, rows, seen = [], [], tf.zeros([0], tf.int64)
            for s, r, v in written:
                keep = tf.logical_and(v, s < self.num_filled)
                keep = tf.logical_and(keep, tf.logical_not(_in_sorted(touched, s)))
                keep = tf.logical_and(keep, tf.logical_not(_in_sorted(tf.sort(seen), s)))
                s, r = fifo.rows_where(s, keep), fifo.rows_where(r, keep)
                slots.append(s)
                rows.append(tf.cast(r, self.spec.embedding_dtype))
                seen = tf.concat([seen, s], 0)
            slots = tf.concat(slots, 0) if slots else tf.zeros([0], tf.int64)
            rows = (tf.concat(rows, 0) if rows
                    else tf.zeros([0, self.spec.embedding_dim], self.spec.embedding_dtype))
            evicted_ids = tf.gather(self.ids, plan.evicted_slots)
        advance_by = tf.cast(num_rows > 0, tf.int64) if advance else tf.constant(0, tf.int64)
        writes = Writes(
            checks=checks_, slots=slots, embeddings=rows, insert_slots=plan.slots,
            insert_features=insert_features, insert_embeddings=insert_embeddings,
            insert_ids=insert_ids, evicted_ids=evicted_ids, new_ids=new_ids,
            new_slots=plan.new_slots, cursor=plan.cursor, num_filled=plan.num_filled,
            advance=advance_by)
        writes.checks = checks_ + tf.nest.flatten(writes.tensors())
        return writes

    def apply(self, writes: Writes) -> None:
        """Applies planned writes: scatters only, nothing that checks or can fail on data."""
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
        self.step.assign_add(writes.advance)

    def write(self, update: CacheUpdate, advance: bool = False) -> None:
        """A transaction of this store alone (no replicas): `plan` then `apply`."""
        writes = self.plan(*self.checked(update), advance)
        with tf.control_dependencies(writes.checks):
            self.apply(writes)

    def insert(self, features, embeddings, ids) -> None:
        """Inserts candidates (`{name: [M, ...]}`, `[M, d]`, `[M]`; FIFO over distinct ids,
        `tfnegcache.fifo`); `step` does not advance. A bad row raises before anything is
        written."""
        self.write(CacheUpdate(features, embeddings, ids))

    def load_own_variables(self, store) -> None:
        """Keras's `.keras` / `.weights.h5` loading (`load_model`, `load_weights`): the
        variables, then the id index they imply (the format keeps variables only)."""
        super().load_own_variables(store)
        self.rebuild_index()

    def set_weights(self, weights) -> None:
        """`tf.keras.layers.Layer.set_weights`, then the id index the new ids imply."""
        super().set_weights(weights)
        self.rebuild_index()

    def rebuild_index(self) -> None:
        """Rebuilds the id index from `ids` and `num_filled` (after a restore from a format
        that keeps variables only)."""
        keys, _ = self.index.export()
        self.index.remove(keys)
        filled = self.num_filled.read_value()
        self.index.insert(self.ids[:filled], tf.range(filled, dtype=tf.int64))
