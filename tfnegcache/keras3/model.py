"""`CachedRetrievalModel`: a Keras 3 model whose `train_step` also keeps the negative caches of
its `CacheRetrieval` losses, on JAX and on TensorFlow; `StopOnSkippedStep`, the callback that
stops `fit` when a JAX step had to be skipped."""

import warnings
from typing import Dict, List

import keras
from keras import ops

from tfnegcache.keras3 import _backend, refresh, step
from tfnegcache.keras3.retrieval import CacheRetrieval


class SkippedSteps(keras.metrics.Metric):
    """Counts skipped training steps (its result, per epoch) and remembers the index of the
    failed check of the last one (`cause`, -1 if none). It is metric state, not a weight: a
    skipped step changes no weight."""

    def __init__(self, name="skipped_steps", **kwargs):
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32",
                                       name="count")
        self.cause = self.add_variable(shape=(), initializer=keras.initializers.Constant(-1),
                                       dtype="int32", name="cause")

    def update_state(self, ok, cause=-1):
        ok = ops.convert_to_tensor(ok)
        self.count.assign(self.count.value + 1.0 - ops.cast(ok, "float32"))
        self.cause.assign(ops.where(ok, self.cause.value, ops.cast(cause, "int32")))

    def result(self):
        return ops.convert_to_tensor(self.count.value)

    def reset_state(self):
        self.count.assign(0.0)
        self.cause.assign(-1)


class StopOnSkippedStep(keras.callbacks.Callback):
    """Stops `fit` right after a skipped training step, with a warning naming the cause.

    Under JAX a training step is a jitted function and cannot raise: a step whose loss,
    gradients or cache rows are not finite (or not well-formed) changes nothing and is counted
    in the `skipped_steps` metric. This callback, which `CachedRetrievalModel.fit` adds
    unless one is given, sees the count rise after that very step, sets
    `model.stop_training` and warns with the failed check, e.g.

        the gradient of `model/embedding/embeddings` has NaN or Inf (non-finite values)

    The message is also kept in `model.skipped_step_message`. On TensorFlow such a step
    raises instead, so the count stays 0.

    Args:
      stop: whether to stop `fit` (False: only warn, and keep training).
    """

    def __init__(self, stop: bool = True):
        super().__init__()
        self.stop = bool(stop)
        self._seen = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._seen = 0.0   # the metric counts per epoch

    def on_train_batch_end(self, batch, logs=None):
        skipped = float((logs or {}).get("skipped_steps", 0.0))
        if skipped <= self._seen:
            return
        self._seen = skipped
        cause = self.model.skipped_step_cause()
        message = (f"tfnegcache: training step {batch} of this epoch was skipped: {cause}. "
                   "Weights, optimizer state and caches are as they were before it.")
        if self.stop:
            self.model.stop_training = True
            message += " fit stopped (a jitted JAX step cannot raise)."
        self.model.skipped_step_message = message
        warnings.warn(message, RuntimeWarning, stacklevel=2)


