"""The main job: four negative strategies for one two-tower model on MovieLens 100k.

Every strategy trains the same towers with the same optimizer, learning rate, temperature,
batch size and epochs on the same split; only the loss's negatives differ:

- `in-batch`: `tfrs.tasks.Retrieval` (our `CacheRetrieval` with `cache=None`): the batch's
  other positives are the negatives.
- `in-batch-logq`: the same with `candidate_sampling_probability` = the movie's empirical
  frequency in the training set (the logQ correction of sampled softmax).
- `full-softmax`: exact softmax over all movies: every movie through the candidate tower at
  every step, logits `u @ V_all^T / T` built here (so no accidental hit can occur: each movie is
  one column, the positive's column is the label).
- `negative-cache`: `CacheRetrieval` + `CachedRetrievalModel` with a cache of `cache_size`
  slots (default 2048, more than the 1682 movies, so the whole table fits) storing each
  movie's id, title tokens and genres, re-encoded when sampled; by default k = 8 negatives
  per query and no in-batch negatives, so the softmax is over [positive, whole cache]: with
  every movie cached, an estimate of the full softmax (in-batch negatives on top would count
  a popular movie once per occurrence in the batch).

In-batch strategies remove accidental hits (duplicates of a query's positive in the batch).

Towers: the query tower reads the user id (`StringLookup` + `Embedding`); the candidate tower
sums a movie-id embedding, the masked mean of title-token embeddings (`[8]` int64 token ids,
0 = padding, vocabulary built from all titles) and a linear map of the 19-genre multi-hot.

Evaluation is an exact brute-force ranking of each held-out (user, movie) pair's movie among
all movies (TFRS `FactorizedTopK`'s definition: training movies are not filtered out):
Recall@K = fraction ranked in the top K; MRR = mean 1/rank (rank 1 = best; ties count against).
"""

import re
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

import tfnegcache
from tfnegcache_examples._extras import import_extra
from tfnegcache_examples import movielens_data as movielens
from tfnegcache_examples import STRATEGIES

TITLE_LEN = 8
NUM_GENRES = len(movielens.GENRES)
KS = (10, 50, 100)
CANDIDATE_KEYS = ("movie_index", "title_tokens", "movie_genres")
FEATURE_SPEC = {
    "movie_index": tf.TensorSpec([], tf.int64),
    "title_tokens": tf.TensorSpec([TITLE_LEN], tf.int64),
    "movie_genres": tf.TensorSpec([NUM_GENRES], tf.float32),
}


# ----------------------------------------------------------------------------- features


def title_tokens(titles: Sequence[str], length: int = TITLE_LEN):
    """`([n, length] int64 token ids, vocabulary)`: lower-cased words, 0 pads, ids from 1."""
    words = [re.findall(r"[a-z0-9']+", str(t).lower())[:length] for t in titles]
    vocab = sorted({w for ws in words for w in ws})
    index = {w: i + 1 for i, w in enumerate(vocab)}
    out = np.zeros((len(titles), length), np.int64)
    for row, ws in enumerate(words):
        out[row, :len(ws)] = [index[w] for w in ws]
    return out, vocab


class Corpus:
    """The data in the form the towers read: the movie table and the split's rows."""

    def __init__(self, data: movielens.MovieLens, train_rows, test_rows):
        movies = data.movies
        self.movie_ids = np.asarray(movies["movie_id"]).astype(str)
        self.num_movies = len(self.movie_ids)
        tokens, self.vocab = title_tokens(movies["movie_title"])
        self.movies = {
            "movie_index": np.arange(self.num_movies, dtype=np.int64),
            "title_tokens": tokens,
            "movie_genres": np.asarray(movies["movie_genres"], np.float32),
        }
        row_of = {m: i for i, m in enumerate(self.movie_ids)}
        ratings = data.ratings
        index = np.array([row_of[m] for m in ratings["movie_id"]], np.int64)
        self.users = np.unique(np.asarray(ratings["user_id"]).astype(str))

        def rows(which):
            which = np.asarray(which)
            idx = index[which]
            out = {"user_id": np.asarray(ratings["user_id"]).astype(str)[which]}
            out.update({k: v[idx] for k, v in self.movies.items()})
            return out

        self.train, self.test = rows(train_rows), rows(test_rows)
        counts = np.bincount(self.train["movie_index"], minlength=self.num_movies)
        self.movie_frequency = (counts / counts.sum()).astype(np.float32)
        self.train["sampling_probability"] = self.movie_frequency[self.train["movie_index"]]

    def movie_tensors(self) -> Dict[str, tf.Tensor]:
        return {k: tf.constant(v) for k, v in self.movies.items()}

    def train_dataset(self, batch_size: int, seed: int) -> tf.data.Dataset:
        n = len(self.train["user_id"])
        return (tf.data.Dataset.from_tensor_slices(self.train)
                .shuffle(n, seed=seed, reshuffle_each_iteration=True)
                .batch(batch_size).prefetch(2))


