"""Keeping a Keras 3 cache's embeddings fresh beyond the write-back of every step, and filling
it before training (the TF front end's `tfnegcache.refresh`):

- `warm_start`: the cache filled from the candidate table before training;
- `refresh_all` / `CacheRefreshCallback`: every filled slot re-encoded (zero staleness), every
  K steps and/or each epoch;
- `refresh_slots`: chosen slots re-encoded.

The candidate tower runs eagerly here (it is the user's model, with its own variables); each
write is one compiled, checked transaction of the cache (`CacheStore.write`). On JAX a
callback first syncs the training state into the variables (`model.jax_state_sync()`, which
`fit` otherwise does at the end of each epoch only) and the next step reads its changes back.
"""

from typing import Callable, Mapping, Optional

import keras
import numpy as np
from keras import ops

from tfnegcache import _args
from tfnegcache.keras3.store import CacheUpdate

Encoder = Callable[[Mapping[str, object]], object]


def encode(cache, slots, encoder: Encoder):
    """`encoder`'s embeddings of the cached features of `slots`, `[M, d]`, no gradient."""
    features, _, _ = cache.gather(slots)
    embeddings = ops.convert_to_tensor(encoder(features))
    return ops.stop_gradient(cache.spec.check_embeddings(embeddings, "encoder output"))


def refresh_slots(cache, slots, encoder: Encoder) -> None:
    """Re-encodes `slots` from their cached features and writes the embeddings; empty slots
    are skipped, nothing else changes."""
    slots = ops.cast(ops.reshape(ops.convert_to_tensor(slots), [-1]), "int32")
    cache.write_embeddings(slots, encode(cache, slots, encoder))


def refresh_all(cache, encoder: Encoder, batch_size: int = 1024) -> int:
    """Re-encodes every filled slot of `cache`, `batch_size` per encoder call; returns the
    count.

    A chunk is written when it is encoded: if the encoder fails (or returns a non-finite row)
    in a later chunk, the chunks before it stay refreshed, every row is its old value or the
    fresh one, and the id index is untouched.

    Example:

    >>> table = keras.layers.Embedding(100, 4)
    >>> cache = tfnegcache.keras3.NegativeCache(64, {"item": ((), "int32")}, 4)
    >>> ids = np.arange(10, dtype="int32")
    >>> cache.insert({"item": ids}, np.zeros([10, 4], "float32"), ids)
    >>> tfnegcache.keras3.refresh_all(cache, lambda f: table(f["item"]))
    10
    """
    batch_size = min(_args.integer("batch_size", batch_size, 1), cache.spec.size)
    filled = int(ops.convert_to_numpy(cache.num_filled.value))
    size = cache.spec.size
    for start in range(0, filled, batch_size):
        slots = start + np.arange(batch_size, dtype=np.int32)
        valid = slots < filled
        slots = np.minimum(slots, size - 1)
        cache.write(CacheUpdate(write_back_slots=slots, write_back_valid=valid,
                                write_back_embeddings=encode(cache, slots, encoder)))
    return filled


def _batches(dataset, batch_size: int, batched: bool):
    """Dicts of numpy arrays, `batch_size` rows each (the last may be shorter)."""
    if isinstance(dataset, Mapping):
        columns = {k: np.asarray(v) for k, v in dataset.items()}
        rows = len(next(iter(columns.values())))
        for start in range(0, rows, batch_size):
            yield {k: v[start:start + batch_size] for k, v in columns.items()}
        return
    if hasattr(dataset, "as_numpy_iterator"):   # a tf.data.Dataset
        dataset = dataset.unbatch() if batched else dataset
        yield from dataset.batch(batch_size).as_numpy_iterator()
        return
    raise ValueError(
        "warm_start: `dataset` must be a dict of arrays (one row per candidate) or a "
        f"tf.data.Dataset of feature dicts. Received: {type(dataset).__name__}.")


