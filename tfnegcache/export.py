"""Export a trained query tower and a candidate index as a TF Serving SavedModel.

`export_retrieval_model` writes `<path>` (default `saved_models/<name>/<version>/`, the layout
TF Serving's model server expects: a base directory per model, a numbered directory per
version) holding only what serving needs: the query tower (its lookup tables and embeddings)
and the candidate embeddings with their identifiers in a `tfrs.layers.factorized_top_k`
index. Nothing of training goes in: no negative cache, no candidate tower, no optimizer.

The `serving_default` signature maps raw query features to the top-k candidates over the
whole corpus:

    {"user_id": tf.string [batch]}  ->  {"ids": tf.string [batch, k], "scores": float32 [batch, k]}

(the input's name and dtype are `input_name` / `input_spec`; a dict `input_spec`, for a
query tower that takes a dict of features, gives one named input per key; the output ids have
the dtype of `candidate_ids`). Out-of-vocabulary queries are whatever the query tower makes of them: for the
MovieLens towers of `tfnegcache_examples.movielens`, an unknown user id maps to the
`StringLookup`'s single OOV index, whose embedding is never trained, so every unknown user gets
the same, non-personalised top k (well-formed ids and finite scores, no error).

Malformed requests fail with `tf.errors.InvalidArgumentError` and leave the loaded model
serving: a wrong dtype ("... was expected to be a string tensor but is a int64 tensor"), a
wrong rank ("Shape of tensor user_id [1,2] is not compatible with expected shape [?]"). An
empty batch is not an error: it returns ids and scores of shape `[0, k]`.

An export that would serve wrong answers is refused before anything is written: candidate
embeddings with NaN or Inf rows (a NaN score sorts first in the index's top k), and a query
tower that `input_spec` does not fit or that does not return `[batch, d]` floats (otherwise the
export succeeds and every request fails). The version directory is written to a temporary
sibling and renamed into place, so a failed export leaves no partial directory and an existing
one untouched; replacing an existing non-empty export takes `overwrite=True`.
"""

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Mapping, Optional, Union

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfnegcache import checks


class _Served(tf.Module):
    """The exported object: an index that owns the query tower and the candidates."""

    def __init__(self, index, input_spec):
        super().__init__()
        self.index = index

        @tf.function(input_signature=[input_spec])
        def serve(queries):
            # A signature call checks dtypes but not shapes: without this a rank-2 request
            # fails deep in the index ("In[0] ndims must be >= 2"); with it, the error names
            # the input and the expected shape.
            queries = tf.nest.map_structure(
                lambda query, spec: tf.ensure_shape(query, spec.shape, name=spec.name),
                queries, input_spec)
            scores, ids = self.index(queries)
            return {"ids": ids, "scores": scores}

        self.serve = serve


# What TensorFlow accepts as the name of a signature's input (an op name).
_INPUT_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


def _named_input_spec(input_spec, input_name):
    """The serving input: a `tf.TensorSpec` named `input_name`, or for a dict `input_spec`
    (a query tower taking a dict) one spec per key, named by its key; each name becomes a
    named input of the signature.

    Raises:
      ValueError: `input_spec` is neither; a name is not one TensorFlow accepts; or
        `input_name` is given with a dict, or disagrees with the spec's own name.
    """
    if input_spec is None:
        input_spec = tf.TensorSpec([None], tf.string)
    if isinstance(input_spec, tf.TensorSpec):
        if input_name is not None and input_spec.name not in (None, input_name):
            raise ValueError(
                "`input_name` and the name of `input_spec` must agree: both name the "
                f"signature's input. Received: input_name={input_name!r}, "
                f"input_spec={input_spec}.")
        name = input_name or input_spec.name or "user_id"
        specs = {name: input_spec}
    elif (isinstance(input_spec, Mapping) and input_spec
          and all(isinstance(v, tf.TensorSpec) for v in input_spec.values())):
        if input_name is not None:
            raise ValueError(
                "`input_name` names the one input of a tf.TensorSpec `input_spec`; the keys of "
                "a dict `input_spec` name its inputs. Received: input_name="
                f"{input_name!r} with input_spec keys {sorted(map(str, input_spec))}.")
        specs = dict(input_spec)
    else:
        raise ValueError(
            "`input_spec` must be a tf.TensorSpec (one input, named `input_name`) or a "
            "non-empty dict {name: tf.TensorSpec} (one input per key, for a query tower that "
            f"takes a dict of features). Received: input_spec={input_spec!r}.")
    for name in specs:
        if not isinstance(name, str) or not _INPUT_NAME.match(name):
            raise ValueError(
                "Each input of the serving signature needs a name TensorFlow accepts: "
                "letters, digits and `_ . - /`, starting with a letter, a digit or `.`. "
                f"Received: {name!r}" + (" (`input_name`)." if isinstance(input_spec,
                                                                      tf.TensorSpec)
                                         else " (a key of `input_spec`)."))
    named = {name: tf.TensorSpec(spec.shape, spec.dtype, name=name)
             for name, spec in specs.items()}
    return named if isinstance(input_spec, Mapping) else next(iter(named.values()))


