"""Tests for tfnegcache_examples.movielens_data, offline, on tiny fixture files of both layouts."""

import socket
import sys
import types
import zipfile

import numpy as np
import pytest

from tfnegcache_examples import movielens_data as movielens

import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-order

# The same 5 movies and 6 ratings in both layouts, chosen for the cases that need care: a
# latin-1 title, a release date later than the title's year (Taxi Driver), the movie with no
# title or date (267), a title ending in "(V)" after its year (1412), timestamp ties across
# users and within a user, and user ids whose text order differs from their numeric order.
GENRE_FLAGS = {
    "1": "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "23": "0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|1|0|0",
    "267": "1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "543": "0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0",
    "1412": "0|0|0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
}
U_ITEM = "".join(
    f"{movie}|{title}|{date}||{url}|{GENRE_FLAGS[movie]}\n"
    for movie, title, date, url in [
        ("1", "Toy Story (1995)", "01-Jan-1995", "http://us.imdb.com/M/title-exact?Toy%20Story"),
        ("23", "Taxi Driver (1976)", "16-Feb-1996", "http://us.imdb.com/M/title-exact?Taxi"),
        ("267", "unknown", "", ""),
        ("543", "Misérables, Les (1995)", "01-Jan-1995", "http://us.imdb.com/Title?Mis%E9rables"),
        (
            "1412",
            "Land Before Time III: The Time of the Great Giving (1995) (V)",
            "01-Jan-1995",
            "http://us.imdb.com/M/title-exact?Land%20Before%20Time%20III",
        ),
    ]
)
U_DATA = (
    "196\t23\t3\t881250949\n"
    "22\t1\t1\t878887116\n"
    "5\t543\t4\t881250949\n"
    "196\t1412\t5\t881250000\n"
    "22\t267\t2\t878887116\n"
    "5\t1\t5\t874965758\n"
)
U_USER = "5|33|F|other|15213\n22|25|M|writer|40206\n196|49|M|writer|55105\n"

RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "23\tTaxi Driver\t1976\tDrama Thriller\n"
    "267\tunkonwn\tunkonwn\tunknown\n"
    "543\tMisérables, Les\t1995\tDrama Musical\n"
    "1412\tLand Before Time III: The Time of the Great Giving (1995)\tV\tAnimation Children's\n"
)
RECBOLE_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + U_DATA
RECBOLE_USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + (
    U_USER.replace("|", "\t")
)

# The expected ratings, in canonical (timestamp, int(user), int(movie)) order.
EXPECTED_RATINGS = [
    # user, movie, rating, timestamp
    ("5", "1", 5.0, 874965758),
    ("22", "1", 1.0, 878887116),
    ("22", "267", 2.0, 878887116),
    ("196", "1412", 5.0, 881250000),
    ("5", "543", 4.0, 881250949),
    ("196", "23", 3.0, 881250949),
]
EXPECTED_MOVIES = {
    # movie: title, release year, genres
    "1": ("Toy Story (1995)", 1995, ("Animation", "Children's", "Comedy")),
    "23": ("Taxi Driver (1976)", 1976, ("Drama", "Thriller")),
    "267": ("unknown", 0, ("unknown",)),
    "543": ("Misérables, Les (1995)", 1995, ("Drama", "Musical")),
    "1412": (
        "Land Before Time III: The Time of the Great Giving (1995) (V)",
        1995,
        ("Animation", "Children's"),
    ),
}


