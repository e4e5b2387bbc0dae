"""Imports of the `examples` extra's packages, which the library itself does not need.

`pip install tfnegcache` installs what importing and training need (TensorFlow, tf-keras,
TFRS, numpy). The MovieLens job, its data loader's TFDS source, the notebook and the
benchmarks' plots also use matplotlib and TensorFlow Datasets, from
`pip install "tfnegcache[examples]"`. Importing them through `import_extra` turns a missing
package into an error that names the extra. No TensorFlow here: the CLI checks before TF loads.
"""

import importlib
import importlib.util
from types import ModuleType

EXTRA = "examples"
INSTALL = f'pip install "tfnegcache[{EXTRA}]"'
# Module name -> the distribution that provides it.
PACKAGES = {"matplotlib": "matplotlib", "tensorflow_datasets": "tensorflow-datasets"}


def missing_message(module: str, purpose: str) -> str:
    """The error text for a missing extra's module: what needs it and what to install."""
    return (f"{purpose} needs {PACKAGES.get(module, module)}, which is not installed. "
            f"Install the {EXTRA} extra: {INSTALL}")


def is_available(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def import_extra(module: str, purpose: str) -> ModuleType:
    """Imports `module`, or raises ImportError naming the extra that provides it.

    Args:
      module: e.g. "matplotlib.pyplot"; its top-level package must be in `PACKAGES`.
      purpose: what needs it, for the message (e.g. "The MovieLens job's plot").

    Returns:
      The module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(missing_message(module.split(".")[0], purpose)) from e
