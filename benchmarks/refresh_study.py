"""What the cache buys: recall vs cache size and refresh rate.

    python -m benchmarks.refresh_study            # default grid, ~10 min on 2 cores
    python -m benchmarks.refresh_study --quick    # 1-minute smoke

On MovieLens 100k (user id tower; movie id embedding + genres tower) and on the synthetic
planted-cluster corpus (N = 2^14 by default; token towers), trains `CachedRetrievalModel`s
with every (cache size, refresh rate) of the grid:

- cache size in {B, 4B, 16B, whole corpus} (capped at the corpus size);
- refresh rate R/N in {0 (write-back only), 1/1024, 1/128, 1/16, 1 (every slot, each step)},
  R = max(1, round(rate * N)) for rate > 0 (so the smallest rates round up to one slot on
  small caches: the JSON records the R used);

plus an in-batch-only baseline (no cache). Every cache is warm-started from the candidate
table (so the whole-corpus cache is full from step 0), then kept by the FIFO stream of
positives, write-back and the random refresh. Records held-out recall@100 (over the whole
corpus) per epoch, per-step staleness of the sampled negatives (`||e - v||^2 / ||v||^2`,
the `cache_staleness` metric reset every step), and training seconds per epoch (recall
evaluation excluded). Writes `results/refresh_study/results.json`, `recall_vs_refresh.png`,
`staleness_vs_step.png`, and prints a table.
"""

import argparse
import json
import os
import time

import tfnegcache  # first: selects Keras 2

import numpy as np
import tensorflow as tf

from benchmarks import _common
from benchmarks import synthetic
from tfnegcache_examples import movielens_data as movielens

RATES = (0.0, 1 / 1024, 1 / 128, 1 / 16, 1.0)
RATE_NAMES = {0.0: "0", 1 / 1024: "1/1024", 1 / 128: "1/128", 1 / 16: "1/16", 1.0: "1"}


# ----------------------------------------------------------------------------- data sets


class Task:
    """A data set: train/test pairs, the candidate table, towers and a recall evaluator."""

    name: str
    batch_size: int
    corpus_size: int
    feature_spec: dict
    id_key: str

    def make_towers(self, dim):
        raise NotImplementedError

    def query_features(self, batch):
        raise NotImplementedError


class MovieLensTask(Task):
    name = "movielens"
    id_key = "movie_id"

    def __init__(self, num_train, num_test, batch_size):
        data = movielens.load(verbose=False)
        train, test = movielens.tutorial_split(data)
        rng = np.random.default_rng(0)
        train = train[:num_train]
        test = rng.permutation(test)[:num_test]
        r = data.ratings
        keys = ("user_id", "movie_id", "movie_genres")
        self.train = {k: r[k][train] for k in keys}
        self.test = {k: r[k][test] for k in keys}
        self.movies = {k: data.movies[k] for k in ("movie_id", "movie_genres")}
        self.users = np.unique(r["user_id"])
        self.corpus_size = len(self.movies["movie_id"])
        self.batch_size = batch_size
        self.feature_spec = {"movie_id": tf.TensorSpec([], tf.string),
                             "movie_genres": tf.TensorSpec([19], tf.float32)}

    def make_towers(self, dim):
        query = tf.keras.Sequential([
            tf.keras.layers.StringLookup(vocabulary=self.users),
            tf.keras.layers.Embedding(len(self.users) + 1, dim)])
        lookup = tf.keras.layers.StringLookup(vocabulary=self.movies["movie_id"])
        ids = tf.keras.layers.Embedding(self.corpus_size + 1, dim)
        genres = tf.keras.layers.Dense(dim, use_bias=False)

        def candidate(features):
            return ids(lookup(features["movie_id"])) + genres(features["movie_genres"])

        return (lambda b: query(b["user_id"])), candidate, [query, lookup, ids, genres]

    def candidates(self):
        return self.movies

    def positives(self, data):
        index = {m: i for i, m in enumerate(self.movies["movie_id"])}
        return np.array([index[m] for m in data["movie_id"]])