def _embeddings_from(candidates, candidate_ids):
    """`(embeddings [n, d], ids [n])` from a tensor/array, or a dataset of either form."""
    if isinstance(candidates, tf.data.Dataset):
        parts, id_parts = [], []
        for element in candidates:
            if isinstance(element, (tuple, list)):
                id_parts.append(tf.convert_to_tensor(element[0]))
                parts.append(tf.convert_to_tensor(element[1]))
            else:
                parts.append(tf.convert_to_tensor(element))
        embeddings = tf.concat(parts, 0)
        if id_parts:
            if candidate_ids is not None:
                raise ValueError("Give `candidate_ids` or a dataset of (ids, embeddings), not both.")
            candidate_ids = tf.concat(id_parts, 0)
    else:
        embeddings = tf.convert_to_tensor(candidates)
    if candidate_ids is None:
        raise ValueError("`candidate_ids` is required unless the dataset yields (ids, embeddings).")
    candidate_ids = tf.convert_to_tensor(candidate_ids)
    if embeddings.shape.rank != 2 or candidate_ids.shape.rank != 1 or (
            embeddings.shape[0] != candidate_ids.shape[0]):
        raise ValueError(
            "Expected candidate embeddings [n, d] and ids [n]. Received shapes "
            f"{tuple(embeddings.shape)} and {tuple(candidate_ids.shape)}.")
    return embeddings, candidate_ids


_MAX_IDS_SHOWN = 5


def _check_finite(embeddings, candidate_ids):
    """Refuses candidate embeddings with a NaN or Inf in any row.

    A NaN score compares as the largest in the index's top k, so such a candidate would come
    back first for every query.

    Args:
      embeddings: `[n, d]` float candidate embeddings, as they will be indexed.
      candidate_ids: `[n]` their identifiers, to name the bad rows.
    """
    finite_rows = tf.reduce_all(tf.math.is_finite(embeddings), axis=1).numpy()
    if finite_rows.all():
        return
    bad_ids = candidate_ids.numpy()[~finite_rows]
    shown = [i.decode("utf-8", "replace") if isinstance(i, bytes) else i.item()
             for i in bad_ids[:_MAX_IDS_SHOWN]]
    more = ", ..." if len(bad_ids) > _MAX_IDS_SHOWN else ""
    raise ValueError(
        "`candidate_embeddings_or_dataset` must hold finite embeddings. Received: "
        f"{len(bad_ids)} of {len(finite_rows)} rows with NaN or Inf, candidate ids "
        f"[{', '.join(map(repr, shown))}{more}].")


def _describe(model):
    return f"{type(model).__name__} {getattr(model, 'name', '')!r}"


