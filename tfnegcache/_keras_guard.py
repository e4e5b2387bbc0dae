"""Makes sure TensorFlow resolves `tf.keras` to Keras 2 (`tf_keras`), as TFRS needs.

TFRS and this package are written against Keras 2. From TensorFlow 2.16 on, `tf.keras` is
Keras 3 unless `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is first imported. We set it
for the user when TensorFlow has not been imported yet, and fail with a clear message when it
has been imported with Keras 3 already.
"""

import os
import sys


def ensure_legacy_keras() -> None:
    """Sets `TF_USE_LEGACY_KERAS=1` if possible and checks that `tf.keras` is Keras 2.

    Raises:
      ImportError: `tf.keras` resolves to Keras 3, typically because TensorFlow was imported
        before `tfnegcache` without `TF_USE_LEGACY_KERAS=1`.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
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
