"""The negative cache under `tf.distribute` (ALGORITHM.md, "Many replicas").

Two layouts, chosen by `NegativeCache(..., layout=...)`:

- `"replicated"` (default): every replica holds the same `size` slots in mirrored variables.
  Each step's inserts and write-backs are all-gathered across replicas and applied once, in
  cross-replica context (`merge_call`), to every copy; the id-to-slot table (one per worker)
  is updated once. All copies stay identical, and identical to a single device fed the
  global batches.
- `"sharded"`: replica r holds its own `size` slots (a shard; the global cache is the union of
  `num_replicas * size` slots, memory per replica stays `size`). The shards are plain
  variables on each replica's device (one sub-cache per local replica, with its own id
  table), so they checkpoint as separate variables. The draw over the union is exact: every
  replica scores the all-gathered global batch of queries against its shard and returns its
  local Gumbel-Max winner with its perturbed score and the shard's log-mass; all-gathering
  those, each query takes the shard with the largest perturbed score (the max of independent
  Gumbel-Max winners over disjoint sets is a Gumbel-Max winner over their union) and the
  cache's log-mass is the logsumexp over shards. Each replica inserts its own batch into its
  own shard; write-backs of re-encoded negatives are all-gathered and each shard keeps its
  own.

Only the strategy's own collectives are used (`ReplicaContext.all_gather`, `all_reduce`,
`merge_call`), so the same code runs under `MirroredStrategy` and
`MultiWorkerMirroredStrategy`. Without a strategy everything reduces to the single-device
code.
"""

import contextlib
import os
from typing import Optional

import tensorflow as tf

LAYOUTS = ("replicated", "sharded")


def replica_context() -> Optional[tf.distribute.ReplicaContext]:
    """The current replica context under a strategy with more than one replica, else None."""
    if not tf.distribute.has_strategy():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context
        return None
    return ctx


def in_replica_context() -> bool:
    """True inside `strategy.run` (or `fit`'s step) of a non-default strategy."""
    return replica_context() is not None


def replica_id() -> int:
    """The global replica id as a Python int (static in every strategy's replica function)."""
    ctx = replica_context()
    if ctx is None:
        return 0
    value = tf.get_static_value(ctx.replica_id_in_sync_group)
    if value is None:
        raise ValueError("The replica id is not static; tfnegcache's sharded cache needs a "
                         "strategy whose replica functions know their replica id at trace time.")
    return int(value)


def num_replicas() -> int:
    ctx = replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def num_local_replicas(strategy=None) -> int:
    """Replicas on this worker (devices this process drives)."""
    strategy = strategy or tf.distribute.get_strategy()
    if not tf.distribute.has_strategy():
        return 1
    return len(strategy.extended.worker_devices)


def replica_seed(seed: tf.Tensor) -> tf.Tensor:
    """Folds the replica id into a stateless seed, so replicas draw independent noise."""
    if num_replicas() == 1:
        return seed
    return tf.random.experimental.stateless_fold_in(seed, replica_id())


def _gather_merge_fn(strategy, value):
    local = strategy.experimental_local_results(value)
    if len(local) == strategy.num_replicas_in_sync:
        # One worker holds every replica's value: concatenate them (any dtype, strings too).
        return tf.concat(local, axis=0)
    return strategy.gather(value, axis=0)  # across workers: the strategy's collective


def all_gather(value: tf.Tensor) -> tf.Tensor:
    """Concatenation of every replica's `value` along axis 0 (identity without replicas).

    Done in cross-replica context (`merge_call`): every replica reaches its gathers in the same
    order there, so the collectives of one step can never be matched out of order (with
    `ReplicaContext.all_gather`, several gathers per step under load failed with "Shape
    mismatch in the collective instance"). Bools travel as int32 (collectives take numbers);
    across workers, strings are not supported by the collectives.
    """
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    value = tf.convert_to_tensor(value)
    if value.dtype == tf.bool:
        return tf.cast(all_gather(tf.cast(value, tf.int32)), tf.bool)
    return tf.identity(ctx.merge_call(_gather_merge_fn, args=(value,)))


