"""Serving a Keras 3 retrieval model: the query tower and an exact top-k index over the
candidates, exported as a TensorFlow SavedModel through Keras 3's own export
(`keras.Model.export(format="tf_saved_model")`, which on JAX converts with `jax2tf`).

On JAX the index's top-k is a sort (`argsort`), not `lax.top_k`: JAX 0.10 serialises
`lax.top_k` as a StableHLO composite newer than TensorFlow 2.21 can read, so an export that
used it would write out fine and fail when served. The sort is exact on every platform and
costs `O(N log N)` per query, which suits catalogues up to about a million on a CPU; on
TensorFlow the index uses `top_k` itself.
"""

import os
import shutil
import tempfile
from typing import Optional

import keras
import keras_rs
import numpy as np
from keras import ops

from tfnegcache import _args
from tfnegcache.keras3 import _backend


class BruteForceIndex(keras_rs.layers.BruteForceRetrieval):
    """`keras_rs.layers.BruteForceRetrieval` whose top-k also exports from JAX (see the module
    docstring). Ids are int32, as keras-rs stores them.

    Example:

    >>> index = BruteForceIndex(np.eye(3, dtype="float32"), np.array([7, 8, 9], "int32"), k=2)
    >>> scores, ids = index(np.array([[0.0, 1.0, 0.5]], "float32"))
    >>> ids.tolist()
    [[8, 9]]
    """

    def call(self, inputs):
        scores = self.compute_score(inputs, self.candidate_embeddings)
        if _backend.is_jax():
            top = ops.argsort(-scores, axis=-1)[:, :self.k]
            top_scores = ops.take_along_axis(scores, top, axis=-1)
        else:
            top_scores, top = ops.top_k(scores, k=self.k)
        if self.candidate_ids is not None:
            top = ops.take(self.candidate_ids, top, axis=0)
        return (top_scores, top) if self.return_scores else top


class _Retriever(keras.Model):
    """The served model: query features -> {"scores": [B, k], "ids": [B, k]}."""

    def __init__(self, query_model, index, **kwargs):
        super().__init__(**kwargs)
        self.query_model = query_model
        self.index = index

    def call(self, inputs):
        scores, ids = self.index(self.query_model(inputs))
        return {"scores": scores, "ids": ids}


def export_retrieval_model(query_model, candidate_embeddings, candidate_ids, path: str,
                           input_signature, k: int = 100, overwrite: bool = False) -> str:
    """Exports `query_model` and an exact top-k index as a TensorFlow SavedModel.

    Args:
      query_model: the query tower, a Keras layer or model (its weights are exported).
      candidate_embeddings: `[N, d]` every candidate's embedding (e.g. the candidate tower on
        the whole catalogue).
      candidate_ids: `[N]` their int32 ids.
      path: the SavedModel directory.
      input_signature: the query tower's inputs, e.g.
        `[keras.InputSpec(shape=(None,), dtype="int32")]`.
      k: ids returned per query, in [1, N].
      overwrite: replace an existing non-empty `path`.

    Returns:
      `path`. Load it with `tf.saved_model.load(path)`; `.serve(inputs)` (and the
      `serving_default` signature) returns `{"scores": [B, k], "ids": [B, k]}`.

    Raises:
      ValueError: before anything is written, for non-finite embeddings, ids that are not
        int32 or do not match the embeddings, `k` out of range, or an existing `path`.

    Example:

    >>> users = keras.layers.Embedding(10, 4)
    >>> export_retrieval_model(users, np.eye(5, 4, dtype="float32"),
    ...                        np.arange(5, dtype="int32"), "/tmp/retrieval", k=2,
    ...                        input_signature=[keras.InputSpec(shape=(None,), dtype="int32")],
    ...                        overwrite=True)
    '/tmp/retrieval'
    """
    embeddings = np.asarray(ops.convert_to_numpy(candidate_embeddings), np.float32)
    ids = np.asarray(ops.convert_to_numpy(candidate_ids))
    if embeddings.ndim != 2 or not np.all(np.isfinite(embeddings)):
        raise ValueError(
            "`candidate_embeddings` must be a finite [num_candidates, dim] matrix. Received "
            f"shape {embeddings.shape} with {int(np.sum(~np.isfinite(embeddings)))} NaN or "
            "Inf values.")
    if ids.shape != (embeddings.shape[0],) or not np.issubdtype(ids.dtype, np.integer) or (
            ids.size and (ids.min() < -2**31 or ids.max() >= 2**31)):
        raise ValueError(
            f"`candidate_ids` must be {embeddings.shape[0]} int32 ids, one per embedding. "
            f"Received shape {ids.shape}, dtype {ids.dtype}.")
    k = _args.integer("k", k, 1, embeddings.shape[0], "the number of candidates")
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"`path` {path!r} exists and is not empty; pass overwrite=True to "
                         "replace it.")
    index = BruteForceIndex(embeddings, ids.astype(np.int32), k=k)
    serving = _Retriever(query_model, index, name="retriever")
    # One call on a batch of zeros of the signature builds the model and checks that the
    # query tower takes these inputs and gives `[B, d]` queries, before anything is written.
    specs = input_signature if isinstance(input_signature, (list, tuple)) else [input_signature]
    examples = [np.zeros([1 if d is None else d for d in spec.shape], spec.dtype)
                for spec in specs]
    outputs = serving(*examples)
    if tuple(outputs["ids"].shape) != (1, k):
        raise ValueError(
            f"the query tower's output on `input_signature` {input_signature} does not score "
            f"against [N, {embeddings.shape[1]}] candidates.")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".export-")
    try:
        serving.export(staging, format="tf_saved_model", input_signature=input_signature,
                       verbose=False)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return path
