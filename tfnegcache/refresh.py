"""Refresh policies for the negative cache: the paper's knobs beyond write-back.

A cached embedding `e_j` was computed by the candidate tower at some earlier step; the
gradient estimator's only bias is how far `e_j` is from `g(x_j)` under the current weights
(docs/algorithm.md step 5). Policies that shrink that gap, composable with each other:

- **write-back** (the default, in `CacheRetrieval`): the negatives re-encoded for the loss
  are written back, so the slots the sampler favours (the hard ones) stay fresh for free.
- **random refresh** (`CacheRetrieval(refresh_per_step=R)`): each training step, R filled
  slots chosen uniformly at random without replacement are re-encoded from their cached
  features by the task's candidate tower, without gradients, and written with the step's
  other cache writes (refresh rate `R / N`; the paper's theory says a small rate keeps
  first-order convergence). They are encoded with the weights before the step's optimizer
  update, like the batch's inserted positives, so a step's writes are checked before any of
  them is applied. The choice is stateless: a function of (cache seed, cache step), like the
  sampler's noise.
- **full refresh** (`CacheRefreshCallback`): every K steps and/or at each epoch end, every
  filled slot is re-encoded, `batch_size` slots per tower call.
- **warm start** (`warm_start`): fill the cache from a candidate dataset (e.g. the whole
  movie table) before training, through `NegativeCache.insert` (dataset order, id dedupe).

The writes themselves are the cache's (`NegativeCache.refresh`, `refresh_all`,
`warm_start`); this module holds the policies and the callback.

Everything here is O(tower work on the slots touched); nothing holds an `[N, ...]` tower
pass beyond one batch.
"""

from typing import Callable, Mapping, Optional

import tensorflow as tf

from tfnegcache import checks
from tfnegcache.cache import refresh_seed  # noqa: F401  (re-exported)

Encoder = Callable[[Mapping[str, tf.Tensor]], tf.Tensor]


def choose_refresh_slots(cache, num_slots: int, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
    """`min(num_slots, filled)` distinct filled slots of `cache`, uniformly at random, int64
    `[R']`; see `NegativeCache.random_filled_slots`."""
    return cache.random_filled_slots(num_slots, seed)


def refresh_all(cache, encoder: Encoder, batch_size: int = 1024) -> int:
    """Re-encodes every filled slot (of every shard), `batch_size` slots per tower call;
    returns the count."""
    return cache.refresh_all(encoder, batch_size)


def warm_start(cache, dataset: tf.data.Dataset, candidate_model: Encoder,
               id_key: str = "id", batch_size: int = 1024, batched: bool = False) -> int:
    """Fills `cache` from a candidate dataset before training; returns rows read. See
    `NegativeCache.warm_start`."""
    return cache.warm_start(dataset, candidate_model, id_key=id_key, batch_size=batch_size,
                            batched=batched)


class CacheRefreshCallback(tf.keras.callbacks.Callback):
    """Re-encodes every filled slot of the model's caches every K steps and/or per epoch.

    A full refresh makes every cached embedding equal to the current tower's output (zero
    staleness) at the cost of `N` candidate-tower forward passes, in chunks of `batch_size`.
    Empty slots are left untouched. Works with any model exposing `cache_tasks()`
    (`CachedRetrievalModel`); each task's `candidate_model` is the encoder.

    Args:
      every_n_steps: refresh after every K-th training batch (counted over the whole `fit`
        run), or None.
      at_epoch_end: refresh at the end of each epoch.
      batch_size: slots per tower call.
    """

    def __init__(self, every_n_steps: Optional[int] = None, at_epoch_end: bool = True,
                 batch_size: int = 1024):
        super().__init__()
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, 1, allow_none=True)
        self.at_epoch_end = bool(at_epoch_end)
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.refreshes = 0
        self._steps = 0

    def refresh(self) -> None:
        """Re-encodes every filled slot of every cache of the model now."""
        for task in self.model.cache_tasks():
            refresh_all(task.cache, task.candidate_model, self.batch_size)
        self.refreshes += 1

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.every_n_steps is not None and self._steps % self.every_n_steps == 0:
            self.refresh()

    def on_epoch_end(self, epoch, logs=None):
        if self.at_epoch_end:
            self.refresh()
