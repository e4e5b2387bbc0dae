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

from typing import Callable

import tensorflow as tf

from tfnegcache import checks

# The step's record is pure Python, shared with the Keras 3 front end.
from tfnegcache._record import TrainingStep, current, recording  # noqa: F401


def apply(step: TrainingStep, loss: tf.Tensor, gradients, variables, optimizer):
    """Prepares the step's cache updates, then applies the gradients and the updates behind
    one guard: the loss, every gradient and every prepared row must pass their checks first.

    Returns:
      The optimizer's update op (or None).
    """
    prepared = [(cache, cache.prepare(update)) for cache, update, _ in step.updates]
    guards = [checks.finite(loss, "the loss")]
    guards += [checks.finite(g, f"the gradient of `{v.name}`")
               for g, v in zip(gradients, variables) if g is not None]
    for _, writes in prepared:
        guards += writes.checks
    with tf.control_dependencies(guards):
        applied = optimizer.apply_gradients(zip(gradients, variables))
    with tf.control_dependencies(guards + ([applied] if applied is not None else [])):
        for cache, writes in prepared:
            cache.commit(writes)
    return applied


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
    """
    with recording() as step:
        with tf.GradientTape() as tape:
            loss = compute_loss()
    if callable(variables):
        variables = variables()
    gradients = tape.gradient(loss, variables)
    apply(step, loss, gradients, variables, optimizer)
    return loss
