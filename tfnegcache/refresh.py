"""Refresh policies for the negative cache: the paper's knobs beyond write-back.

A cached embedding `e_j` was computed by the candidate tower at some earlier step; the
gradient estimator's only bias is how far `e_j` is from `g(x_j)` under the current weights
(ALGORITHM.md step 5). Policies that shrink that gap, composable with each other:

- **write-back** (the default, in `CacheRetrieval`): the negatives re-encoded for the loss
  are written back, so the slots the sampler favours (the hard ones) stay fresh for free.
- **random refresh** (`CacheRetrieval(refresh_per_step=R)`): after the optimizer step, R
  filled slots chosen uniformly at random without replacement are re-encoded from their
  cached features with the new weights, without gradients (refresh rate `R / N`; the
  paper's theory says a small rate keeps first-order convergence). The choice is stateless:
  a function of (cache seed, cache step), like the sampler's noise.
- **full refresh** (`CacheRefreshCallback`): every K steps and/or at each epoch end, every
  filled slot is re-encoded, `batch_size` slots per tower call.
- **warm start** (`warm_start`): fill the cache from a candidate dataset (e.g. the whole
  movie table) before training, through `NegativeCache.insert` (dataset order, id dedupe).

Everything here is O(tower work on the slots touched); nothing holds an `[N, ...]` tower
pass beyond one batch.
"""

from typing import Callable, Mapping, Optional

import tensorflow as tf

Encoder = Callable[[Mapping[str, tf.Tensor]], tf.Tensor]

# Folded into the cache seed so refresh choices never share a stream with the sampler's.
_REFRESH_STREAM = 0x726566


def refresh_seed(cache_seed: int, step) -> tf.Tensor:
    """The `[2]` stateless seed of the random refresh at cache step `step`."""
    seed = tf.random.experimental.stateless_fold_in(
        tf.constant([cache_seed, _REFRESH_STREAM], tf.int64), tf.cast(step, tf.int64))
    return seed


def choose_refresh_slots(cache, num_slots: int, seed: Optional[tf.Tensor] = None) -> tf.Tensor:
    """`min(num_slots, filled)` distinct filled slots, uniformly at random, int64 `[R']`.

    Uniform without replacement over the filled slots `[0, num_filled)`: each slot gets a
    stateless uniform key and the `num_slots` largest keys win (`top_k` over N keys: O(N)
    work, no tower calls). With `num_slots >= cache.size` every filled slot is chosen, in
    slot order, and no randomness is used.

    Args:
      cache: the `NegativeCache`.
      num_slots: R, slots to choose.
      seed: `[2]` int seed; default `refresh_seed(cache.seed, cache.step)`.
    """
    num_slots = int(num_slots)
    if num_slots >= cache.size:
        return tf.range(cache.num_filled, dtype=tf.int64)
    if num_slots < 1:
        return tf.zeros([0], tf.int64)
    if seed is None:
        seed = refresh_seed(cache.seed, cache.step)
    keys = tf.random.stateless_uniform([cache.size], seed, dtype=tf.float32)
    filled = tf.range(cache.size, dtype=tf.int64) < cache.num_filled
    keys = tf.where(filled, keys, -1.0)
    top = tf.math.top_k(keys, k=num_slots, sorted=True)
    slots = tf.cast(top.indices, tf.int64)
    return tf.boolean_mask(slots, top.values >= 0.0)


def encode_slots(cache, slots: tf.Tensor, encoder: Encoder) -> tf.Tensor:
    """The current tower's embeddings of `slots`' cached features, `[M, d]`, no gradient."""
    features, _, _ = cache.gather(slots)
    embeddings = tf.convert_to_tensor(encoder(features))
    embeddings = cache.check_embeddings(embeddings, "encoder output")
    return tf.stop_gradient(embeddings)


