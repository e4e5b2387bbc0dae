"""Saving and restoring caches: the spec check before a restore and the `.h5` format's limits.

A cache's spec (layout, size, feature names, shapes and dtypes, embedding dim and dtype, id
dtype) is what its variables' names, shapes and dtypes say, so a checkpoint carries it without
extra state. `check_checkpoint` reads the spec of every cache saved in a weights file
(TensorFlow checkpoint or `.h5`) and compares it with the model's caches before anything is
restored. `CachedRetrievalModel.save_weights` / `load_weights` use these.
"""

import os
import re
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

_ATTRIBUTE = "/.ATTRIBUTES/VARIABLE_VALUE"
# Per-slot bookkeeping every cache has besides its features.
_STATE = ("embeddings", "ids", "inserted_at", "updated_at", "num_filled", "cursor", "step")


def is_h5(filepath, save_format: Optional[str] = None) -> bool:
    """Whether Keras writes or reads `filepath` in the HDF5 format."""
    if save_format is not None:
        return save_format.lower() in ("h5", "hdf5")
    return str(filepath).endswith((".h5", ".hdf5", ".keras"))


def _spec_of(variables: Dict[str, Tuple[tuple, tf.DType]]) -> Optional[dict]:
    """A cache spec from `{relative variable name: (shape, dtype)}` of one (shard) cache."""
    if "embeddings" not in variables or "ids" not in variables:
        return None
    (size, dim), embedding_dtype = variables["embeddings"]
    features = {name[len("features/"):]: (tuple(shape[1:]), dtype.name)
                for name, (shape, dtype) in variables.items() if name.startswith("features/")}
    return {"size": int(size), "embedding_dim": int(dim),
            "embedding_dtype": embedding_dtype.name, "id_dtype": variables["ids"][1].name,
            "features": dict(sorted(features.items()))}


def cache_spec(cache) -> dict:
    """The spec of a `NegativeCache` or `ShardedNegativeCache` as built."""
    stores = cache.stores()
    prefix = stores[0].name + "/"
    spec = _spec_of({v.name[v.name.index(prefix) + len(prefix):].rsplit(":", 1)[0]:
                     (tuple(v.shape), v.dtype) for v in stores[0].weights})
    spec["layout"] = "replicated" if stores == [cache] else "sharded"
    return spec


def describe(spec: dict) -> str:
    features = ", ".join(f"{name}: {list(shape)} {dtype}"
                         for name, (shape, dtype) in spec["features"].items())
    return (f"{spec['layout']}, size={spec['size']}, embedding_dim={spec['embedding_dim']} "
            f"({spec['embedding_dtype']}), id_dtype={spec['id_dtype']}, "
            f"features {{{features}}}")


def _unescape(name: str) -> str:
    return name.replace(".S", "/").replace("..", ".")


def _paths(model) -> List[Tuple[object, str]]:
    """Each cache of the model with its object path in a TensorFlow checkpoint."""
    # pylint: disable=g-import-not-at-top
    from tensorflow.python.checkpoint import graph_view
    from tfnegcache.cache import Cache

    _, paths = graph_view.ObjectGraphView(model).breadth_first_traversal()
    found = []
    for obj, refs in paths.items():
        if isinstance(obj, Cache):
            path = "/".join(ref.name.replace(".", "..").replace("/", ".S") for ref in refs)
            found.append((obj, path))
    return found


def _saved_tf(reader, prefix: str) -> Optional[dict]:
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    groups: Dict[str, dict] = {}
    for key in shapes:
        if not key.startswith(prefix + "/") or not key.endswith(_ATTRIBUTE):
            continue
        rest = key[len(prefix) + 1:-len(_ATTRIBUTE)]
        shard = ""
        if rest.startswith("shards/"):
            shard, rest = rest.split("/", 2)[1], rest.split("/", 2)[2]
        groups.setdefault(shard, {})[_unescape(rest)] = (tuple(shapes[key]), dtypes[key])
    return _combine(groups)