def write_grouplens(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    (directory / "u.data").write_text(U_DATA)
    (directory / "u.user").write_text(U_USER)
    return directory


def write_recbole(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.item").write_text(RECBOLE_ITEM, encoding="utf-8")
    (directory / "ml-100k.inter").write_text(RECBOLE_INTER)
    (directory / "ml-100k.user").write_text(RECBOLE_USER)
    return directory


def multi_hot(names):
    return np.array([1.0 if g in names else 0.0 for g in movielens.GENRES], np.float32)


def fail(message):
    def raise_error(*args, **kwargs):
        raise OSError(message)

    return raise_error


@pytest.fixture(name="offline")
def fixture_offline(monkeypatch):
    """Makes the network sources fail at once, as on a machine without network."""
    monkeypatch.setattr(movielens, "_tfds_builders", fail("no network (test)"))
    monkeypatch.setattr(movielens, "_pip_download", fail("no package index (test)"))


def assert_same_data(a, b):
    assert a.ratings.keys() == b.ratings.keys() and a.movies.keys() == b.movies.keys()
    for key in a.ratings:
        np.testing.assert_array_equal(a.ratings[key], b.ratings[key], err_msg=key)
    for key in a.movies:
        np.testing.assert_array_equal(a.movies[key], b.movies[key], err_msg=key)


@pytest.mark.parametrize("writer", [write_grouplens, write_recbole], ids=["grouplens", "recbole"])
def test_load_dir_parses_every_field(tmp_path, writer, offline):
    data = movielens.load(
        data_dir=writer(tmp_path / "data"), cache_dir=tmp_path / "cache", verbose=False
    )
    r = data.ratings
    assert [str(u) for u in r["user_id"]] == [row[0] for row in EXPECTED_RATINGS]
    assert [str(m) for m in r["movie_id"]] == [row[1] for row in EXPECTED_RATINGS]
    np.testing.assert_array_equal(r["user_rating"], [row[2] for row in EXPECTED_RATINGS])
    np.testing.assert_array_equal(r["timestamp"], [row[3] for row in EXPECTED_RATINGS])
    for i, movie in enumerate(r["movie_id"]):
        title, year, genres = EXPECTED_MOVIES[movie]
        assert r["movie_title"][i] == title
        assert r["release_year"][i] == year
        np.testing.assert_array_equal(r["movie_genres"][i], multi_hot(genres))
    assert r["user_rating"].dtype == np.float32 and r["movie_genres"].dtype == np.float32
    assert r["timestamp"].dtype == np.int64 and r["release_year"].dtype == np.int64
    assert r["movie_genres"].shape == (6, 19)

    m = data.movies
    assert list(m["movie_id"]) == ["1", "23", "267", "543", "1412"]
    assert list(m["movie_title"]) == [EXPECTED_MOVIES[i][0] for i in m["movie_id"]]
    assert list(m["release_year"]) == [EXPECTED_MOVIES[i][1] for i in m["movie_id"]]
    np.testing.assert_array_equal(
        m["movie_genres"], [multi_hot(EXPECTED_MOVIES[i][2]) for i in m["movie_id"]]
    )
    assert str(tmp_path / "data") in data.source
    assert not (tmp_path / "cache").exists()  # A local directory is read, not copied.


def test_both_layouts_give_identical_arrays(tmp_path, offline):
    grouplens = movielens.load(data_dir=write_grouplens(tmp_path / "g"), verbose=False)
    recbole = movielens.load(data_dir=write_recbole(tmp_path / "r"), verbose=False)
    assert_same_data(grouplens, recbole)
    assert "GroupLens" in grouplens.source and "RecBole" in recbole.source


def test_genre_names_are_the_grouplens_order():
    assert len(movielens.GENRES) == 19
    assert movielens.GENRES[:5] == ("unknown", "Action", "Adventure", "Animation", "Children's")
    assert movielens.GENRES[-1] == "Western"


def test_ratings_dataset_dtypes_and_shapes(tmp_path, offline):
    data = movielens.load(data_dir=write_grouplens(tmp_path / "g"), verbose=False)
    spec = data.ratings_dataset().element_spec
    assert spec["user_id"] == tf.TensorSpec([], tf.string)
    assert spec["movie_title"] == tf.TensorSpec([], tf.string)
    assert spec["movie_genres"] == tf.TensorSpec([19], tf.float32)
    assert spec["release_year"] == tf.TensorSpec([], tf.int64)
    assert spec["user_rating"] == tf.TensorSpec([], tf.float32)
    assert spec["timestamp"] == tf.TensorSpec([], tf.int64)

    rows = list(data.ratings_dataset(np.array([5, 0])).as_numpy_iterator())
    assert [(r["user_id"], r["movie_id"]) for r in rows] == [(b"196", b"23"), (b"5", b"1")]
    assert rows[1]["movie_title"] == b"Toy Story (1995)"
    assert len(list(data.ratings_dataset())) == 6

    movies = list(data.movies_dataset().as_numpy_iterator())
    assert [m["movie_title"].decode() for m in movies][3] == "Misérables, Les (1995)"
    with pytest.raises(ValueError, match="1-D integer array"):
        data.ratings_dataset(np.array([0.5]))


def synthetic(num_users=20, per_user=10, seed=0):
    """A `MovieLens` with random timestamps (ties included) and no files behind it."""
    rng = np.random.default_rng(seed)
    n = num_users * per_user
    movies = movielens._movie_table(  # pylint: disable=protected-access
        ids=[str(i) for i in range(1, 31)],
        titles=[f"Movie {i} (1990)" for i in range(1, 31)],
        genres=np.zeros((30, 19), np.float32),
        years=[1990] * 30,
    )
    return movielens._assemble(  # pylint: disable=protected-access
        user_ids=[str(u) for u in np.repeat(np.arange(1, num_users + 1), per_user)],
        movie_ids=[str(m) for m in rng.integers(1, 31, n)],
        ratings=rng.integers(1, 6, n),
        timestamps=rng.integers(0, 50, n),
        movies=movies,
        source="synthetic",
    )


def test_tutorial_split_sizes_disjoint_covering_deterministic():
    data = synthetic()
    train, test = movielens.tutorial_split(data, seed=3, num_train=150)
    assert train.shape == (150,) and test.shape == (50,)
    assert train.dtype == np.int64 and test.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(200))
    again = movielens.tutorial_split(data, seed=3, num_train=150)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(train, movielens.tutorial_split(data, seed=4, num_train=150)[0])
    with pytest.raises(ValueError, match="num_train must be in \\[0, 200\\].*got 201"):
        movielens.tutorial_split(data, num_train=201)


def test_temporal_split_holds_out_one_of_each_users_latest_ratings():
    data = synthetic()
    train, test = movielens.temporal_split(data)
    users = data.ratings["user_id"]
    assert len(test) == 20 and len(train) == 180
    assert train.dtype == np.int64 and test.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(200))
    assert sorted(users[test]) == sorted(np.unique(users))
    timestamps = data.ratings["timestamp"]
    for row in test:
        mine = np.flatnonzero(users == users[row])
        assert timestamps[row] == timestamps[mine].max()