# ----------------------------------------------------------------------------- towers


def query_tower(users, dim: int) -> tf.keras.Model:
    """User id string -> embedding. Unknown ids share the lookup's OOV row (index 0)."""
    return tf.keras.Sequential([
        tf.keras.layers.StringLookup(vocabulary=list(users), mask_token=None),
        tf.keras.layers.Embedding(len(users) + 1, dim),
    ], name="query_tower")


class CandidateTower(tf.keras.Model):
    """Movie id embedding + mean title-token embedding + linear genres."""

    def __init__(self, num_movies: int, vocab_size: int, dim: int):
        super().__init__(name="candidate_tower")
        self.movie = tf.keras.layers.Embedding(num_movies, dim)
        self.tokens = tf.keras.layers.Embedding(vocab_size + 1, dim)
        self.genres = tf.keras.layers.Dense(dim, use_bias=False)

    def call(self, features):
        tokens = features["title_tokens"]
        mask = tf.cast(tokens > 0, tf.float32)[..., None]
        title = tf.reduce_sum(self.tokens(tokens) * mask, 1) / tf.maximum(
            tf.reduce_sum(mask, 1), 1.0)
        return self.movie(features["movie_index"]) + title + self.genres(features["movie_genres"])


class TwoTower(tfnegcache.CachedRetrievalModel):
    """One two-tower model; `strategy` picks the negatives of its loss."""

    def __init__(self, corpus: Corpus, strategy: str, dim: int, temperature: float,
                 cache_size: int, num_negatives: int, seed: int,
                 cache_in_batch: bool = False):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.temperature = temperature
        self.query_tower = query_tower(corpus.users, dim)
        self.candidate_tower = CandidateTower(corpus.num_movies, len(corpus.vocab), dim)
        self._movies = corpus.movie_tensors()
        cache = None
        if strategy == "negative-cache":
            cache = tfnegcache.NegativeCache(cache_size, FEATURE_SPEC, dim, seed=seed)
        self.task = tfnegcache.CacheRetrieval(
            temperature=temperature, remove_accidental_hits=True, cache=cache,
            candidate_model=self.candidate_tower if cache is not None else None,
            num_negatives=num_negatives, use_in_batch_negatives=cache_in_batch)

    def compute_loss(self, features, training=False):
        queries = self.query_tower(features["user_id"])
        if self.strategy == "full-softmax":
            movies = self.candidate_tower(self._movies)
            logits = tf.matmul(queries, movies, transpose_b=True) / self.temperature
            # Summed over the batch, as tfrs.tasks.Retrieval's default loss is.
            return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=features["movie_index"], logits=logits))
        candidates = {k: features[k] for k in CANDIDATE_KEYS}
        embeddings = self.candidate_tower(candidates)
        kwargs = {"candidate_ids": features["movie_index"], "compute_metrics": False}
        if self.strategy == "in-batch-logq":
            kwargs["candidate_sampling_probability"] = features["sampling_probability"]
        if self.strategy == "negative-cache":
            kwargs["candidate_features"] = candidates
        return self.task(queries, embeddings, **kwargs)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: TwoTower, corpus: Corpus, chunk: int = 4096) -> Dict[str, float]:
    """Exact Recall@{10,50,100} and MRR of the test pairs over all movies."""
    movies = model.candidate_tower(corpus.movie_tensors())
    users, positives = corpus.test["user_id"], corpus.test["movie_index"]
    ranks = []
    for start in range(0, len(users), chunk):
        queries = model.query_tower(tf.constant(users[start:start + chunk]))
        scores = tf.matmul(queries, movies, transpose_b=True)
        pos = tf.gather(scores, positives[start:start + chunk], batch_dims=1)
        # `scores >= pos` counts the positive itself, so the count is the rank (ties against).
        ranks.append(tf.reduce_sum(tf.cast(scores >= pos[:, None], tf.int32), 1).numpy())
    ranks = np.concatenate(ranks)
    out = {f"recall@{k}": float(np.mean(ranks <= k)) for k in KS}
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


class _EpochEval(tf.keras.callbacks.Callback):
    """Times each training epoch, then evaluates (outside the timed part)."""

    def __init__(self, corpus):
        super().__init__()
        self.corpus, self.seconds, self.evals = corpus, [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.evals.append(evaluate(self.model, self.corpus))


def train_one(corpus: Corpus, strategy: str, seed: int, epochs: int, batch_size: int,
              learning_rate: float, dim: int, temperature: float, cache_size: int,
              num_negatives: int, cache_in_batch: bool, verbose: int):
    """Trains one model; returns (model, per-epoch evals, per-epoch seconds, history)."""
    tf.keras.utils.set_random_seed(seed)
    model = TwoTower(corpus, strategy, dim, temperature, cache_size, num_negatives, seed,
                     cache_in_batch)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(learning_rate))
    callback = _EpochEval(corpus)
    history = model.fit(corpus.train_dataset(batch_size, seed), epochs=epochs,
                        callbacks=[callback], verbose=verbose)
    return model, callback.evals, callback.seconds, history.history


