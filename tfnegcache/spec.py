"""`CacheSpec`: what a negative cache holds, checked once at construction, and the checks of
everything given to a cache against it (keras-rs style messages, raised at trace time)."""

import dataclasses
import math
import os
from typing import Dict, Mapping, Optional

import tensorflow as tf

from tfnegcache import checks

FeatureSpec = Mapping[str, tf.TensorSpec]

# Memory estimates where the bytes depend on the values: a tf.string element is a 24-byte
# `tstring` holding strings up to 22 bytes in place (longer ones add their length); an entry
# of the id index (a hash map) holds a key, a slot and the map's own pointers (measured with
# TensorFlow 2.21 on 4M entries: 43 bytes each with int64 ids, 76 with short string ids).
STRING_BYTES = 32
INDEX_ENTRY_BYTES = 48


def machine_memory_bytes() -> Optional[int]:
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} bytes"


def _describe(spec_or_tensor) -> str:
    return f"shape={tuple(spec_or_tensor.shape)} dtype={spec_or_tensor.dtype.name}"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """The validated arguments of a cache (see `NegativeCache` for their meaning)."""

    size: int
    feature_spec: Dict[str, tf.TensorSpec]
    embedding_dim: int
    id_dtype: tf.DType = tf.int64
    embedding_dtype: tf.DType = tf.float32
    seed: int = 0
    block_size: Optional[int] = None
    scoring_dtype: Optional[tf.DType] = None

    @classmethod
    def build(cls, size, feature_spec, embedding_dim, id_dtype=tf.int64,
              embedding_dtype=tf.float32, seed=0, block_size=None,
              scoring_dtype=None) -> "CacheSpec":
        """Checks every argument; raises ValueError naming the first that is wrong."""
        size = checks.integer("size", size, 1)
        embedding_dim = checks.integer("embedding_dim", embedding_dim, 1)
        seed = checks.integer("seed", seed, None)
        block_size = checks.integer("block_size", block_size, 1, size, "size", allow_none=True)
        if scoring_dtype is not None:
            scoring_dtype = tf.as_dtype(scoring_dtype)
            if scoring_dtype not in (tf.float32, tf.bfloat16, tf.float16):
                raise ValueError(
                    "`scoring_dtype` must be None (the queries' dtype), tf.float32, "
                    f"tf.bfloat16 or tf.float16. Received: scoring_dtype={scoring_dtype!r}.")
        if not isinstance(feature_spec, Mapping) or not feature_spec:
            raise ValueError(
                "`feature_spec` must be a non-empty dict naming the candidate features to "
                "store, {name: tf.TensorSpec(shape, dtype)}. Received: "
                f"feature_spec={feature_spec!r}.")
        for key, value in feature_spec.items():
            if not isinstance(value, tf.TensorSpec) or not value.shape.is_fully_defined():
                raise ValueError(
                    f"`feature_spec[{key!r}]` must be a tf.TensorSpec with a fully defined "
                    f"per-candidate shape. Received: {value!r}.")
        id_dtype = tf.as_dtype(id_dtype)
        if id_dtype not in (tf.int64, tf.string):
            raise ValueError(f"`id_dtype` must be tf.int64 or tf.string. Received: {id_dtype}.")
        embedding_dtype = tf.as_dtype(embedding_dtype)
        if not embedding_dtype.is_floating:
            raise ValueError(
                f"`embedding_dtype` must be a float dtype. Received: {embedding_dtype}.")
        spec = cls(size, dict(sorted(feature_spec.items())), embedding_dim, id_dtype,
                   embedding_dtype, seed, block_size, scoring_dtype)
        spec.check_memory()
        return spec

    # ------------------------------------------------------------------ memory

    def memory_bytes(self) -> Dict[str, int]:
        """The estimated bytes of one store of this spec (one copy of a `NegativeCache`, one
        shard of a `ShardedNegativeCache`), by part: `features`, `embeddings`, `ids`,
        `bookkeeping` (per-slot steps and counters) and `index` (the id index when full).
        Numbers are exact; each `tf.string` element counts `STRING_BYTES`."""
        def element_bytes(dtype):
            return STRING_BYTES if dtype == tf.string else dtype.size

        id_bytes = element_bytes(self.id_dtype)
        return {
            "features": self.size * sum(
                math.prod(s.shape.as_list()) * element_bytes(s.dtype)
                for s in self.feature_spec.values()),
            "embeddings": self.size * self.embedding_dim * self.embedding_dtype.size,
            "ids": self.size * id_bytes,
            "bookkeeping": self.size * 2 * 8 + 3 * 8,
            "index": self.size * (INDEX_ENTRY_BYTES + (id_bytes if self.id_dtype == tf.string
                                                       else 0)),
        }

    def check_memory(self, available: Optional[int] = None) -> None:
        """Raises ValueError, naming `size` and the estimate, when one store of this spec
        needs more than the machine's memory (`available` bytes; default: the physical
        memory), before anything is allocated."""
        available = machine_memory_bytes() if available is None else available
        parts = self.memory_bytes()
        total = sum(parts.values())
        if available is None or total <= available:
            return
        detail = ", ".join(f"{name} {_gib(n)}" for name, n in parts.items())
        raise ValueError(
            f"`size` must be small enough for the cache to fit in this machine's memory "
            f"({_gib(available)}): {self.size} slots of this spec need about {_gib(total)} "
            f"({detail}; a string element counted as {STRING_BYTES} bytes). "
            f"Received: size={self.size}.")

    # ------------------------------------------------------------------ config

    def config(self) -> dict:
        """The spec as a JSON-friendly dict (a cache's `get_config`)."""
        return {
            "size": self.size,
            "feature_spec": {k: {"shape": s.shape.as_list(), "dtype": s.dtype.name}
                             for k, s in self.feature_spec.items()},
            "embedding_dim": self.embedding_dim,
            "id_dtype": self.id_dtype.name,
            "embedding_dtype": self.embedding_dtype.name,
            "seed": self.seed,
            "block_size": self.block_size,
            "scoring_dtype": None if self.scoring_dtype is None else self.scoring_dtype.name,
        }

    @staticmethod
    def arguments_from_config(config: dict) -> dict:
        """A cache's `get_config()` with its `feature_spec` turned back into `tf.TensorSpec`s."""
        config = dict(config)
        config["feature_spec"] = {
            k: tf.TensorSpec(v["shape"], tf.as_dtype(v["dtype"]))
            for k, v in config["feature_spec"].items()}
        return config

    # ------------------------------------------------------------------ input checks

    def check_features(self, features: Mapping[str, tf.Tensor], num_rows=None,
                       what: str = "candidate_features") -> Dict[str, tf.Tensor]:
        """The spec'd features of `features` (extra keys are ignored), checked.

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
            value = features[key]
            if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
                raise ValueError(
                    f"`{what}[{key!r}]` must be a dense tensor of per-candidate "
                    f"{_describe(spec)}. Received: {type(value).__name__}. Pad it to a fixed "
                    "shape first.")
            value = tf.convert_to_tensor(value)
            if value.dtype != spec.dtype:
                raise ValueError(
                    f"`{what}[{key!r}]` has dtype {value.dtype.name}, but the cache's "
                    f"feature_spec says {spec.dtype.name} (per-candidate shape "
                    f"{tuple(spec.shape)}).")
            if value.shape.rank is not None and (
                    value.shape.rank != spec.shape.rank + 1
                    or not spec.shape.is_compatible_with(value.shape[1:])):
                raise ValueError(
                    f"`{what}[{key!r}]` has shape {tuple(value.shape)}, but the cache expects "
                    f"[num_candidates, *{tuple(spec.shape)}] (feature_spec {_describe(spec)}).")
            rows = value.shape[0]
            if isinstance(num_rows, int) and rows is not None and rows != num_rows:
                raise ValueError(
                    f"`{what}[{key!r}]` has {rows} rows, but there are {num_rows} "
                    f"candidates (rows of the embeddings/ids). Received shape "
                    f"{tuple(value.shape)}.")
            checked[key] = value
        return checked

    def check_embeddings(self, embeddings, what: str = "embeddings") -> tf.Tensor:
        """`embeddings` as a tensor, checked to be `[rows, embedding_dim]` floats."""
        embeddings = tf.convert_to_tensor(embeddings)
        if not embeddings.dtype.is_floating:
            raise ValueError(
                f"`{what}` must be floating point. Received dtype {embeddings.dtype.name}.")
        if embeddings.shape.rank is not None and (
                embeddings.shape.rank != 2
                or embeddings.shape[1] not in (None, self.embedding_dim)):
            raise ValueError(
                f"`{what}` must have shape [num_rows, {self.embedding_dim}] (the cache's "
                f"embedding_dim). Received shape {tuple(embeddings.shape)}.")
        return embeddings

    def check_queries(self, queries, what: str = "query_embeddings") -> tf.Tensor:
        """`queries` as a tensor, checked to be `[B, d]` or multi-head `[B, H, d]` floats."""
        queries = tf.convert_to_tensor(queries)
        if not queries.dtype.is_floating:
            raise ValueError(
                f"`{what}` must be floating point. Received dtype {queries.dtype.name}.")
        shapes = (f"[num_rows, {self.embedding_dim}] or, multi-head, "
                  f"[num_rows, num_heads, {self.embedding_dim}]")
        rank = queries.shape.rank
        if rank is not None and rank not in (2, 3):
            raise ValueError(
                f"`{what}` must have shape {shapes}. Received shape {tuple(queries.shape)}.")
        if rank is not None and queries.shape[-1] not in (None, self.embedding_dim):
            raise ValueError(
                f"`{what}` have dimension {queries.shape[-1]}, but the cache stores embeddings "
                f"of dimension {self.embedding_dim}: they must have shape {shapes}. Received "
                f"shape {tuple(queries.shape)}.")
        return queries

    def check_ids(self, ids, what: str = "candidate_ids") -> tf.Tensor:
        """`ids` as a vector of the cache's id dtype (int32 is widened to int64)."""
        ids = tf.convert_to_tensor(ids)
        if ids.dtype == tf.int32 and self.id_dtype == tf.int64:
            ids = tf.cast(ids, tf.int64)
        if ids.dtype != self.id_dtype:
            raise ValueError(
                f"`{what}` has dtype {ids.dtype.name}, but the cache's id_dtype is "
                f"{self.id_dtype.name}.")
        if ids.shape.rank is not None and ids.shape.rank != 1:
            raise ValueError(
                f"`{what}` must be a vector [num_candidates]. Received shape "
                f"{tuple(ids.shape)}.")
        return ids
