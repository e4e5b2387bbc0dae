"""`CachedRetrievalModel`: a `tfrs.Model` whose training step also keeps the negative cache."""

import contextlib
from typing import Dict, List

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import checks, distribute, restore
from tfnegcache.retrieval import CacheRetrieval


class CachedRetrievalModel(tfrs.Model):
    """A `tfrs.Model` that updates the negative caches of its `CacheRetrieval` tasks.

    Write it exactly as a `tfrs.Model`: build the towers and a `CacheRetrieval` task in
    `__init__`, and implement `compute_loss`. `train_step` then:

    1. runs `compute_loss` with the tasks in training mode: each draws its negatives from the
       cache, re-encodes them (and its `refresh_per_step` random slots), and records a
       `CacheUpdate`;
    2. computes every write of the step and checks it, reading but not writing: the loss and
       every gradient are finite, every embedding to be written is finite, and row counts
       match (also when the batch dimension is only known at run time);
    3. only then applies the optimizer step and each cache's writes (write-back of the
       re-encoded negatives, FIFO insert of the batch's candidates, the refresh) and
       advances the cache's step.

    A step is all-or-nothing: when a check fails, the step raises
    `tf.errors.InvalidArgumentError` naming what was wrong (e.g. "the gradient of
    `candidate_tower/embedding/embeddings:0` has NaN or Inf"), and every weight, optimizer
    slot, cache variable and the id index are as they were before it. Restore nothing, fix
    the input, and call `fit` again.

    `test_step` (so `evaluate`) and `predict` never draw or change the cache. Besides TFRS's
    `loss`, `regularization_loss` and `total_loss`, training logs carry `cache_staleness`
    (mean `||e - v||^2 / ||v||^2` of the re-encoded negatives over the epoch) and
    `cache_fill` (the fraction of slots in use after the step). The cache's variables are
    weights of the model, so `save_weights`, `tf.train.Checkpoint` and `ModelCheckpoint` keep
    them (see `load_weights` for what a restore checks).
    """

    def cache_tasks(self) -> List[CacheRetrieval]:
        """The model's `CacheRetrieval` tasks that have a cache."""
        return [layer for layer in self._flatten_layers(include_self=False)
                if isinstance(layer, CacheRetrieval) and layer.cache is not None]

    @contextlib.contextmanager
    def _tasks_in_training(self, tasks):
        for task in tasks:
            task.in_train_step = True
        try:
            yield
        finally:
            for task in tasks:
                task.in_train_step = False

    def _cache_logs(self, tasks) -> Dict[str, tf.Tensor]:
        logs = {}
        for task in tasks:
            prefix = "" if len(tasks) == 1 else f"{task.name}/"
            logs[f"{prefix}cache_fill"] = task.cache.fill_fraction()
        return logs

    def train_step(self, inputs):
        tasks = self.cache_tasks()
        for task in tasks:
            task.cache.begin_step()
        with tf.GradientTape() as tape:
            with self._tasks_in_training(tasks):
                loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum([tf.reduce_sum(l) for l in self.losses])
            total_loss = loss + regularization_loss
        gradients = tape.gradient(total_loss, self.trainable_variables)

        # One transaction (docs/algorithm.md step 6): every write of the step is computed and
        # checked before the first one is applied; after that nothing can fail on the data.
        writes = []
        for task in tasks:
            update = task.pop_update()
            if update is not None:
                writes.append((task.cache, task.cache.prepare(update)))
        guards = [checks.finite(total_loss, "the loss")]
        guards += [checks.finite(g, f"the gradient of `{v.name}`")
                   for g, v in zip(gradients, self.trainable_variables) if g is not None]
        for _, prepared in writes:
            guards += prepared.checks
        with tf.control_dependencies(guards):
            applied = self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        with tf.control_dependencies(guards + ([applied] if applied is not None else [])):
            for cache, prepared in writes:
                cache.commit(prepared)

        metrics = {metric.name: metric.result() for metric in self.metrics}
        # Each replica's loss covers its share of the global batch (summed, as the gradients).
        metrics["loss"] = distribute.all_reduce_sum(loss)
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = metrics["loss"] + regularization_loss
        metrics.update(self._cache_logs(tasks))
        return metrics

    def save_weights(self, filepath, overwrite=True, save_format=None, options=None):
        """`tf.keras.Model.save_weights`, refusing `.h5` for a cache that holds strings (the
        format cannot store them) before anything is written."""
        if restore.is_h5(filepath, save_format):
            restore.check_h5_savable(self, filepath)
        return super().save_weights(filepath, overwrite=overwrite, save_format=save_format,
                                    options=options)

    def load_weights(self, filepath, skip_mismatch=False, by_name=False, options=None):
        """`tf.keras.Model.load_weights`, with the cache checked first and its index rebuilt.

        Before anything is restored, every cache saved in the file is compared with the
        model's (layout, size, feature names, shapes and dtypes, embedding dim and dtype, id
        dtype): a mismatch raises ValueError naming both. After the restore each cache's
        id-to-slot index is rebuilt from its restored ids, so the `.h5` format, which keeps
        variables only, restores a working cache too.
        """
        restore.check_weights_file(self, filepath)
        status = super().load_weights(filepath, skip_mismatch=skip_mismatch, by_name=by_name,
                                      options=options)
        for task in self.cache_tasks():
            for cache in task.cache.local_caches():
                cache.rebuild_index()
        return status

    @property
    def distribute_reduction_method(self):
        # train_step already reduces its logs over replicas: every replica returns the same.
        return self._distribute_reduction_method or "first"

    @distribute_reduction_method.setter
    def distribute_reduction_method(self, value):
        self._distribute_reduction_method = value

    def test_step(self, inputs):
        logs = super().test_step(inputs)
        logs["loss"] = distribute.all_reduce_sum(logs["loss"])
        logs["total_loss"] = logs["loss"] + logs["regularization_loss"]
        for task in self.cache_tasks():
            logs.pop(task.staleness.name, None)
        return logs
