"""Retrieval quality at equal wall-clock training time: cache vs in-batch vs in-batch + logQ.

Methods: `cache` (cache negatives + in-batch negatives), `cache+logq` (the same, with the logQ
correction: in-batch negatives estimate the uncached mass, the cache adds its exact cached
mass on the same scale; see `CacheRetrieval`),
`cache-only` (the softmax over [positive, cache]: no in-batch negatives), `inbatch`,
`inbatch+logq`, and `full-softmax` (every candidate through the tower each step: the exact
gradient every other method estimates; only for small corpora). Embeddings are unit-norm,
scored with temperature 0.05.

    python -m benchmarks.quality_at_time --seconds 120   # 2^20 candidates, cache 2^16
    python -m benchmarks.quality_at_time --quick         # a small smoke configuration
    # per step instead of per second: the same number of steps for every method
    python -m benchmarks.quality_at_time --equal-steps 750 --log2n 16 \
        --methods inbatch inbatch+logq cache+logq cache-only full-softmax

Each model (same towers as `benchmarks.step_time`, the same stream of fresh training
queries in the same order, none repeated) trains for the same number of seconds of training
steps (data generation excluded), evaluated along the way and at the end by brute force over
ALL candidates: recall@10 and recall@100 of held-out queries.

The corpus is made harder than `make_corpus`'s defaults (`--query-item-tokens 2`, more noise
tokens): with 8 item tokens per query an in-batch model already finds the positive, and the
point here is whether hard negatives from the positive's fine cluster help tell it apart.
Its fine clusters hold `--fine-size` (64) candidates, so there are `N / 64` of them (16,384 at
N = 2^20) and an in-batch negative almost never comes from the positive's own fine cluster:
the run prints how often (`same_fine_cluster_rate`, the chance that at least one of the B - 1
popularity-drawn in-batch negatives of a held-out query shares its positive's fine cluster).

`--equal-steps S` trains every method for S steps instead of S seconds (written to
`quality_per_step.json`/`.png`): it separates what a method gains per step from what it costs.
"""

import argparse
import time

from benchmarks import _common  # first: imports tfnegcache (Keras 2) before TensorFlow

import numpy as np
import tensorflow as tf

from benchmarks import synthetic
from benchmarks import token_towers

METHODS = ("cache", "cache+logq", "cache-only", "inbatch", "inbatch+logq", "full-softmax")
DEFAULT_METHODS = ("cache", "cache+logq", "cache-only", "inbatch", "inbatch+logq")


def build(method, corpus, args):
    towers = dict(dim=args.dim, seed=args.seed, temperature=args.temperature,
                  normalize=not args.unnormalized, buckets=args.hash_buckets, hidden=args.hidden)
    if method == "full-softmax":
        model = token_towers.TwoTower(corpus.tokens_per_candidate,
                                      all_candidate_tokens=corpus.candidate_tokens, **towers)
    else:
        model = token_towers.TwoTower(
            corpus.tokens_per_candidate,
            cache_size=args.cache_size if method.startswith("cache") else None,
            logq=method.endswith("+logq"), num_negatives=args.num_negatives,
            use_in_batch_negatives=method != "cache-only",
            refresh_per_step=args.refresh_per_step if method.startswith("cache") else 0,
            **towers)
    model.compile(optimizer=tf.keras.optimizers.Adam(args.learning_rate))
    return model


def train_for(model, corpus, batch, seconds, max_steps, on_checkpoint=None, checkpoints=(),
              by_steps=False):
    """Runs train steps on fresh batches of the corpus's query stream until `seconds` of step
    time are spent. Batch i is queries [i B, (i + 1) B) of the stream, the same for every
    method, and no query repeats: a faster method sees more data, never the same data twice
    (a fixed training set would let the fastest method overfit within the budget).

    `on_checkpoint(spent_seconds, steps)` is called (outside the timed steps) each time the
    spent time passes one of `checkpoints` (seconds; steps when `by_steps`), for a
    recall-vs-seconds (or steps) curve.
    """
    step = tf.function(model.train_step)
    spent, steps, logs = 0.0, 0, None
    pending = sorted(checkpoints)
    while spent < seconds and steps < max_steps:
        queries = corpus.queries(batch, split="train", start=steps * batch)
        features = {k: tf.constant(v) for k, v in queries.items()}
        began = time.perf_counter()
        logs = step(features)
        loss = float(logs["loss"])
        if steps > 0:          # the first call traces: not training time
            spent += time.perf_counter() - began
        steps += 1
        while pending and (steps if by_steps else spent) >= pending[0] and on_checkpoint:
            pending.pop(0)
            on_checkpoint(spent, steps)
    return {"steps": steps, "train_seconds": spent, "final_loss": loss}


def evaluate(model, corpus, test, ks=(10, 100), chunk=2**16):
    """Recall@k over all candidates, brute force in chunks of candidates."""
    encode = tf.function(model.candidate_tower)
    queries = model.query_tower(tf.constant(test["query_tokens"]))
    best_scores, best_ids = None, None
    top = max(ks)
    for start in range(0, corpus.num_candidates, chunk):
        emb = encode(tf.constant(corpus.candidate_tokens[start:start + chunk]))
        scores = tf.matmul(queries, emb, transpose_b=True)
        values, indices = tf.math.top_k(scores, min(top, scores.shape[1]))
        indices = indices + start
        if best_scores is not None:
            values = tf.concat([best_scores, values], 1)
            indices = tf.concat([best_ids, indices], 1)
            values, order = tf.math.top_k(values, top)
            indices = tf.gather(indices, order, batch_dims=1)
        best_scores, best_ids = values, indices
    found = best_ids.numpy() == test["candidate_id"][:, None]
    return {f"recall@{k}": float(found[:, :k].any(1).mean()) for k in ks}


