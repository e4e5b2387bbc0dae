"""Serving: the query tower and an exact top-k index exported through Keras 3's own export
path (`jax2tf` on JAX), loaded and answering in a fresh TensorFlow process; bad inputs are
refused before anything is written."""

import json
import os
import subprocess
import sys

import keras
import keras_rs
import numpy as np
import pytest

import k3help
from tfnegcache.keras3.export import BruteForceIndex, export_retrieval_model

SIGNATURE = [keras.InputSpec(shape=(None,), dtype="int32")]

SERVE = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
users = tf.constant(json.loads(sys.argv[2]), tf.int32)
served = loaded.serve(users)
signature = loaded.signatures["serving_default"](users)
print(json.dumps({"ids": served["ids"].numpy().tolist(),
                  "scores": served["scores"].numpy().tolist(),
                  "signature_ids": signature["ids"].numpy().tolist()}))
"""


def _towers(num_users=12, num_items=300, dim=8):
    users = keras.layers.Embedding(num_users, dim)
    users.build((None,))
    rng = np.random.default_rng(0)
    users.embeddings.assign(rng.normal(size=(num_users, dim)).astype(np.float32))
    items = rng.normal(size=(num_items, dim)).astype(np.float32)
    ids = (np.arange(num_items) * 7 + 3).astype(np.int32)
    return users, items, ids


def test_the_export_answers_in_a_fresh_process_as_the_model_does(tmp_path):
    users, items, ids = _towers()
    path = export_retrieval_model(users, items, ids, str(tmp_path / "retrieval"), SIGNATURE,
                                  k=10)
    batch = [0, 3, 5, 7, 11, 2, 9]                        # 7: another batch size than traced
    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_BACKEND", "TF_USE_LEGACY_KERAS")}
    result = subprocess.run([sys.executable, "-c", SERVE, path, str(batch)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    scores = k3help.numpy(users(np.asarray(batch, np.int32))) @ items.T
    expected = ids[np.argsort(-scores, axis=1, kind="stable")[:, :10]]
    np.testing.assert_array_equal(served["ids"], expected)
    np.testing.assert_array_equal(served["signature_ids"], expected)
    np.testing.assert_allclose(served["scores"], -np.sort(-scores, axis=1)[:, :10], rtol=1e-5)


def test_the_index_matches_keras_rs_brute_force_retrieval():
    _, items, ids = _towers()
    queries = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    ours = BruteForceIndex(items, ids, k=5)(queries)
    theirs = keras_rs.layers.BruteForceRetrieval(items, ids, k=5)(queries)
    np.testing.assert_array_equal(k3help.numpy(ours[1]), k3help.numpy(theirs[1]))
    np.testing.assert_allclose(k3help.numpy(ours[0]), k3help.numpy(theirs[0]), rtol=1e-6)


@pytest.mark.parametrize("bad,message", [
    ("nan", "must be a finite [num_candidates, dim] matrix"),
    ("ids", "must be 300 int32 ids, one per embedding"),
    ("k", "`k` must be an integer in [1, the number of candidates]. Received: k=301."),
    ("exists", "exists and is not empty; pass overwrite=True"),
])
def test_bad_exports_are_refused_before_anything_is_written(bad, message, tmp_path):
    users, items, ids = _towers()
    path = tmp_path / "retrieval"
    k = 10
    if bad == "nan":
        items[5, 1] = np.nan
    elif bad == "ids":
        ids = ids[:-1]
    elif bad == "k":
        k = 301
    elif bad == "exists":
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError) as error:
        export_retrieval_model(users, items, ids, str(path), SIGNATURE, k=k)
    assert message in str(error.value)
    assert sorted(os.listdir(tmp_path)) == (["retrieval"] if bad == "exists" else [])
    if bad == "exists":
        assert os.listdir(path) == ["keep.txt"]
