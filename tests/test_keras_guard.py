"""Importing tfnegcache selects Keras 2 for TensorFlow imported after it, or its first use says
clearly why it cannot."""

import os
import subprocess
import sys


def run(code):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_first_selects_keras_2_for_tfrs():
    # And the Keras 3 front end, beside it in the package, is not imported with it.
    result = run("import tfnegcache, os, sys, tensorflow as tf, tensorflow_recommenders\n"
                 "print(os.environ['TF_USE_LEGACY_KERAS'], tf.keras.layers.Layer.__module__,\n"
                 "      'tfnegcache.keras3' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "tf_keras.src.engine.base_layer", "False"]


def test_use_after_keras_3_fails_with_the_fix():
    result = run("import tensorflow as tf\ntf.keras.layers\nimport tfnegcache\n"
                 "tfnegcache.CacheRetrieval")
    assert result.returncode != 0
    assert "ImportError: tfnegcache requires tf.keras to be Keras 2" in result.stderr
    assert "TF_USE_LEGACY_KERAS=1" in result.stderr