class CachedRetrievalModel(keras.Model):
    """A Keras 3 model whose `train_step` also updates the caches of its `CacheRetrieval`
    losses, as one transaction with the optimizer step.

    Write it as any Keras 3 model (keras-rs's examples do): the towers and a
    `CacheRetrieval` in `__init__`, `call`, and a `compute_loss` that calls the loss with the
    batch's candidate ids and features. `train_step` (per backend) runs loss -> gradients ->
    prepare -> guard -> optimizer -> commit (`tfnegcache.keras3.step`). A failed check:

    - TensorFlow: raises `InvalidArgumentError` naming it; every weight, optimizer slot and
      cache is as before the step;
    - JAX: the step changes nothing, `skipped_steps` counts it and `StopOnSkippedStep`
      (added to every `fit`) stops training with a warning naming it.

    Training logs add `cache_staleness` (mean `||e - v||^2 / ||v||^2` of the re-encoded
    negatives), `cache_fill` and `skipped_steps`. `evaluate` and `predict` never draw or
    change a cache; the caches' variables are model weights (`save_weights` keeps them).

    Example:

    >>> class Model(tfnegcache.keras3.CachedRetrievalModel):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.users = keras.layers.Embedding(10, 4)
    ...         self.items = keras.layers.Embedding(100, 4)
    ...         self.retrieval_loss = tfnegcache.keras3.CacheRetrieval(
    ...             cache=tfnegcache.keras3.NegativeCache(64, {"item": ((), "int32")}, 4),
    ...             candidate_model=lambda f: self.items(f["item"]))
    ...     def call(self, users):
    ...         return self.users(users)
    ...     def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
    ...         return self.retrieval_loss(y_pred, self.items(y), candidate_ids=y,
    ...                                    candidate_features={"item": y})
    >>> model = Model()
    >>> model.compile(optimizer=keras.optimizers.Adagrad(0.1))
    >>> users, items = np.arange(32, dtype="int32") % 10, np.arange(32, dtype="int32")
    >>> sorted(model.fit(users, items, batch_size=8, verbose=0).history)
    ['cache_fill', 'cache_staleness', 'loss', 'skipped_steps']
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped_steps = SkippedSteps()
        self.skipped_step_message = None
        self._check_messages: List[str] = []

    # ------------------------------------------------------------------ the caches

    def cache_tasks(self) -> List[CacheRetrieval]:
        """The model's `CacheRetrieval` losses that have a cache.

        Raises:
          ValueError: two losses share one cache (their updates would corrupt it).
        """
        tasks = [layer for layer in self._flatten_layers(include_self=False)
                 if isinstance(layer, CacheRetrieval) and layer.cache is not None]
        owners = {}
        for task in tasks:
            other = owners.setdefault(id(task.cache), task)
            if other is not task:
                raise ValueError(
                    f"The losses {other.name!r} and {task.name!r} share the cache "
                    f"{task.cache.name!r}: each would plan its inserts from the same state "
                    "in every step, and the cache would be corrupted. Give each "
                    "CacheRetrieval its own cache.")
        return tasks

    def compile(self, *args, **kwargs):
        self.cache_tasks()   # refuses shared caches before anything is built
        return super().compile(*args, **kwargs)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, verbose="auto", callbacks=None,
            **kwargs):
        """`keras.Model.fit`, with a `StopOnSkippedStep` among the callbacks unless one is
        given."""
        callbacks = list(callbacks or [])
        if not any(isinstance(c, StopOnSkippedStep) for c in callbacks):
            callbacks.append(StopOnSkippedStep())
        return super().fit(x, y, batch_size=batch_size, epochs=epochs, verbose=verbose,
                           callbacks=callbacks, **kwargs)

    def skipped_step_cause(self) -> str:
        """The failed check of the last skipped training step (JAX), or "" if none."""
        refresh.sync_training_state(self)
        index = int(ops.convert_to_numpy(self.skipped_steps.cause.value))
        if 0 <= index < len(self._check_messages):
            return self._check_messages[index]
        return ""

    def _cache_logs(self) -> Dict[str, object]:
        tasks = self.cache_tasks()
        return {("" if len(tasks) == 1 else f"{t.name}/") + "cache_fill": t.cache.fill_fraction()
                for t in tasks}

    def _drop_training_only(self, logs):
        for task in self.cache_tasks():
            logs.pop(task.staleness.name, None)
        logs.pop(self.skipped_steps.name, None)
        return logs

    # ------------------------------------------------------------------ the training step

    if _backend.BACKEND == "jax":

        def train_step(self, state, data):
            import jax  # pylint: disable=import-outside-toplevel
            tv, ntv, ov, mv = state
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            traced = {}

            def loss_fn(trainable):
                with step.recording() as record:
                    loss, aux = self.compute_loss_and_updates(
                        trainable, ntv, mv, x, y, sample_weight, training=True,
                        optimizer_variables=ov)
                traced["record"] = record
                # The recorded updates leave the differentiated function as outputs.
                updates = [(u.arrays(), [ok for _, ok in checks])
                           for _, (u, checks), _ in record.updates]
                return loss, (aux, updates)

            (_, (aux, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
            unscaled_loss, y_pred, ntv_forward, mv_forward = aux
            record = traced["record"]
            updates = [(arrays, list(zip([m for m, _ in recorded[1]], oks)))
                       for (_, recorded, _), (arrays, oks) in zip(record.updates, updates)]
            mapping = list(zip(self.non_trainable_variables, ntv_forward))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                prepared = step.prepare(record, updates)
                checks = step.guard(unscaled_loss, grads, self.trainable_variables, prepared)
                ok, cause = step.verdict(checks)
                self._check_messages = [message for message, _ in checks]
                step.commit(prepared, ok)
                logs = self._cache_logs()
            # A skipped step keeps every other non-trainable variable too (e.g. normalisation
            # statistics or seeds the forward pass moved); the caches' writes were masked.
            cached = {id(v) for cache, _ in prepared for v in cache.store_variables()}
            new_ntv = []
            for variable, old in zip(self.non_trainable_variables, ntv):
                value = scope.get_current_value(variable)
                if id(variable) not in cached and value is not old:
                    value = ops.where(ok, value, old)
                new_ntv.append(value)
            tv, ov = jax.lax.cond(
                ok, lambda: tuple(self.optimizer.stateless_apply(ov, grads, tv)),
                lambda: (tv, ov))
            mv = [ops.where(ok, new, old) if new is not old else new
                  for new, old in zip(mv_forward, mv)]
            with keras.StatelessScope(
                    state_mapping=list(zip(self.metrics_variables, mv))) as scope:
                batch = next(i for i in keras.tree.flatten(x) if i is not None).shape[0]
                self._loss_tracker.update_state(
                    ops.where(ok, unscaled_loss, 0.0),
                    sample_weight=ops.where(ok, float(batch), 0.0))
                self.skipped_steps.update_state(ok, cause)
                logs = {**self.compute_metrics(x, y, y_pred, sample_weight), **logs}
            mv = [scope.get_current_value(v) for v in self.metrics_variables]
            return logs, (list(tv), new_ntv, list(ov), mv)

        def test_step(self, state, data):
            logs, state = super().test_step(state, data)
            return self._drop_training_only(logs), state

    else:

        def train_step(self, data):
            import tensorflow as tf  # pylint: disable=import-outside-toplevel
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            with step.recording() as record:
                with tf.GradientTape() as tape:
                    if self._call_has_training_arg:
                        y_pred = self(x, training=True)
                    else:
                        y_pred = self(x)
                    loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                              sample_weight=sample_weight, training=True)
                    scaled = self.optimizer.scale_loss(loss)
            variables = self.trainable_variables
            grads = tape.gradient(scaled, variables)
            prepared = step.prepare(record)
            checks = step.guard(loss, grads, variables, prepared)
            self._check_messages = [message for message, _ in checks]
            guards = [tf.debugging.Assert(ok, [f"{message}; the step changed nothing"])
                      for message, ok in checks]
            with tf.control_dependencies(guards):
                self.optimizer.apply_gradients(
                    [(g, v) for g, v in zip(grads, variables) if g is not None])
            with tf.control_dependencies(guards):
                step.commit(prepared)
            batch = tf.shape(next(i for i in keras.tree.flatten(x) if i is not None))[0]
            self._loss_tracker.update_state(loss, sample_weight=batch)
            self.skipped_steps.update_state(True)
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            logs.update(self._cache_logs())
            return logs

        def test_step(self, data):
            return self._drop_training_only(super().test_step(data))
