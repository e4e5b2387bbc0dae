"""Keeping cached embeddings fresh, beyond the write-back of every step.

A cached embedding `e_j` was computed by the candidate tower at some earlier step; how far it
is from `g(x_j)` under the current weights is what the cache's estimator must correct for
(docs/algorithm.md step 5). What shrinks that gap:

- write-back (the default, in `CacheRetrieval`): the re-encoded negatives are written back,
  so the slots the sampler favours stay fresh for free;
- the random refresh (`CacheRetrieval(refresh_per_step=R)`): R random filled slots per step,
  re-encoded with the weights the step starts from and written with the step's other writes;
- a full refresh (`Cache.refresh_all`, `CacheRefreshCallback`): every filled slot,
  `batch_size` per tower call;
- a warm start (`Cache.warm_start`): the cache filled from the candidate table before
  training.

Each function here takes a `tfnegcache.cache.Cache` and writes through its transaction.
"""

from typing import Callable, Mapping, Optional

import tensorflow as tf

from tfnegcache import checks
from tfnegcache.store import CacheUpdate
from tfnegcache._autograph import as_user_code

Encoder = Callable[[Mapping[str, tf.Tensor]], tf.Tensor]


def encode(store, slots: tf.Tensor, encoder: Encoder) -> tf.Tensor:
    """`encoder`'s embeddings of the cached features of `slots` in `store`, `[M, d]`, no
    gradient."""
    features, _, _ = store.gather(slots)
    embeddings = tf.convert_to_tensor(as_user_code(encoder)(features))
    return tf.stop_gradient(store.spec.check_embeddings(embeddings, "encoder output"))


def refresh_slots(cache, slots: tf.Tensor, encoder: Encoder) -> None:
    """Re-encodes `slots` from their cached features and writes the embeddings; empty slots
    are skipped, nothing else changes."""
    (store,) = cache.stores()
    slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
    cache.write_embeddings(slots, encode(store, slots, encoder))


def refresh_all(cache, encoder: Encoder, batch_size: int = 1024) -> int:
    """Re-encodes every filled slot of every store of `cache`, `batch_size` per encoder call
    (one traced function per store and chunk shape); returns the count.

    A chunk is written when it is encoded: if the encoder fails (or returns a non-finite row)
    in a later chunk, the chunks before it stay refreshed, and the error says up to which
    slot. Every row is then either its old value or the fresh one, and the id index is
    untouched.
    """
    batch_size = min(checks.integer("batch_size", batch_size, 1), cache.spec.size)
    total = 0
    for store in cache.stores():
        memo = store.__dict__.setdefault("_refreshers", {})
        key = (id(encoder), batch_size)
        if key not in memo:
            @tf.function
            def refresh_chunk(start, store=store):
                slots = start + tf.range(batch_size, dtype=tf.int64)
                valid = slots < store.num_filled
                slots = tf.minimum(slots, store.spec.size - 1)
                store.write(CacheUpdate(write_back_slots=slots, write_back_valid=valid,
                                        write_back_embeddings=encode(store, slots, encoder)))

            memo[key] = refresh_chunk
        filled = int(store.num_filled.numpy())
        for start in range(0, filled, batch_size):
            try:
                memo[key](tf.constant(start, tf.int64))
            except tf.errors.OpError as error:
                raise _stopped(error, f"refresh_all re-encoded slots [0, {start}) of "
                                      f"{store.name!r} and stopped at the chunk of slots "
                                      f"[{start}, {min(start + batch_size, filled)})") from error
        total += filled
    return total


def _stopped(error: tf.errors.OpError, what: str) -> tf.errors.OpError:
    """`error` (same type) with `what` was done before it in front of its message."""
    message = f"{what}: {error.message}"
    try:
        return type(error)(error.node_def, error.op, message)
    except TypeError:   # the base class also takes the code
        return tf.errors.OpError(error.node_def, error.op, message, error.error_code)


