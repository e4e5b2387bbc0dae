"""Is the cache worth it for my model? Time its train step with the cache and without.

The negative cache pays at equal training time only when it learns enough faster per step to
cover what its step costs over an in-batch step. `measure_cost` times both steps of a user's
`CachedRetrievalModel` on one of its batches, and the cache's scoring alone, and reports:

- `rho`: the towers' cost per example over the scoring cost per query (the in-batch step over
  the scoring of the batch's queries against the cache; `python -m benchmarks.rho_map` maps
  where the cache pays along it);
- `overhead`: the cache step over the in-batch step;
- the per-step gain needed to break even: the cache must reach a given quality in
  `1 / overhead` of the in-batch steps.

The model is left exactly as it was (weights, optimizer, caches and their indexes).
"""

import dataclasses
import time
from typing import Dict, List, Mapping

import numpy as np
import tensorflow as tf

from tfnegcache import checks, step

# Where the cache started to pay at equal time in `python -m benchmarks.rho_map`
# (results/rho_map/summary.json, "crossover"; seed 0, docs/rho_map.md), by tower shape; None
# where the runs did not bracket it.
CROSSOVER_RHO: Dict[str, object] = {"dense": 11.7, "rec": 2.2}


@dataclasses.dataclass
class CostReport:
    """What `measure_cost` measured (milliseconds are medians of process CPU time)."""

    cache_step_ms: float
    in_batch_step_ms: float
    scoring_ms: float
    batch_size: int
    cache_slots: int

    @property
    def rho(self) -> float:
        """The towers' cost per example over the scoring cost per query."""
        return self.in_batch_step_ms / self.scoring_ms

    @property
    def overhead(self) -> float:
        """The cache step's cost in in-batch steps."""
        return self.cache_step_ms / self.in_batch_step_ms

    @property
    def break_even_step_ratio(self) -> float:
        """To break even at equal time the cache must reach a quality in at most this share
        of the steps in-batch negatives need for it."""
        return 1.0 / self.overhead

    def __str__(self) -> str:
        lines = [
            f"batch {self.batch_size}, cache of {self.cache_slots} slots (CPU time per step, "
            "medians)",
            f"  train step with the cache:      {self.cache_step_ms:9.2f} ms",
            f"  train step, in-batch negatives: {self.in_batch_step_ms:9.2f} ms",
            f"  scoring the cache alone:        {self.scoring_ms:9.2f} ms",
            f"rho = {self.rho:.3g} (towers per example / scoring per query)",
            f"overhead = {self.overhead:.3g}x: to pay at equal time the cache must reach a "
            f"quality in under {100 * self.break_even_step_ratio:.0f}% of the steps "
            "in-batch negatives need",
        ]
        known = {k: v for k, v in CROSSOVER_RHO.items() if v is not None}
        if known:
            lines.append("crossover rho measured on a CPU, one seed (benchmarks.rho_map, "
                         "docs/rho_map.md): " + ", ".join(
                f"{shape} {value:.3g}" for shape, value in known.items()))
        return "\n".join(lines)


def _snapshot(model) -> List[np.ndarray]:
    return [v.numpy() for v in _state(model)]


def _state(model) -> List[tf.Variable]:
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables())
    seen, unique = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            unique.append(v)
    return unique


