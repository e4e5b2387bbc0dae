"""The record one training step's tasks share with the step: the numbering of their draws
and the cache updates they ask for. Pure Python, used by both front ends (`tfnegcache.step`
and `tfnegcache.keras3.step`)."""

import contextlib
import contextvars
from typing import Dict, List, Optional, Tuple

_CURRENT = contextvars.ContextVar("tfnegcache_training_step", default=None)


class TrainingStep:
    """What one training step's tasks share with the step: the numbering of their draws and
    the cache updates they ask for, in order."""

    def __init__(self) -> None:
        self.updates: List[Tuple[object, object, str]] = []   # (cache, CacheUpdate, task)
        self._draws: Dict[int, int] = {}

    def next_draw(self, cache) -> int:
        """The index of the next draw from `cache` in this step (0, 1, ...)."""
        index = self._draws.get(id(cache), 0)
        self._draws[id(cache)] = index + 1
        return index

    def record(self, cache, update, task_name: str) -> None:
        """Records `update` of `cache`, asked by the task `task_name`.

        Raises:
          ValueError: another task already asked to update this cache in this step (two
            tasks would plan their inserts from the same state and corrupt it).
        """
        for other, _, name in self.updates:
            if other is cache and name == task_name:
                raise ValueError(
                    f"The task {name!r} was called twice in one training step: each call "
                    f"draws from and writes to the cache {cache.name!r}, and each would plan "
                    "its inserts from the same state, so the cache would be corrupted. Call "
                    "each CacheRetrieval task once per step (concatenate the batches), or give "
                    "each call a task with a cache of its own.")
            if other is cache:
                raise ValueError(
                    f"The tasks {name!r} and {task_name!r} both draw from and write to the "
                    f"cache {cache.name!r} in one training step: each would plan its inserts "
                    "from the same state, and the cache would be corrupted. Give each "
                    "CacheRetrieval task its own cache.")
        self.updates.append((cache, update, task_name))


def current() -> Optional[TrainingStep]:
    """The training step being run in this context, or None (evaluation, prediction)."""
    return _CURRENT.get()


@contextlib.contextmanager
def recording():
    """Opens a `TrainingStep` for the tasks called inside (what `run_step` does)."""
    step = TrainingStep()
    token = _CURRENT.set(step)
    try:
        yield step
    finally:
        _CURRENT.reset(token)
