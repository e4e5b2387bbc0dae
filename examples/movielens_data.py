"""MovieLens 100k ratings and movies as numpy arrays and `tf.data.Dataset`s.

`load` returns the 100,000 ratings of 943 users on 1,682 movies, with the movie features
(title, 19 GroupLens genres, release year) joined onto each rating, from the first source that
works, in this order unless `sources` says otherwise:

1. `"dir"`: a local directory given as `data_dir`, in either the GroupLens `ml-100k` layout
   (`u.data`, `u.item`) or the RecBole atomic layout (`ml-100k.inter`, `ml-100k.item`);
2. `"cache"`: the user cache directory (see `default_cache_dir`), filled by an earlier fetch;
3. `"tfds"`: TensorFlow Datasets `movielens/100k-ratings` and `movielens/100k-movies`, when
   already prepared, or downloadable (a quick connection probe first, so an offline machine
   falls through at once instead of hanging);
4. `"recbole"`: the RecBole atomic files shipped inside the PyPI wheel `recbole==1.2.1`,
   fetched with `pip download` (no install, no dependencies) and extracted into the cache, so
   the next load reads the cache and runs no pip at all. A line on stderr says so when it
   downloads.

The "tfds" source needs `tensorflow-datasets`, from the `examples` extra
(`pip install "tfnegcache[examples]"`); without it that source is skipped with the reason.

A line on stderr says which source was used; `MovieLensUnavailable` lists every source tried
and why it failed when none works.

Differences between the sources, and how they are reconciled:

- Titles are GroupLens's, with the year in parentheses ("Toy Story (1995)"). RecBole splits
  the last parenthesised group off the title into `release_year`; we put it back, which
  restores the GroupLens text, also for movie 1412, whose GroupLens title ends in "(1995) (V)"
  and whose RecBole `release_year` is "V". RecBole marks movie 267's missing title and year
  as "unkonwn" (sic); GroupLens has the title "unknown" and no date, so we use "unknown".
- `release_year` is the year in the title's last "(YYYY)", as RecBole has it, since the
  GroupLens release date is sometimes a later re-release (Taxi Driver (1976) has
  16-Feb-1996); the release date's year is the fallback for a title without one, and 0 means
  unknown. TFDS has no dates, only titles, so the title rule also keeps TFDS consistent.
- TFDS genre labels are 21 names ("Children", "Unknown", "IMAX", "(no genres listed)", ...);
  they are mapped to the 19 GroupLens names by name. "IMAX" and "(no genres listed)" come
  from the larger MovieLens sets and never occur in 100k; were they present they would be
  dropped, since `GENRES` has no column for them.
"""

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfnegcache_examples._extras import import_extra

if TYPE_CHECKING:
    import tensorflow as tf

# TensorFlow is imported where a dataset is built, not here: the CLI checks a --data-dir
# with `directory_layout` before TensorFlow loads.

GENRES: Tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

SOURCES: Tuple[str, ...] = ("dir", "cache", "tfds", "recbole")

RECBOLE_VERSION = "1.2.1"
# Where the wheel keeps the example data set; these members are all we read from it.
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_FILES: Tuple[str, ...] = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
GROUPLENS_FILES: Tuple[str, ...] = ("u.data", "u.item")

# RecBole's marker for movie 267's missing title and release year, misspelt in its files.
_RECBOLE_MISSING = "unkonwn"
_TFDS_HOST = ("files.grouplens.org", 443)
_TFDS_PROBE_TIMEOUT_S = 5.0
_PIP_TIMEOUT_S = 300.0
_TITLE_YEAR = re.compile(r"\((\d{4})\)")
_YEAR = re.compile(r"\d{4}")

PathLike = Union[str, os.PathLike]


class MovieLensUnavailable(RuntimeError):
    """No source could provide MovieLens 100k; the message lists each source and why."""


