"""`ShardedNegativeCache`: one cache shard per replica, drawn from as their exact union."""

import os
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from tfnegcache import distribute
from tfnegcache.cache import (CacheNegatives, CacheUpdate, NegativeCache, _Writes,
                              spec_from_config)


class ShardedNegativeCache(tf.keras.layers.Layer):
    """A negative cache split over the replicas of a `tf.distribute` strategy.

    Replica r holds its own `size` slots (a shard), so the cache sampled from is the union of
    `num_replicas * size` slots while memory per replica stays that of `size`. The shards are
    plain variables on their replica's device, each a `NegativeCache` with its own id index
    (`shards`), and checkpoint as separate variables.

    The draw over the union is exact (docs/algorithm.md, "Many replicas"): every replica scores
    the all-gathered global batch of queries against its shard and returns its local
    Gumbel-Max winner with its perturbed score and the shard's log-mass; all-gathering those,
    each query takes the shard with the largest perturbed score (the max of independent
    Gumbel-Max winners over disjoint sets is a Gumbel-Max winner over their union), and the
    log-mass is the logsumexp over shards. Each replica inserts its own batch into its own
    shard; write-backs of re-encoded negatives are all-gathered and each shard keeps the rows
    of its own slots. A slot's address is `replica * size + slot`.

    Same interface as `NegativeCache` for a `CacheRetrieval` task and
    `CachedRetrievalModel`; not supported: `top_m` and logQ with in-batch negatives (both
    need a cross-shard merge), and `warm_start` (warm-start each of `shards` instead). Every
    replica must get the same batch size (`drop_remainder=True`). Under
    `MultiWorkerMirroredStrategy` add `ShardedCacheBackup` beside `BackupAndRestore`.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy()
    >>> with strategy.scope():
    ...     cache = tfnegcache.ShardedNegativeCache(
    ...         size=65536, feature_spec={"movie_title": tf.TensorSpec([], tf.string)},
    ...         embedding_dim=32, id_dtype=tf.string)
    >>> len(cache.shards) == strategy.num_replicas_in_sync
    True
    """

    def __init__(self, size: int, feature_spec, embedding_dim: int,
                 id_dtype: tf.DType = tf.int64, embedding_dtype: tf.DType = tf.float32,
                 seed: int = 0, block_size: Optional[int] = None,
                 name: str = "negative_cache", scoring_dtype: Optional[tf.DType] = None,
                 **kwargs) -> None:
        """Creates one empty shard of `size` slots per local replica (arguments as in
        `NegativeCache`; `size` is per replica)."""
        kwargs.pop("trainable", None)   # a cache is never trainable (get_config has it)
        super().__init__(name=name, trainable=False, **kwargs)
        self.shards: List[NegativeCache] = []
        for r, device in enumerate(distribute.shard_devices()):
            with distribute.local_variables(device):
                shard = NegativeCache(size, feature_spec, embedding_dim, id_dtype,
                                      embedding_dtype, seed, block_size, name=f"{name}_shard_{r}",
                                      scoring_dtype=scoring_dtype)
            shard._per_replica = True  # pylint: disable=protected-access
            self.shards.append(shard)
        first = self.shards[0]
        self.size, self.embedding_dim = first.size, first.embedding_dim
        self.feature_spec, self.id_dtype = first.feature_spec, first.id_dtype
        self.embedding_dtype, self.seed, self.block_size = (
            first.embedding_dtype, first.seed, first.block_size)
        self.scoring_dtype = first.scoring_dtype

    def check_features(self, features, num_rows=None, what: str = "candidate_features"):
        return self.shards[0].check_features(features, num_rows, what)

    def check_embeddings(self, embeddings, what: str = "embeddings"):
        return self.shards[0].check_embeddings(embeddings, what)

    def check_queries(self, queries, what: str = "query_embeddings"):
        return self.shards[0].check_queries(queries, what)

    def check_ids(self, ids, what: str = "candidate_ids"):
        return self.shards[0].check_ids(ids, what)

    def local_shard(self) -> NegativeCache:
        """The shard the current replica owns (shard 0 outside a replica context)."""
        if not distribute.in_replica_context():
            return self.shards[0]
        return self.shards[distribute.replica_id() % len(self.shards)]

    def local_caches(self) -> List[NegativeCache]:
        return list(self.shards)

    def check_sampling(self, top_m: Optional[int], sampling_mode: str = "gumbel") -> None:
        if sampling_mode != "gumbel":
            raise ValueError(
                "A ShardedNegativeCache draws by Gumbel-Max over the union of its shards; "
                "uniform draws over the union are not implemented. Received: "
                f"sampling={sampling_mode!r}; use a NegativeCache.")
        if top_m is not None:
            raise ValueError(
                "`top_m` is not supported with a sharded cache (it needs a cross-shard merge "
                f"of the per-shard top m, which is not implemented). Received: top_m={top_m!r}"
                " with a ShardedNegativeCache; use a NegativeCache.")

    def lookup(self, ids: tf.Tensor) -> tf.Tensor:
        raise ValueError(
            "`candidate_sampling_probability` (logQ) with in-batch negatives needs to know "
            "which in-batch candidates the whole cache holds, which a sharded cache cannot "
            "answer locally (not implemented). Received a ShardedNegativeCache; use a "
            "NegativeCache, or use_in_batch_negatives=False, or no logQ.")

    def fill_fraction(self) -> tf.Tensor:
        """Fraction of the union's slots in use (all-reduced in replica context)."""
        if not distribute.in_replica_context():
            filled = tf.add_n([tf.cast(s.num_filled, tf.float32) for s in self.shards])
            return filled / float(self.size * len(self.shards))
        filled = distribute.all_reduce_sum(tf.cast(self.local_shard().num_filled, tf.float32))
        return filled / float(self.size * distribute.num_replicas())

    def begin_step(self) -> None:
        for shard in self.shards:
            shard.begin_step()

    def draw(self, queries: tf.Tensor, num_samples: int, temperature: Optional[float] = None,
             masked_ids: Optional[tf.Tensor] = None, excluded_ids: Optional[tf.Tensor] = None,
             draw: bool = True, top_m: Optional[int] = None) -> CacheNegatives:
        """The exact draw over the union of the shards, for this replica's queries.

        Every replica scores the global batch's queries (all-gathered) against its shard.
        The masked ids are the global batch's, so a candidate of any replica's batch is never
        drawn from the cache. Arguments and result as in `NegativeCache.draw`; the slots are
        union addresses (`replica * size + slot`). Queries may be `[B, d]` or `[B, H, d]`
        (maxsim over heads): the gather keeps every head, so each shard scores as one cache.
        """
        self.check_sampling(top_m)
        queries = self.check_queries(queries)
        shard = self.local_shard()
        num_rows = tf.shape(queries)[0]
        rows = tf.range(num_rows) + distribute.replica_id() * num_rows
        global_queries = distribute.all_gather(queries)
        same_batch = tf.debugging.assert_equal(
            tf.shape(global_queries)[0], num_rows * distribute.num_replicas(),
            message="The sharded negative cache needs the same batch size on every replica "
                    "(batch with drop_remainder=True).")
        with tf.control_dependencies([same_batch]):
            global_queries = tf.identity(global_queries)
        gather = lambda x: distribute.all_gather(x) if x is not None else None  # noqa: E731
        local = shard.sample(global_queries, num_samples=num_samples, temperature=temperature,
                             masked_ids=gather(masked_ids), excluded_ids=gather(excluded_ids),
                             draw=draw)
        # [R, B_global] -> this replica's rows [R, B].
        log_masses = tf.gather(distribute.all_stack(local.log_mass), rows, axis=1)
        log_mass = tf.reduce_logsumexp(log_masses, axis=0)
        if not draw:
            return CacheNegatives(log_mass=log_mass)

        features, stale, _ = shard.gather(local.slots)
        stacked = {
            "perturbed": local.perturbed,
            "slots": tf.cast(local.slots, tf.int64) + distribute.replica_id() * self.size,
            "stale": stale, **{f"features/{k}": v for k, v in features.items()},
        }
        # [R, B, k, ...]: every shard's winner for this replica's queries.
        stacked = {k: tf.gather(distribute.all_stack(v), rows, axis=1)
                   for k, v in stacked.items()}
        owner = tf.argmax(stacked["perturbed"], axis=0, output_type=tf.int32)  # [B, k]
        b, k = tf.meshgrid(tf.range(num_rows), tf.range(num_samples), indexing="ij")
        at_owner = tf.stack([owner, b, k], axis=-1)
        # [R, B, k, ...] -> [B * k, ...]: each draw's row from its winning shard.
        picked = {key: tf.gather_nd(v, at_owner) for key, v in stacked.items()}
        features = {key: tf.reshape(picked[f"features/{key}"], [-1, *spec.shape.as_list()])
                    for key, spec in self.feature_spec.items()}
        return CacheNegatives(log_mass, tf.reshape(picked["slots"], [-1]), features,
                              tf.reshape(picked["stale"], [-1, self.embedding_dim]))

    def refresh_candidates(self, num_slots: int) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
        """This replica's random refresh: slots of its own shard, as union addresses."""
        slots, features = self.local_shard().refresh_candidates(num_slots)
        return slots + distribute.replica_id() * self.size, features

    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> _Writes:
        """The local shard's writes: this replica's inserts, the rows of every replica's
        write-back that address this shard, and this replica's refresh."""
        offset = distribute.replica_id() * self.size
        local = CacheUpdate(update.insert_features, update.insert_embeddings, update.insert_ids)
        if update.write_back_slots is not None:
            slots = distribute.all_gather(tf.cast(tf.reshape(update.write_back_slots, [-1]),
                                                  tf.int64))
            valid = update.write_back_valid
            if valid is None:
                valid = tf.ones_like(update.write_back_slots, tf.bool)
            valid = distribute.all_gather(tf.reshape(valid, [-1]))
            mine = tf.logical_and(valid, tf.equal(slots // self.size, offset // self.size))
            local.write_back_slots = slots % self.size
            local.write_back_embeddings = distribute.all_gather(update.write_back_embeddings)
            local.write_back_valid = mine
        if update.refresh_slots is not None:
            local.refresh_slots = tf.cast(update.refresh_slots, tf.int64) - offset
            local.refresh_embeddings = update.refresh_embeddings
        return self.local_shard().prepare(local, advance_step)

    def commit(self, writes: _Writes) -> None:
        self.local_shard().commit(writes)

    # The same transaction as NegativeCache's, over this type's prepare and commit.
    update = NegativeCache.update

    def insert(self, features, embeddings, ids) -> None:
        """Inserts into the current replica's shard (shard 0 outside a replica context)."""
        self.local_shard().insert(features, embeddings, ids)

    def refresh_all(self, encoder, batch_size: int = 1024) -> int:
        """Re-encodes every filled slot of every shard; returns the count."""
        return sum(shard.refresh_all(encoder, batch_size) for shard in self.shards)

    def warm_start(self, *args, **kwargs) -> int:
        raise ValueError(
            f"warm_start fills one cache, but {self.name!r} is a ShardedNegativeCache: "
            "warm-start each of `cache.shards` with its own part of the candidates instead.")

    def get_config(self):
        config = super().get_config()
        config.update(self.shards[0].get_config())
        config["name"] = self.name
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**spec_from_config(config))


class ShardedCacheBackup(tf.keras.callbacks.Callback):
    """Backs up and restores each worker's own shards of sharded caches, beside
    `tf.keras.callbacks.BackupAndRestore`.

    Under `MultiWorkerMirroredStrategy`, `BackupAndRestore` saves the chief's checkpoint only
    and restores every worker from it: a worker's shards (its own, unmirrored variables)
    would come back as the chief's. This callback writes every worker's shards (variables
    and id index) to `<backup_dir>/cache_shards/worker-<index>` at each epoch end, restores
    them at train begin when that backup exists, and deletes it when training completes, as
    `BackupAndRestore` does with its own. List it *after* `BackupAndRestore`, with the same
    `backup_dir`, so its restore runs after the chief's:

    ```python
    callbacks = [tf.keras.callbacks.BackupAndRestore(backup_dir),
                 tfnegcache.ShardedCacheBackup(backup_dir)]
    ```

    Replicated caches need nothing beyond `BackupAndRestore` (every copy is the same).
    """

    def __init__(self, backup_dir: str):
        super().__init__()
        self.backup_dir = backup_dir

    def _manager(self):
        caches = [layer for layer in self.model._flatten_layers(include_self=False)  # pylint: disable=protected-access
                  if isinstance(layer, ShardedNegativeCache)]
        if not caches:
            return None
        checkpoint = tf.train.Checkpoint(caches=[list(c.shards) for c in caches])
        directory = os.path.join(self.backup_dir, "cache_shards",
                                 f"worker-{distribute.worker_index()}")
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)

    def on_train_begin(self, logs=None):
        self._checkpoints = self._manager()
        if self._checkpoints is not None and self._checkpoints.latest_checkpoint:
            self._checkpoints.checkpoint.restore(
                self._checkpoints.latest_checkpoint).assert_existing_objects_matched()

    def on_epoch_end(self, epoch, logs=None):
        if self._checkpoints is not None:
            self._checkpoints.save(checkpoint_number=epoch)

    def on_train_end(self, logs=None):
        if self._checkpoints is not None:
            tf.io.gfile.rmtree(self._checkpoints.directory)
