"""One Keras 3 training step with negative caches: loss -> gradients -> prepare -> one guard ->
optimizer -> commit (docs/algorithm.md, step 6), the TF front end's `tfnegcache.step`.

The step opens a `TrainingStep` record (`tfnegcache._record`, shared with the TF front end):
the `CacheRetrieval` losses computed inside number their draws with it and record the cache
update they ask for. After the gradients every recorded update is prepared (every row
computed, nothing written), and the guard collects one `(message, ok)` check per thing that
must hold: the loss and every gradient finite, every row to write finite and well-formed.

What a failed check does depends on the backend (`CachedRetrievalModel.train_step`):

- TensorFlow: each check is a `tf.debugging.Assert` in front of the optimizer and the
  commit, so the step raises `InvalidArgumentError` naming the check, with nothing changed;
- JAX: a jitted step cannot raise. The optimizer step runs under `lax.cond(ok, ...)`, the
  cache's writes are sent to its spare row (`CacheStore.masked`), every other variable keeps
  its value, the `skipped_steps` metric counts the step and the model remembers the first
  failed check; `StopOnSkippedStep` (added to every `fit`) then stops `fit` and names it.
"""

from typing import List, Tuple

from keras import ops

from tfnegcache import _record
from tfnegcache.keras3.store import CacheUpdate, Writes

recording = _record.recording
current = _record.current

Check = Tuple[str, object]


def prepare(record: _record.TrainingStep, updates=None) -> List[Tuple[object, Writes]]:
    """Every recorded cache update, planned (reads only), with the loss's input checks first.

    `updates`: the recorded `(CacheUpdate fields, input checks)` per cache, when they were
    carried out of a traced function (JAX: out of `value_and_grad`); default: the record's.
    """
    prepared = []
    for i, (cache, recorded, _) in enumerate(record.updates):
        update, input_checks = recorded if updates is None else updates[i]
        if not isinstance(update, CacheUpdate):
            update = CacheUpdate(**update)
        writes = cache.prepare(update)
        writes.checks = list(input_checks) + writes.checks
        prepared.append((cache, writes))
    return prepared


def _dense(gradient):
    """A gradient's values (TensorFlow gives `IndexedSlices` for embedding lookups)."""
    if hasattr(gradient, "indices") and hasattr(gradient, "values"):
        return gradient.values
    return gradient


def guard(loss, gradients, variables, prepared) -> List[Check]:
    """The step's checks, in order: the loss, each gradient, each cache's rows."""
    checks = [("the loss has NaN or Inf (non-finite values)",
               ops.all(ops.isfinite(ops.cast(loss, "float32"))))]
    for gradient, variable in zip(gradients, variables):
        if gradient is None:
            continue
        checks.append((f"the gradient of `{variable.path}` has NaN or Inf (non-finite values)",
                       ops.all(ops.isfinite(ops.cast(_dense(gradient), "float32")))))
    for _, writes in prepared:
        checks += writes.checks
    return checks


def verdict(checks: List[Check]):
    """`(ok, cause)`: whether every check passed, and the index of the first that did not
    (-1 when all passed)."""
    flags = ops.stack([ok for _, ok in checks])
    ok = ops.all(flags)
    cause = ops.where(ok, -1, ops.cast(ops.argmin(ops.cast(flags, "int32")), "int32"))
    return ok, cause


def commit(prepared, ok=None) -> None:
    """Applies the prepared writes (masked by `ok` when given: under JAX, a failed step's
    writes change nothing)."""
    for cache, writes in prepared:
        cache.commit(writes if ok is None else cache.masked(writes, ok))