@dataclasses.dataclass
class MovieLens:
    """MovieLens 100k: the ratings with their movie features, and the movie table.

    Attributes:
      ratings: one row per rating, sorted by (timestamp, int(user_id), int(movie_id)):
        "user_id" str [n] (e.g. "196"), "movie_id" str [n] ("242"), "movie_title" str [n]
        ("Kolya (1996)"), "movie_genres" float32 [n, 19] multi-hot over `GENRES`,
        "release_year" int64 [n] (0 when unknown), "user_rating" float32 [n] (1 to 5),
        "timestamp" int64 [n] (Unix seconds).
      movies: one row per movie, sorted by int(movie_id): "movie_id" str [m], "movie_title"
        str [m], "movie_genres" float32 [m, 19], "release_year" int64 [m].
      source: where the data came from, in words.
    """

    ratings: Dict[str, np.ndarray]
    movies: Dict[str, np.ndarray]
    source: str

    def ratings_dataset(self, indices: Optional[np.ndarray] = None) -> "tf.data.Dataset":
        """The ratings (all, or the rows `indices`) as a dataset of feature dicts.

        Args:
          indices: int [k] row numbers into `ratings` (e.g. from `tutorial_split`), in the
            order to yield them; None for all rows in canonical order.

        Returns:
          A dataset of dicts with the keys of `ratings`: strings as tf.string scalars,
          "movie_genres" float32 [19], "release_year" and "timestamp" int64, "user_rating"
          float32 scalars.
        """
        import tensorflow as tf  # pylint: disable=g-import-not-at-top,redefined-outer-name
        return tf.data.Dataset.from_tensor_slices(_take_rows(self.ratings, indices))

    def movies_dataset(self) -> "tf.data.Dataset":
        """The movie table as a dataset of dicts with the keys and dtypes of `movies`."""
        import tensorflow as tf  # pylint: disable=g-import-not-at-top,redefined-outer-name
        return tf.data.Dataset.from_tensor_slices(dict(self.movies))


