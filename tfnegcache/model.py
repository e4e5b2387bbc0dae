"""`CachedRetrievalModel`: a `tfrs.Model` whose training step also keeps its negative caches."""

from typing import Dict, List

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import distribute, restore, step
from tfnegcache._autograph import as_user_code
from tfnegcache.retrieval import CacheRetrieval


def _refuse_jit_compile(value) -> None:
    if value:
        raise ValueError(
            "`jit_compile` must be False or None for a CachedRetrievalModel. Received: "
            f"jit_compile={value!r}. Its caches find cached ids in a hash table "
            "(tf.lookup.experimental.MutableHashTable, ops LookupTableFindV2 and "
            "LookupTableInsertV2), which XLA cannot compile, so the first step would fail. "
            "Compile the model without it, and run the towers under XLA instead: decorate "
            "their computation with `tf.function(jit_compile=True)`.")


class CachedRetrievalModel(tfrs.Model):
    """A `tfrs.Model` whose `train_step` also updates the caches of its `CacheRetrieval` tasks.

    Write it as a `tfrs.Model`: the towers and a `CacheRetrieval` task in `__init__`, and
    `compute_loss`. `train_step` is `tfnegcache.step.run_step` over that loss: the tasks draw
    negatives and record their cache updates, every write is prepared and checked, and only
    then do the optimizer and the caches change. A failed check raises
    `tf.errors.InvalidArgumentError` naming what was wrong, with every weight, optimizer slot
    and cache as before the step. `evaluate` and `predict` never draw or change a cache.
    Training logs add `cache_staleness` (mean `||e - v||^2 / ||v||^2` of the re-encoded
    negatives) and `cache_fill`. The caches' variables are model weights; `load_weights`
    checks a saved cache's spec before restoring and rebuilds its id index after.

    Example:

    >>> class Model(tfnegcache.CachedRetrievalModel):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.users = tf.keras.layers.Embedding(10, 4)
    ...         self.items = tf.keras.layers.Embedding(100, 4)
    ...         self.task = tfnegcache.CacheRetrieval(
    ...             cache=tfnegcache.NegativeCache(
    ...                 64, {"item": tf.TensorSpec([], tf.int64)}, embedding_dim=4),
    ...             candidate_model=lambda f: self.items(f["item"]))
    ...     def compute_loss(self, batch, training=False):
    ...         item = batch["item"]
    ...         return self.task(self.users(batch["user"]), self.items(item),
    ...                          candidate_ids=item, candidate_features={"item": item})
    >>> model = Model()
    >>> model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     {"user": tf.range(32) % 10, "item": tf.range(32, dtype=tf.int64)}).batch(8)
    >>> sorted(model.fit(data, epochs=1, verbose=0).history)[:2]
    ['cache_fill', 'cache_staleness']
    """

    def cache_tasks(self) -> List[CacheRetrieval]:
        """The model's `CacheRetrieval` tasks that have a cache.

        Raises:
          ValueError: two tasks share one cache (their updates would corrupt it).
        """
        tasks = [layer for layer in self._flatten_layers(include_self=False)
                 if isinstance(layer, CacheRetrieval) and layer.cache is not None]
        owners = {}
        for task in tasks:
            other = owners.setdefault(id(task.cache), task)
            if other is not task:
                raise ValueError(
                    f"The tasks {other.name!r} and {task.name!r} share the cache "
                    f"{task.cache.name!r}: each would plan its inserts from the same state "
                    "in every step, and the cache would be corrupted. Give each "
                    "CacheRetrieval task its own cache.")
        return tasks

    def compile(self, *args, **kwargs):
        """`tf.keras.Model.compile`, refusing first what cannot train: two tasks sharing one
        cache, and `jit_compile=True` (see `jit_compile`)."""
        # jit_compile is compile's 8th parameter.
        _refuse_jit_compile(kwargs.get("jit_compile", args[7] if len(args) > 7 else None))
        self.cache_tasks()   # refuses shared caches before anything is built
        return super().compile(*args, **kwargs)

    @property
    def jit_compile(self):
        """False: the caches' id index is a hash table, which XLA cannot compile, so the
        training and evaluation steps cannot be XLA-compiled as a whole. Setting it True raises
        ValueError; compile the towers with XLA instead (`tf.function(jit_compile=True)` on
        their computation)."""
        return super().jit_compile

    @jit_compile.setter
    def jit_compile(self, value):
        _refuse_jit_compile(value)
        tfrs.Model.jit_compile.fset(self, value)

    def compile_from_config(self, config: dict) -> None:
        """What `tf.keras.models.load_model` calls to compile a loaded `.keras` model: as
        `tf.keras.Model`'s, which skips models that override `compile` (this one checks its
        tasks there), so that the optimizer and its state come back too."""
        self.compile(**tf.keras.saving.deserialize_keras_object(config))
        if isinstance(self.optimizer, tf.keras.optimizers.Optimizer) and self.built:
            self.optimizer.build(self.trainable_variables)   # its variables, to be loaded

    def _regularization(self, loss: tf.Tensor) -> tf.Tensor:
        """The sum of the model's regularization losses in the loss's dtype (float64 under
        `set_floatx("float64")`, where TFRS's empty sum would be float32)."""
        return tf.add_n([tf.zeros([], loss.dtype)]
                        + [tf.cast(tf.reduce_sum(l), loss.dtype) for l in self.losses])

    def _cache_logs(self, tasks) -> Dict[str, tf.Tensor]:
        logs = {}
        for task in tasks:
            prefix = "" if len(tasks) == 1 else f"{task.name}/"
            logs[f"{prefix}cache_fill"] = task.cache.fill_fraction()
        return logs

    def train_step(self, inputs):
        tasks = self.cache_tasks()
        parts = {}

        def total_loss():
            parts["loss"] = as_user_code(self.compute_loss)(inputs, training=True)
            parts["regularization"] = self._regularization(parts["loss"])
            return parts["loss"] + parts["regularization"]

        step.run_step(total_loss, lambda: self.trainable_variables, self.optimizer)
        metrics = {metric.name: metric.result() for metric in self.metrics}
        # Each replica's loss covers its share of the global batch (summed, as the gradients).
        metrics["loss"] = distribute.all_reduce_sum(parts["loss"])
        metrics["regularization_loss"] = parts["regularization"]
        metrics["total_loss"] = metrics["loss"] + parts["regularization"]
        metrics.update(self._cache_logs(tasks))
        return metrics

    def test_step(self, inputs):
        loss = tf.convert_to_tensor(as_user_code(self.compute_loss)(inputs, training=False))
        regularization = self._regularization(loss)
        logs = {metric.name: metric.result() for metric in self.metrics}
        logs["loss"] = distribute.all_reduce_sum(loss)
        logs["regularization_loss"] = regularization
        logs["total_loss"] = logs["loss"] + regularization
        for task in self.cache_tasks():
            logs.pop(task.staleness.name, None)
        return logs

    def save_weights(self, filepath, overwrite=True, save_format=None, options=None):
        """`tf.keras.Model.save_weights`, refusing `.h5` for a cache that holds strings (the
        format cannot store them) before anything is written."""
        if restore.is_h5(filepath, save_format):
            restore.check_h5_savable(self, filepath)
        return super().save_weights(filepath, overwrite=overwrite, save_format=save_format,
                                    options=options)

    def load_weights(self, filepath, skip_mismatch=False, by_name=False, options=None):
        """`tf.keras.Model.load_weights`, with every saved cache's spec checked first (a
        mismatch raises ValueError naming both, nothing restored) and the id indexes rebuilt
        after (so formats that keep variables only restore a working cache)."""
        restore.check_checkpoint(self, filepath)
        status = super().load_weights(filepath, skip_mismatch=skip_mismatch, by_name=by_name,
                                      options=options)
        self._rebuild_indexes()
        return status

    def set_weights(self, weights) -> None:
        """`tf.keras.Model.set_weights`, then the caches' id indexes the new ids imply."""
        super().set_weights(weights)
        self._rebuild_indexes()

    def _rebuild_indexes(self) -> None:
        for task in self.cache_tasks():
            for store in task.cache.stores():
                store.rebuild_index()

    @property
    def distribute_reduction_method(self):
        # train_step already reduces its logs over replicas: every replica returns the same.
        return self._distribute_reduction_method or "first"

    @distribute_reduction_method.setter
    def distribute_reduction_method(self, value):
        self._distribute_reduction_method = value