def _check_query_model(query_model, input_spec, candidate_shape):
    """Refuses a query tower that `input_spec` does not fit or that does not return `[batch, d]`.

    Tracing alone accepts a mismatched dtype (a string-to-int `Cast` is a valid graph whose
    kernel does not exist), so the traced tower is also run on a batch of zero rows: that
    creates every kernel without needing a valid query value.

    Args:
      query_model: the query tower.
      input_spec: the serving input's `tf.TensorSpec`, `[batch, ...]`.
      candidate_shape: `[n, d]`, the candidate embeddings' shape.
    """
    dim = candidate_shape[1]

    def fails(problem):
        return ValueError(
            f"`query_model` must map `input_spec` to float embeddings [batch, {dim}] (the "
            f"candidate embeddings' dimension). {problem} Received: input_spec={input_spec}, "
            f"query_model={_describe(query_model)}.")

    ran = None
    specs = tf.nest.flatten(input_spec)
    try:
        traced = tf.function(query_model).get_concrete_function(input_spec)
        outputs = traced.structured_outputs
        if all(spec.shape.rank is not None for spec in specs):
            empty = tf.nest.map_structure(
                lambda spec: tf.zeros([d or 0 for d in spec.shape.as_list()], spec.dtype),
                input_spec)
            ran = traced(empty)
    # Whatever fails here would fail every request: re-raised with the spec and tower named.
    except Exception as error:  # pylint: disable=broad-except
        message = str(error).strip()
        if isinstance(error, tf.errors.OpError):
            # The message is a traceback of where the failing op was built, then the problem.
            message = error.message.strip().split("\n\n")[-1].splitlines()[0]
        message = message if message.endswith((".", ":")) else message + "."
        raise fails(f"Calling it on `input_spec` fails: {message}") from error
    if not isinstance(outputs, tf.Tensor):
        raise fails(f"It returns {type(outputs).__name__}, not a single tensor.")
    shape = outputs.shape
    if shape.rank == 2 and shape[1] is None and ran is not None:
        shape = tf.TensorShape([shape[0], ran.shape[1]])  # unknown when traced, known once run
    if shape.rank != 2 or shape[1] != dim:
        raise fails(f"Its output shape is {shape}, the candidate embeddings' shape is "
                    f"{candidate_shape}.")
    if not outputs.dtype.is_floating:
        raise fails(f"Its output dtype is {outputs.dtype.name}, not a float.")