def default_cache_dir() -> Path:
    """The cache directory for MovieLens 100k.

    Returns:
      `$TFNEGCACHE_CACHE_DIR/movielens-100k` if that variable is set, else
      `$XDG_CACHE_HOME/tfnegcache/movielens-100k`, else `~/.cache/tfnegcache/movielens-100k`.
    """
    root = os.environ.get("TFNEGCACHE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "tfnegcache")
    return Path(root) / "movielens-100k"


def load(
    data_dir: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    sources: Optional[Sequence[str]] = None,
    verbose: bool = True,
) -> MovieLens:
    """Loads MovieLens 100k from the first source that works.

    Args:
      data_dir: a local directory in the GroupLens `ml-100k` layout or the RecBole atomic
        layout, tried by the "dir" source.
      cache_dir: the directory holding the cached files themselves (the RecBole atomic
        files, and TFDS downloads under `tfds/`); default `default_cache_dir()`.
      sources: names from `SOURCES` to try, in order; default all of `SOURCES`.
      verbose: whether to print the source line on stderr.

    Returns:
      The `MovieLens` data.

    Raises:
      ValueError: `sources` names an unknown source.
      MovieLensUnavailable: every source failed; the message gives each one's reason.
    """
    sources = tuple(SOURCES if sources is None else sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty sequence of {SOURCES}, got {sources!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    loaders: Dict[str, Callable[[], MovieLens]] = {
        "dir": lambda: _load_dir_source(data_dir),
        "cache": lambda: _load_directory(cache, origin="cached"),
        "tfds": lambda: _load_tfds(cache / "tfds"),
        "recbole": lambda: _load_recbole(cache, verbose),
    }
    failures = []
    for name in sources:
        try:
            data = loaders[name]()
        except Exception as e:  # pylint: disable=broad-except
            # Any failure of one source (missing files, no network, a bad wheel, TFDS
            # errors) is a reason to try the next; all reasons end up in the final error.
            failures.append(f"  - {name}: {type(e).__name__}: {e}")
            continue
        if verbose:
            print(f"tfnegcache: MovieLens 100k from {data.source}", file=sys.stderr)
        return data
    raise MovieLensUnavailable(
        "MovieLens 100k is unavailable from every source tried:\n" + "\n".join(failures)
    )


def tutorial_split(
    data: MovieLens, seed: int = 42, num_train: int = 80_000
) -> Tuple[np.ndarray, np.ndarray]:
    """A random split with the TFRS tutorial's proportions (80,000 train, the rest test).

    All ratings are shuffled with `np.random.default_rng(seed).permutation`; the first
    `num_train` are train. The tutorial shuffles TFDS's records with `tf.random`, so the
    records in each part differ from the tutorial's; only the sizes match.

    Args:
      data: the loaded data.
      seed: the permutation's seed.
      num_train: how many ratings go to train, 0 to n.

    Returns:
      (train, test): int64 row numbers into `data.ratings`, [num_train] and [n - num_train],
      in shuffled order, disjoint and together covering every row.
    """
    n = len(data.ratings["timestamp"])
    if not 0 <= num_train <= n:
        raise ValueError(f"num_train must be in [0, {n}] (the number of ratings), got {num_train}")
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return order[:num_train], order[num_train:]


def temporal_split(data: MovieLens, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Per-user leave-last-out: one of each user's latest ratings is test, the others train.

    When several of a user's ratings share the latest timestamp (MovieLens records seconds,
    and users often rate a batch of movies at once), the held-out one is drawn uniformly at
    random among them with `np.random.default_rng(seed)`. Breaking the tie by a fixed order
    instead (e.g. the largest movie id, the last row in canonical order) would bias the test
    set towards whatever that order favours: MovieLens ids were assigned roughly in order of
    addition to the catalogue, so later ids are less popular movies. Earlier ratings are never
    held out.

    Args:
      data: the loaded data.
      seed: the seed of the tie-breaking draw; the split is a deterministic function of the
        data and the seed.

    Returns:
      (train, test): int64 row numbers into `data.ratings`, ascending; test has one row per
      user ([943] for MovieLens 100k), train the other rows.
    """
    users = data.ratings["user_id"]
    timestamps = data.ratings["timestamp"]
    # One uniform key per row; a user's test row is the one with the latest timestamp and,
    # among those tied on it, the largest key: a uniform draw among the tied rows.
    keys = np.random.default_rng(seed).random(len(users))
    order = np.lexsort((keys, timestamps, users))
    sorted_users = users[order]
    is_last = np.append(sorted_users[1:] != sorted_users[:-1], True)
    test = np.sort(order[is_last]).astype(np.int64)
    is_test = np.zeros(len(users), dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test).astype(np.int64), test


# ----------------------------------------------------------------------------- assembling


def _take_rows(columns: Mapping[str, np.ndarray], indices: Optional[np.ndarray]) -> Dict:
    if indices is None:
        return dict(columns)
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}"
        )
    return {key: value[indices] for key, value in columns.items()}


def _movie_table(
    ids: Sequence[str], titles: Sequence[str], genres: np.ndarray, years: Sequence[int]
) -> Dict[str, np.ndarray]:
    """Builds the movie table sorted by int(movie_id).

    Args:
      ids, titles, years: [m] per movie; genres: float32 [m, 19].

    Returns:
      The `MovieLens.movies` dict.
    """
    ids = np.asarray(ids, dtype=np.str_)
    if len(ids) == 0 or len(set(ids.tolist())) != len(ids):
        raise ValueError(f"expected a non-empty movie table with unique ids, got {len(ids)} rows "
                         f"of which {len(set(ids.tolist()))} distinct")
    order = np.argsort(ids.astype(np.int64), kind="stable")
    return {
        "movie_id": ids[order],
        "movie_title": np.asarray(titles, dtype=np.str_)[order],
        "movie_genres": np.asarray(genres, dtype=np.float32).reshape(-1, len(GENRES))[order],
        "release_year": np.asarray(years, dtype=np.int64)[order],
    }


def _assemble(
    user_ids: Sequence[str],
    movie_ids: Sequence[str],
    ratings: Sequence[float],
    timestamps: Sequence[int],
    movies: Dict[str, np.ndarray],
    source: str,
) -> MovieLens:
    """Sorts the ratings canonically and joins the movie features onto them.

    Args:
      user_ids, movie_ids, ratings, timestamps: [n] per rating.
      movies: the movie table from `_movie_table`.
      source: the `MovieLens.source` text.

    Returns:
      The `MovieLens` data.
    """
    user_ids = np.asarray(user_ids, dtype=np.str_)
    if len(user_ids) == 0:
        raise ValueError("expected ratings, got none")
    movie_ids = np.asarray(movie_ids, dtype=np.str_)
    timestamps = np.asarray(timestamps, dtype=np.int64)
    # Ids are numeric in every source; sorting by their value (not text) keeps 2 before 10.
    order = np.lexsort((movie_ids.astype(np.int64), user_ids.astype(np.int64), timestamps))
    movie_ids = movie_ids[order]
    rows = np.searchsorted(movies["movie_id"].astype(np.int64), movie_ids.astype(np.int64))
    rows = np.minimum(rows, len(movies["movie_id"]) - 1)
    unknown = movies["movie_id"][rows] != movie_ids
    if unknown.any():
        raise ValueError(
            f"{int(unknown.sum())} ratings name movies missing from the movie table, "
            f"e.g. movie_id {movie_ids[unknown][0]!r}"
        )
    ratings_columns = {
        "user_id": user_ids[order],
        "movie_id": movie_ids,
        "movie_title": movies["movie_title"][rows],
        "movie_genres": movies["movie_genres"][rows],
        "release_year": movies["release_year"][rows],
        "user_rating": np.asarray(ratings, dtype=np.float32)[order],
        "timestamp": timestamps[order],
    }
    return MovieLens(ratings=ratings_columns, movies=movies, source=source)


def _title_year(title: str, release_date: str = "") -> int:
    """The year in the title's last "(YYYY)", else the release date's year, else 0."""
    years = _TITLE_YEAR.findall(title)
    if years:
        return int(years[-1])
    return int(release_date[-4:]) if _YEAR.fullmatch(release_date[-4:]) else 0


# ------------------------------------------------------------------ local directory layouts


def _load_dir_source(data_dir: Optional[PathLike]) -> MovieLens:
    if data_dir is None:
        raise FileNotFoundError("no data_dir given")
    return _load_directory(Path(data_dir), origin="given as data_dir")


def _load_directory(directory: Path, origin: str) -> MovieLens:
    """Reads a directory in the GroupLens or the RecBole atomic layout, whichever it has.

    Args:
      directory: the directory holding the files.
      origin: how the directory came to be, for the source text ("cached", ...).

    Returns:
      The `MovieLens` data.
    """
    if directory_layout(directory) == "grouplens":
        return _read_grouplens(directory, origin)
    return _read_recbole(directory, origin)


def directory_layout(directory: PathLike) -> str:
    """Which MovieLens 100k layout a directory holds, checking only that the files exist.

    Args:
      directory: the directory to look into.

    Returns:
      "grouplens" if it has `GROUPLENS_FILES`, else "recbole" if it has the first two of
      `RECBOLE_FILES`.

    Raises:
      FileNotFoundError: the directory does not exist or has neither set of files; the
        message says which, and what the directory holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"directory {directory} does not exist")
    if all((directory / name).is_file() for name in GROUPLENS_FILES):
        return "grouplens"
    if all((directory / name).is_file() for name in RECBOLE_FILES[:2]):
        return "recbole"
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise FileNotFoundError(
        f"{directory} has neither the GroupLens files {GROUPLENS_FILES} nor the RecBole "
        f"atomic files {RECBOLE_FILES[:2]}; it has {present}"
    )


def _split_lines(
    path: Path, separator: str, encoding: str, num_fields: Optional[int] = None
) -> List[List[str]]:
    """The non-empty lines of a file, split into fields.

    Args:
      path: the file.
      separator: the field separator.
      encoding: the text encoding.
      num_fields: how many fields every line must have; None for as many as the first line.

    Returns:
      [lines][num_fields] field texts.
    """
    rows = []
    # Not `str.splitlines`: it also splits at "\x85" and other characters that latin-1
    # text may hold inside a title.
    lines = path.read_text(encoding=encoding).split("\n")
    for line_number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split(separator)
        if num_fields is None:
            num_fields = len(fields)
        if len(fields) != num_fields:
            raise ValueError(
                f"{path}:{line_number}: expected {num_fields} fields separated by "
                f"{separator!r}, got {len(fields)}: {line[:80]!r}"
            )
        rows.append(fields)
    return rows


def _read_grouplens(directory: Path, origin: str) -> MovieLens:
    """Reads `u.data` (user\\titem\\trating\\ttimestamp) and `u.item` (latin-1, 24 fields)."""
    items = _split_lines(directory / "u.item", "|", "latin-1", num_fields=5 + len(GENRES))
    movies = _movie_table(
        ids=[row[0] for row in items],
        titles=[row[1] for row in items],
        genres=np.array([row[5:] for row in items], dtype=np.float32),
        years=[_title_year(row[1], row[2]) for row in items],
    )
    data = _split_lines(directory / "u.data", "\t", "latin-1", num_fields=4)
    return _assemble(
        user_ids=[row[0] for row in data],
        movie_ids=[row[1] for row in data],
        ratings=[float(row[2]) for row in data],
        timestamps=[int(row[3]) for row in data],
        movies=movies,
        source=f"GroupLens files in {directory} ({origin})",
    )


def _read_atomic(path: Path, columns: Sequence[str]) -> List[List[str]]:
    """Reads a RecBole atomic file, returning the named columns of every row.

    Args:
      path: a tab-separated file whose first row is `name:type` headers.
      columns: the header names to return, without their `:type`.

    Returns:
      [rows][len(columns)] field texts.
    """
    lines = _split_lines(path, "\t", "utf-8")
    if not lines:
        raise ValueError(f"{path} is empty, expected a header row of name:type fields")
    names = [field.split(":")[0] for field in lines[0]]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: header {lines[0]} lacks columns {missing}")
    positions = [names.index(c) for c in columns]
    return [[row[p] for p in positions] for row in lines[1:]]


def _recbole_title(title: str, year: str) -> str:
    """Puts RecBole's split-off `release_year` back on the title, as GroupLens has it."""
    if title == _RECBOLE_MISSING:
        return "unknown"
    return title if year in ("", _RECBOLE_MISSING) else f"{title} ({year})"


def _genre_row(names: Sequence[str], where: str) -> List[float]:
    unknown = [n for n in names if n not in GENRES]
    if unknown:
        raise ValueError(f"{where}: unknown genres {unknown}, expected names from {GENRES}")
    return [1.0 if g in names else 0.0 for g in GENRES]


def _read_recbole(directory: Path, origin: str) -> MovieLens:
    """Reads `ml-100k.inter` and `ml-100k.item` (RecBole atomic files, UTF-8)."""
    item_path = directory / "ml-100k.item"
    items = _read_atomic(item_path, ("item_id", "movie_title", "release_year", "class"))
    titles = [_recbole_title(title, year) for _, title, year, _ in items]
    movies = _movie_table(
        ids=[row[0] for row in items],
        titles=titles,
        genres=np.array(
            [_genre_row(row[3].split(), f"{item_path} item {row[0]}") for row in items],
            dtype=np.float32,
        ).reshape(-1, len(GENRES)),
        years=[_title_year(title) for title in titles],
    )
    inter = _read_atomic(directory / "ml-100k.inter", ("user_id", "item_id", "rating", "timestamp"))
    return _assemble(
        user_ids=[row[0] for row in inter],
        movie_ids=[row[1] for row in inter],
        ratings=[float(row[2]) for row in inter],
        # Typed `float` in the header but whole seconds in the file.
        timestamps=[int(float(row[3])) for row in inter],
        movies=movies,
        source=f"RecBole atomic files in {directory} ({origin})",
    )


# -------------------------------------------------------------------------------- RecBole


def _pip_download(requirement: str, dest_dir: Path) -> None:
    """Downloads the wheel of `requirement` alone (no dependencies) into `dest_dir`."""
    command = [
        sys.executable, "-m", "pip", "download", requirement,
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise OSError(f"`{' '.join(command[2:])}` exited with {result.returncode}: {tail}")


def _extract_recbole_files(wheel: Path, dest_dir: Path) -> None:
    """Writes the wheel's `ml-100k.{inter,item,user}` into `dest_dir`.

    Each file goes to a temporary name first and is renamed into place, so an interrupted
    extraction never leaves a truncated file for the cache to read later.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        for name in RECBOLE_FILES:
            member = RECBOLE_MEMBER_DIR + name
            if member not in members:
                raise FileNotFoundError(f"{wheel.name} has no member {member}")
            partial = dest_dir / f".{name}.partial"
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, dest_dir / name)


def _load_recbole(cache_dir: Path, verbose: bool = True) -> MovieLens:
    """Fetches the recbole wheel, extracts the atomic files into `cache_dir` and reads them."""
    requirement = f"recbole=={RECBOLE_VERSION}"
    if verbose:
        # A download is a side effect worth a line: what, from where, and where it stays.
        print(f"tfnegcache: downloading MovieLens 100k inside the wheel {requirement} from "
              "the package index (`pip download`, PyPI unless pip is configured otherwise); "
              f"its data files are cached in {cache_dir}", file=sys.stderr, flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".wheel-") as download_dir:
        _pip_download(requirement, Path(download_dir))
        wheels = sorted(Path(download_dir).glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
        if not wheels:
            found = sorted(p.name for p in Path(download_dir).iterdir())
            raise FileNotFoundError(f"pip download of {requirement} left no wheel, only {found}")
        _extract_recbole_files(wheels[0], cache_dir)
    return _read_recbole(cache_dir, origin=f"fetched from the PyPI wheel {requirement}")


# ----------------------------------------------------------------------------------- TFDS


def _tfds_genre_matrix(label_names: Sequence[str]) -> np.ndarray:
    """float32 [len(label_names), 19]: TFDS genre label id -> GroupLens multi-hot row.

    TFDS writes "Children" and "Unknown" for GroupLens's "Children's" and "unknown"; labels
    with no GroupLens counterpart ("IMAX", "(no genres listed)") get an all-zero row.
    """
    canonical = {g.lower().replace("'s", ""): i for i, g in enumerate(GENRES)}
    matrix = np.zeros((len(label_names), len(GENRES)), dtype=np.float32)
    for label_id, name in enumerate(label_names):
        column = canonical.get(name.lower().replace("'s", ""))
        if column is not None:
            matrix[label_id, column] = 1.0
    return matrix


def _tfds_arrays(
    builder, keys: Sequence[str], num_genres: Optional[int] = None
) -> Dict[str, np.ndarray]:
    """All of a prepared TFDS builder's train split as numpy arrays of `keys`.

    Args:
      builder: a prepared `tfds.core.DatasetBuilder`.
      keys: the scalar features to read.
      num_genres: if given, also "movie_genres": the variable-length label ids become a
        float32 [n, num_genres] multi-hot, so that the split reads as one dense batch.

    Returns:
      [n] arrays per key (strings as bytes), plus "movie_genres" when asked for.
    """

    import tensorflow as tf  # pylint: disable=g-import-not-at-top,redefined-outer-name

    def select(example):
        features = {key: example[key] for key in keys}
        if num_genres is not None:
            features["movie_genres"] = tf.reduce_max(
                tf.one_hot(example["movie_genres"], num_genres), axis=0
            )
        return features

    dataset = builder.as_dataset(split="train").map(select).batch(1 << 20)
    return next(iter(dataset.as_numpy_iterator()))


def _tfds_decode(value: np.ndarray) -> np.ndarray:
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in value], np.str_)


def _from_tfds(
    ratings: Mapping[str, np.ndarray],
    movies: Mapping[str, np.ndarray],
    label_names: Sequence[str],
    source: str,
) -> MovieLens:
    """Builds `MovieLens` from TFDS arrays.

    Args:
      ratings: "user_id", "movie_id" bytes or str [n], "user_rating" float32 [n], "timestamp"
        int64 [n].
      movies: "movie_id", "movie_title" bytes or str [m], "movie_genres" float32
        [m, len(label_names)] multi-hot over TFDS genre label ids.
      label_names: TFDS's genre label names, in label id order.
      source: the `MovieLens.source` text.

    Returns:
      The `MovieLens` data.
    """
    titles = _tfds_decode(movies["movie_title"])
    genre_matrix = _tfds_genre_matrix(label_names)
    table = _movie_table(
        ids=_tfds_decode(movies["movie_id"]),
        titles=titles,
        genres=np.minimum(np.asarray(movies["movie_genres"], np.float32) @ genre_matrix, 1.0),
        years=[_title_year(t) for t in titles],
    )
    return _assemble(
        user_ids=_tfds_decode(ratings["user_id"]),
        movie_ids=_tfds_decode(ratings["movie_id"]),
        ratings=ratings["user_rating"],
        timestamps=ratings["timestamp"],
        movies=table,
        source=source,
    )


def _tfds_builders(tfds_dir: Path):
    """The prepared TFDS builders for (ratings, movies), downloading them if the host answers.

    Prepared data in `tfds_dir` or in TFDS's default data dir is used as is; otherwise the
    GroupLens host is probed with a short timeout before TFDS downloads into `tfds_dir`, since
    an unreachable host can otherwise stall the download for minutes.
    """
    tfds = import_extra("tensorflow_datasets", "The TFDS source of MovieLens 100k")
    from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

    names = ("movielens/100k-ratings", "movielens/100k-movies")
    data_dirs = (str(tfds_dir), constants.get_default_data_dir())
    for data_dir in data_dirs:
        # Without this check TFDS warns about every missing version folder it looks into.
        if not os.path.isdir(os.path.join(data_dir, "movielens")):
            continue
        builders = [tfds.builder(name, data_dir=data_dir) for name in names]
        if all(b.is_prepared() for b in builders):
            return builders
    try:
        socket.create_connection(_TFDS_HOST, timeout=_TFDS_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise OSError(
            f"{' and '.join(names)} not prepared in {' or '.join(data_dirs)}, and the "
            f"download host {_TFDS_HOST[0]} is unreachable ({e})"
        ) from e
    builders = [tfds.builder(name, data_dir=str(tfds_dir)) for name in names]
    for builder in builders:
        builder.download_and_prepare()
    return builders


def _load_tfds(tfds_dir: Path) -> MovieLens:
    """Reads TFDS `movielens/100k-ratings` and `movielens/100k-movies`."""
    ratings_builder, movies_builder = _tfds_builders(tfds_dir)
    label_names = movies_builder.info.features["movie_genres"].feature.names
    ratings = _tfds_arrays(ratings_builder, ("user_id", "movie_id", "user_rating", "timestamp"))
    movies = _tfds_arrays(movies_builder, ("movie_id", "movie_title"), len(label_names))
    return _from_tfds(
        ratings, movies, label_names, source=f"TensorFlow Datasets in {movies_builder.data_dir}"
    )
