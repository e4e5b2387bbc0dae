"""tfnegcache: train two-tower retrieval models in Keras against a large negative cache.

The method of Lindgren et al., "Efficient Training of Retrieval Models using Negative Cache"
(NeurIPS 2021), as a drop-in for `tfrs.tasks.Retrieval`:

- `NegativeCache`: the cache of candidate features, stale embeddings and ids, and its one
  write transaction per step (`cache.py`); `ShardedNegativeCache`: one shard per replica
  (`sharded.py`);
- `sample_cache` / `gumbel_max_sample`: exact Gumbel-Max sampling from it (`sampling.py`);
- `CacheRetrieval`: the retrieval task with the cached softmax loss (`retrieval.py`);
- `CachedRetrievalModel`: the `tfrs.Model` whose `train_step` keeps the cache (`model.py`).

Importing this package sets `TF_USE_LEGACY_KERAS=1` when TensorFlow is not imported yet, since
TFRS needs Keras 2; it fails with a clear message if TensorFlow already runs Keras 3.
"""

from tfnegcache._keras_guard import ensure_legacy_keras

ensure_legacy_keras()

# pylint: disable=g-import-not-at-top,wrong-import-position
from tfnegcache.cache import CacheUpdate, NegativeCache
from tfnegcache.model import CachedRetrievalModel
from tfnegcache.refresh import CacheRefreshCallback, warm_start
from tfnegcache.retrieval import CacheRetrieval
from tfnegcache.sharded import ShardedCacheBackup, ShardedNegativeCache
from tfnegcache.sampling import CacheDraw, gumbel_max_sample, sample_cache

__version__ = "0.1.0"

__all__ = [
    "CacheDraw",
    "CacheRefreshCallback",
    "CacheRetrieval",
    "CacheUpdate",
    "CachedRetrievalModel",
    "NegativeCache",
    "ShardedCacheBackup",
    "ShardedNegativeCache",
    "gumbel_max_sample",
    "sample_cache",
    "warm_start",
]