def tied_user_data():
    """User 1 rated movies 10 and 20 early, then 30, 40 and 50 in one second; user 2 once."""
    movies = movielens._movie_table(  # pylint: disable=protected-access
        ids=["10", "20", "30", "40", "50"],
        titles=[f"Movie {i} (1990)" for i in range(5)],
        genres=np.zeros((5, 19), np.float32),
        years=[1990] * 5,
    )
    return movielens._assemble(  # pylint: disable=protected-access
        user_ids=["1", "1", "1", "1", "1", "2"],
        movie_ids=["10", "20", "30", "40", "50", "10"],
        ratings=[3, 4, 5, 1, 2, 3],
        timestamps=[100, 200, 300, 300, 300, 150],
        movies=movies,
        source="hand-made",
    )


def test_temporal_split_draws_uniformly_among_tied_latest_ratings():
    data = tied_user_data()
    users, movie_ids = data.ratings["user_id"], data.ratings["movie_id"]
    num_seeds = 3000
    counts = {}
    for seed in range(num_seeds):
        train, test = movielens.temporal_split(data, seed=seed)
        # Ascending rows: user 2's only rating (time 150) comes before user 1's latest.
        assert list(users[test]) == ["2", "1"]
        assert movie_ids[test[0]] == "10"
        held_out = movie_ids[test[1]]
        counts[held_out] = counts.get(held_out, 0) + 1
        assert len(train) == 4 and held_out not in movie_ids[train[users[train] == "1"]]
    # Only the three ratings tied at the latest second are ever held out, never 10 or 20.
    assert sorted(counts) == ["30", "40", "50"]
    # Each count is Binomial(3000, 1/3): mean 1000, std 25.8. A 5-std band (+-129) fails
    # a correct draw with probability ~1e-6 per movie, while a tie-break that favoured one
    # movie by even 1.5x (count ~1286) falls outside it. The seeds are fixed, so the
    # test is deterministic anyway.
    for movie, count in counts.items():
        assert abs(count - num_seeds / 3) < 5 * np.sqrt(num_seeds * 2 / 9), (movie, counts)


