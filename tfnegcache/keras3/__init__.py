"""tfnegcache on Keras 3 (JAX and TensorFlow backends): the negative cache for keras-rs users.

The method of Lindgren et al., "Efficient Training of Retrieval Models using Negative Cache"
(NeurIPS 2021), as the TF front end (`tfnegcache`, on tf_keras and TFRS) implements it, in
`keras.ops` and fixed shapes, so the whole training step compiles with `jax.jit`:

- `NegativeCache` (`cache.py`) over a `CacheStore` (`store.py`: variables, the sorted id
  index of `index.py`, plan/apply) with the FIFO insert rule in `fifo.py` and the checks of
  its inputs in `spec.py`;
- `scoring.py`, `sampling.py`: the tiled log-mass and exact two-stage draws from it;
- `negatives.py`: what a step draws and the cache's logit (`Gumbel`, `Uniform`);
- `CacheRetrieval` (`retrieval.py`): in-batch softmax with logQ and accidental-hit removal
  (keras-rs has no softmax retrieval loss) plus the cache's column;
- `CachedRetrievalModel` (`model.py`) whose `train_step` runs `step.py`'s pipeline, and
  `StopOnSkippedStep`;
- `refresh.py` (`warm_start`, `refresh_all`, `CacheRefreshCallback`), `export.py` (serving).

Importing this module imports neither `tf_keras` nor `tensorflow_recommenders` and leaves
`TF_USE_LEGACY_KERAS` alone: `keras` is Keras 3 (`KERAS_BACKEND=jax` or `tensorflow`, set
before Keras is first imported). Do not use the TF front end in the same process.
"""

from tfnegcache.keras3 import _backend

_backend.check_backend()

from tfnegcache.keras3.cache import NegativeCache  # noqa: E402
from tfnegcache.keras3.model import CachedRetrievalModel, StopOnSkippedStep  # noqa: E402
from tfnegcache.keras3.refresh import (  # noqa: E402
    CacheRefreshCallback, refresh_all, warm_start)
from tfnegcache.keras3.retrieval import CacheRetrieval, remove_accidental_hits  # noqa: E402
from tfnegcache.keras3.spec import FeatureSpec  # noqa: E402
from tfnegcache.keras3.store import CacheUpdate  # noqa: E402

__all__ = [
    "CacheRefreshCallback",
    "CacheRetrieval",
    "CacheUpdate",
    "CachedRetrievalModel",
    "FeatureSpec",
    "NegativeCache",
    "StopOnSkippedStep",
    "refresh_all",
    "remove_accidental_hits",
    "warm_start",
]
