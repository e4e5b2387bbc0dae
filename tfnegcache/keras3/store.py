"""`CacheStore`: the variables of one Keras 3 cache and the id index over them.

A store reads its own variables, plans a step's writes into them (`plan`: reads only; every
check is a `(message, ok)` pair for the step's guard) and applies a plan (`apply`: scatters
only). Every shape is fixed by the batch: a row that must not be written (a duplicate, an
invalid draw, a masked write of a skipped step) is sent to the spare row `size`, which every
per-slot variable has and nothing reads. That keeps the step free of dynamic shapes, so it
compiles with `jax.jit` (and XLA on TensorFlow) and runs unchanged on an accelerator.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import keras
from keras import ops
from keras.src.backend.common import global_state

from tfnegcache import _args
from tfnegcache.keras3 import _backend, fifo, index
from tfnegcache.keras3.spec import CacheSpec

NEG_INF = float("-inf")

Check = Tuple[str, object]   # (what is wrong when it fails, bool scalar: passes)


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
      refresh_valid: `[R]` bool, False for rows not to write (None: all).
    """

    insert_features: Optional[Dict[str, object]] = None
    insert_embeddings: Optional[object] = None
    insert_ids: Optional[object] = None
    write_back_slots: Optional[object] = None
    write_back_embeddings: Optional[object] = None
    write_back_valid: Optional[object] = None
    refresh_slots: Optional[object] = None
    refresh_embeddings: Optional[object] = None
    refresh_valid: Optional[object] = None

    def arrays(self) -> Dict[str, object]:
        """The fields as a dict (a pytree of tensors and Nones)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class Writes:
    """A planned update of one store: the scatters `CacheStore.apply` performs.

    `checks` must pass before any of it is applied: on TensorFlow the step's guard asserts
    them; under JAX `masked(ok)` sends every write to the spare row when they do not.
    """

    checks: List[Check]
    slots: object             # [S] int32: every embedding write (inserted, written back, refreshed)
    embeddings: object        # [S, d]
    insert_slots: object      # [G] int32: feature/id writes of the insert
    insert_features: Dict[str, object]
    insert_ids: object        # [G]
    index_ids: object         # [N]: the id index after the update
    index_slots: object       # [N]
    cursor: object
    num_filled: object
    advance: object           # int32 0 or 1: how far the store's step moves

    def masked(self, ok, spare: int) -> "Writes":
        """These writes if `ok` (a bool scalar), else writes that change nothing."""
        keep = lambda slots: ops.where(ok, slots, spare)  # noqa: E731
        return dataclasses.replace(
            self, slots=keep(self.slots), insert_slots=keep(self.insert_slots),
            advance=ops.where(ok, self.advance, 0))


def _finite(rows, what: str) -> Check:
    return (f"{what} has NaN or Inf (non-finite values)",
            ops.all(ops.isfinite(ops.cast(rows, "float32"))))


class CacheStore(keras.layers.Layer):
    """The state of `spec.size` cache slots: features, embeddings, ids, per-slot steps, and
    the id index.

    Variables (non-trainable): `feature_<name>` `[N + 1, ...]`, `embeddings` `[N + 1, d]`,
    `ids` `[N + 1]` int32, `inserted_at` and `updated_at` `[N + 1]` int32 (the store's step
    at which a slot's candidate was inserted and its embedding last written); row N is the
    spare that absorbs masked writes (it keeps its initial zeros and is never read). `index_ids` / `index_slots` `[N]` (the sorted id index,
    `tfnegcache.keras3.index`), `num_filled`, `cursor` (the ring's next slot) and `step`.
    Slots `[0, num_filled)` are filled. All are weights: `save_weights` keeps the whole
    cache, index included.
    """

    def __init__(self, spec: CacheSpec, name: str, **kwargs) -> None:
        kwargs.pop("trainable", None)
        super().__init__(name=name, trainable=False, **kwargs)
        self.spec = spec
        rows = spec.size + 1

        def variable(var_name, shape, dtype, fill=0):
            return self.add_weight(shape=shape, dtype=dtype, trainable=False, name=var_name,
                                   initializer=keras.initializers.Constant(fill),
                                   autocast=False)

        self.features = {key: variable(f"feature_{key}", (rows, *s.shape), s.dtype)
                         for key, s in spec.feature_spec.items()}
        self.embeddings = variable("embeddings", (rows, spec.embedding_dim),
                                   spec.embedding_dtype)
        self.ids = variable("ids", (rows,), "int32", -1)
        self.inserted_at = variable("inserted_at", (rows,), "int32")
        self.updated_at = variable("updated_at", (rows,), "int32")
        self.index_ids = variable("index_ids", (spec.size,), "int32", index.EMPTY)
        self.index_slots = variable("index_slots", (spec.size,), "int32", -1)
        self.num_filled = variable("num_filled", (), "int32")
        self.cursor = variable("cursor", (), "int32")
        self.step = variable("step", (), "int32")
        self.built = True
        self._write_fn = None
        self._messages = {}

    @property
    def spare(self) -> int:
        """The spare row: masked writes go there; it is never read."""
        return self.spec.size

    def store_variables(self) -> list:
        """Every variable of the store, in a fixed order."""
        return [*self.features.values(), self.embeddings, self.ids, self.inserted_at,
                self.updated_at, self.index_ids, self.index_slots, self.num_filled,
                self.cursor, self.step]

    # ------------------------------------------------------------------ reading

    def fill_fraction(self):
        """The fraction of slots that hold a candidate, a float32 scalar."""
        return ops.cast(self.num_filled.value, "float32") / float(self.spec.size)

    def lookup(self, ids):
        """Slots holding `ids` (int32, any shape), -1 where an id is not cached."""
        return index.lookup(self.index_ids.value, self.index_slots.value,
                            ops.cast(ids, "int32"))

    def gather(self, slots):
        """`(features {name: [*S, ...]}, embeddings [*S, d], ids [*S])` of `slots`."""
        features = {k: ops.take(v.value, slots, axis=0) for k, v in self.features.items()}
        return (features, ops.take(self.embeddings.value, slots, axis=0),
                ops.take(self.ids.value, slots, axis=0))

    def slot_bias(self, masked_slots=None):
        """`[N]` float32: 0 for filled slots, `-inf` for empty ones and `masked_slots`
        (int32, any shape; negative entries mask nothing)."""
        size = self.spec.size
        filled = ops.arange(size, dtype="int32") < self.num_filled.value
        bias = ops.where(filled, 0.0, NEG_INF)
        if masked_slots is not None:
            masked_slots = ops.reshape(masked_slots, [-1])
            positions = ops.where(masked_slots >= 0, masked_slots, size)
            bias = ops.scatter_update(
                ops.concatenate([bias, ops.zeros([1])], 0), ops.expand_dims(positions, -1),
                ops.full(_backend.shape(positions), NEG_INF))[:size]
        return bias

    def random_filled_slots(self, num_slots: int, key):
        """`(slots [R], valid [R])`: `R = min(num_slots, size)` distinct slots drawn uniformly
        from the filled ones (`valid` False past the number filled). Each slot gets a uniform
        key and the R largest among the filled win."""
        num_slots = _args.integer("num_slots", num_slots, 0)
        size = self.spec.size
        count = min(num_slots, size)
        if count == 0:
            return ops.zeros([0], "int32"), ops.zeros([0], "bool")
        filled = ops.arange(size, dtype="int32") < self.num_filled.value
        if count == size:
            return ops.arange(size, dtype="int32"), filled
        keys = ops.where(filled, _backend.uniform([size], key), -1.0)
        values, slots = ops.top_k(keys, count, sorted=True)
        return ops.cast(slots, "int32"), values >= 0.0

    # ------------------------------------------------------------------ writing

    def plan(self, update: CacheUpdate, advance: bool) -> Writes:
        """Every write of `update` and the checks that must pass first; reads, never writes.

        Embedding writes take precedence in order: the insert, then the write-back, then the
        refresh (a slot written twice keeps the first row); rows for empty slots and invalid
        rows are dropped.

        Raises:
          ValueError: at trace time, for rows that do not match the spec.
        """
        spec, checks = self.spec, []
        size, dim = spec.size, spec.embedding_dim
        num_filled = self.num_filled.value
        cursor = self.cursor.value
        if update.insert_ids is not None and update.insert_ids.shape[0] != 0:   # None: dynamic
            ids, id_check = spec.check_ids(update.insert_ids, "candidate_ids")
            embeddings = spec.check_embeddings(update.insert_embeddings, "candidate embeddings")
            rows = _backend.static_rows(embeddings)
            features = spec.check_features(update.insert_features, rows)
            for check in (id_check,
                          _backend.same_rows(ids, rows if rows is not None else _backend.shape(
                              embeddings)[0], "`candidate_ids`", "candidate embeddings")):
                if check is not None:
                    checks.append(check)
            checks.append(_finite(embeddings, "`embeddings to insert`"))
            insert = fifo.plan_insert(ids, self.lookup, cursor, num_filled, size)
            insert_slots = insert.slots
            insert_features = {k: ops.take(v, insert.rows, axis=0) for k, v in features.items()}
            insert_ids = ops.take(ids, insert.rows)
            insert_embeddings = ops.take(embeddings, insert.rows, axis=0)
            evicted = ops.logical_and(insert.is_new, insert.slots < num_filled)
            evicted_ids = ops.take(self.ids.value, ops.where(evicted, insert.slots, size))
            index_ids, index_slots = index.update(
                self.index_ids.value, self.index_slots.value, evicted_ids, evicted,
                insert.ids, insert.slots, insert.is_new)
            next_cursor, next_filled = insert.cursor, insert.num_filled
            touched_slots = ops.where(insert.slots < size, insert.slots, -1)
            num_rows = _backend.num_rows(ids)
        else:
            insert_slots = ops.zeros([0], "int32")
            insert_features = {k: ops.zeros((0, *s.shape), s.dtype)
                               for k, s in spec.feature_spec.items()}
            insert_ids = ops.zeros([0], "int32")
            insert_embeddings = ops.zeros([0, dim], spec.embedding_dtype)
            index_ids, index_slots = self.index_ids.value, self.index_slots.value
            next_cursor, next_filled = cursor, num_filled
            touched_slots = ops.zeros([0], "int32")
            num_rows = 1 if update.insert_ids is None else 0
        # Embedding-only writes, in order of precedence.
        slots, rows, valid = [], [], []
        for s, r, v, what in (
                (update.write_back_slots, update.write_back_embeddings, update.write_back_valid,
                 "write-back embeddings"),
                (update.refresh_slots, update.refresh_embeddings, update.refresh_valid,
                 "refreshed embeddings")):
            if s is None:
                continue
            r = spec.check_embeddings(r, what)
            s = ops.cast(ops.reshape(s, [-1]), "int32")
            check = _backend.same_rows(
                r, _backend.static_rows(s) if _backend.static_rows(s) is not None
                else _backend.shape(s)[0], f"`{what}`", "slots")
            if check is not None:
                checks.append(check)
            v = ops.ones(_backend.shape(s), "bool") if v is None else ops.reshape(v, [-1])
            checks.append(_finite(r, f"`{what}`"))
            slots.append(s)
            rows.append(ops.cast(r, spec.embedding_dtype))
            valid.append(v)
        if slots:
            slots = ops.concatenate(slots, 0)
            rows = ops.concatenate(rows, 0)
            valid = ops.concatenate(valid, 0)
            valid = ops.logical_and(valid, ops.logical_and(slots >= 0, slots < num_filled))
            if touched_slots.shape[0] != 0:
                touched = ops.sort(touched_slots)
                at = ops.minimum(ops.cast(ops.searchsorted(touched, slots), "int32"),
                                 _backend.num_rows(touched) - 1)
                valid = ops.logical_and(valid, ops.not_equal(ops.take(touched, at), slots))
            valid = fifo.first_occurrences(slots, valid)
            slots = ops.where(valid, slots, size)
            rows = ops.where(ops.expand_dims(valid, -1), rows, ops.zeros_like(rows))
        else:
            slots = ops.zeros([0], "int32")
            rows = ops.zeros([0, dim], spec.embedding_dtype)
        advance_by = ops.cast(ops.convert_to_tensor(num_rows) > 0, "int32") if advance \
            else ops.convert_to_tensor(0, "int32")
        return Writes(
            checks=checks,
            slots=ops.concatenate([insert_slots, slots], 0),
            embeddings=ops.concatenate(
                [ops.cast(insert_embeddings, spec.embedding_dtype), rows], 0),
            insert_slots=insert_slots, insert_features=insert_features, insert_ids=insert_ids,
            index_ids=index_ids, index_slots=index_slots,
            cursor=next_cursor, num_filled=next_filled, advance=advance_by)

    def apply(self, writes: Writes) -> None:
        """Applies planned writes: scatters and assigns only.

        Rows sent to the spare row carry its current content, so the spare never changes:
        a masked (skipped) update leaves every variable bit-identical.
        """
        stamp = self.step.value
        spare = self.spare

        def scatter(variable, slots, rows):
            to_spare = ops.reshape(ops.equal(slots, spare),
                                   (-1,) + (1,) * (len(variable.shape) - 1))
            current = ops.expand_dims(variable.value[spare], 0)
            _backend.scatter_rows(variable, slots,
                                  ops.where(to_spare, current, ops.cast(rows, variable.dtype)))

        for key, variable in self.features.items():
            scatter(variable, writes.insert_slots, writes.insert_features[key])
        scatter(self.ids, writes.insert_slots, writes.insert_ids)
        scatter(self.inserted_at, writes.insert_slots,
                ops.full(_backend.shape(writes.insert_slots), stamp, "int32"))
        scatter(self.embeddings, writes.slots, writes.embeddings)
        scatter(self.updated_at, writes.slots, ops.full(_backend.shape(writes.slots), stamp, "int32"))
        # A masked update's index, cursor and fill are the current ones (`masked`).
        self.index_ids.assign(writes.index_ids)
        self.index_slots.assign(writes.index_slots)
        self.cursor.assign(writes.cursor)
        self.num_filled.assign(writes.num_filled)
        self.step.assign(self.step.value + writes.advance)

    def masked(self, writes: Writes, ok) -> Writes:
        """`writes` if `ok`, else writes that leave every variable as it is."""
        masked = writes.masked(ok, self.spare)
        return dataclasses.replace(
            masked,
            index_ids=ops.where(ok, writes.index_ids, self.index_ids.value),
            index_slots=ops.where(ok, writes.index_slots, self.index_slots.value),
            cursor=ops.where(ok, writes.cursor, self.cursor.value),
            num_filled=ops.where(ok, writes.num_filled, self.num_filled.value))

    # ------------------------------------------------------------------ eager writes

    def _write_now(self, arrays, advance: bool, messages: dict):
        """Plans and applies `arrays` (a `CacheUpdate`'s fields), masked unless every check
        passes; returns the checks' flags `[C]` and records their messages in `messages`."""
        writes = self.plan(CacheUpdate(**arrays), advance)
        messages[(_signature(arrays), advance, len(writes.checks))] = [
            what for what, _ in writes.checks]
        flags = (ops.stack([ok for _, ok in writes.checks]) if writes.checks
                 else ops.ones([0], "bool"))
        self.apply(self.masked(writes, ops.all(flags)))
        return flags

    def write(self, update: CacheUpdate, advance: bool = False) -> None:
        """One transaction outside a training step (insert, warm start, refresh), compiled
        once per shape: applied only if every check passes.

        Raises:
          ValueError: a check failed (the message names it); nothing was written.
        """
        arrays = update.arrays()
        advance = bool(advance)
        if _backend.is_jax():
            writer = _jax_writer(self)
            values, flags = writer.compiled([v.value for v in self.store_variables()], arrays,
                                            advance)
            for variable, value in zip(self.store_variables(), values):
                variable.assign(value)
            messages = writer.messages
        else:
            if self._write_fn is None:
                import tensorflow as tf  # pylint: disable=import-outside-toplevel
                # Traced per shape (no relaxed shapes): the spec's checks stay static. The
                # write is backend-neutral code, jitted as it is on JAX: nothing in it for
                # AutoGraph to convert (converting it took seconds per process).
                self._write_fn = {flag: tf.function(
                    lambda arrays, flag=flag: self._write_now(arrays, flag, self._messages),
                    autograph=False)
                    for flag in (False, True)}
            flags = self._write_fn[advance](arrays)
            messages = self._messages
        flags = ops.convert_to_numpy(flags)
        if not flags.all():
            key = (_signature(arrays), advance, len(flags))
            failed = [m for m, ok in zip(messages[key], flags) if not ok]
            raise ValueError(f"{failed[0]}; nothing was written to the cache {self.name!r}.")

    def insert(self, features, embeddings, ids) -> None:
        """Inserts candidates (`{name: [M, ...]}`, `[M, d]`, `[M]`; FIFO over distinct ids,
        `tfnegcache.keras3.fifo`); `step` does not advance. A bad row raises ValueError
        before anything is written."""
        if hasattr(ids, "numpy") or hasattr(ids, "__array__"):
            ids = ops.convert_to_numpy(ids)
        ids, _ = self.spec.check_ids(ids)
        if not isinstance(features, dict):
            features = self.spec.check_features(features)   # raises with the expected keys
        features = {k: v for k, v in features.items() if k in self.spec.feature_spec}
        self.spec.check_features(features, _backend.static_rows(ops.convert_to_tensor(
            embeddings)))
        self.write(CacheUpdate(features, embeddings, ids))


class _JaxWriter:
    """The compiled write of every store with one spec: a pure function of the store's
    variable values, traced through a template store of that spec whose variables are never
    allocated (what `plan` and `apply` read is the spec and the mapped variables only).
    Sharing it saves a compilation per cache."""

    def __init__(self, spec: CacheSpec):
        import jax  # pylint: disable=import-outside-toplevel
        self.messages = {}
        # Variables made in a stateless scope are never allocated: every one is mapped.
        with keras.StatelessScope(initialize_variables=False):
            template = CacheStore(spec, name="template")
        variables = template.store_variables()
        # ... and never: Keras would allocate them at the next stateless scope's exit.
        pending = global_state.get_global_attribute("uninitialized_variables", [])
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if all(v is not t for t in variables)])

        def write_fn(values, arrays, advance):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                flags = template._write_now(arrays, advance, self.messages)  # pylint: disable=protected-access
            return [scope.get_current_value(v) for v in variables], flags

        self.compiled = jax.jit(write_fn, donate_argnums=(0,), static_argnums=(2,))


_JAX_WRITERS: Dict[str, _JaxWriter] = {}


def _jax_writer(store: "CacheStore") -> _JaxWriter:
    key = repr(sorted(store.spec.config().items()))
    if key not in _JAX_WRITERS:
        _JAX_WRITERS[key] = _JaxWriter(store.spec)
    return _JAX_WRITERS[key]


def _signature(arrays):
    """Which fields of a compiled write are given (its checks depend on that, and on how many
    shapes are dynamic, which the number of checks tells)."""
    return tuple((k, v is not None) for k, v in sorted(arrays.items()))
