"""One training step with negative caches: loss -> gradients -> prepare -> one guard ->
optimizer -> commit (docs/algorithm.md, step 6).

`run_step` is the step. It opens a `TrainingStep`, the record that the step's
`CacheRetrieval` tasks find with `current()`: a task numbers its draws with it and records
the cache update it asks for. After the gradients, every recorded update is prepared (every
row computed and checked, nothing written); the loss, every gradient and every prepared row
must be finite and well-formed before the optimizer or any cache changes. A failed check
raises with nothing changed.

`CachedRetrievalModel.train_step` is `run_step` over the model's loss; a custom training
loop calls `run_step` with its own loss function, variables and optimizer.
"""

import contextlib
import contextvars
from typing import Callable

import tensorflow as tf

from tfnegcache import checks, loss_scale
from tfnegcache._autograph import as_user_code

# The step's record is pure Python, shared with the Keras 3 front end.
from tfnegcache._record import TrainingStep, current, recording  # noqa: F401

_IN_BATCH_ONLY = contextvars.ContextVar("tfnegcache_in_batch_only", default=False)


@contextlib.contextmanager
def in_batch_only():
    """Inside, `CacheRetrieval` tasks ignore their caches and act as `tfrs.tasks.Retrieval`
    (what `tfnegcache.cost.measure_cost` times the cache against)."""
    token = _IN_BATCH_ONLY.set(True)
    try:
        yield
    finally:
        _IN_BATCH_ONLY.reset(token)


def caches_ignored() -> bool:
    """Whether `in_batch_only` is in force."""
    return _IN_BATCH_ONLY.get()


def apply(step: TrainingStep, loss: tf.Tensor, gradients, variables, optimizer):
    """Prepares the step's cache updates, then applies the gradients and the updates behind
    one guard: the loss, every gradient and every prepared row must pass their checks first.

    Under a loss-scale optimizer with a dynamic scale (`mixed_float16`), non-finite gradients
    do not fail the step: the optimizer skips it and lowers its scale, and the caches are
    then not written either (`tfnegcache.loss_scale`). `gradients` are the unscaled ones.

    Returns:
      The optimizer's update op (or None).
    """
    prepared = [(cache, cache.prepare(update)) for cache, update, _ in step.updates]
    guards = [checks.finite(loss, "the loss")]
    if not loss_scale.skips_non_finite(optimizer):
        guards += [checks.finite(g, f"the gradient of `{v.name}`")
                   for g, v in zip(gradients, variables) if g is not None]
    for _, writes in prepared:
        guards += writes.checks
    with tf.control_dependencies(guards):
        # `applied`: None, or whether a loss-scale optimizer applied (it skips non-finite
        # gradients).
        update, applied = loss_scale.apply_gradients(optimizer, gradients, variables)
    with tf.control_dependencies(guards + [t for t in (update, applied) if t is not None]):
        for cache, writes in prepared:
            cache.commit(writes, when=applied)
    return update


def run_step(compute_loss: Callable[[], tf.Tensor], variables, optimizer) -> tf.Tensor:
    """One all-or-nothing training step of a loss whose `CacheRetrieval` tasks draw from
    caches.

    Args:
      compute_loss: a function of no arguments returning the scalar loss to minimise (it
        calls the tasks).
      variables: the trainable variables, or a function returning them (read after the
        loss, so that layers built by their first call are included).
      optimizer: applies the gradients.

    Returns:
      The loss.

    Example (a custom training loop):

    >>> users, items = tf.keras.layers.Embedding(10, 4), tf.keras.layers.Embedding(50, 4)
    >>> cache = tfnegcache.NegativeCache(32, {"item": tf.TensorSpec([], tf.int64)}, 4)
    >>> task = tfnegcache.CacheRetrieval(cache=cache,
    ...                                  candidate_model=lambda f: items(f["item"]))
    >>> optimizer = tf.keras.optimizers.Adam(0.01)
    >>> user, item = tf.range(8) % 10, tf.range(8, dtype=tf.int64)
    >>> def loss():
    ...     return task(users(user), items(item), candidate_ids=item,
    ...                 candidate_features={"item": item})
    >>> variables = lambda: users.trainable_variables + items.trainable_variables
    >>> for _ in range(2):
    ...     _ = tfnegcache.run_step(loss, variables, optimizer)
    >>> int(cache.num_filled), int(cache.step), int(optimizer.iterations)
    (8, 2, 2)
    """
    with recording() as step:
        with tf.GradientTape() as tape:
            loss = as_user_code(compute_loss)()
            scaled_loss = loss_scale.scale(optimizer, loss)
    if callable(variables):
        variables = variables()
    gradients = loss_scale.unscale(optimizer, tape.gradient(scaled_loss, variables))
    apply(step, loss, gradients, variables, optimizer)
    return loss