def test_temporal_split_is_deterministic_for_a_seed():
    data = synthetic(seed=5)
    first = movielens.temporal_split(data, seed=7)
    again = movielens.temporal_split(data, seed=7)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    # The default seed is 0; synthetic() has ties, so some other seed breaks one differently.
    np.testing.assert_array_equal(movielens.temporal_split(data)[1],
                                  movielens.temporal_split(data, seed=0)[1])
    assert any(not np.array_equal(first[1], movielens.temporal_split(data, seed=s)[1])
               for s in range(8, 20))


def test_temporal_split_on_the_fixture_files(tmp_path, offline):
    data = movielens.load(data_dir=write_grouplens(tmp_path / "g"), verbose=False)
    held_out = set()
    for seed in range(50):
        train, test = movielens.temporal_split(data, seed=seed)
        # User 5's and user 196's latest ratings are rows 4 and 5; user 22 rated movies 1 and
        # 267 in the same second (rows 1 and 2), so either may be held out.
        assert list(test[1:]) == [4, 5] and test[0] in (1, 2)
        np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(6))
        held_out.add(int(test[0]))
    assert held_out == {1, 2}


def test_error_lists_every_source_and_reason(tmp_path, offline):
    missing = tmp_path / "nowhere"
    with pytest.raises(movielens.MovieLensUnavailable) as error:
        movielens.load(data_dir=missing, cache_dir=tmp_path / "cache", verbose=False)
    message = str(error.value)
    assert isinstance(error.value, RuntimeError)
    assert f"- dir: FileNotFoundError: directory {missing} does not exist" in message
    assert f"- cache: FileNotFoundError: directory {tmp_path / 'cache'} does not exist" in message
    assert "- tfds: OSError: no network (test)" in message
    assert "- recbole: OSError: no package index (test)" in message


def test_sources_restrict_and_order(tmp_path, offline):
    with pytest.raises(movielens.MovieLensUnavailable) as error:
        movielens.load(cache_dir=tmp_path / "cache", sources=("recbole", "dir"), verbose=False)
    lines = str(error.value).splitlines()[1:]
    assert lines == [
        "  - recbole: OSError: no package index (test)",
        "  - dir: FileNotFoundError: no data_dir given",
    ]
    with pytest.raises(ValueError, match="got \\('dir', 'web'\\)"):
        movielens.load(sources=("dir", "web"))


def test_a_directory_without_the_files_says_what_it_expected(tmp_path, offline):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ratings.csv").write_text("")
    with pytest.raises(movielens.MovieLensUnavailable, match="has neither the GroupLens files"):
        movielens.load(data_dir=tmp_path / "d", sources=("dir",), verbose=False)


def test_malformed_line_names_file_and_line(tmp_path, offline):
    directory = write_grouplens(tmp_path / "g")
    (directory / "u.data").write_text(U_DATA + "7\t1\t5\n")
    with pytest.raises(movielens.MovieLensUnavailable, match="u.data:7: expected 4 fields"):
        movielens.load(data_dir=directory, sources=("dir",), verbose=False)


def fake_wheel(path):
    """A small zip laid out like the recbole wheel, with other members around the three."""
    member_dir = movielens.RECBOLE_MEMBER_DIR
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
        archive.writestr(member_dir + "ml-100k.inter", RECBOLE_INTER)
        archive.writestr(member_dir + "ml-100k.item", RECBOLE_ITEM.encode("utf-8"))
        archive.writestr(member_dir + "ml-100k.user", RECBOLE_USER)
        archive.writestr(member_dir + "ml-100k.kg", "head_id:token\n")
        archive.writestr("recbole/dataset_example/ml-1m/ml-1m.inter", "wrong file\n")