def all_stack(value: tf.Tensor) -> tf.Tensor:
    """Every replica's `value` stacked on a new leading axis `[num_replicas, ...]`."""
    return all_gather(value[None])


def _sum_merge_fn(strategy, value):
    local = strategy.experimental_local_results(value)
    if len(local) == strategy.num_replicas_in_sync:
        return tf.add_n(list(local))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def all_reduce_sum(value: tf.Tensor) -> tf.Tensor:
    """Sum of every replica's `value` (in cross-replica context, as `all_gather`)."""
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return tf.identity(ctx.merge_call(_sum_merge_fn, args=(tf.convert_to_tensor(value),)))


# ---------------------------------------------------------------------- sharded storage

_VARIABLE_ARGS = ("initial_value", "trainable", "name", "dtype", "shape", "constraint",
                  "validate_shape", "caching_device")


@contextlib.contextmanager
def local_variables(device: Optional[str]):
    """Creates variables as plain (not mirrored) variables on `device`, even in a strategy's
    scope: the storage of one shard."""
    from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-import-not-at-top

    def creator(next_creator, **kwargs):  # pylint: disable=unused-argument
        args = {k: kwargs[k] for k in _VARIABLE_ARGS if kwargs.get(k) is not None}
        return resource_variable_ops.ResourceVariable(**args)

    device_scope = tf.device(device) if device else contextlib.nullcontext()
    with device_scope, tf.variable_creator_scope(creator):
        yield


def shard_devices(strategy=None):
    """The devices of this worker's replicas (None for no strategy: one shard, default device)."""
    if not tf.distribute.has_strategy():
        return [None]
    strategy = strategy or tf.distribute.get_strategy()
    return list(strategy.extended.worker_devices)


def local_shard(cache):
    """The shard of a sharded cache that the current replica owns (shard 0 outside replicas)."""
    if replica_context() is None:
        return cache.shards[0]
    return cache.shards[replica_id() % len(cache.shards)]


def sharded_fill_fraction(cache) -> tf.Tensor:
    """Fraction of the union's slots in use (all-reduced in replica context)."""
    if replica_context() is None:
        filled = tf.add_n([tf.cast(s.num_filled, tf.float32) for s in cache.shards])
        total = float(cache.size * len(cache.shards))
    else:
        filled = all_reduce_sum(tf.cast(local_shard(cache).num_filled, tf.float32))
        total = float(cache.size * num_replicas())
    return filled / total


def sharded_draw(cache, queries, num_samples, temperature, masked_ids, excluded_ids, draw):
    """The exact draw over the union of the shards, for this replica's queries.

    Every replica scores the global batch's queries (all-gathered) against its shard. The
    masked ids are the global batch's (`masked_ids` all-gathered), so a candidate of any
    replica's batch is never drawn from the cache.

    Returns:
      `(log_mass [B], slots [B, k], owner [B, k], features {name: [B, k, ...]},
      stale [B, k, d])` for this replica's B queries (`slots` and the rest None when not
      `draw`); `owner` is the replica whose shard holds the drawn slot.
    """
    shard = local_shard(cache)
    num_rows = tf.shape(queries)[0]
    offset = replica_id() * num_rows
    rows = tf.range(num_rows) + offset
    global_queries = all_gather(queries)
    checks = [tf.debugging.assert_equal(
        tf.shape(global_queries)[0], num_rows * num_replicas(),
        message="The sharded negative cache needs the same batch size on every replica "
                "(batch with drop_remainder=True).")]
    with tf.control_dependencies(checks):
        global_queries = tf.identity(global_queries)
    local = shard.sample(
        global_queries, num_samples=num_samples, temperature=temperature,
        masked_ids=all_gather(masked_ids) if masked_ids is not None else None,
        excluded_ids=all_gather(excluded_ids) if excluded_ids is not None else None,
        draw=draw)
    # [R, B_global] -> this replica's rows [R, B].
    log_masses = tf.gather(all_stack(local.log_mass), rows, axis=1)
    log_mass = tf.reduce_logsumexp(log_masses, axis=0)
    if not draw:
        return log_mass, None, None, None, None

    features, stale, _ = shard.gather(local.slots)
    stacked = {
        "perturbed": local.perturbed, "slots": local.slots, "stale": stale,
        **{f"features/{k}": v for k, v in features.items()},
    }
    # [R, B, k, ...]: every shard's winner for this replica's queries.
    stacked = {k: tf.gather(all_stack(v), rows, axis=1) for k, v in stacked.items()}
    owner = tf.argmax(stacked["perturbed"], axis=0, output_type=tf.int32)  # [B, k]

    b, k = tf.meshgrid(tf.range(num_rows), tf.range(num_samples), indexing="ij")
    at_owner = tf.stack([owner, b, k], axis=-1)  # [B, k, 3]

    def pick(value):
        # [R, B, k, ...] -> [B, k, ...]: each draw's row from its winning shard.
        return tf.gather_nd(value, at_owner)

    picked = {k: pick(v) for k, v in stacked.items()}
    features = {k[len("features/"):]: v for k, v in picked.items() if k.startswith("features/")}
    return log_mass, picked["slots"], owner, features, picked["stale"]