def _combine(groups: Dict[str, dict]) -> Optional[dict]:
    if not groups:
        return None
    specs = [_spec_of(v) for _, v in sorted(groups.items())]
    if any(s is None for s in specs):
        return None
    spec = specs[0]
    spec["layout"] = "replicated" if list(groups) == [""] else "sharded"
    return spec


def _saved_h5(filepath, model) -> Dict[str, Optional[dict]]:
    """`{cache name: saved spec}` of the caches in a Keras `.h5` weights file."""
    import h5py  # pylint: disable=g-import-not-at-top

    groups: Dict[str, Dict[str, dict]] = {}
    names = "|".join(re.escape(cache.name) for cache, _ in _paths(model))
    pattern = re.compile(rf"(?:^|/)({names})(?:_shard_(\d+))?/(.*):\d+$")
    with h5py.File(filepath, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        for layer_name in root.attrs.get("layer_names", []):
            layer = root[layer_name.decode() if isinstance(layer_name, bytes) else layer_name]
            for weight_name in layer.attrs.get("weight_names", []):
                weight_name = weight_name.decode() if isinstance(weight_name, bytes) else weight_name
                match = pattern.search(weight_name)
                if match is None:
                    continue
                base, shard, rest = match.group(1), match.group(2) or "", match.group(3)
                data = layer[weight_name]
                groups.setdefault(base, {}).setdefault(shard, {})[rest] = (
                    tuple(data.shape), tf.as_dtype(data.dtype))
    return {name: _combine(g) for name, g in groups.items()}


def check_checkpoint(model, filepath) -> None:
    """Raises ValueError, naming both specs, when a cache saved in the weights file `filepath`
    differs from the cache at the same place under `model`; reads the file, changes nothing.

    `model` is any root of a checkpoint: a Keras model (`load_weights` calls this), or the
    `tf.train.Checkpoint` about to `restore(filepath)` (call it first).

    Example:

    >>> import tempfile
    >>> spec = {"item": tf.TensorSpec([], tf.int64)}
    >>> path = tf.train.Checkpoint(cache=tfnegcache.NegativeCache(8, spec, 4)).write(
    ...     tempfile.mkdtemp() + "/ckpt")
    >>> bigger = tf.train.Checkpoint(cache=tfnegcache.NegativeCache(16, spec, 4))
    >>> tfnegcache.check_checkpoint(bigger, path)
    Traceback (most recent call last):
    ...
    ValueError: Cannot restore the cache 'negative_cache' from '...': it was saved as [replicated, size=8, ...], but the model's cache is [replicated, size=16, ...]. Nothing was restored. Build the model with the cache it was saved with.
    """
    caches = _paths(model)
    if not caches:
        return
    if is_h5(filepath):
        saved = _saved_h5(filepath, model)
        pairs = [(cache, saved.get(cache.name)) for cache, _ in caches]
    else:
        reader = tf.train.load_checkpoint(os.fspath(filepath))
        pairs = [(cache, _saved_tf(reader, path)) for cache, path in caches]
    for cache, spec in pairs:
        if spec is None:
            continue   # nothing of this cache in the file: a restore leaves it as it is
        current = cache_spec(cache)
        if spec != current:
            raise ValueError(
                f"Cannot restore the cache {cache.name!r} from {os.fspath(filepath)!r}: it was "
                f"saved as [{describe(spec)}], but the model's cache is [{describe(current)}]. "
                "Nothing was restored. Build the model with the cache it was saved with.")


def check_h5_savable(model, filepath) -> None:
    """Raises ValueError before writing when a cache holds strings, which `.h5` cannot."""
    for cache, _ in _paths(model):
        strings = sorted({v.name for store in cache.stores() for v in store.weights
                          if v.dtype == tf.string})
        if strings:
            raise ValueError(
                f"The .h5 weights format cannot store string variables, and the cache "
                f"{cache.name!r} holds {strings}. Save in the TensorFlow format instead (a "
                f"path without .h5, e.g. {os.path.splitext(os.fspath(filepath))[0]!r}), which "
                "also keeps the cache's id index.")