def warm_start(cache, dataset, candidate_model: Encoder, id_key: str = "id",
               batch_size: int = 1024, batched: bool = False) -> int:
    """Fills `cache` from a candidate table before training; returns rows read.

    Each row holds every key of the cache's `feature_spec` plus the id under `id_key`.
    Candidates are encoded by `candidate_model` with the current weights and inserted in
    order (FIFO over distinct ids); the cache's step does not advance. Each batch is one
    transaction: a batch with a bad row (say a NaN embedding) raises ValueError and writes
    nothing, and the batches before it stay inserted.

    Args:
      dataset: a dict of arrays `{name: [num_candidates, ...]}`, or a `tf.data.Dataset` of
        feature dicts (one candidate per element, or batches with `batched=True`).
      candidate_model: the candidate tower, mapping a feature dict to `[M, d]`.
      id_key: the key holding the candidate id (int32).
      batch_size: candidates per tower call and insert (capped at the cache size).
      batched: whether a `tf.data.Dataset` already yields batches.

    Example:

    >>> table = keras.layers.Embedding(100, 4)
    >>> cache = tfnegcache.keras3.NegativeCache(64, {"item": ((), "int32")}, 4)
    >>> movies = {"item": np.arange(50, dtype="int32")}
    >>> tfnegcache.keras3.warm_start(cache, movies, lambda f: table(f["item"]), id_key="item")
    50
    """
    batch_size = min(_args.integer("batch_size", batch_size, 1), cache.spec.size)
    rows = 0
    for element in _batches(dataset, batch_size, batched):
        if id_key not in element:
            raise ValueError(
                f"warm_start: dataset rows must hold the candidate id under `id_key` "
                f"({id_key!r}). Received keys: {sorted(element)}.")
        features = cache.spec.check_features(
            {k: element[k] for k in element if k in cache.spec.feature_spec},
            what="warm_start dataset element")
        embeddings = ops.stop_gradient(ops.convert_to_tensor(candidate_model(features)))
        cache.insert(features, embeddings, element[id_key])
        rows += len(element[id_key])
    return rows


def sync_training_state(model) -> None:
    """Makes the model's variables hold the training state (JAX `fit` keeps it apart until the
    end of each epoch); a no-op on TensorFlow."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


class CacheRefreshCallback(keras.callbacks.Callback):
    """Re-encodes every filled slot of the model's caches every K steps and/or per epoch.

    Works with any model exposing `cache_tasks()` (`CachedRetrievalModel`); each task's
    `candidate_model` is the encoder.

    Args:
      every_n_steps: refresh after every K-th training step (counted over the whole `fit`),
        or None.
      at_epoch_end: refresh at the end of each epoch.
      batch_size: slots per tower call.
    """

    def __init__(self, every_n_steps: Optional[int] = None, at_epoch_end: bool = True,
                 batch_size: int = 1024):
        super().__init__()
        self.every_n_steps = _args.integer("every_n_steps", every_n_steps, 1, allow_none=True)
        self.at_epoch_end = bool(at_epoch_end)
        self.batch_size = _args.integer("batch_size", batch_size, 1)
        self.refreshes = 0
        self._steps = 0
        self._epoch_start = 0

    def refresh(self) -> None:
        """Re-encodes every filled slot of every cache of the model now."""
        sync_training_state(self.model)
        for task in self.model.cache_tasks():
            refresh_all(task.cache, task.candidate_model, self.batch_size)
        self.refreshes += 1

    def on_train_begin(self, logs=None):
        self._steps = self._epoch_start = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._steps

    def on_train_batch_end(self, batch, logs=None):
        steps = self._epoch_start + batch + 1
        if self.every_n_steps is not None and \
                steps // self.every_n_steps > self._steps // self.every_n_steps:
            self.refresh()
        self._steps = steps

    def on_epoch_end(self, epoch, logs=None):
        if self.at_epoch_end:
            self.refresh()
