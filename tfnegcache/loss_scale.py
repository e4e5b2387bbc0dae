"""A training step under a loss-scale optimizer (`mixed_float16`).

Under `tf.keras.mixed_precision.set_global_policy("mixed_float16")`, `compile` wraps the
optimizer in a `LossScaleOptimizer`. Its `apply_gradients` neither scales the loss nor
unscales the gradients (the step must: `scale`, `unscale`), and with a dynamic loss scale it
skips every step whose gradients are not all finite and lowers the scale: float16 gradients
overflow now and then by design, and that is how the scale finds its level. So a step under
such an optimizer does not fail on non-finite gradients; it applies nothing, neither to the
weights nor to the caches (`apply_gradients` returns whether it applied), and training goes
on. A non-finite loss still fails the step.
"""

from typing import Optional, Sequence, Tuple

import tensorflow as tf


def is_loss_scaled(optimizer) -> bool:
    """Whether `optimizer` is a Keras `LossScaleOptimizer` (either generation)."""
    return hasattr(optimizer, "get_scaled_loss") and hasattr(optimizer, "inner_optimizer")


def skips_non_finite(optimizer) -> bool:
    """Whether `optimizer` skips steps with non-finite gradients by itself (a dynamic loss
    scale), so that the step must not fail on them."""
    return is_loss_scaled(optimizer) and bool(optimizer.dynamic)


def scale(optimizer, loss: tf.Tensor) -> tf.Tensor:
    """The loss to differentiate: `loss * loss_scale` under a loss-scale optimizer."""
    return optimizer.get_scaled_loss(loss) if is_loss_scaled(optimizer) else loss


def unscale(optimizer, gradients: Sequence) -> list:
    """The gradients of the loss from those of `scale(optimizer, loss)`."""
    if not is_loss_scaled(optimizer):
        return list(gradients)
    return optimizer.get_unscaled_gradients(list(gradients))


def _all_finite(gradients) -> tf.Tensor:
    values = [g.values if isinstance(g, tf.IndexedSlices) else g
              for g in gradients if g is not None]
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values])


def apply_gradients(optimizer, gradients: Sequence, variables: Sequence
                    ) -> Tuple[Optional[tf.Tensor], Optional[tf.Tensor]]:
    """Applies the gradients; returns `(update, applied)`: the optimizer's update op (or
    None), and None when the optimizer always applies, else a bool scalar: whether it did
    (all gradients finite once summed over the replicas).

    A skipping optimizer's gradients are summed over the replicas here, as its own
    `apply_gradients` would, so that the decision read here is the one it takes.
    """
    pairs = list(zip(gradients, variables))
    if not skips_non_finite(optimizer):
        return optimizer.apply_gradients(pairs), None
    inner = optimizer.inner_optimizer
    if hasattr(inner, "aggregate_gradients"):          # tf.keras.optimizers.Optimizer
        pairs = list(inner.aggregate_gradients(pairs))
    else:                                              # tf.keras.optimizers.legacy
        pairs = list(inner._aggregate_gradients(     # pylint: disable=protected-access
            inner._transform_unaggregated_gradients(pairs)))  # pylint: disable=protected-access
    applied = _all_finite([g for g, _ in pairs])
    return optimizer.apply_gradients(pairs, experimental_aggregate_gradients=False), applied