def refresh_slots(cache, slots: tf.Tensor, encoder: Encoder) -> None:
    """Re-encodes `slots` from their cached features and writes the embeddings.

    Empty slots among `slots` are skipped (`write_embeddings` does); `updated_at` of the
    written slots becomes the cache's current step. Ids, features and insertion order are
    untouched. Non-finite embeddings fail with `InvalidArgumentError`, writing nothing.
    """
    slots = tf.cast(tf.reshape(slots, [-1]), tf.int64)
    cache.write_embeddings(slots, encode_slots(cache, slots, encoder))


def refresh_all(cache, encoder: Encoder, batch_size: int = 1024) -> int:
    """Re-encodes every filled slot, `batch_size` slots per tower call; returns the count.

    Runs eagerly over chunks (each chunk's tower call and write in one `tf.function` with a
    fixed chunk shape, so it traces once); empty slots are never touched. A sharded cache
    refreshes every shard.
    """
    if cache.layout == "sharded":
        return sum(refresh_all(shard, encoder, batch_size) for shard in cache.shards)
    batch_size = int(min(max(1, batch_size), cache.size))
    fn = _chunk_refresher(cache, encoder, batch_size)
    filled = int(cache.num_filled.numpy())
    for start in range(0, filled, batch_size):
        fn(tf.constant(start, tf.int64))
    return filled


def _chunk_refresher(cache, encoder, batch_size):
    key = (id(encoder), batch_size)
    memo = cache.__dict__.setdefault("_tfnegcache_refreshers", {})
    if key not in memo:
        @tf.function
        def refresh_chunk(start):
            slots = start + tf.range(batch_size, dtype=tf.int64)
            valid = slots < cache.num_filled
            slots = tf.minimum(slots, cache.size - 1)
            cache.write_embeddings(slots, encode_slots(cache, slots, encoder), valid=valid)

        memo[key] = refresh_chunk
    return memo[key]


def warm_start(cache, dataset: tf.data.Dataset, candidate_model: Encoder,
               id_key: str = "id", batch_size: int = 1024, batched: bool = False) -> int:
    """Fills the cache from a candidate dataset before training; returns rows read.

    Each element is a dict of one candidate's features (or of `[M, ...]` rows when
    `batched`), holding every key of the cache's `feature_spec` plus the id under `id_key`
    (extra keys are ignored). Candidates are encoded by `candidate_model` with the current
    weights and inserted through `NegativeCache.insert`, in dataset order: ids are deduped
    (a repeated id refreshes its slot), and a dataset larger than the cache leaves its
    last `size` distinct candidates (FIFO). The cache's `step` does not advance.

    Args:
      cache: the `NegativeCache` to fill.
      dataset: candidates, e.g. `movielens.load().movies_dataset()`.
      candidate_model: the candidate tower, mapping a feature dict to `[M, d]`.
      id_key: the element key holding the candidate id.
      batch_size: candidates per tower call and insert (capped at the cache size).
      batched: whether `dataset` already yields batches.

    Raises:
      ValueError: a sharded cache (which shard gets which candidate is for the caller to
        decide: warm-start each of `cache.shards` with its part of the dataset).
    """
    if cache.layout == "sharded":
        raise ValueError(
            f"warm_start fills one cache, but {cache.name!r} has layout='sharded': warm-start "
            "each of `cache.shards` with its own part of the candidates instead.")
    batch_size = int(min(max(1, batch_size), cache.size))
    if not batched:
        dataset = dataset.batch(batch_size)
    elif batch_size < cache.size:
        dataset = dataset.unbatch().batch(batch_size)

    @tf.function
    def insert(element):
        features = cache.check_features(element, what="warm_start dataset element")
        embeddings = tf.stop_gradient(tf.convert_to_tensor(candidate_model(features)))
        cache.insert(features, embeddings, element[id_key])
        return tf.shape(embeddings)[0]

    rows = 0
    for element in dataset:
        if id_key not in element:
            raise ValueError(
                f"warm_start: dataset elements must hold the candidate id under `id_key` "
                f"({id_key!r}). Received keys: {sorted(element)}.")
        rows += int(insert(element))
    return rows


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
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(
                f"`every_n_steps` must be >= 1 or None. Received: {every_n_steps!r}.")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.at_epoch_end = bool(at_epoch_end)
        self.batch_size = int(batch_size)
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