class SyntheticTask(Task):
    name = "synthetic"
    id_key = "candidate_id"

    def __init__(self, num_candidates, num_train, num_test, batch_size):
        self.corpus = synthetic.make_corpus(num_candidates=num_candidates, seed=0)
        self.train = self.corpus.queries(num_train, "train")
        self.test = self.corpus.queries(num_test, "test")
        self.corpus_size = num_candidates
        self.batch_size = batch_size
        self.feature_spec = {
            "candidate_id": tf.TensorSpec([], tf.int64),
            "candidate_tokens": tf.TensorSpec([self.corpus.tokens_per_candidate], tf.int32)}

    def make_towers(self, dim):
        tokens = tf.keras.layers.Embedding(self.corpus.vocab_size, dim)
        ids = tf.keras.layers.Embedding(self.corpus_size, dim)

        def query(batch):
            return tf.reduce_mean(tokens(batch["query_tokens"]), axis=1)

        def candidate(features):
            return (tf.reduce_mean(tokens(features["candidate_tokens"]), axis=1)
                    + ids(features["candidate_id"]))

        return query, candidate, [tokens, ids]

    def candidates(self):
        return {"candidate_id": self.corpus.candidate_ids,
                "candidate_tokens": self.corpus.candidate_tokens}

    def positives(self, data):
        return data["candidate_id"]


# ----------------------------------------------------------------------------- model


class StudyModel(tfnegcache.CachedRetrievalModel):

    def __init__(self, task, cache_size, refresh_per_step, dim, seed):
        super().__init__()
        tf.keras.utils.set_random_seed(seed)
        self.query_tower, self.candidate_tower, self.parts = task.make_towers(dim)
        self.task_data = task
        cache = None
        if cache_size:
            cache = tfnegcache.NegativeCache(
                cache_size, task.feature_spec, dim,
                id_dtype=task.feature_spec[task.id_key].dtype, seed=seed)
        self.task = tfnegcache.CacheRetrieval(
            cache=cache, candidate_model=self.candidate_tower,
            refresh_per_step=refresh_per_step)

    def compute_loss(self, batch, training=False):
        features = {k: batch[k] for k in self.task_data.feature_spec}
        return self.task(self.query_tower(batch), self.candidate_tower(features),
                         candidate_ids=batch[self.task_data.id_key],
                         candidate_features=features, compute_metrics=False)


def recall_at(model, task, k=100, chunk=4096):
    table = task.candidates()
    encode = tf.function(model.candidate_tower)
    n = task.corpus_size
    cands = tf.concat([encode({key: tf.constant(v[s:s + chunk]) for key, v in table.items()})
                       for s in range(0, n, chunk)], axis=0)
    queries = model.query_tower({k_: tf.constant(v) for k_, v in task.test.items()})
    top = tf.math.top_k(tf.matmul(queries, cands, transpose_b=True), k).indices.numpy()
    return float(np.mean(np.any(top == task.positives(task.test)[:, None], axis=1)))


class Recorder(tf.keras.callbacks.Callback):
    """Per-step staleness (the metric reset every step), per-epoch time and recall."""

    def __init__(self, task):
        super().__init__()
        self.data = task
        self.staleness, self.recall, self.seconds = [], [], []

    def on_train_batch_begin(self, batch, logs=None):
        if self.model.task.cache is not None:
            self.model.task.staleness.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        if logs and "cache_staleness" in logs:
            self.staleness.append(float(logs["cache_staleness"]))

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.recall.append(recall_at(self.model, self.data))


def run_one(task, cache_size, rate, args):
    refresh = 0 if not cache_size or rate == 0 else max(1, round(rate * cache_size))
    model = StudyModel(task, cache_size, refresh, args.dim, args.seed)
    model.compile(tf.keras.optimizers.Adam(args.lr))
    cache = model.task.cache
    if cache is not None and args.warm_start:
        cache.warm_start(tf.data.Dataset.from_tensor_slices(task.candidates()),
                         model.candidate_tower, id_key=task.id_key, batch_size=4096)
    ds = (tf.data.Dataset.from_tensor_slices(task.train)
          .shuffle(len(next(iter(task.train.values()))), seed=args.seed)
          .batch(task.batch_size, drop_remainder=True).prefetch(2))
    recorder = Recorder(task)
    model.fit(ds, epochs=args.epochs, verbose=0, callbacks=[recorder])
    return {
        "dataset": task.name, "cache_size": cache_size, "refresh_rate": rate,
        "refresh_per_step": refresh, "batch_size": task.batch_size,
        "recall_at_100": recorder.recall, "seconds_per_epoch": recorder.seconds,
        "staleness": recorder.staleness,
    }


# ----------------------------------------------------------------------------- report


def size_label(size, task):
    if size == 0:
        return "in-batch"
    if size >= task.corpus_size:
        return f"corpus ({size})"
    return f"{size // task.batch_size}B ({size})"