# ---------------------------------------------------------------------- applying updates

def apply_update(cache, insert, write_back, refresh=None) -> None:
    """Applies one training step's cache update in any context.

    Args:
      cache: the `NegativeCache`.
      insert: `(features, embeddings, ids)` of this replica's batch, or None.
      write_back: `(slots, embeddings, valid)` (replicated) or `(slots, embeddings, valid,
        owner)` (sharded), this replica's re-encoded negatives, or None.
      refresh: `(num_slots, encoder)` random refresh (`NegativeCache.update`), or None. A
        sharded cache refreshes each shard from its own replica; a replicated one refreshes
        once, in cross-replica context, with the same slots for every copy.
    """
    if cache.layout == "sharded":
        shard = local_shard(cache)
        if write_back is not None:
            slots, fresh, valid, owner = (all_gather(tf.reshape(x, [-1]) if x.shape.rank == 1
                                                     else x) for x in write_back)
            # Every replica's re-encoded negatives; this shard keeps the ones it owns.
            mine = tf.logical_and(valid, tf.equal(owner, replica_id()))
            write_back = (slots, fresh, mine)
        shard.update(insert=insert, write_back=write_back, refresh=refresh)
        return

    ctx = replica_context()
    if ctx is None:
        cache.update(insert=insert, write_back=write_back, refresh=refresh)
        return
    # Replicated: every replica gathers the global update, then it is applied once, in
    # cross-replica context, to every copy (and to the worker's one id table).
    gathered = tf.nest.map_structure(all_gather, (insert, write_back))

    def merge_fn(strategy, update):
        first = lambda x: strategy.experimental_local_results(x)[0]  # noqa: E731
        insert_, write_back_ = tf.nest.map_structure(first, update)
        cache.update(insert=insert_, write_back=write_back_, refresh=refresh)

    ctx.merge_call(merge_fn, args=(gathered,))
    cache._draws_this_step = 0  # pylint: disable=protected-access


def replica_values(variable):
    """Every local copy of a (possibly mirrored) variable, as numpy arrays."""
    values = getattr(variable, "values", None)
    if values is None:
        return [variable.numpy()]
    return [v.numpy() for v in values]


def _worker_index() -> int:
    """This worker's index in a multi-worker cluster (0 on one machine)."""
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    return int(task_id or 0)


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

    def _caches(self):
        from tfnegcache.cache import NegativeCache  # pylint: disable=import-outside-toplevel
        return [layer for layer in self.model._flatten_layers(include_self=False)  # pylint: disable=protected-access
                if isinstance(layer, NegativeCache) and layer.layout == "sharded"]

    def _manager(self):
        caches = self._caches()
        if not caches:
            return None
        checkpoint = tf.train.Checkpoint(caches=[list(c.shards) for c in caches])
        directory = os.path.join(self.backup_dir, "cache_shards", f"worker-{_worker_index()}")
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
