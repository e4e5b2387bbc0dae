"""`ShardedNegativeCache`: one cache shard per replica, drawn from as their exact union."""

import os
from typing import List, Optional

import tensorflow as tf

from tfnegcache import distribute, sampling
from tfnegcache.cache import Cache, draw_seed, refresh_seed, when_true
from tfnegcache.negatives import CacheNegatives
from tfnegcache.spec import CacheSpec
from tfnegcache.store import CacheStore, CacheUpdate, Writes


class ShardedNegativeCache(Cache):
    """A negative cache split over the replicas of a `tf.distribute` strategy.

    Replica r holds its own `size` slots (a shard, a `CacheStore` of plain variables on its
    device, with its own id index), so the cache drawn from is the union of
    `num_replicas * size` slots while memory per replica stays that of `size`. A slot's
    address is `replica * size + slot`.

    The draw over the union is exact (docs/algorithm.md, "Many replicas"): every replica
    scores the all-gathered global batch of queries against its shard and returns its local
    Gumbel-Max winner, its perturbed score and the shard's log-mass; each query takes the
    shard with the largest perturbed score (the max of independent Gumbel-Max winners over
    disjoint sets is a Gumbel-Max winner over their union). Each replica inserts its own
    batch into its own shard; write-backs are all-gathered and each shard keeps the rows of
    its own slots.

    Not supported: `top_m`, uniform draws and logQ with in-batch negatives (each needs a
    cross-shard merge). Every replica must get the same batch size (`drop_remainder=True`).
    Warm-start each of `shards` with its own part of the candidates (`refresh.warm_start`).
    Under `MultiWorkerMirroredStrategy` add `ShardedCacheBackup` beside `BackupAndRestore`.

    Args: as `NegativeCache`; `size` is per replica.

    Example:

    >>> strategy = tf.distribute.MirroredStrategy()
    >>> with strategy.scope():
    ...     cache = tfnegcache.ShardedNegativeCache(
    ...         size=1024, feature_spec={"title": tf.TensorSpec([], tf.string)},
    ...         embedding_dim=4, id_dtype=tf.string)
    >>> len(cache.shards) == strategy.num_replicas_in_sync
    True
    """

    supports_uniform = supports_top_m = supports_logq = False

    def __init__(self, size: int, feature_spec, embedding_dim: int,
                 id_dtype: tf.DType = tf.int64, embedding_dtype: tf.DType = tf.float32,
                 seed: int = 0, block_size: Optional[int] = None,
                 name: str = "negative_cache", scoring_dtype: Optional[tf.DType] = None,
                 **kwargs) -> None:
        kwargs.pop("trainable", None)   # never trainable (get_config carries it)
        super().__init__(name=name, trainable=False, **kwargs)
        self.spec = CacheSpec.build(size, feature_spec, embedding_dim, id_dtype,
                                    embedding_dtype, seed, block_size, scoring_dtype)
        self.shards: List[CacheStore] = []
        for r, device in enumerate(distribute.shard_devices()):
            with distribute.local_variables(device):
                self.shards.append(CacheStore(self.spec, name=f"{name}_shard_{r}"))

    def stores(self) -> List[CacheStore]:
        return list(self.shards)

    def local_shard(self) -> CacheStore:
        """The shard the current replica owns (shard 0 outside a replica context)."""
        if not distribute.in_replica_context():
            return self.shards[0]
        return self.shards[distribute.replica_id() % len(self.shards)]

    def step_counter(self) -> tf.Variable:
        return self.local_shard().step

    def fill_fraction(self) -> tf.Tensor:
        """Fraction of the union's slots in use (all-reduced in replica context)."""
        if not distribute.in_replica_context():
            filled = tf.add_n([tf.cast(s.num_filled, tf.float32) for s in self.shards])
            return filled / float(self.spec.size * len(self.shards))
        filled = distribute.all_reduce_sum(tf.cast(self.local_shard().num_filled, tf.float32))
        return filled / float(self.spec.size * distribute.num_replicas())

    def _local_draw(self, queries, num_samples, temperature, masked_ids, excluded_ids, seed):
        """This replica's shard scored against the global batch's queries, and which of the
        global rows are this replica's."""
        queries = self.spec.check_queries(queries)
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
        masked = shard.lookup(gather(masked_ids)) if masked_ids is not None else None
        excluded = shard.lookup(gather(excluded_ids)) if excluded_ids is not None else None
        inv_temperature = 1.0 / temperature if temperature is not None else 1.0
        plan = sampling.plan_sampler(self.spec.size, self.spec.embedding_dim,
                                     global_queries.shape[0], self.spec.block_size,
                                     num_heads=sampling.query_heads(global_queries))
        local = sampling.sample_cache(global_queries, shard.embeddings, shard.slot_bias(masked),
                                      inv_temperature, num_samples, seed,
                                      excluded_slots=excluded, plan=plan,
                                      scoring_dtype=self.spec.scoring_dtype,
                                      scattered_bias=masked_ids is not None)
        # [R, B_global] -> this replica's rows [R, B].
        log_masses = tf.gather(distribute.all_stack(local.log_mass), rows, axis=1)
        return shard, local, rows, log_masses

    def log_mass(self, queries, temperature=None, masked_ids=None, excluded_ids=None,
                 top_m=None) -> tf.Tensor:
        if top_m is not None:
            raise ValueError("`top_m` is not supported with a ShardedNegativeCache.")
        _, _, _, log_masses = self._local_draw(queries, 1, temperature, masked_ids,
                                               excluded_ids, None)
        return tf.reduce_logsumexp(log_masses, axis=0)

    def draw(self, queries, num_samples: int, temperature=None, masked_ids=None,
             excluded_ids=None, seed=None, top_m=None) -> CacheNegatives:
        """The exact draw over the union of the shards, for this replica's queries (see
        `Cache.draw`); slots are union addresses. The masked ids are the global batch's."""
        if top_m is not None:
            raise ValueError("`top_m` is not supported with a ShardedNegativeCache.")
        if seed is None:
            seed = draw_seed(self.spec.seed, self.step_counter(), 0)
        shard, local, rows, log_masses = self._local_draw(
            queries, num_samples, temperature, masked_ids, excluded_ids, seed)
        log_mass = tf.reduce_logsumexp(log_masses, axis=0)
        features, stale, _ = shard.gather(local.slots)
        stacked = {
            "perturbed": local.perturbed,
            # This shard's draw probability, as a probability over the union: a shard wins a
            # draw with probability exp(shard log-mass - union log-mass).
            "log_prob": local.log_prob + local.log_mass[:, None],
            "slots": tf.cast(local.slots, tf.int64) + distribute.replica_id() * self.spec.size,
            "stale": stale, **{f"features/{k}": v for k, v in features.items()},
        }
        # [R, B, k, ...]: every shard's winner for this replica's queries.
        stacked = {k: tf.gather(distribute.all_stack(v), rows, axis=1)
                   for k, v in stacked.items()}
        owner = tf.argmax(stacked["perturbed"], axis=0, output_type=tf.int32)  # [B, k]
        num_rows = tf.shape(rows)[0]
        b, k = tf.meshgrid(tf.range(num_rows), tf.range(num_samples), indexing="ij")
        at_owner = tf.stack([owner, b, k], axis=-1)
        # [R, B, k, ...] -> [B * k, ...]: each draw's row from its winning shard.
        picked = {key: tf.gather_nd(v, at_owner) for key, v in stacked.items()}
        features = {key: tf.reshape(picked[f"features/{key}"], [-1, *spec.shape.as_list()])
                    for key, spec in self.spec.feature_spec.items()}
        has_mass = tf.math.is_finite(log_mass)
        log_prob = tf.where(has_mass[:, None], picked["log_prob"] - log_mass[:, None], 0.0)
        valid = tf.broadcast_to(has_mass[:, None], tf.shape(log_prob))
        return CacheNegatives(tf.reshape(picked["slots"], [-1]), features,
                              tf.reshape(picked["stale"], [-1, self.spec.embedding_dim]),
                              log_prob, valid, log_mass)

    def refresh_candidates(self, num_slots: int):
        """This replica's random refresh: slots of its own shard, as union addresses."""
        shard = self.local_shard()
        slots = shard.random_filled_slots(num_slots, refresh_seed(self.spec.seed, shard.step))
        features, _, _ = shard.gather(slots)
        return slots + distribute.replica_id() * self.spec.size, features

    def prepare(self, update: CacheUpdate, advance_step: bool = True) -> Writes:
        """The local shard's writes: this replica's inserts, the rows of every replica's
        write-back that address this shard, and this replica's refresh."""
        insert, written, checks_ = self.local_shard().checked(update)
        offset = distribute.replica_id() * self.spec.size
        local = []
        for slots, rows, valid, what in written:
            if what == "write-back embeddings":
                slots, rows, valid = (distribute.all_gather(x) for x in (slots, rows, valid))
            mine = tf.logical_and(valid, tf.equal(slots // self.spec.size,
                                                  offset // self.spec.size))
            local.append((slots % self.spec.size, rows, mine, what))
        return self.local_shard().plan(insert, local, checks_, advance_step)

    def commit(self, writes: Writes, when: Optional[tf.Tensor] = None) -> None:
        when_true(when, lambda: self.local_shard().apply(writes))

    def insert(self, features, embeddings, ids) -> None:
        """Inserts into the current replica's shard (shard 0 outside a replica context)."""
        self.update(CacheUpdate(features, embeddings, ids), advance_step=False)

    def get_config(self):
        config = super().get_config()
        config.update(self.spec.config())
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**CacheSpec.arguments_from_config(config))


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

    Example:

    >>> backup_dir = "/tmp/tfnegcache_backup"
    >>> callbacks = [tf.keras.callbacks.BackupAndRestore(backup_dir),
    ...              tfnegcache.ShardedCacheBackup(backup_dir)]
    >>> callbacks[1].backup_dir
    '/tmp/tfnegcache_backup'

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
