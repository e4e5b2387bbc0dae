"""Retrieval quality at equal wall-clock training time: cache vs in-batch vs in-batch + logQ.

Methods: `cache` (cache negatives + in-batch negatives), `cache+logq` (the same, with the logQ
correction on the in-batch part; the cache part is an exact softmax and needs none),
`cache-only` (the softmax over [positive, cache]: no in-batch negatives), `inbatch`,
`inbatch+logq`. Embeddings are unit-norm, scored with temperature 0.05.

    python -m benchmarks.quality_at_time --seconds 120   # 2^20 candidates, cache 2^16
    python -m benchmarks.quality_at_time --quick         # a small smoke configuration

Each model (same towers as `benchmarks.step_time`, the same stream of fresh training
queries in the same order, none repeated) trains for the same number of seconds of training
steps (data generation excluded), evaluated along the way and at the end by brute force over
ALL candidates: recall@10 and recall@100 of held-out queries.

The corpus is made harder than `make_corpus`'s defaults (`--query-item-tokens 2`, more noise
tokens): with 8 item tokens per query an in-batch model already finds the positive, and the
point here is whether hard negatives from the positive's fine cluster help tell it apart.
"""

import argparse
import time

from benchmarks import _common  # first: imports tfnegcache (Keras 2) before TensorFlow

import numpy as np
import tensorflow as tf

from tfnegcache.datasets import synthetic

METHODS = ("cache", "cache+logq", "cache-only", "inbatch", "inbatch+logq")


def build(method, corpus, args):
    model = _common.TwoTower(
        corpus.tokens_per_candidate, dim=args.dim, seed=args.seed,
        cache_size=args.cache_size if method.startswith("cache") else None,
        logq=method.endswith("+logq"), temperature=args.temperature,
        normalize=not args.unnormalized, num_negatives=args.num_negatives,
        use_in_batch_negatives=method != "cache-only")
    model.compile(optimizer=tf.keras.optimizers.Adam(args.learning_rate))
    return model


def train_for(model, corpus, batch, seconds, max_steps, on_checkpoint=None, checkpoints=()):
    """Runs train steps on fresh batches of the corpus's query stream until `seconds` of step
    time are spent. Batch i is queries [i B, (i + 1) B) of the stream, the same for every
    method, and no query repeats: a faster method sees more data, never the same data twice
    (a fixed training set would let the fastest method overfit within the budget).

    `on_checkpoint(spent_seconds, steps)` is called (outside the timed steps) each time the
    spent time passes one of `checkpoints` (seconds), for a recall-vs-seconds curve.
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
        while pending and spent >= pending[0] and on_checkpoint is not None:
            on_checkpoint(pending.pop(0), steps)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--log2n", type=int, default=20)
    parser.add_argument("--cache-size", type=int, default=2**16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--unnormalized", action="store_true",
                        help="raw dot products (default: unit-norm embeddings / temperature)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--num-negatives", type=int, default=1,
                        help="k, negatives drawn from the cache per query")
    parser.add_argument("--query-item-tokens", type=int, default=2)
    parser.add_argument("--query-cluster-tokens", type=int, default=2)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--curve-points", type=int, default=6,
                        help="evaluations along the run (untimed) for the recall-vs-seconds plot")
    parser.add_argument("--max-steps", type=int, default=10**9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.cache_size, args.seconds, args.num_test = 12, 2**10, 1.0, 100
        args.max_steps, args.curve_points = 10, 2

    corpus = synthetic.make_corpus(
        num_candidates=2**args.log2n, query_item_tokens=args.query_item_tokens,
        query_cluster_tokens=args.query_cluster_tokens, seed=args.seed)
    test = corpus.queries(args.num_test, split="test")

    rows = []
    for method in args.methods:
        model = build(method, corpus, args)
        row = {"method": method, "curve": []}

        def checkpoint(at_seconds, steps, model=model, row=row):
            row["curve"].append({"seconds": at_seconds, "steps": steps,
                                 **evaluate(model, corpus, test)})

        marks = [args.seconds * (i + 1) / args.curve_points for i in range(args.curve_points - 1)]
        row.update(train_for(model, corpus, args.batch, args.seconds, args.max_steps,
                             checkpoint, marks))
        row["ms_per_step"] = 1e3 * row["train_seconds"] / max(1, row["steps"] - 1)
        row.update(evaluate(model, corpus, test))
        row["curve"].append({"seconds": row["train_seconds"], "steps": row["steps"],
                             "recall@10": row["recall@10"], "recall@100": row["recall@100"]})
        print(row, flush=True)
        rows.append(row)

    by = {r["method"]: r for r in rows}
    targets = {}
    baselines = [by[m]["recall@10"] for m in ("inbatch", "inbatch+logq") if m in by]
    for method in ("cache", "cache+logq", "cache-only"):
        if method in by and baselines:
            best = max(baselines)
            ratio = by[method]["recall@10"] / best if best else None
            targets[f"{method}_r10/best_inbatch_r10"] = ratio
            targets[f"{method}_quality_met(>=1.5)"] = bool(ratio and ratio >= 1.5)
    config = vars(args)
    path = _common.write_json("quality_at_time", {"config": config, "rows": rows,
                                                  "targets": targets})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, k in zip(axes, ("recall@10", "recall@100")):
        for r in rows:
            ax.plot([c["seconds"] for c in r["curve"]], [c[k] for c in r["curve"]], "o-",
                    label=r["method"])
        ax.set_xlabel("training seconds")
        ax.set_ylabel(f"held-out {k} over all candidates")
        ax.set_title(f"N=2^{args.log2n}, cache {args.cache_size}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(_common.plot_path("quality_at_time"))

    print(_common.table(rows, ["method", "steps", "ms_per_step", "final_loss", "recall@10",
                               "recall@100"]))
    print("targets:", targets)
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