def _check_target(path, overwrite):
    """Refuses to write over a file, or over a non-empty directory unless `overwrite`."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"`path` must be a directory or not exist. Received: path={path} "
                              "(a file).")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(
            f"`path` must not be a non-empty directory unless overwrite=True. Received: "
            f"path={path} (holding {sorted(p.name for p in path.iterdir())[:_MAX_IDS_SHOWN]}), "
            "overwrite=False.")


def _write_atomically(path, write):
    """Calls `write(directory)` on a temporary sibling of `path`, then renames it to `path`.

    The sibling shares `path`'s parent, so the renames stay on one filesystem and are atomic.
    Its name starts with a dot and is not a number, so TF Serving, which loads the numbered
    directories of a model's base path, never picks up a half-written version. On failure the
    temporary directory (and any parent this call created) is removed and `path` is untouched;
    an existing `path` is moved aside, replaced, then deleted.

    Args:
      path: the directory to write; replaced if it exists.
      write: a function writing the export into the directory it is given.
    """
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    # `os.mkdir`, not `tempfile.mkdtemp`: the directory becomes the export, so it takes the
    # umask's permissions (mkdtemp's 0700 would hide it from a server running as another user).
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    os.mkdir(staging)
    old = None
    try:
        write(staging)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            os.rename(path, old)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(old, path)
                raise
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # deepest first; only the ones left empty
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    if old is None:
        return
    # The new export is in place: failing to delete the old one must not report a failure.
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        tf.get_logger().warning("Could not delete the replaced export %s.", old)


def export_retrieval_model(
    query_model: tf.keras.Model,
    candidate_embeddings_or_dataset,
    candidate_ids=None,
    path: Optional[Union[str, os.PathLike]] = None,
    k: int = 100,
    *,
    name: str = "retrieval",
    version: int = 1,
    base_dir: Union[str, os.PathLike] = "saved_models",
    input_name: Optional[str] = None,
    input_spec: Union[None, tf.TensorSpec, Mapping[str, tf.TensorSpec]] = None,
    index: str = "brute_force",
    overwrite: bool = False,
) -> Path:
    """Writes a SavedModel that serves the top `k` candidates for raw query features.

    Args:
      query_model: maps a batch of raw query features (`input_spec`) to `[batch, d]`
        embeddings; for MovieLens, a user-id string lookup plus embedding.
      candidate_embeddings_or_dataset: the whole corpus's embeddings `[n, d]` (tensor or
        array), or a `tf.data.Dataset` of embedding batches, or of `(ids, embeddings)` batches
        (then leave `candidate_ids` None). Compute them with the trained candidate tower
        before exporting; the tower itself is not exported.
      candidate_ids: `[n]` identifiers returned for the candidates (e.g. movie id strings).
      path: the version directory to write; default `<base_dir>/<name>/<version>`.
      k: how many candidates to return per query (at most n).
      name, version, base_dir: the default path's parts.
      input_name: the signature's input name; default the name of `input_spec`, else
        "user_id".
      input_spec: the input's `tf.TensorSpec` (default `tf.TensorSpec([None], tf.string)`),
        or for a query tower that takes a dict of features, `{name: tf.TensorSpec}`: the
        signature then has one input per key, named by it (and `input_name` is not given).
      index: "brute_force" (exact, `tfrs.layers.factorized_top_k.BruteForce`) or "scann"
        (`tfrs.layers.factorized_top_k.ScaNN`, needs the `scann` package).
      overwrite: whether to replace `path` if it is a non-empty directory; the old directory
        is replaced as a whole (none of its files remain), and only once the new export is
        written.

    Returns:
      The directory written.

    Raises:
      ValueError: if a candidate embedding is NaN or Inf, if `query_model` cannot be called
        on `input_spec` or does not return float `[batch, d]`, if `input_spec` is neither a
        `tf.TensorSpec` nor a dict of them (or its names are not valid input names), or if
        `k` or `index` is invalid.
      FileExistsError: if `path` is a file, or a non-empty directory and `overwrite` is False.
      Nothing is written in these cases; if writing fails, `path` is left as it was.
    """
    embeddings, candidate_ids = _embeddings_from(candidate_embeddings_or_dataset, candidate_ids)
    num_candidates = int(embeddings.shape[0])
    k = checks.integer("k", k, 1, num_candidates, f"{num_candidates} (the candidates)")
    version = checks.integer("version", version, 0)
    if index not in ("brute_force", "scann"):
        raise ValueError(f"`index` must be 'brute_force' or 'scann'. Received: {index!r}.")
    if path is None:
        path = Path(base_dir) / name / str(version)
    path = Path(path)
    input_spec = _named_input_spec(input_spec, input_name)
    _check_target(path, overwrite)
    # Checked as indexed: a float64 beyond the float32 range becomes Inf here.
    embeddings = tf.cast(embeddings, tf.float32)
    _check_finite(embeddings, candidate_ids)
    _check_query_model(query_model, input_spec, embeddings.shape)

    if index == "brute_force":
        layer = tfrs.layers.factorized_top_k.BruteForce(k=k)
    else:
        layer = tfrs.layers.factorized_top_k.ScaNN(k=k)
    # Set after construction: Keras derives a layer's config from its constructor arguments
    # when they are all plain values; a model among them makes every SavedModel write warn
    # (several times) that the config is empty.
    layer.query_model = query_model
    layer.index(embeddings, candidate_ids)
    served = _Served(layer, input_spec)
    # Trace once so the signature's inputs carry the specs' names.
    signature = served.serve.get_concrete_function()
    options = tf.saved_model.SaveOptions(
        namespace_whitelist=["Scann"] if index == "scann" else None)
    _write_atomically(path, lambda directory: tf.saved_model.save(
        served, str(directory), signatures={"serving_default": signature}, options=options))
    return path
