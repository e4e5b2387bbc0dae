"""export_retrieval_model: a SavedModel serving top-k movie ids for raw user ids."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import ml_fixture
from tfnegcache_examples import movielens_data as movielens
from tfnegcache_examples import movielens as experiment
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


def served(requests):
    """Loads each SavedModel in one fresh interpreter (TensorFlow without this library) and
    calls its serving_default: `[(path, user ids)]` -> one result per request."""
    script = textwrap.dedent("""
        import json, os, sys
        import tensorflow as tf
        for path, user_ids in json.loads(sys.argv[1]):
            loaded = tf.saved_model.load(path)
            fn = loaded.signatures["serving_default"]
            out = fn(user_id=tf.constant(user_ids))
            saved = tf.train.list_variables(os.path.join(path, "variables", "variables"))
            print(json.dumps({
                "ids": out["ids"].numpy().astype(str).tolist(),
                "scores": out["scores"].numpy().tolist(),
                "inputs": sorted(fn.structured_input_signature[1]),
                "variables": [[name, list(shape)] for name, shape in saved],
            }))
    """)
    argument = json.dumps([[str(path), [str(u) for u in users]] for path, users in requests])
    result = subprocess.run([sys.executable, "-c", script, argument], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()[-len(requests):]
    assert len(lines) == len(requests), result.stdout[-3000:]
    return [json.loads(line) for line in lines]


@pytest.fixture(name="exported", scope="module")
def fixture_exported(trained, tmp_path_factory):
    """Two exports of the trained model, served one after the other in one fresh process (one
    TensorFlow start-up for both; neither needs this library):
    `({name: (path, user ids, what serving_default returned)}, directory)`. "known": five
    training users, exported under a base directory; "unknown": two ids the lookup has never
    seen and a training user, exported to a given path."""
    model, corpus = trained
    directory = tmp_path_factory.mktemp("exported")
    movies = model.candidate_tower(corpus.movie_tensors())
    known = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                   name="ml", base_dir=directory)
    unknown = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                     path=directory / "m" / "7")
    requests = {"known": (known, list(corpus.users[:5])),
                "unknown": (unknown, ["no-such-user", "another-unknown", corpus.users[0]])}
    outs = served(list(requests.values()))
    return {name: (path, users, out)
            for (name, (path, users)), out in zip(requests.items(), outs)}, directory


def in_memory_top_k(model, corpus, user_ids, k):
    movies = model.candidate_tower(corpus.movie_tensors())
    scores = tf.matmul(model.query_tower(tf.constant(user_ids)), movies, transpose_b=True)
    top = tf.math.top_k(scores, k)
    return corpus.movie_ids[top.indices.numpy()], top.values.numpy()


def test_exported_model_serves_the_in_memory_top_k(trained, exported):
    model, corpus = trained
    results, directory = exported
    path, users, out = results["known"]
    assert path == directory / "ml" / "1"
    assert (path / "saved_model.pb").exists()
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


def test_unknown_user_gets_the_oov_top_k(trained, exported):
    _, corpus = trained
    results, directory = exported
    path, _, out = results["unknown"]
    assert path == directory / "m" / "7"
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
    num_movies = len(corpus.movie_ids)
    for bad in (10_000, 0, 2.5, True, "3"):
        with pytest.raises(ValueError, match=rf"`k` must be an integer in \[1, {num_movies} "
                                             rf"\(the candidates\)\]\. Received: k={bad!r}\."):
            export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=bad,
                                   path=tmp_path / "x")
    with pytest.raises(ValueError, match=r"`version` must be an integer >= 0\. Received: "
                                         r"version=1\.5\."):
        export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=3, version=1.5,
                               base_dir=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def saved_model_cli(*args):
    """Runs `saved_model_cli` and returns its stdout.

    The script installed with this interpreter's TensorFlow, else the one on PATH, else the
    module it runs.
    """
    script = Path(sys.executable).with_name("saved_model_cli")
    script = str(script) if script.exists() else shutil.which("saved_model_cli")
    command = [script] if script else [
        sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    result = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_saved_model_cli_show_and_run_serve_the_in_memory_top_k(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  path=tmp_path / "cli" / "1")

    shown = saved_model_cli("show", "--dir", path, "--all")
    # serving_default: user_id string [batch] -> ids string [batch, K], scores float [batch, K]
    signature = shown.split("signature_def['serving_default']:", 1)[1].split("signature_def[")[0]
    tensors = {name: (dtype, shape) for name, dtype, shape in re.findall(
        r"(?:inputs|outputs)\['(\w+)'\] tensor_info:\s*dtype: (\w+)\s*shape: (\([^)]*\))",
        signature)}
    assert tensors == {"user_id": ("DT_STRING", "(-1)"),
                       "ids": ("DT_STRING", f"(-1, {K})"),
                       "scores": ("DT_FLOAT", f"(-1, {K})")}, shown
    assert "Method name is: tensorflow/serving/predict" in signature

    users = ["1", "42"]  # "42" is not a fixture user (ids 1-30): the OOV row's top k
    outdir = tmp_path / "cli_out"
    ran = saved_model_cli("run", "--dir", path, "--tag_set", "serve", "--signature_def",
                          "serving_default", "--input_exprs", f"user_id={users!r}",
                          "--outdir", outdir)
    assert "Result for output key ids" in ran and "Result for output key scores" in ran
    ids = np.load(outdir / "ids.npy", allow_pickle=True).astype(str)
    scores = np.load(outdir / "scores.npy")
    expected_ids, expected_scores = in_memory_top_k(model, corpus, users, K)
    assert ids.shape == scores.shape == (2, K)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert np.mean(ids == expected_ids) > 0.95
    # The text printed by `run` is the same: every returned id is in the printed ids block.
    printed = ran.split("Result for output key ids", 1)[1].split("Result for output key", 1)[0]
    assert set(re.findall(r"b'([^']*)'", printed)) == set(ids.ravel())


def export_size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_export_with_a_large_cache_is_no_larger_than_without(tmp_path):
    data = ml_fixture.load(tmp_path / "data")
    train_rows, test_rows = movielens.tutorial_split(data, num_train=960)
    corpus = experiment.Corpus(data, train_rows, test_rows)
    sizes = {}
    for strategy, cache_size in (("in-batch", 0), ("negative-cache", 2**16)):
        model, *_ = experiment.train_one(
            corpus, strategy, seed=0, epochs=1, batch_size=64, learning_rate=0.1, dim=8,
            temperature=0.5, cache_size=cache_size or 1, num_negatives=2,
            cache_in_batch=True, verbose=0)
        if cache_size:
            assert max(w.shape[0] for w in model.task.cache.weights if w.shape.rank) == 2**16
            assert model.task.cache.fill_fraction().numpy() > 0
        movies = model.candidate_tower(corpus.movie_tensors())
        path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                      path=tmp_path / strategy / "1")
        sizes[strategy] = export_size(path)
    print(f"\nexport size: without a cache {sizes['in-batch']} bytes, "
          f"with a 2^16-slot cache {sizes['negative-cache']} bytes")
    # The cache alone holds 2^16 x (8 + 8*8 + 19*4 + 8*4 + ...) bytes, megabytes: none of it
    # may reach the export.
    assert sizes["negative-cache"] <= sizes["in-batch"] + 4096, sizes


def test_malformed_requests_fail_clearly_and_the_model_keeps_serving(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  path=tmp_path / "bad" / "1")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    users = list(corpus.users[:2])
    expected_ids, expected_scores = in_memory_top_k(model, corpus, users, K)

    def serves_a_good_request():
        out = serve(user_id=tf.constant(users))
        np.testing.assert_allclose(out["scores"].numpy(), expected_scores, rtol=1e-5, atol=1e-6)
        assert np.mean(out["ids"].numpy().astype(str) == expected_ids) > 0.95

    # Wrong dtype: int64 ids instead of strings.
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string tensor"):
        serve(user_id=tf.constant([1, 42], tf.int64))
    serves_a_good_request()
    # Wrong rank: [1, 2] strings instead of [batch].
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape("user_id [1,2] is not compatible with expected shape [?]")):
        serve(user_id=tf.constant([users]))
    serves_a_good_request()
    # Empty batch: documented, not an error: [0, K] ids and scores.
    out = serve(user_id=tf.constant([], tf.string))
    assert out["ids"].shape == (0, K) and out["scores"].shape == (0, K)
    assert out["ids"].dtype == tf.string and out["scores"].dtype == tf.float32
    serves_a_good_request()
    # Unknown ids: the documented OOV top k (see test_unknown_user_gets_the_oov_top_k).
    out = serve(user_id=tf.constant(["", "no-such-user"]))
    assert out["ids"].numpy()[0].tolist() == out["ids"].numpy()[1].tolist()
    serves_a_good_request()


def snapshot(directory):
    """Every file and directory under `directory`, with the files' bytes; None if absent."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(name="existing", scope="module")