def test_recbole_fetch_fills_the_cache_and_the_cache_is_reused(
    tmp_path, monkeypatch, offline, capsys
):
    calls = []

    def pip_download(requirement, dest_dir):
        calls.append(requirement)
        fake_wheel(dest_dir / "recbole-1.2.1-py3-none-any.whl")

    monkeypatch.setattr(movielens, "_pip_download", pip_download)
    cache = tmp_path / "cache"
    fetched = movielens.load(cache_dir=cache)
    assert calls == ["recbole==1.2.1"]
    assert sorted(p.name for p in cache.iterdir()) == [
        "ml-100k.inter", "ml-100k.item", "ml-100k.user"
    ]  # fmt: skip
    assert (cache / "ml-100k.item").read_text(encoding="utf-8") == RECBOLE_ITEM
    assert (cache / "ml-100k.user").read_text() == RECBOLE_USER
    assert capsys.readouterr().err == (
        "tfnegcache: downloading MovieLens 100k inside the wheel recbole==1.2.1 from the "
        "package index (`pip download`, PyPI unless pip is configured otherwise); its data "
        f"files are cached in {cache}\n"
        f"tfnegcache: MovieLens 100k from RecBole atomic files in {cache} "
        "(fetched from the PyPI wheel recbole==1.2.1)\n"
    )

    monkeypatch.setattr(movielens, "_pip_download", fail("pip must not run again"))
    cached = movielens.load(cache_dir=cache)
    assert capsys.readouterr().err == (
        f"tfnegcache: MovieLens 100k from RecBole atomic files in {cache} (cached)\n"
    )
    assert_same_data(fetched, cached)
    grouplens = movielens.load(data_dir=write_grouplens(tmp_path / "g"), verbose=False)
    assert_same_data(cached, grouplens)


def test_recbole_download_line_only_when_verbose(tmp_path, monkeypatch, offline, capsys):
    monkeypatch.setattr(movielens, "_pip_download",
                        lambda requirement, dest_dir: fake_wheel(dest_dir / "recbole-1.2.1-py3-none-any.whl"))
    movielens.load(cache_dir=tmp_path / "cache", sources=("recbole",), verbose=False)
    assert capsys.readouterr().err == ""


def test_tfds_source_without_tensorflow_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises
    with pytest.raises(movielens.MovieLensUnavailable) as error:
        movielens.load(cache_dir=tmp_path / "cache", sources=("tfds",), verbose=False)
    assert ("- tfds: ImportError: The TFDS source of MovieLens 100k needs tensorflow-datasets, "
            "which is not installed. Install the examples extra: "
            'pip install "tfnegcache[examples]"') in str(error.value)


def test_recbole_wheel_without_the_files_fails_and_leaves_no_cache(
    tmp_path, monkeypatch, offline
):
    def pip_download(requirement, dest_dir):
        with zipfile.ZipFile(dest_dir / "recbole-1.2.1-py3-none-any.whl", "w") as archive:
            archive.writestr("recbole/__init__.py", "")

    monkeypatch.setattr(movielens, "_pip_download", pip_download)
    cache = tmp_path / "cache"
    with pytest.raises(movielens.MovieLensUnavailable, match="has no member recbole/"):
        movielens.load(cache_dir=cache, sources=("recbole",), verbose=False)
    assert list(cache.iterdir()) == []  # The download folder is gone, no file half-written.


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFNEGCACHE_CACHE_DIR", str(tmp_path / "t"))
    assert movielens.default_cache_dir() == tmp_path / "t" / "movielens-100k"
    monkeypatch.delenv("TFNEGCACHE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert movielens.default_cache_dir() == tmp_path / "x" / "tfnegcache" / "movielens-100k"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert movielens.default_cache_dir() == tmp_path / "h" / ".cache/tfnegcache/movielens-100k"


def test_default_cache_dir_is_used_when_none_given(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TFNEGCACHE_CACHE_DIR", str(tmp_path))
    write_recbole(tmp_path / "movielens-100k")
    data = movielens.load(sources=("cache",), verbose=False)
    assert data.source == f"RecBole atomic files in {tmp_path / 'movielens-100k'} (cached)"


def test_tfds_fails_fast_when_not_prepared_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))
    probes = []

    def unreachable(address, timeout):
        probes.append((address, timeout))
        raise socket.gaierror("Name or service not known (test)")

    monkeypatch.setattr(movielens.socket, "create_connection", unreachable)
    with pytest.raises(OSError, match="files.grouplens.org is unreachable"):
        movielens._tfds_builders(tmp_path / "tfds")  # pylint: disable=protected-access
    assert probes == [(("files.grouplens.org", 443), 5.0)]


