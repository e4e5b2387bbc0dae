"""`CacheSpec`: what a Keras 3 negative cache holds, checked once at construction, and the
checks of everything given to a cache against it (keras-rs style messages, raised while
tracing, before anything changes).

Differences from the TF front end's spec, forced by JAX: ids are int32 (JAX without x64 has
no int64 and would truncate silently), and features are numbers (JAX has no string arrays;
map strings to integers in the input pipeline, e.g. with `keras.layers.StringLookup`).
"""

import collections
import dataclasses
from typing import Dict, Mapping, Optional

import numpy as np
from keras import ops

from tfnegcache import _args
from tfnegcache.keras3 import _backend

INT32_MAX = _backend.INT32_MAX

FeatureSpec = collections.namedtuple("FeatureSpec", ["shape", "dtype"])
FeatureSpec.__doc__ = """One cached feature: its per-candidate `shape` (a tuple) and `dtype` (a
name such as "int32"). `tf.TensorSpec`, `jax.ShapeDtypeStruct` or a `(shape, dtype)` tuple are
accepted wherever a `FeatureSpec` is."""

_NUMERIC = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
            "float16", "bfloat16", "float32", "float64")
_WIDE = ("int64", "float64")


def _dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    try:
        return np.dtype(name).name if name != "bfloat16" else name
    except TypeError:
        return name


def _jax_x64() -> bool:
    if not _backend.is_jax():
        return True
    import jax  # pylint: disable=import-outside-toplevel
    return bool(jax.config.jax_enable_x64)


