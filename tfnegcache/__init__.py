"""tfnegcache: train two-tower retrieval models in Keras against a large negative cache.

The method of Lindgren et al., "Efficient Training of Retrieval Models using Negative Cache"
(NeurIPS 2021), as a drop-in for `tfrs.tasks.Retrieval`:

- `NegativeCache`: the cache of candidate features, stale embeddings and ids, and its one
  write transaction per step (`cache.py`); `ShardedNegativeCache`: one shard per replica
  (`sharded.py`);
- `sample_cache` / `gumbel_max_sample`: exact Gumbel-Max sampling from it (`sampling.py`);
- `CacheRetrieval`: the retrieval task with the cached softmax loss (`retrieval.py`);
- `CachedRetrievalModel`: the `tfrs.Model` whose `train_step` keeps the cache (`model.py`).

TFRS needs Keras 2, so importing this package sets `TF_USE_LEGACY_KERAS=1` when TensorFlow is
not imported yet, and fails with a clear message if TensorFlow already runs Keras 3. The names
above are loaded, with TensorFlow, on first use: `import tfnegcache` alone stays cheap, so that
`python -m tfnegcache --help` and its argument errors need no TensorFlow.
"""

import importlib
import os
import sys

from tfnegcache._keras_guard import ensure_legacy_keras

if "tensorflow" in sys.modules:
    ensure_legacy_keras()  # TensorFlow already runs: check its Keras now, not on first use.
else:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "CacheDraw": "tfnegcache.sampling",
    "CacheNegatives": "tfnegcache.cache",
    "CacheRefreshCallback": "tfnegcache.refresh",
    "CacheRetrieval": "tfnegcache.retrieval",
    "CacheUpdate": "tfnegcache.cache",
    "CachedRetrievalModel": "tfnegcache.model",
    "NegativeCache": "tfnegcache.cache",
    "ShardedCacheBackup": "tfnegcache.sharded",
    "ShardedNegativeCache": "tfnegcache.sharded",
    "gumbel_max_sample": "tfnegcache.sampling",
    "sample_cache": "tfnegcache.sampling",
    "check_checkpoint": "tfnegcache.restore",
    "warm_start": "tfnegcache.refresh",
}

# Submodules reachable as attributes (`tfnegcache.retrieval.MIN_FLOAT`) without their own import.
_SUBMODULES = ("cache", "checks", "datasets", "distribute", "experiments", "export", "model",
               "refresh", "restore", "retrieval", "sampling", "sharded")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS and name not in _SUBMODULES:
        raise AttributeError(f"module 'tfnegcache' has no attribute {name!r}")
    ensure_legacy_keras()
    if name in _SUBMODULES:
        return importlib.import_module(f"tfnegcache.{name}")  # binds the attribute too
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