def fixture_existing(trained, tmp_path_factory):
    """An export that tests expecting a refusal point at; they check that it stays as it is."""
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  path=tmp_path_factory.mktemp("existing") / "ml" / "1")
    (path / "unrelated.txt").write_text("not part of the export")
    return path


def assert_refused(export, error, match, existing, tmp_path):
    """`export(path, overwrite)` raises for an existing target and a new one; neither changes."""
    before, listing = snapshot(existing), sorted(p.name for p in existing.parent.iterdir())
    with pytest.raises(error, match=match):
        export(existing, True)
    assert snapshot(existing) == before
    assert sorted(p.name for p in existing.parent.iterdir()) == listing  # no temp dir left
    new = tmp_path / "new" / "ml" / "1"
    with pytest.raises(error, match=match):
        export(new, False)
    assert list(tmp_path.iterdir()) == []  # not even the parents


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_candidate_embeddings_are_refused(trained, existing, tmp_path, bad):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors()).numpy()
    rows = [3, 7, 8, 20, 30, 39]  # more than the message lists
    movies[rows, 1] = bad
    ids = ", ".join(repr(str(i)) for i in corpus.movie_ids[rows[:5]])
    assert_refused(
        lambda path, overwrite: export_retrieval_model(
            model.query_tower, movies, corpus.movie_ids, k=K, path=path, overwrite=overwrite),
        ValueError,
        re.escape(f"must hold finite embeddings. Received: 6 of {len(movies)} rows with NaN "
                  f"or Inf, candidate ids [{ids}, ...]."),
        existing, tmp_path)


