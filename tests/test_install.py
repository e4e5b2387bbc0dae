"""`pip install tfnegcache` is lean: the library works without the `examples` extra."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parent.parent

# Makes the examples extra's packages unimportable, as in an environment without the extra.
BLOCK_EXTRAS = """
import importlib.abc, sys

class BlockExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tensorflow_datasets"):
            raise ImportError(f"{name} is blocked (test: no examples extra)")
        return None

sys.meta_path.insert(0, BlockExtras())
"""

TRAIN_ONE_STEP = """
import numpy as np
import tfnegcache
import tensorflow as tf

dim = 4
spec = {"item_id": tf.TensorSpec([], tf.int64)}
items = tf.keras.layers.Embedding(10, dim)


class Model(tfnegcache.CachedRetrievalModel):
    def __init__(self):
        super().__init__()
        self.users = tf.keras.layers.Embedding(5, dim)
        self.items = items
        self.task = tfnegcache.CacheRetrieval(
            cache=tfnegcache.NegativeCache(16, spec, dim),
            candidate_model=lambda features: items(features["item_id"]), num_negatives=2)

    def compute_loss(self, features, training=False):
        return self.task(self.users(features["user_id"]), self.items(features["item_id"]),
                         candidate_ids=features["item_id"],
                         candidate_features={"item_id": features["item_id"]})


model = Model()
model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
data = {"user_id": np.arange(8) % 5, "item_id": np.arange(8, dtype=np.int64)}
logs = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(4), epochs=1, verbose=0)
print("loss", logs.history["loss"][-1] > 0, "fill", logs.history["cache_fill"][-1] > 0)

from tfnegcache_examples import movielens as experiment  # the job's module imports too
try:
    experiment.plot({}, "unused.png")
except ImportError as error:
    print(error)
print("matplotlib" in sys.modules, "tensorflow_datasets" in sys.modules)
"""


def test_import_and_train_without_the_examples_extra(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    result = subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + TRAIN_ONE_STEP],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "loss True fill True",
        "The MovieLens job's plot needs matplotlib, which is not installed. Install the "
        'examples extra: pip install "tfnegcache[examples]"',
        "False False",
    ]


def test_setup_keeps_the_extras_out_of_install_requires(monkeypatch):
    setup_args = {}
    monkeypatch.setattr(setuptools, "setup", setup_args.update)
    monkeypatch.chdir(ROOT)  # setup.py reads README.md from the working directory
    runpy.run_path(str(ROOT / "setup.py"))
    names = [r.split(">")[0].split("<")[0] for r in setup_args["install_requires"]]
    assert names == ["tensorflow", "tf-keras", "tensorflow-recommenders", "numpy"]
    extras = setup_args["extras_require"]
    assert extras["examples"] == ["tensorflow-datasets>=4.9", "matplotlib>=3.8"]
    assert set(extras["examples"]) <= set(extras["test"])  # the suite runs the examples too
    keras3 = [r.split(">")[0].split("<")[0].split("=")[0] for r in extras["keras3"]]
    assert keras3 == ["keras", "keras-rs", "jax[cpu]"]
    assert set(extras["keras3"]) <= set(extras["test"])    # ... and the Keras 3 tests