def warm_start(cache, dataset: tf.data.Dataset, candidate_model: Encoder, id_key: str = "id",
               batch_size: int = 1024, batched: bool = False) -> int:
    """Fills `cache` from a candidate dataset before training; returns rows read.

    Each element is a dict of one candidate's features (or of `[M, ...]` rows when
    `batched`) with every key of the cache's `feature_spec` plus the id under `id_key`.
    Candidates are encoded by `candidate_model` with the current weights and inserted in
    dataset order (FIFO over distinct ids); the cache's step does not advance. Each batch is
    one transaction: a batch with a bad row (say a NaN embedding) raises and writes nothing,
    and the batches before it stay inserted (the error says how many rows that is).

    Args:
      dataset: candidates, e.g. the movie table as a `tf.data.Dataset`.
      candidate_model: the candidate tower, mapping a feature dict to `[M, d]`.
      id_key: the element key holding the candidate id.
      batch_size: candidates per tower call and insert (capped at the cache size).
      batched: whether `dataset` already yields batches.

    Returns:
      The number of rows read.

    Example:

    >>> cache = tfnegcache.NegativeCache(100, {"item": tf.TensorSpec([], tf.int64)}, 4)
    >>> tower = tf.keras.layers.Embedding(1000, 4)
    >>> items = tf.data.Dataset.range(60).map(lambda i: {"item": i, "id": i})
    >>> tfnegcache.warm_start(cache, items, lambda f: tower(f["item"]))
    60
    >>> int(cache.num_filled)
    60
    """
    batch_size = min(checks.integer("batch_size", batch_size, 1), cache.spec.size)
    if not batched:
        dataset = dataset.batch(batch_size)
    elif batch_size < cache.spec.size:
        dataset = dataset.unbatch().batch(batch_size)

    @tf.function
    def insert(element):
        features = cache.spec.check_features(element, what="warm_start dataset element")
        embeddings = tf.stop_gradient(tf.convert_to_tensor(candidate_model(features)))
        cache.insert(features, embeddings, element[id_key])
        return tf.shape(embeddings)[0]

    rows = 0
    for element in dataset:
        if id_key not in element:
            raise ValueError(
                f"warm_start: dataset elements must hold the candidate id under `id_key` "
                f"({id_key!r}). Received keys: {sorted(element)}.")
        try:
            rows += int(insert(element))
        except tf.errors.OpError as error:
            raise _stopped(error, f"warm_start inserted the first {rows} rows of the dataset "
                                  f"and stopped at the batch of rows from {rows} on") from error
    return rows


class CacheRefreshCallback(tf.keras.callbacks.Callback):
    """Re-encodes every filled slot of the model's caches every K steps and/or per epoch.

    A full refresh makes every cached embedding the current tower's (zero staleness) for `N`
    candidate-tower forward passes, `batch_size` at a time; empty slots are untouched. Works
    with any model exposing `cache_tasks()` (`CachedRetrievalModel`); each task's
    `candidate_model` is the encoder.

    Args:
      every_n_steps: refresh after every K-th step of the optimizer, or None. Steps are the
        optimizer's (`model.optimizer.iterations`), so every step counts, also under
        `compile(steps_per_execution=S)`, where Keras reports one batch end per S steps (the
        refresh then comes at the first batch end at or after each K-th step; one refresh
        for all the multiples of K that one execution crosses), and the schedule goes on
        across `fit` calls and resumed runs.
      at_epoch_end: refresh at the end of each epoch.
      batch_size: slots per tower call.

    Example (pass it to `fit`: `model.fit(data, callbacks=[refresh])`):

    >>> refresh = tfnegcache.CacheRefreshCallback(every_n_steps=100, at_epoch_end=False)
    >>> refresh.every_n_steps, refresh.refreshes
    (100, 0)
    """

    def __init__(self, every_n_steps: Optional[int] = None, at_epoch_end: bool = True,
                 batch_size: int = 1024):
        super().__init__()
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, 1, allow_none=True)
        self.at_epoch_end = bool(at_epoch_end)
        self.batch_size = checks.integer("batch_size", batch_size, 1)
        self.refreshes = 0
        self._last = None      # the optimizer's step count at the last batch end

    def refresh(self) -> None:
        """Re-encodes every filled slot of every cache of the model now."""
        for task in self.model.cache_tasks():
            refresh_all(task.cache, task.candidate_model, self.batch_size)
        self.refreshes += 1

    def _steps(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_begin(self, logs=None):
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        # Read at the first batch, after every callback's on_train_begin: BackupAndRestore
        # restores the optimizer's step count there.
        if self._last is None:
            self._last = self._steps()

    def on_train_batch_end(self, batch, logs=None):
        # Not `batch`: it numbers steps within an epoch, from where a resumed epoch starts.
        steps = self._steps()
        if self.every_n_steps is not None and \
                steps // self.every_n_steps > self._last // self.every_n_steps:
            self.refresh()
        self._last = steps

    def on_epoch_end(self, epoch, logs=None):
        if self.at_epoch_end:
            self.refresh()