def test_input_spec_the_query_tower_cannot_take_is_refused(trained, existing, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    # Takes int64 ids; the default spec sends strings. Tracing alone accepts this.
    tower = tf.keras.Sequential([tf.keras.layers.Embedding(100, movies.shape[1])],
                                name="int_id_tower")
    assert_refused(
        lambda path, overwrite: export_retrieval_model(
            tower, movies, corpus.movie_ids, k=K, path=path, overwrite=overwrite),
        ValueError,
        re.escape("Calling it on `input_spec` fails: Cast string to ")
        + r"\w+ is not supported\. Received: "
        + re.escape("input_spec=TensorSpec(shape=(None,), dtype=tf.string, name='user_id'), "
                    "query_model=Sequential 'int_id_tower'."),
        existing, tmp_path)

    # The spec the tower takes exports and serves.
    path = export_retrieval_model(tower, movies, corpus.movie_ids, k=K, path=tmp_path / "i",
                                  input_spec=tf.TensorSpec([None], tf.int64, name="user_id"))
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    queries = tf.constant([1, 5], tf.int64)
    top = tf.math.top_k(tf.matmul(tower(queries), movies, transpose_b=True), K)
    np.testing.assert_allclose(serve(user_id=queries)["scores"].numpy(), top.values.numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output", ["dimension", "dtype"])
def test_query_tower_output_unlike_the_candidates_is_refused(trained, existing, tmp_path,
                                                             output):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    dim = movies.shape[1]
    lookup = tf.keras.layers.StringLookup(vocabulary=list(corpus.users))
    if output == "dimension":
        tower = tf.keras.Sequential([lookup, tf.keras.layers.Embedding(len(corpus.users) + 1,
                                                                       dim + 3)])
        problem = f"Its output shape is (None, {dim + 3}), the candidate embeddings' shape is " \
                  f"({len(movies)}, {dim})."
    else:
        tower = tf.keras.Sequential([lookup, tf.keras.layers.Lambda(
            lambda ids: tf.tile(ids[:, None], [1, dim]))])
        problem = "Its output dtype is int64, not a float."
    assert_refused(
        lambda path, overwrite: export_retrieval_model(
            tower, movies, corpus.movie_ids, k=K, path=path, overwrite=overwrite),
        ValueError,
        re.escape(f"`query_model` must map `input_spec` to float embeddings [batch, {dim}] "
                  f"(the candidate embeddings' dimension). {problem}"),
        existing, tmp_path)


def test_existing_export_is_replaced_only_with_overwrite(trained, tmp_path):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=K,
                                  path=tmp_path / "ml" / "1")
    (path / "unrelated.txt").write_text("left by hand")
    before = snapshot(path)
    with pytest.raises(FileExistsError, match=re.escape(
            f"`path` must not be a non-empty directory unless overwrite=True. Received: "
            f"path={path}")):
        export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=3, path=path)
    assert snapshot(path) == before

    assert export_retrieval_model(model.query_tower, movies, corpus.movie_ids, k=3, path=path,
                                  overwrite=True) == path
    assert not (path / "unrelated.txt").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["1"]  # nothing set aside remains
    os.mkdir(tmp_path / "plain")  # the export's permissions are the umask's, like any mkdir
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode
    users = list(corpus.users[:2])
    out = tf.saved_model.load(str(path)).signatures["serving_default"](
        user_id=tf.constant(users))
    _, scores = in_memory_top_k(model, corpus, users, 3)
    np.testing.assert_allclose(out["scores"].numpy(), scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("failing", ["save", "rename"])
def test_failed_write_leaves_the_target_as_it_was(trained, existing, tmp_path, monkeypatch,
                                                  failing):
    model, corpus = trained
    movies = model.candidate_tower(corpus.movie_tensors())
    if failing == "save":
        def save(obj, export_dir, *args, **kwargs):
            del obj, args, kwargs
            (Path(export_dir) / "saved_model.pb").write_bytes(b"half written")
            raise RuntimeError("disk full")
        monkeypatch.setattr(tf.saved_model, "save", save)
    else:
        rename = os.rename

        def rename_except_into_place(src, dst):
            if ".tmp-" in str(src):  # the new export moving into place
                raise RuntimeError("disk full")
            rename(src, dst)
        monkeypatch.setattr(os, "rename", rename_except_into_place)
    assert_refused(
        lambda path, overwrite: export_retrieval_model(
            model.query_tower, movies, corpus.movie_ids, k=K, path=path, overwrite=overwrite),
        RuntimeError, "disk full", existing, tmp_path)


# ------------------------------------------------------------------ naming the inputs


class UserAndAge(tf.keras.Model):
    """A query tower taking a dict: a user-id embedding plus an age-bucket embedding."""

    def __init__(self, dim):
        super().__init__()
        self.users = tf.keras.layers.Embedding(10, dim)
        self.ages = tf.keras.layers.Embedding(5, dim)

    def call(self, features):
        return self.users(features["user"]) + self.ages(features["age"])


def small_corpus(dim=4, num=20):
    rng = np.random.default_rng(0)
    return (tf.constant(rng.normal(size=(num, dim)), tf.float32),
            tf.constant([f"m{i}" for i in range(num)]))


def expected_top_k(queries, movies, ids, k):
    top = tf.math.top_k(tf.matmul(queries, movies, transpose_b=True), k)
    return ids.numpy()[top.indices.numpy()], top.values.numpy()


def test_input_name_names_the_input_of_a_given_input_spec(tmp_path):
    movies, ids = small_corpus()
    tower = tf.keras.layers.Embedding(10, 4)
    path = export_retrieval_model(tower, movies, ids, k=3, path=tmp_path / "m" / "1",
                                  input_spec=tf.TensorSpec([None], tf.int64), input_name="uid")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert sorted(serve.structured_input_signature[1]) == ["uid"]
    users = tf.constant([1, 7], tf.int64)
    out = serve(uid=users)
    expected_ids, expected_scores = expected_top_k(tower(users), movies, ids, 3)
    np.testing.assert_array_equal(out["ids"].numpy(), expected_ids)
    np.testing.assert_allclose(out["scores"].numpy(), expected_scores, rtol=1e-6)


def test_a_dict_input_spec_serves_a_multi_input_query_tower(tmp_path):
    movies, ids = small_corpus()
    tower = UserAndAge(4)
    path = export_retrieval_model(
        tower, movies, ids, k=3, path=tmp_path / "m" / "1",
        input_spec={"user": tf.TensorSpec([None], tf.int64),
                    "age": tf.TensorSpec([None], tf.int32)})
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert sorted(serve.structured_input_signature[1]) == ["age", "user"]
    request = {"user": tf.constant([1, 2, 2], tf.int64), "age": tf.constant([0, 3, 4], tf.int32)}
    out = serve(**request)
    expected_ids, expected_scores = expected_top_k(tower(request), movies, ids, 3)
    np.testing.assert_array_equal(out["ids"].numpy(), expected_ids)
    np.testing.assert_allclose(out["scores"].numpy(), expected_scores, rtol=1e-6)
    # A malformed request names its input.
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape("age [1,3] is not compatible with expected shape [?]")):
        serve(user=request["user"], age=request["age"][None])


