"""The strategy collectives the caches use under `tf.distribute` (docs/algorithm.md, "Many
replicas"), and nothing about any cache's layout.

Only the strategy's own collectives are used (`merge_call`, `experimental_local_results`,
`gather`, `reduce`), so the same code runs under `MirroredStrategy` and
`MultiWorkerMirroredStrategy`. Without a strategy every function is the identity (or runs its
function directly). `NegativeCache` (replicated) and `ShardedNegativeCache` (per-replica
shards) build their layouts from these.
"""

import contextlib
from typing import Optional

import tensorflow as tf

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


# ---------------------------------------------------------------------- per-replica storage

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


def _first_local(strategy, value):
    return strategy.experimental_local_results(value)[0]


def run_once(fn, structure) -> None:
    """Runs `fn(structure)` once per worker, in cross-replica context, with the first local
    replica's values: how a write to mirrored variables (and a worker's id table) is applied
    once to every copy. Every replica must pass the same values."""
    ctx = replica_context()
    if ctx is None:
        fn(structure)
        return

    def merge_fn(strategy, value):
        fn(tf.nest.map_structure(lambda x: _first_local(strategy, x), value))

    ctx.merge_call(merge_fn, args=(structure,))


def worker_index() -> int:
    """This worker's index in a multi-worker cluster (0 on one machine)."""
    resolver = getattr(tf.distribute.get_strategy(), "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    return int(task_id or 0)