def plot(results, tasks, out_dir):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r["dataset"] == task.name]
        base = [r for r in rows if r["cache_size"] == 0]
        for size in sorted({r["cache_size"] for r in rows if r["cache_size"]}):
            pts = sorted((RATES.index(r["refresh_rate"]), r["recall_at_100"][-1])
                         for r in rows if r["cache_size"] == size)
            ax.plot(*zip(*pts), marker="o", label=size_label(size, task))
        if base:
            ax.axhline(base[0]["recall_at_100"][-1], color="k", ls="--", label="in-batch only")
        ax.set_xticks(range(len(RATES)), [RATE_NAMES[r] for r in RATES])
        ax.set_xlabel("refresh rate R/N per step (0 = write-back only)")
        ax.set_ylabel("held-out recall@100 (last epoch)")
        ax.set_title(task.name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "recall_vs_refresh.png"), dpi=110)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r["dataset"] == task.name and r["cache_size"]]
        biggest = max(r["cache_size"] for r in rows)
        for r in rows:
            if r["cache_size"] != biggest or not r["staleness"]:
                continue
            s = np.asarray(r["staleness"])
            w = max(1, len(s) // 100)
            smooth = np.convolve(s, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(smooth)) + w - 1, smooth,
                    label=f"rate {RATE_NAMES[r['refresh_rate']]}")
        ax.set_yscale("symlog", linthresh=1e-3)   # rate 1 sits at exactly 0
        ax.set_xlabel("training step")
        ax.set_ylabel(f"staleness of sampled negatives (mean over {w} steps)")
        ax.set_title(f"{task.name}: cache = {size_label(biggest, task)}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "staleness_vs_step.png"), dpi=110)


def seconds_per_epoch(r):
    """Median training seconds of epochs after the first (which also traces the step)."""
    s = r["seconds_per_epoch"]
    return float(np.median(s[1:] if len(s) > 1 else s))


def table(results, tasks):
    lines = ["| dataset | cache | refresh rate (R/step) | recall@100 per epoch | "
             "staleness (last epoch mean) | s/epoch (after the 1st) |",
             "| --- | --- | --- | --- | --- | --- |"]
    by_name = {t.name: t for t in tasks}
    for r in results:
        task = by_name[r["dataset"]]
        steps = len(r["staleness"]) // max(1, len(r["recall_at_100"]))
        stale = np.mean(r["staleness"][-steps:]) if r["staleness"] else float("nan")
        rate = "-" if not r["cache_size"] else \
            f"{RATE_NAMES[r['refresh_rate']]} ({r['refresh_per_step']})"
        lines.append(
            f"| {r['dataset']} | {size_label(r['cache_size'], task)} | {rate} | "
            + ", ".join(f"{x:.3f}" for x in r["recall_at_100"])
            + f" | {stale:.3g} | {seconds_per_epoch(r):.1f} |")
    return "\n".join(lines)


class _Stub:
    def __init__(self, name, batch_size, corpus_size):
        self.name, self.batch_size, self.corpus_size = name, batch_size, corpus_size


def replot(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)["results"]
    tasks = []
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name]
        tasks.append(_Stub(name, rows[0]["batch_size"], max(r["cache_size"] for r in rows)))
    plot(results, tasks, out_dir)
    print(table(results, tasks))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run")
    parser.add_argument("--datasets", default="movielens,synthetic")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-candidates", type=int, default=2**14)
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    parser.add_argument("--out", default="results/refresh_study")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots and table from OUT/results.json")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.out)
    quick = args.quick
    if args.epochs is None:
        args.epochs = 1 if quick else 3
    names = args.datasets.split(",")
    tasks = []
    if "movielens" in names:
        tasks.append(MovieLensTask(num_train=4096 if quick else 16000,
                                   num_test=1000 if quick else 4000, batch_size=64))
    if "synthetic" in names:
        tasks.append(SyntheticTask(2**12 if quick else args.num_candidates,
                                   num_train=4096 if quick else 16384,
                                   num_test=1000 if quick else 4000, batch_size=128))
    rates = (0.0, 1 / 16, 1.0) if quick else RATES
    os.makedirs(args.out, exist_ok=True)
    results = []
    for task in tasks:
        b = task.batch_size
        sizes = sorted({min(s, task.corpus_size) for s in (b, 4 * b, 16 * b, task.corpus_size)})
        if quick:
            sizes = [sizes[0], sizes[-1]]
        grid = [(0, 0.0)] + [(s, r) for s in sizes for r in rates]
        for size, rate in grid:
            t0 = time.perf_counter()
            result = run_one(task, size, rate, args)
            results.append(result)
            print(f"{task.name:9s} cache={size:6d} rate={RATE_NAMES[rate]:>6s} "
                  f"recall@100={result['recall_at_100']} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({"args": vars(args), "results": results}, f)
    plot(results, tasks, args.out)
    print(table(results, tasks))


if __name__ == "__main__":
    main()
