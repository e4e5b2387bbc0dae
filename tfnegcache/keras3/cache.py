"""`NegativeCache`: the Keras 3 negative cache (one store, `tfnegcache.keras3.store`), with the
draws a task asks of it and the transaction a training step writes through.

One training step asks its cache for a draw (`draw`, `draw_uniform`, or `log_mass` in
evaluation), then writes into it once (docs/algorithm.md, step 6): `prepare` computes every
row the step writes and every check of them, reading only; `commit` only scatters.
"""

from typing import Optional

from keras import ops

from tfnegcache import _args
from tfnegcache._plan import plan_sampler
from tfnegcache.keras3 import _backend, refresh, sampling
from tfnegcache.keras3.negatives import CacheNegatives
from tfnegcache.keras3.spec import CacheSpec
from tfnegcache.keras3.store import CacheStore, CacheUpdate, Writes

# Folded into the cache seed so each use of randomness has a stream of its own.
_DRAW_STREAM, _REFRESH_STREAM = 0x6E6567, 0x726566


class NegativeCache(CacheStore):
    """A fixed-size store of candidates to sample hard negatives from (Keras 3).

    Each of the `size` slots holds a candidate's features (enough for the candidate tower to
    re-encode it), its embedding as computed at some earlier step (stale) and its id. Scoring
    a batch of queries against every slot is one pass over the `[size, d]` embeddings, a tile
    at a time, with no tower work. Writes are O(batch) scatters applied as one checked
    transaction; inserts are FIFO over distinct ids (`tfnegcache.keras3.fifo`). The state is
    Keras variables (non-trainable weights of the model that holds the cache), on the JAX and
    the TensorFlow backends alike.

    Args:
      size: N, the number of slots.
      feature_spec: `{name: (per-candidate shape, dtype)}` of numeric features (a
        `FeatureSpec`, `tf.TensorSpec` or `jax.ShapeDtypeStruct` works too).
      embedding_dim: d, the candidate tower's output size.
      embedding_dtype: storage of the embeddings ("float32"; "bfloat16"/"float16" halve it).
      seed: the draws are a function of (seed, step, draw index).
      block_size: the sampler's block size in [1, size]; None chooses it from the shapes.
      name: the layer's name.

    Ids are int32 (below 2**31 - 1) on both backends.

    Example:

    >>> cache = tfnegcache.keras3.NegativeCache(
    ...     size=1024, feature_spec={"movie_id": ((), "int32")}, embedding_dim=4)
    >>> ids = np.array([7, 9], "int32")
    >>> cache.insert({"movie_id": ids}, np.ones([2, 4], "float32"), ids)
    >>> cache.draw(np.ones([3, 4], "float32"), num_samples=2).slots.shape
    (6,)
    """

    def __init__(self, size: int, feature_spec, embedding_dim: int,
                 embedding_dtype: str = "float32", seed: int = 0,
                 block_size: Optional[int] = None, name: str = "negative_cache",
                 **kwargs) -> None:
        spec = CacheSpec.build(size, feature_spec, embedding_dim, embedding_dtype, seed,
                               block_size)
        super().__init__(spec, name=name, **kwargs)

    # The spec's fields, read directly (`cache.size`, `cache.feature_spec`, ...).
    size = property(lambda self: self.spec.size)
    feature_spec = property(lambda self: self.spec.feature_spec)
    embedding_dim = property(lambda self: self.spec.embedding_dim)
    embedding_dtype = property(lambda self: self.spec.embedding_dtype)
    seed = property(lambda self: self.spec.seed)
    block_size = property(lambda self: self.spec.block_size)

    def get_config(self):
        config = super().get_config()
        config.update(self.spec.config())
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("trainable", None)
        config.pop("dtype", None)
        return cls(**config)

    def covers(self, ids):
        """`[n]` bool: whether the cache holds each id."""
        return self.lookup(ids) >= 0

    def draw_key(self, index: int):
        """The key of draw `index` of the training step at the cache's current step:
        reproducible, and never shared with evaluation or the refresh."""
        root = _backend.key(self.spec.seed, _DRAW_STREAM)
        return _backend.fold_in(_backend.fold_in(root, self.step.value), index)

    def refresh_key(self):
        """The key of the random refresh at the cache's current step."""
        return _backend.fold_in(_backend.key(self.spec.seed, _REFRESH_STREAM), self.step.value)

    # ------------------------------------------------------------------ drawing

    def _masks(self, masked_ids, excluded_ids):
        masked = self.lookup(masked_ids) if masked_ids is not None else None
        excluded = self.lookup(excluded_ids) if excluded_ids is not None else None
        return self.slot_bias(masked), excluded

    def sample(self, queries, num_samples: int = 1, temperature: Optional[float] = None,
               masked_ids=None, excluded_ids=None, key=None) -> sampling.SlotDraw:
        """The draw of `draw` as slots `[B, k]` with the log-mass and log-probability
        (`sampling.SlotDraw`); arguments as in `draw`."""
        num_samples = _args.integer("num_samples", num_samples, 1)
        queries = self.spec.check_queries(queries)
        bias, excluded = self._masks(masked_ids, excluded_ids)
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        if key is None:
            key = self.draw_key(0)
        plan = plan_sampler(self.spec.size, self.spec.embedding_dim, queries.shape[0],
                            self.spec.block_size)
        return sampling.sample_cache(queries, self.embeddings.value, bias, inv_temperature,
                                     num_samples, key, excluded_slots=excluded, plan=plan)

    def log_mass(self, queries, temperature=None, masked_ids=None, excluded_ids=None):
        """`[B]` the log-mass of the cached scores eligible for each query (no draw)."""
        queries = self.spec.check_queries(queries)
        bias, excluded = self._masks(masked_ids, excluded_ids)
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        plan = plan_sampler(self.spec.size, self.spec.embedding_dim, queries.shape[0],
                            self.spec.block_size)
        return sampling.sample_cache(queries, self.embeddings.value, bias, inv_temperature, 1,
                                     None, excluded_slots=excluded, plan=plan).log_mass

    def draw(self, queries, num_samples: int, temperature=None, masked_ids=None,
             excluded_ids=None, key=None) -> CacheNegatives:
        """k negatives per query from the softmax over the cached scores.

        Args:
          queries: `[B, d]`.
          num_samples: k.
          temperature: T; None is 1.
          masked_ids: ids never drawn for any query (in-batch candidates that are also
            negatives).
          excluded_ids: `[B]`, an id never drawn for query i (its positive).
          key: the draw's key; None: `draw_key(0)`.
        """
        result = self.sample(queries, num_samples, temperature, masked_ids, excluded_ids, key)
        slots = ops.reshape(result.slots, [-1])
        features, stale, _ = self.gather(slots)
        valid = ops.broadcast_to(ops.expand_dims(ops.isfinite(result.log_mass), -1),
                                 _backend.shape(result.log_prob))
        return CacheNegatives(slots, features, stale, result.log_prob, valid, result.log_mass)

    def draw_uniform(self, num_queries: int, num_samples: int, masked_ids=None,
                     excluded_ids=None, key=None) -> CacheNegatives:
        """k slots per query uniformly, with replacement, over the filled slots: no scoring
        (mixed negative sampling's draw). A draw on a slot ineligible for its query (masked,
        or its own excluded id) is not valid."""
        num_samples = _args.integer("num_samples", num_samples, 1)
        if key is None:
            key = self.draw_key(0)
        filled = self.num_filled.value
        uniform = _backend.uniform((num_queries, num_samples), key)
        slots = ops.minimum(ops.cast(uniform * ops.cast(filled, "float32"), "int32"),
                            ops.maximum(filled - 1, 0))
        bias, excluded = self._masks(masked_ids, excluded_ids)
        valid = ops.isfinite(ops.take(bias, slots))
        if excluded is not None:
            valid = ops.logical_and(valid, ops.not_equal(slots, ops.expand_dims(excluded, -1)))
        log_prob = ops.full((num_queries, num_samples),
                            -ops.log(ops.cast(ops.maximum(filled, 1), "float32")))
        flat = ops.reshape(slots, [-1])
        features, stale, _ = self.gather(flat)
        return CacheNegatives(flat, features, stale, log_prob, valid)

    def refresh_candidates(self, num_slots: int):
        """This step's random refresh: `(slots [R], valid [R], their features)`."""
        slots, valid = self.random_filled_slots(num_slots, self.refresh_key())
        features, _, _ = self.gather(slots)
        return slots, valid, features

    # ------------------------------------------------------------------ the transaction

    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> Writes:
        """Every write of `update` and its checks; writes nothing (see `CacheStore.plan`)."""
        return self.plan(update, advance_step)

    def commit(self, writes: Writes) -> None:
        """Applies prepared writes: scatters only."""
        self.apply(writes)

    def update(self, update: Optional[CacheUpdate] = None, advance_step: bool = True) -> None:
        """`prepare` then `commit` as one checked transaction (eagerly, outside a training
        step). Raises ValueError with nothing changed if a check fails."""
        self.write(update if update is not None else CacheUpdate(), advance_step)

    def write_embeddings(self, slots, embeddings, valid=None) -> None:
        """Overwrites the embeddings of `slots` `[M]` with `embeddings` `[M, d]` (rows with
        `valid` False, and empty slots, are skipped); `step` does not advance."""
        self.write(CacheUpdate(write_back_slots=slots, write_back_embeddings=embeddings,
                               write_back_valid=valid))

    def refresh(self, slots, encoder) -> None:
        """Re-encodes `slots` from their cached features with `encoder` (no gradient)."""
        refresh.refresh_slots(self, slots, encoder)

    def refresh_all(self, encoder, batch_size: int = 1024) -> int:
        """Re-encodes every filled slot, `batch_size` per encoder call; returns the count."""
        return refresh.refresh_all(self, encoder, batch_size)

    def warm_start(self, dataset, candidate_model, id_key: str = "id",
                   batch_size: int = 1024) -> int:
        """Fills the cache from a candidate table before training; returns rows read (see
        `refresh.warm_start`)."""
        return refresh.warm_start(self, dataset, candidate_model, id_key, batch_size)
