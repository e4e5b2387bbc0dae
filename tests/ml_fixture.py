"""A small synthetic MovieLens 100k look-alike, in memory or in the GroupLens file layout."""

import numpy as np

from tfnegcache_examples import movielens_data as movielens


def arrays(num_users=30, num_movies=40, num_ratings=1200, seed=0):
    """Ratings with a planted preference: user u mostly rates movies near (u * 7) mod M."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, num_users + 1, num_ratings)
    offsets = rng.geometric(0.3, num_ratings) - 1
    movies = (users * 7 + offsets) % num_movies + 1
    genres = np.zeros((num_movies, len(movielens.GENRES)), np.int64)
    genres[np.arange(num_movies), np.arange(num_movies) % len(movielens.GENRES)] = 1
    titles = [f"Movie {m} {'Night Day Love War'.split()[m % 4]} (19{50 + m % 50})"
              for m in range(1, num_movies + 1)]
    timestamps = 880000000 + rng.integers(0, 10**6, num_ratings)
    return users, movies, titles, genres, timestamps


def write_grouplens(directory, **kwargs):
    """Writes `u.data` and `u.item` in the GroupLens `ml-100k` layout; returns `directory`."""
    users, movies, titles, genres, timestamps = arrays(**kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "u.data").write_text("".join(
        f"{u}\t{m}\t{1 + (u + m) % 5}\t{t}\n" for u, m, t in zip(users, movies, timestamps)))
    (directory / "u.item").write_bytes("".join(
        f"{i + 1}|{title}|01-Jan-1995||http://x|{'|'.join(map(str, row))}\n"
        for i, (title, row) in enumerate(zip(titles, genres))).encode("latin-1"))
    return directory


def load(tmp_path, **kwargs):
    """The fixture loaded through `movielens.load` (the "dir" source only)."""
    directory = write_grouplens(tmp_path / "ml-100k", **kwargs)
    return movielens.load(data_dir=directory, sources=("dir",), verbose=False)
