"""tfnegcache: train two-tower retrieval models in Keras against a large negative cache.

The method of Lindgren et al., "Efficient Training of Retrieval Models using Negative Cache"
(NeurIPS 2021), as a drop-in for `tfrs.tasks.Retrieval`:

- `NegativeCache` (`cache.py`), `ShardedNegativeCache` (`sharded.py`): the cache, replicated
  or one shard per replica, over `CacheStore`s (`store.py`: variables, id index, the
  transaction) with the FIFO insert rule in `fifo.py` and the checks of its inputs in
  `spec.py`;
- `scoring.py`, `sampling.py`: the tiled log-mass and exact Gumbel-Max draws from it;
- `negatives.py`: what a step draws and the cache's logit (`Gumbel`, `Uniform`);
- `CacheRetrieval` (`retrieval.py`): the TFRS task plus the cache's column;
- `run_step` (`step.py`): loss -> gradients -> prepare -> guard -> optimizer -> commit, and
  `CachedRetrievalModel` (`model.py`), the `tfrs.Model` whose `train_step` is it;
- `refresh.py` (warm start, full refresh, the callback), `restore.py` (checkpoint checks),
  `distribute.py` (collectives), `export.py` (serving).

TFRS needs Keras 2, so importing this package sets `TF_USE_LEGACY_KERAS=1` just before
TensorFlow is imported (unless the Keras 3 front end, `tfnegcache.keras3`, is in use), and the
first use of a name above fails with a clear message if TensorFlow already runs Keras 3. The
names are loaded, with TensorFlow, on first use: `import tfnegcache` alone stays cheap, so
that `python -m tfnegcache --help` and its argument errors need no TensorFlow.
"""

import importlib
import sys

from tfnegcache._keras_guard import ensure_legacy_keras

from tfnegcache._keras_guard import defer_until_tensorflow

if "tensorflow" not in sys.modules:
    # Set just before TensorFlow is imported, unless the Keras 3 front end is in use. (With
    # TensorFlow imported already, the first use of a TF front-end name checks its Keras.)
    defer_until_tensorflow()

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_EXPORTS = {
    "Cache": "tfnegcache.cache",
    "CacheNegatives": "tfnegcache.negatives",
    "CacheRefreshCallback": "tfnegcache.refresh",
    "CacheRetrieval": "tfnegcache.retrieval",
    "CacheUpdate": "tfnegcache.cache",
    "CachedRetrievalModel": "tfnegcache.model",
    "NegativeCache": "tfnegcache.cache",
    "ShardedCacheBackup": "tfnegcache.sharded",
    "ShardedNegativeCache": "tfnegcache.sharded",
    "check_checkpoint": "tfnegcache.restore",
    "gumbel_max_sample": "tfnegcache.sampling",
    "measure_cost": "tfnegcache.cost",
    "run_step": "tfnegcache.step",
    "sample_cache": "tfnegcache.sampling",
    "warm_start": "tfnegcache.refresh",
}

# Submodules reachable as attributes (`tfnegcache.negatives.MIN_FLOAT`) without their own
# import.
_SUBMODULES = ("cache", "checks", "cost", "distribute", "export", "fifo", "loss_scale",
               "model", "negatives", "refresh", "restore", "retrieval", "sampling", "scoring",
               "sharded", "spec", "step", "store")

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