def _as_feature_spec(key, value) -> FeatureSpec:
    if isinstance(value, tuple) and len(value) == 2 and not hasattr(value, "dtype"):
        shape, dtype = value
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        shape, dtype = value.shape, value.dtype
    else:
        raise ValueError(
            f"`feature_spec[{key!r}]` must be a (shape, dtype) pair, a FeatureSpec or a "
            f"tf.TensorSpec / jax.ShapeDtypeStruct. Received: {value!r}.")
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        shape = None
    if shape is None or any(d < 0 for d in shape):
        raise ValueError(
            f"`feature_spec[{key!r}]` must have a fully defined per-candidate shape. Received: "
            f"{value!r}.")
    dtype = _dtype_name(dtype)
    if dtype not in _NUMERIC:
        raise ValueError(
            f"`feature_spec[{key!r}]` has dtype {dtype}; the Keras 3 cache stores numbers only "
            "(JAX has no string arrays). Map strings to integers in the input pipeline "
            "(e.g. keras.layers.StringLookup) and cache those.")
    if dtype in _WIDE and not _jax_x64():
        raise ValueError(
            f"`feature_spec[{key!r}]` has dtype {dtype}, which JAX stores in 32 bits unless "
            "x64 is enabled (values would be cut silently). Use "
            f"{dtype.replace('64', '32')} features.")
    return FeatureSpec(shape, dtype)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The validated arguments of a cache (see `NegativeCache` for their meaning)."""

    size: int
    feature_spec: Dict[str, FeatureSpec]
    embedding_dim: int
    embedding_dtype: str = "float32"
    seed: int = 0
    block_size: Optional[int] = None

    @classmethod
    def build(cls, size, feature_spec, embedding_dim, embedding_dtype="float32", seed=0,
              block_size=None) -> "CacheSpec":
        """Checks every argument; raises ValueError naming the first that is wrong."""
        size = _args.integer("size", size, 1, INT32_MAX - 1)
        embedding_dim = _args.integer("embedding_dim", embedding_dim, 1)
        seed = _args.integer("seed", seed, 0, INT32_MAX)
        block_size = _args.integer("block_size", block_size, 1, size, "size", allow_none=True)
        if not isinstance(feature_spec, Mapping) or not feature_spec:
            raise ValueError(
                "`feature_spec` must be a non-empty dict naming the candidate features to "
                "store, {name: (per-candidate shape, dtype)}. Received: "
                f"feature_spec={feature_spec!r}.")
        features = {str(k): _as_feature_spec(k, v) for k, v in sorted(feature_spec.items())}
        embedding_dtype = _dtype_name(embedding_dtype)
        if embedding_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(
                "`embedding_dtype` must be float32, bfloat16 or float16. Received: "
                f"embedding_dtype={embedding_dtype!r}.")
        return cls(size, features, embedding_dim, embedding_dtype, seed, block_size)

    def config(self) -> dict:
        """The spec as a JSON-friendly dict (a cache's `get_config`)."""
        return {
            "size": self.size,
            "feature_spec": {k: [list(s.shape), s.dtype] for k, s in self.feature_spec.items()},
            "embedding_dim": self.embedding_dim,
            "embedding_dtype": self.embedding_dtype,
            "seed": self.seed,
            "block_size": self.block_size,
        }

    # ------------------------------------------------------------------ input checks

    def check_features(self, features, num_rows=None,
                       what: str = "candidate_features") -> Dict[str, object]:
        """The spec'd features of `features` (extra keys are ignored) as tensors, checked.

        Raises:
          ValueError: a key is missing, or a feature's per-candidate shape or dtype differs
            from the spec, or its rows differ from `num_rows` (when both are static).
        """
        if not isinstance(features, Mapping):
            raise ValueError(
                f"`{what}` must be a dict of tensors with keys {sorted(self.feature_spec)}. "
                f"Received: {type(features).__name__}.")
        missing = sorted(set(self.feature_spec) - set(features))
        if missing:
            raise ValueError(
                f"`{what}` is missing feature(s) {missing} of the cache's feature_spec. "
                f"Received keys: {sorted(features)}; expected: {sorted(self.feature_spec)}.")
        checked = {}
        for key, spec in self.feature_spec.items():
            value = ops.convert_to_tensor(features[key])
            dtype = _dtype_name(value.dtype)
            if dtype != spec.dtype:
                raise ValueError(
                    f"`{what}[{key!r}]` has dtype {dtype}, but the cache's feature_spec says "
                    f"{spec.dtype} (per-candidate shape {spec.shape}).")
            shape = tuple(value.shape)
            if len(shape) != len(spec.shape) + 1 or any(
                    s is not None and s != t for s, t in zip(shape[1:], spec.shape)):
                raise ValueError(
                    f"`{what}[{key!r}]` has shape {shape}, but the cache expects "
                    f"[num_candidates, *{spec.shape}] (feature_spec {spec}).")
            if isinstance(num_rows, int) and shape[0] is not None and shape[0] != num_rows:
                raise ValueError(
                    f"`{what}[{key!r}]` has {shape[0]} rows, but there are {num_rows} "
                    f"candidates (rows of the embeddings/ids). Received shape {shape}.")
            checked[key] = value
        return checked

    def check_embeddings(self, embeddings, what: str = "embeddings"):
        """`embeddings` as a tensor, checked to be `[rows, embedding_dim]` floats."""
        embeddings = ops.convert_to_tensor(embeddings)
        dtype = _dtype_name(embeddings.dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise ValueError(f"`{what}` must be floating point. Received dtype {dtype}.")
        shape = tuple(embeddings.shape)
        if len(shape) != 2 or shape[1] not in (None, self.embedding_dim):
            raise ValueError(
                f"`{what}` must have shape [num_rows, {self.embedding_dim}] (the cache's "
                f"embedding_dim). Received shape {shape}.")
        return embeddings

    def check_queries(self, queries, what: str = "query_embeddings"):
        """`queries` as a tensor, checked to be `[B, embedding_dim]` floats."""
        queries = ops.convert_to_tensor(queries)
        dtype = _dtype_name(queries.dtype)
        if not dtype.startswith(("float", "bfloat")):
            raise ValueError(f"`{what}` must be floating point. Received dtype {dtype}.")
        shape = tuple(queries.shape)
        if len(shape) != 2 or shape[1] not in (None, self.embedding_dim):
            raise ValueError(
                f"`{what}` must have shape [num_rows, {self.embedding_dim}] (the cache's "
                f"embedding_dim; multi-head queries are not supported by the Keras 3 cache). "
                f"Received shape {shape}.")
        return queries

    def check_ids(self, ids, what: str = "candidate_ids"):
        """`(ids as an int32 vector, run-time check or None)`.

        Ids must be int32 values below `2**31 - 1` (the id index's empty marker). int64 ids
        are accepted where they can be checked before the cast: numpy arrays are checked now
        (ValueError), TensorFlow tensors by the returned check, which the training step's
        guard runs before anything changes. (Under JAX without x64, 64-bit arrays are cut to
        32 bits before any model code sees them: feed int32 ids.)
        """
        if isinstance(ids, (np.ndarray, list, tuple, int, np.integer)):
            host = np.asarray(ids)
            if not np.issubdtype(host.dtype, np.integer):
                raise ValueError(
                    f"`{what}` must be integers (int32). Received dtype {host.dtype}.")
            if host.size and (host.min() < -INT32_MAX - 1 or host.max() >= INT32_MAX):
                raise ValueError(
                    f"`{what}` must be int32 values below 2**31 - 1 (2147483647 marks an empty "
                    f"index entry). Received values in [{host.min()}, {host.max()}]; map "
                    "wider ids to a dense int32 range in the input pipeline.")
            ids, check = ops.convert_to_tensor(host.astype(np.int32)), None
        else:
            ids = ops.convert_to_tensor(ids)
            dtype = _dtype_name(ids.dtype)
            if dtype not in ("int32", "int64"):
                raise ValueError(
                    f"`{what}` must be int32 (or int64 values that fit). Received dtype "
                    f"{dtype}.")
            check = None
            if dtype == "int64":
                fits = ops.logical_and(ops.all(ids < INT32_MAX), ops.all(ids >= -INT32_MAX - 1))
                check = (f"`{what}` has values outside int32 (below 2**31 - 1)", fits)
            else:
                check = (f"`{what}` has the value 2**31 - 1 (the id index's empty marker)",
                         ops.all(ids < INT32_MAX))
            ids = ops.cast(ids, "int32")
        if len(ids.shape) != 1:
            raise ValueError(
                f"`{what}` must be a vector [num_candidates]. Received shape "
                f"{tuple(ids.shape)}.")
        return ids, check
