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


def is_keras_v3(filepath) -> bool:
    """Whether Keras writes or reads `filepath` in its own format: a `.keras` archive
    (`model.save`), or `.weights.h5` (`save_weights`), variables by position per layer."""
    return str(filepath).endswith((".keras", ".weights.h5"))


def is_h5(filepath, save_format: Optional[str] = None) -> bool:
    """Whether Keras writes or reads `filepath` in the (legacy) HDF5 weights format."""
    if save_format is not None:
        return save_format.lower() in ("h5", "hdf5")
    return str(filepath).endswith((".h5", ".hdf5")) and not is_keras_v3(filepath)


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
    if spec["layout"] == "sharded":
        spec["shards"] = len(stores)
    return spec


def describe(spec: dict) -> str:
    features = ", ".join(f"{name}: {list(shape)} {dtype}"
                         for name, (shape, dtype) in spec["features"].items())
    layout = spec["layout"]
    if "shards" in spec:
        layout += f" over {spec['shards']} shard{'s' if spec['shards'] != 1 else ''}"
    return (f"{layout}, size={spec['size']}, embedding_dim={spec['embedding_dim']} "
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
    if spec["layout"] == "sharded":
        spec["shards"] = len(groups)
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


def _keras_v3_paths(model) -> Dict[int, str]:
    """`{id(store): path}` of every `CacheStore` under `model` in a `.keras` / `.weights.h5`
    file: the walk of tf_keras's `saving_lib` (attributes in reverse sorted order, a layer
    in a list or dict named by its snake-cased class, each object once)."""
    # pylint: disable=g-import-not-at-top,protected-access
    from tf_keras.src.saving import saving_lib
    from tf_keras.src.utils import generic_utils
    from tfnegcache.store import CacheStore

    found, visited = {}, set()

    def visit(obj, path):
        if id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, CacheStore):
            found[id(obj)] = path
        for attr, child in saving_lib._walk_trackable(obj):
            if saving_lib._is_keras_trackable(child):
                visit(child, tf.io.gfile.join(path, attr))
            elif isinstance(child, (list, dict, tuple, set)):
                used = {}
                for item in (list(child.values()) if isinstance(child, dict) else child):
                    if not saving_lib._is_keras_trackable(item) or id(item) in visited:
                        continue
                    name = generic_utils.to_snake_case(type(item).__name__)
                    used[name] = used.get(name, -1) + 1
                    name = f"{name}_{used[name]}" if used[name] else name
                    visit(item, tf.io.gfile.join(path, attr, name))

    visit(model, "")
    return found


def _h5_dtype(dataset) -> tf.DType:
    return tf.string if dataset.dtype.kind in "OSU" else tf.as_dtype(dataset.dtype)


def _positional(saved, feature_names: List[str]) -> Dict[str, Tuple[tuple, tf.DType]]:
    """`{name: (shape, dtype)}` of one store saved by position: the features first (named as
    the model's when there are as many), then `_STATE`."""
    arrays = [saved[str(j)] for j in range(len(saved))]
    if len(arrays) < len(_STATE):
        return {}
    features, state = arrays[:-len(_STATE)], arrays[-len(_STATE):]
    names = (list(feature_names) if len(features) == len(feature_names)
             else [f"#{j}" for j in range(len(features))])
    variables = {f"features/{n}": (tuple(a.shape), _h5_dtype(a)) for n, a in zip(names, features)}
    variables.update({n: (tuple(a.shape), _h5_dtype(a)) for n, a in zip(_STATE, state)})
    return variables


def _saved_keras_v3(filepath, model, caches) -> List[Tuple[object, Optional[dict]]]:
    """`[(cache, saved spec or None)]` from a `.keras` archive or a `.weights.h5` file.

    The format keeps a layer's variables by position, not by name, so the saved features take
    the model's names when there are as many (a feature renamed with its shape and dtype
    unchanged is not seen). A sharded cache's shards are saved as siblings `cache_store`,
    `cache_store_1`, ... of one list."""
    # pylint: disable=g-import-not-at-top
    import zipfile
    from tf_keras.src.saving import saving_lib

    paths = _keras_v3_paths(model)
    archive = None
    if str(filepath).endswith(".keras"):
        archive = zipfile.ZipFile(os.fspath(filepath), "r")
        store = saving_lib.H5IOStore("model.weights.h5", archive=archive, mode="r")
    else:
        store = saving_lib.H5IOStore(os.fspath(filepath), mode="r")
    try:
        found = []
        for cache, _ in caches:
            stores = cache.stores()
            feature_names = sorted(cache.spec.feature_spec)
            first = paths.get(id(stores[0]))
            if first is None:
                found.append((cache, None))
                continue
            if stores == [cache]:
                shard_paths = [first]
            else:
                parent, base = first.rsplit("/", 1)
                base = re.sub(r"_\d+$", "", base)
                shard_paths = []
                while True:
                    index = len(shard_paths)
                    path = f"{parent}/{base}" + (f"_{index}" if index else "")
                    if not len(store.get(path)):   # pylint: disable=g-explicit-length-test
                        break
                    shard_paths.append(path)
            groups = {("" if stores == [cache] else str(i)): _positional(store.get(path),
                                                                        feature_names)
                      for i, path in enumerate(shard_paths)}
            groups = {k: v for k, v in groups.items() if v}
            found.append((cache, _combine(groups)))
        return found
    finally:
        store.close()
        if archive is not None:
            archive.close()


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
    if is_keras_v3(filepath):
        pairs = _saved_keras_v3(filepath, model, caches)
    elif is_h5(filepath):
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
