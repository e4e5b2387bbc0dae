"""export_retrieval_model: a SavedModel serving top-k movie ids for raw user ids."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import ml_fixture
from tfnegcache.datasets import movielens
from tfnegcache.experiments import movielens as experiment
from tfnegcache.export import export_retrieval_model

CACHE_SIZE = 97  # distinct from every other dimension, so cache-sized tensors are recognisable
K = 10


@pytest.fixture(name="trained", scope="module")
def fixture_trained(tmp_path_factory):
    data = ml_fixture.load(tmp_path_factory.mktemp("data"))
    train_rows, test_rows = movielens.tutorial_split(data, num_train=960)
    corpus = experiment.Corpus(data, train_rows, test_rows)
    model, *_ = experiment.train_one(
        corpus, "negative-cache", seed=0, epochs=1, batch_size=32, learning_rate=0.1, dim=8,
        temperature=0.5, cache_size=CACHE_SIZE, num_negatives=2, cache_in_batch=True,
        verbose=0)
    assert model.task.cache.fill_fraction().numpy() > 0  # the cache was used
    return model, corpus


def served(path, user_ids):
    """Loads the SavedModel in a fresh interpreter and calls serving_default."""
    script = textwrap.dedent(f"""
        import json, sys
        import tensorflow as tf
        loaded = tf.saved_model.load({str(path)!r})
        fn = loaded.signatures["serving_default"]
        out = fn(user_id=tf.constant({[str(u) for u in user_ids]!r}))
        saved = tf.train.list_variables({str(path / "variables" / "variables")!r})
        names = [name for name, _ in saved]
        shapes = [list(shape) for _, shape in saved]
        print(json.dumps({{
            "ids": out["ids"].numpy().astype(str).tolist(),
            "scores": out["scores"].numpy().tolist(),
            "inputs": sorted(fn.structured_input_signature[1]),
            "variables": list(zip(names, shapes)),
        }}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_memory_top_k(model, corpus, user_ids, k):
    movies = model.candidate_tower(corpus.movie_tensors())
    scores = tf.matmul(model.query_tower(tf.constant(user_ids)), movies, transpose_b=True)
    top = tf.math.top_k(scores, k)
    return corpus.movie_ids[top.indices.numpy()], top.values.numpy()


def test_exported_model_serves_the_in_memory_top_k(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  name="ml", base_dir=tmp_path)
    assert path == tmp_path / "ml" / "1"
    assert (path / "saved_model.pb").exists()
    users = list(corpus.users[:5])
    out = served(path, users)
    assert out["inputs"] == ["user_id"]
    ids, scores = in_memory_top_k(model, corpus, users, K)
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-5, atol=1e-6)
    # Ids must match wherever scores are not tied with a neighbour.
    assert np.mean(np.array(out["ids"]) == ids) > 0.95

    # Only the query tower and the index: no cache, no candidate tower, no optimizer.
    shapes = [shape for _, shape in out["variables"]]
    names = " ".join(name for name, _ in out["variables"])
    assert not any(CACHE_SIZE in shape for shape in shapes), out["variables"]
    assert "cache" not in names.lower() and "optimizer" not in names.lower()
    assert "candidate_tower" not in names
    cache_weights = {tuple(w.shape.as_list()) for w in model.task.cache.weights}
    assert not cache_weights & {tuple(s) for s in shapes if s}


def test_unknown_user_gets_the_oov_top_k(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  path=tmp_path / "m" / "7")
    out = served(path, ["no-such-user", "another-unknown", corpus.users[0]])
    # Both unknown ids share the lookup's OOV row: the same well-formed, finite top k.
    assert out["ids"][0] == out["ids"][1]
    assert np.all(np.isfinite(out["scores"][0]))
    assert set(out["ids"][0]) <= set(corpus.movie_ids)
    assert out["ids"][2] != out["ids"][0]


def test_dataset_of_ids_and_embeddings_and_bad_k(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    dataset = tf.data.Dataset.from_tensor_slices((corpus.movie_ids, movies)).batch(16)
    path = export_retrieval_model(model.query_tower, dataset, k=3, path=tmp_path / "d" / "1")
    loaded = tf.saved_model.load(str(path))
    out = loaded.signatures["serving_default"](user_id=tf.constant(list(corpus.users[:2])))
    ids, scores = in_memory_top_k(model, corpus, list(corpus.users[:2]), 3)
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k"):
        export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=10_000,
                               path=tmp_path / "x")
