"""Makes sure TensorFlow resolves `tf.keras` to Keras 2 (`tf_keras`), as TFRS needs.

TFRS and the TF front end are written against Keras 2. From TensorFlow 2.16 on, `tf.keras` is
Keras 3 unless `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is first imported. We set it
for the user when TensorFlow is imported after `tfnegcache` (`defer_until_tensorflow`), and
fail with a clear message when it was imported with Keras 3 already. The Keras 3 front end
(`tfnegcache.keras3`) must not set it: while that module is imported, the variable is left
alone.
"""

import importlib.abc
import os
import sys

KERAS3_MODULE = "tfnegcache.keras3"


def _set_unless_keras3() -> None:
    if KERAS3_MODULE not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


class _BeforeTensorFlow(importlib.abc.MetaPathFinder):
    """Sets `TF_USE_LEGACY_KERAS=1` when TensorFlow is first imported, unless the Keras 3
    front end is being used; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            _set_unless_keras3()
            remove_hook()
        return None


_HOOK = _BeforeTensorFlow()


def remove_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def defer_until_tensorflow() -> None:
    """Arranges for `TF_USE_LEGACY_KERAS=1` to be set just before TensorFlow is imported
    (unless `tfnegcache.keras3` is imported by then)."""
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def ensure_legacy_keras() -> None:
    """Sets `TF_USE_LEGACY_KERAS=1` if possible and checks that `tf.keras` is Keras 2.

    Raises:
      ImportError: `tf.keras` resolves to Keras 3, typically because TensorFlow was imported
        before `tfnegcache` without `TF_USE_LEGACY_KERAS=1`.
    """
    if "tensorflow" not in sys.modules:
        _set_unless_keras3()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    # Keras 3 has `keras.version()`; tf_keras (Keras 2) behind `tf.keras` has none.
    version_fn = getattr(tf.keras, "version", None)
    version = version_fn() if version_fn else "2"
    if not version.startswith("2"):
        raise ImportError(
            "tfnegcache requires tf.keras to be Keras 2 (the tf_keras package), but "
            f"tf.keras is Keras {version}. TensorFlow was imported before tfnegcache with "
            f"TF_USE_LEGACY_KERAS={os.environ.get('TF_USE_LEGACY_KERAS')!r}. Either import "
            "tfnegcache before tensorflow, or set the environment variable "
            "TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported."
        )
    from tfnegcache import _autograph  # pylint: disable=g-import-not-at-top
    _autograph.leave_unconverted()