@pytest.mark.parametrize("kwargs, match", [
    ({"input_spec": [tf.TensorSpec([None], tf.int64)]},
     r"`input_spec` must be a tf\.TensorSpec \(one input, named `input_name`\) or a non-empty "
     r"dict \{name: tf\.TensorSpec\} \(one input per key, for a query tower that takes a dict "
     r"of features\)\. Received: input_spec=\[TensorSpec"),
    ({"input_spec": {"user": tf.TensorSpec([None], tf.int64), "age": tf.int32}},
     r"`input_spec` must be a tf\.TensorSpec .* Received: input_spec=\{'user': "),
    ({"input_spec": {"user": tf.TensorSpec([None], tf.int64)}, "input_name": "uid"},
     r"`input_name` names the one input of a tf\.TensorSpec `input_spec`; the keys of a dict "
     r"`input_spec` name its inputs\. Received: input_name='uid' with input_spec keys "
     r"\['user'\]\."),
    ({"input_spec": tf.TensorSpec([None], tf.int64, name="user"), "input_name": "uid"},
     r"`input_name` and the name of `input_spec` must agree: both name the signature's input\. "
     r"Received: input_name='uid', input_spec=TensorSpec\(.*name='user'\)\."),
    ({"input_spec": {"user id": tf.TensorSpec([None], tf.int64)}},
     r"Each input of the serving signature needs a name TensorFlow accepts: .* Received: "
     r"'user id' \(a key of `input_spec`\)\."),
])
def test_an_input_spec_that_cannot_name_the_inputs_is_refused_before_writing(tmp_path, kwargs,
                                                                               match):
    movies, ids = small_corpus()
    with pytest.raises(ValueError, match=match):
        export_retrieval_model(UserAndAge(4), movies, ids, k=3, path=tmp_path / "m" / "1",
                               **kwargs)
    assert list(tmp_path.iterdir()) == []