# TFDS's genre label names for movielens, in label id order (tensorflow_datasets 4.9).
TFDS_LABELS = [
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "Unknown", "War", "Western", "(no genres listed)",
]  # fmt: skip


class FakeBuilder:
    """Stands in for a prepared TFDS builder: `as_dataset` of the TFDS feature layout."""

    def __init__(self, features):
        self.features = features
        self.data_dir = "/fake/tfds"

    def as_dataset(self, split):
        assert split == "train"
        return tf.data.Dataset.from_tensor_slices(self.features)


def test_tfds_source_matches_the_local_layouts(tmp_path, monkeypatch):
    # The TFDS features of the fixture: ids and titles as TFDS writes them, genres as
    # variable-length lists of TFDS label ids.
    movie_ids = list(EXPECTED_MOVIES)
    tfds_name = {"Children's": "Children", "unknown": "Unknown"}
    genre_ids = [
        [TFDS_LABELS.index(tfds_name.get(g, g)) for g in EXPECTED_MOVIES[i][2]] for i in movie_ids
    ]
    movies = FakeBuilder(
        {
            "movie_id": tf.constant(movie_ids),
            "movie_title": tf.constant([EXPECTED_MOVIES[i][0] for i in movie_ids]),
            "movie_genres": tf.ragged.constant(genre_ids, dtype=tf.int64),
        }
    )
    rows = [line.split("\t") for line in U_DATA.splitlines()]
    ratings = FakeBuilder(
        {
            "user_id": tf.constant([r[0] for r in rows]),
            "movie_id": tf.constant([r[1] for r in rows]),
            "user_rating": tf.constant([float(r[2]) for r in rows], tf.float32),
            "timestamp": tf.constant([int(r[3]) for r in rows], tf.int64),
            "user_zip_code": tf.constant(["00000"] * len(rows)),
        }
    )
    labels = types.SimpleNamespace(names=TFDS_LABELS)
    movies.info = types.SimpleNamespace(
        features={"movie_genres": types.SimpleNamespace(feature=labels)}
    )
    monkeypatch.setattr(movielens, "_tfds_builders", lambda tfds_dir: (ratings, movies))
    data = movielens.load(sources=("tfds",), cache_dir=tmp_path / "cache", verbose=False)
    assert data.source == "TensorFlow Datasets in /fake/tfds"
    assert_same_data(data, movielens.load(data_dir=write_grouplens(tmp_path / "g"), verbose=False))


def test_tfds_labels_are_those_of_the_installed_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("movielens/100k-movies", data_dir=str(tmp_path))
    assert builder.info.features["movie_genres"].feature.names == TFDS_LABELS


def test_tfds_genre_labels_map_by_name():
    matrix = movielens._tfds_genre_matrix(TFDS_LABELS)  # pylint: disable=protected-access
    assert matrix.shape == (21, 19)
    assert matrix[TFDS_LABELS.index("Children"), movielens.GENRES.index("Children's")] == 1
    assert matrix[TFDS_LABELS.index("Unknown"), movielens.GENRES.index("unknown")] == 1
    assert matrix[TFDS_LABELS.index("IMAX")].sum() == 0
    assert matrix[TFDS_LABELS.index("(no genres listed)")].sum() == 0
    assert matrix.sum(axis=0).tolist() == [1.0] * 19  # Every GroupLens genre is reachable.