def run(data: movielens.MovieLens, split: str = "tutorial", strategies=STRATEGIES,
        seeds=(0, 1, 2), epochs: int = 3, batch_size: int = 256, learning_rate: float = 0.1,
        dim: int = 32, temperature: float = 1.0, cache_size: int = 2048,
        num_negatives: int = 8, cache_in_batch: bool = False, verbose: int = 1,
        on_model=None, log=print) -> Dict:
    """Trains every strategy with every seed; returns the results as a JSON-able dict.

    `on_model(strategy, seed, model, corpus)` is called after each training run (the CLI
    exports the first cache-trained model from it).
    """
    if split == "tutorial":
        # 80,000 / 20,000 on MovieLens 100k; the same 80 % on smaller fixture data.
        train_rows, test_rows = movielens.tutorial_split(
            data, num_train=int(0.8 * len(data.ratings["user_id"])))
    elif split == "temporal":
        # A fixed seed for the tie-break: every training seed is scored on the same held-out
        # set, so the spread over seeds is the models', not the split's.
        train_rows, test_rows = movielens.temporal_split(data, seed=0)
    else:
        raise ValueError(f"split must be 'tutorial' or 'temporal', got {split!r}")
    corpus = Corpus(data, train_rows, test_rows)
    log(f"{split} split: {len(train_rows)} train, {len(test_rows)} test ratings; "
        f"{corpus.num_movies} movies, {len(corpus.users)} users, "
        f"{len(corpus.vocab)} title words")
    runs: List[Dict] = []
    for strategy in strategies:
        for seed in seeds:
            log(f"--- {strategy}, seed {seed}")
            model, evals, seconds, history = train_one(
                corpus, strategy, seed, epochs, batch_size, learning_rate, dim, temperature,
                cache_size, num_negatives, cache_in_batch, verbose)
            final = evals[-1]
            log(f"{strategy} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items())
                + f", {np.mean(seconds):.1f} s/epoch")
            record = {"strategy": strategy, "seed": seed, "final": final,
                      "per_epoch": evals, "seconds_per_epoch": seconds}
            if "cache_staleness" in history:
                record["cache_staleness"] = [float(x) for x in history["cache_staleness"]]
                record["cache_fill"] = [float(x) for x in history["cache_fill"]]
            runs.append(record)
            if on_model is not None:
                on_model(strategy, seed, model, corpus)
    table = []
    for strategy in strategies:
        mine = [r for r in runs if r["strategy"] == strategy]
        row = {"strategy": strategy, "seeds": len(mine)}
        for key in [f"recall@{k}" for k in KS] + ["mrr"]:
            values = [r["final"][key] for r in mine]
            row[key], row[key + "_std"] = float(np.mean(values)), float(np.std(values))
        row["seconds_per_epoch"] = float(np.mean([np.mean(r["seconds_per_epoch"]) for r in mine]))
        row["recall@100_per_epoch"] = np.mean(
            [[e["recall@100"] for e in r["per_epoch"]] for r in mine], 0).tolist()
        table.append(row)
    config = dict(split=split, strategies=list(strategies), seeds=list(seeds), epochs=epochs,
                  batch_size=batch_size, learning_rate=learning_rate, optimizer="Adagrad",
                  embedding_dim=dim, temperature=temperature, cache_size=cache_size,
                  num_negatives=num_negatives, cache_in_batch=cache_in_batch,
                  num_train=int(len(train_rows)), num_test=int(len(test_rows)),
                  data_source=data.source)
    return {"config": config, "table": table, "runs": runs}


def format_table(results: Dict) -> str:
    """The table as Markdown: mean over seeds (± std for Recall@100 and MRR)."""
    lines = ["| strategy | Recall@10 | Recall@50 | Recall@100 | MRR | s/epoch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results["table"]:
        lines.append(
            f"| {r['strategy']} | {r['recall@10']:.4f} | {r['recall@50']:.4f} | "
            f"{r['recall@100']:.4f} ± {r['recall@100_std']:.4f} | "
            f"{r['mrr']:.4f} ± {r['mrr_std']:.4f} | {r['seconds_per_epoch']:.2f} |")
    return "\n".join(lines)


def plot(results: Dict, path) -> None:
    """PNG of held-out Recall@100 per epoch, one line per strategy (mean over seeds)."""
    matplotlib = import_extra("matplotlib", "The MovieLens job's plot")
    matplotlib.use("Agg")
    plt = import_extra("matplotlib.pyplot", "The MovieLens job's plot")
    import_extra("matplotlib.ticker", "The MovieLens job's plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["table"]:
        values = r["recall@100_per_epoch"]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=r["strategy"])
    cfg = results["config"]
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out Recall@100")
    ax.set_title(f"MovieLens 100k, {cfg['split']} split, mean of {len(cfg['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
