"""What importing the Keras 3 front end does to a process, read in this process's conftest
right after `import tfnegcache.keras3, keras` and before any test module is imported; and what
TensorFlow and the TF front end then do.

tests/test_keras3.py starts this directory in a fresh process per backend, with
TF_USE_LEGACY_KERAS and KERAS_BACKEND left out of the environment but for the backend: the
checks are the ones a fresh `python -c "import tfnegcache.keras3, keras"` would make.
"""

import os

import pytest

import tfnegcache


def test_importing_keras3_pulls_neither_tf_keras_nor_tfrs_nor_sets_legacy_keras(imported):
    assert imported["backend"] == os.environ.get("KERAS_BACKEND", "tensorflow")
    assert imported["version"].startswith("3."), imported
    assert not imported["tf_keras"] and not imported["tensorflow_recommenders"], imported
    # Started by tests/test_keras3.py, the variable was unset before and must still be unset.
    assert imported["legacy_keras"] == imported["legacy_keras_before"], imported


def test_after_keras3_tensorflow_keeps_keras_3_and_the_tf_front_end_says_why_not(imported):
    # `import tfnegcache` (tests/conftest.py) armed the hook that sets TF_USE_LEGACY_KERAS when
    # TensorFlow loads; with the Keras 3 front end imported, the hook leaves it unset. (On the
    # TensorFlow backend `import keras` loaded TensorFlow; on JAX a test module's import did,
    # or this one does.)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    assert os.environ.get("TF_USE_LEGACY_KERAS") == imported["legacy_keras_before"]
    assert tf.keras.version().startswith("3.")
    with pytest.raises(ImportError, match="^tfnegcache requires tf.keras to be Keras 2"):
        tfnegcache.CacheRetrieval  # pylint: disable=pointless-statement