def same_fine_cluster_rate(corpus, test, batch):
    """How often at least one of a query's `batch - 1` in-batch negatives (drawn by
    popularity, as the batch's other positives are) lies in its positive's fine cluster,
    averaged over the held-out queries."""
    mass = np.bincount(corpus.fine_cluster, weights=corpus.popularity)
    positive = test["candidate_id"]
    others = mass[corpus.fine_cluster[positive]] - corpus.popularity[positive]
    return float(np.mean(1.0 - (1.0 - others) ** (batch - 1)))


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--log2n", type=int, default=20)
    parser.add_argument("--cache-size", type=int, default=2**16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hash-buckets", type=int, default=token_towers.HASH_BUCKETS,
                        help="rows of each tower's hashed token table")
    parser.add_argument("--hidden", type=int, default=token_towers.HIDDEN_UNITS,
                        help="each tower's MLP width")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--unnormalized", action="store_true",
                        help="raw dot products (default: unit-norm embeddings / temperature)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-negatives", type=int, default=1,
                        help="k, negatives drawn from the cache per query")
    parser.add_argument("--query-item-tokens", type=int, default=2)
    parser.add_argument("--query-cluster-tokens", type=int, default=2)
    parser.add_argument("--fine-size", type=int, default=64,
                        help="candidates per fine cluster (N / fine-size fine clusters)")
    parser.add_argument("--fine-per-coarse", type=int, default=64)
    parser.add_argument("--cluster-tokens", type=int, default=2,
                        help="tokens owned by each coarse and each fine cluster")
    parser.add_argument("--popularity-exponent", type=float, default=0.8)
    parser.add_argument("--equal-steps", type=int, default=0,
                        help="train every method for this many steps instead of --seconds")
    parser.add_argument("--refresh-per-step", type=int, default=0,
                        help="cache slots re-encoded per step (cache methods)")
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--curve-points", type=int, default=6,
                        help="evaluations along the run (untimed) for the recall-vs-seconds plot")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.cache_size, args.seconds, args.num_test = 12, 2**10, 1.0, 100
        args.max_steps, args.curve_points, args.fine_per_coarse = 10, 2, 8
        if args.equal_steps:
            args.equal_steps = 10
    if args.equal_steps:
        args.seconds, args.max_steps = float("inf"), args.equal_steps
    name = "quality_per_step" if args.equal_steps else "quality_at_time"

    num_candidates = 2**args.log2n
    num_fine = max(1, num_candidates // args.fine_size)
    if num_fine % args.fine_per_coarse:
        parser.error(f"N / --fine-size = {num_fine} fine clusters must be divisible by "
                     f"--fine-per-coarse={args.fine_per_coarse}")
    corpus = synthetic.make_corpus(
        num_candidates=num_candidates, num_coarse=num_fine // args.fine_per_coarse,
        fine_per_coarse=args.fine_per_coarse, cluster_tokens=args.cluster_tokens,
        query_item_tokens=args.query_item_tokens,
        query_cluster_tokens=args.query_cluster_tokens,
        popularity_exponent=args.popularity_exponent, seed=args.seed)
    test = corpus.queries(args.num_test, split="test")
    same_fine = same_fine_cluster_rate(corpus, test, args.batch)
    print(f"N={num_candidates}: {num_fine} fine clusters of {num_candidates // num_fine}; "
          f"same_fine_cluster_rate={same_fine:.4f}", flush=True)

    rows = []
    for method in args.methods:
        model = build(method, corpus, args)
        row = {"method": method, "curve": []}

        def checkpoint(at_seconds, steps, model=model, row=row):
            row["curve"].append({"seconds": at_seconds, "steps": steps,
                                 **evaluate(model, corpus, test)})

        total = args.equal_steps or args.seconds
        marks = [total * (i + 1) / args.curve_points for i in range(args.curve_points - 1)]
        row.update(train_for(model, corpus, args.batch, args.seconds, args.max_steps,
                             checkpoint, marks, by_steps=bool(args.equal_steps)))
        row["ms_per_step"] = 1e3 * row["train_seconds"] / max(1, row["steps"] - 1)
        row.update(evaluate(model, corpus, test))
        row["curve"].append({"seconds": row["train_seconds"], "steps": row["steps"],
                             "recall@10": row["recall@10"], "recall@100": row["recall@100"]})
        print(row, flush=True)
        rows.append(row)

    by = {r["method"]: r for r in rows}
    targets = {}
    baselines = [by[m]["recall@10"] for m in ("inbatch", "inbatch+logq") if m in by]
    for method in ("cache", "cache+logq", "cache-only", "full-softmax"):
        if method in by and baselines:
            best = max(baselines)
            ratio = by[method]["recall@10"] / best if best else None
            targets[f"{method}_r10/best_inbatch_r10"] = ratio
            targets[f"{method}_quality_met(>=1.5)"] = bool(ratio and ratio >= 1.5)
    config = vars(args)
    path = _common.write_json(name, {"config": config, "rows": rows, "targets": targets,
                                     "same_fine_cluster_rate": same_fine})

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, k in zip(axes, ("recall@10", "recall@100")):
        for r in rows:
            x = "steps" if args.equal_steps else "seconds"
            ax.plot([c[x] for c in r["curve"]], [c[k] for c in r["curve"]], "o-",
                    label=r["method"])
        ax.set_xlabel("training steps" if args.equal_steps else "training seconds")
        ax.set_ylabel(f"held-out {k} over all candidates")
        ax.set_title(f"N=2^{args.log2n}, cache {args.cache_size}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(_common.plot_path(name))

    print(_common.table(rows, ["method", "steps", "ms_per_step", "final_loss", "recall@10",
                               "recall@100"]))
    print("targets:", targets)
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