def _median_ms(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
    times = []
    for _ in range(steps):
        began = time.process_time()
        tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
        times.append(time.process_time() - began)
    return 1e3 * float(np.median(times))


def measure_cost(model, batch: Mapping[str, tf.Tensor], steps: int = 10,
                 warmup: int = 2) -> CostReport:
    """Times `model`'s train step with its caches and with in-batch negatives only.

    Args:
      model: a compiled `CachedRetrievalModel` with at least one `CacheRetrieval` task with
        a cache (fill the cache first, e.g. `cache.warm_start`: scoring costs the same, but
        a filled cache is what training sees).
      batch: one training batch, as `fit` would pass it to `train_step`.
      steps: timed steps of each kind (after `warmup` untimed ones).
      warmup: untimed steps (the first traces).

    Returns:
      A `CostReport`; `print` it for the summary. The model's weights, optimizer state,
      metrics and caches are restored afterwards, bit for bit (what a first step would have
      built, lazily created layers and optimizer slots, keeps the values it was built with).

    Raises:
      ValueError: `model` is not a compiled `CachedRetrievalModel` with a cache, or `steps`
        or `warmup` are not integers >= 1 (>= 0 for `warmup`).

    Example:

    >>> class Model(tfnegcache.CachedRetrievalModel):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.users = tf.keras.layers.Embedding(10, 4)
    ...         self.items = tf.keras.layers.Embedding(100, 4)
    ...         self.task = tfnegcache.CacheRetrieval(
    ...             cache=tfnegcache.NegativeCache(
    ...                 64, {"item": tf.TensorSpec([], tf.int64)}, embedding_dim=4),
    ...             candidate_model=lambda f: self.items(f["item"]))
    ...     def compute_loss(self, batch, training=False):
    ...         item = batch["item"]
    ...         return self.task(self.users(batch["user"]), self.items(item),
    ...                          candidate_ids=item, candidate_features={"item": item})
    >>> model = Model()
    >>> model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    >>> batch = {"user": tf.range(8) % 10, "item": tf.range(8, dtype=tf.int64)}
    >>> report = tfnegcache.measure_cost(model, batch, steps=2)
    >>> report.batch_size, report.cache_slots, report.rho > 0
    (8, 64, True)
    """
    from tfnegcache.model import CachedRetrievalModel  # pylint: disable=g-import-not-at-top

    steps = checks.integer("steps", steps, 1)
    warmup = checks.integer("warmup", warmup, 0)
    if not isinstance(model, CachedRetrievalModel):
        raise ValueError("`model` must be a tfnegcache.CachedRetrievalModel. Received: "
                         f"{type(model).__name__}.")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("`model` must be compiled first (model.compile(optimizer=...)): "
                         "its train step is what is timed.")
    tasks = model.cache_tasks()
    if not tasks:
        raise ValueError("`model` has no CacheRetrieval task with a cache: there is nothing "
                         "to compare with in-batch negatives.")
    if not isinstance(batch, Mapping):
        raise ValueError("`batch` must be one training batch, a dict of tensors as `fit` "
                         f"passes it to train_step. Received: {type(batch).__name__}.")
    batch = {k: tf.convert_to_tensor(v) for k, v in batch.items()}

    state = _state(model)
    before = [v.numpy() for v in state]
    # Build what a first step would (lazily created layers, optimizer slots) so that it is
    # restored too: at the values it was created with, metrics reset.
    model.compute_loss(batch, training=False)
    optimizer = model.optimizer
    if hasattr(optimizer, "build"):
        optimizer.build(model.trainable_variables)
    model.reset_metrics()
    known = {id(v) for v in state}
    created = [v for v in _state(model) if id(v) not in known]
    state += created
    before += [v.numpy() for v in created]
    try:
        cache_step = tf.function(lambda: model.train_step(batch)["loss"])
        cache_ms = _median_ms(cache_step, steps, warmup)

        def in_batch():
            with step.in_batch_only():
                return model.train_step(batch)["loss"]

        in_batch_ms = _median_ms(tf.function(in_batch), steps, warmup)
        cache = tasks[0].cache
        num_queries = _batch_rows(batch)
        queries = tf.random.stateless_normal([num_queries, cache.embedding_dim], [0, 1]) * 0.1
        scoring = tf.function(lambda: cache.log_mass(queries))
        scoring_ms = _median_ms(scoring, steps, warmup)
    finally:
        for variable, value in zip(state, before):
            variable.assign(value)
        for task in tasks:
            for store in task.cache.stores():
                store.rebuild_index()
    return CostReport(cache_ms, in_batch_ms, scoring_ms, num_queries, tasks[0].cache.size)


def _batch_rows(batch) -> int:
    for value in tf.nest.flatten(batch):
        if value.shape.rank and value.shape[0] is not None:
            return int(value.shape[0])
    raise ValueError("`batch` must hold tensors with a known number of rows.")
