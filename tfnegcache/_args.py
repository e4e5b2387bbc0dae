"""Argument checks shared by both front ends: pure Python (numpy only), so that importing them
pulls in neither TensorFlow nor any Keras.

Each raises a `ValueError` before any state exists, in the keras-rs style
"`x` must be ... Received: x=...". `tfnegcache.checks` re-exports them for the TF front end.
"""

import math
import numbers
from typing import Optional

import numpy as np


def integer(name: str, value, low: Optional[int], high: Optional[int] = None,
            high_name: Optional[str] = None, allow_none: bool = False):
    """`value` as a Python int, if it is an integer (Python or numpy, not bool) in
    `[low, high]` (None: unbounded); else `ValueError` naming the argument, the range and the
    value received.
    `high_name` names the upper bound in the message (e.g. "size")."""
    if value is None and allow_none:
        return None
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
          and (low is None or value >= low) and (high is None or value <= high))
    if not ok:
        if low is None:
            expected = "an integer"
        elif high is None:
            expected = f"an integer >= {low}"
        else:
            expected = f"an integer in [{low}, {high_name or high}]"
        if allow_none:
            expected += " or None"
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}.")
    return int(value)


def temperature(value) -> Optional[float]:
    """`value` as a float if it is a finite real number > 0, or None (no temperature)."""
    if value is None:
        return None
    ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(value) and value > 0)
    if not ok:
        raise ValueError("`temperature` must be a number > 0 (scores are divided by it) or "
                         f"None. Received: temperature={value!r}.")
    return float(value)
