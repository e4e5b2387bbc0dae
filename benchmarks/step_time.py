"""Training step time and peak memory vs cache size N: cache vs in-batch vs full softmax.

    python -m benchmarks.step_time            # N in {2^14, 2^16, 2^18, 2^20}, B=256, d=64
    python -m benchmarks.step_time --quick    # N in {2^10, 2^12}, a smoke configuration

Every (mode, N) runs in its own subprocess, so its peak RSS (`ru_maxrss` of the child) is its
own. Modes:

- `cache`: a `CachedRetrievalModel` train step with a full cache of N candidates of the
  synthetic corpus (one negative per query, in-batch negatives kept);
- `inbatch`: the same towers, in-batch negatives only (also reports the towers' forward +
  backward time and the optimizer's apply time separately);
- `full`: the full softmax: all N candidates through the candidate tower with gradients;
  skipped when its estimated time (extrapolated from the smaller N) exceeds `--full-max-s`
  or its estimated memory exceeds `--full-max-gib`;
- `floor`: `logsumexp` of `[B, d] x [d, N]` alone (the scoring floor), no towers;
- `floor_tiled`: the same log-mass computed by our tiled scorer (`sample_cache` without a
  draw). The targets use the faster of the two floors: the work that cannot be avoided.

Towers: hashed token bag (2^14 buckets) + MLP for both the query (query tokens) and the
candidate (the candidate's 32 tokens). Hashing keeps the embedding tables moderate: with
tf-keras Adam, a dense update of a 2^16-row table costs more than the towers, which is no
cost of the cache.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODES = ("inbatch", "cache", "floor", "floor_tiled", "full")


# ---------------------------------------------------------------------------------- child

def _child(mode, num_slots, batch, dim, repeats, embedding_dtype):
    from benchmarks import _common  # imports tfnegcache (Keras 2) before TensorFlow
    import tensorflow as tf
    from tfnegcache.datasets import synthetic

    out = {"mode": mode, "N": num_slots}
    rng = np.random.default_rng(0)
    if mode in ("floor", "floor_tiled"):
        from tfnegcache import sampling
        queries = tf.constant(rng.normal(size=(batch, dim)).astype(np.float32))
        embeddings = tf.Variable(rng.normal(size=(num_slots, dim)).astype(np.float32))
        no_bias = tf.zeros([num_slots])

        @tf.function
        def floor():
            if mode == "floor_tiled":
                return sampling.sample_cache(queries, embeddings, no_bias, 1.0, 1, None).log_mass
            return tf.reduce_logsumexp(tf.matmul(queries, embeddings, transpose_b=True), -1)
        out["step_ms"] = 1e3 * _common.time_fn(floor, repeats)
        return out

    corpus = synthetic.make_corpus(num_candidates=max(num_slots, 256), seed=0)
    data = corpus.queries(batch, split="train")
    features = {k: tf.constant(v) for k, v in data.items()}
    tokens_per_candidate = corpus.tokens_per_candidate

    if mode == "full":
        model = _common.TwoTower(tokens_per_candidate, dim=dim)
        optimizer = tf.keras.optimizers.Adam(1e-3)
        all_tokens = tf.constant(corpus.candidate_tokens[:num_slots])
        labels = tf.constant(data["candidate_id"])

        @tf.function
        def full_step():
            with tf.GradientTape() as tape:
                q = model.query_tower(features["query_tokens"])
                c = model.candidate_tower(all_tokens)
                logits = tf.matmul(q, c, transpose_b=True)
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels, logits))
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss
        out["step_ms"] = 1e3 * _common.time_fn(full_step, max(1, repeats // 3))
        return out

    cache_size = num_slots if mode == "cache" else None
    model = _common.TwoTower(tokens_per_candidate, cache_size=cache_size, dim=dim,
                             embedding_dtype=tf.as_dtype(embedding_dtype))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    if mode == "cache":
        cache = model.task.cache
        fill = tf.function(lambda t, i: cache.insert(
            {"candidate_tokens": t}, model.candidate_tower(t), i))
        chunk = min(num_slots, 2**12)  # small: the fill's tower pass must not set the peak
        for start in range(0, num_slots, chunk):
            fill(tf.constant(corpus.candidate_tokens[start:start + chunk]),
                 tf.constant(corpus.candidate_ids[start:start + chunk]))
        out["cache_fill"] = float(cache.fill_fraction())
        out["cache_storage_bytes"] = int(sum(
            int(np.prod(v.shape)) * v.dtype.size for v in cache.weights))
        # The sampler alone (score + two-stage draw), on the batch's query embeddings.
        q = model.query_tower(features["query_tokens"])
        sample = tf.function(lambda: cache.sample(q, 1).slots)
        out["sampler_ms"] = 1e3 * _common.time_fn(sample, repeats)

    step = tf.function(model.train_step)
    cpu = {}
    out["step_ms"] = 1e3 * _common.time_fn(lambda: step(features)["loss"], repeats, warmup=2,
                                           cpu=cpu)
    out["step_cpu_ms"] = 1e3 * cpu["cpu_s"]

    if mode == "inbatch":
        variables = model.trainable_variables

        @tf.function
        def towers():
            with tf.GradientTape() as tape:
                loss = model.compute_loss(features, training=True)
            return tape.gradient(loss, variables)
        out["towers_fwd_bwd_ms"] = 1e3 * _common.time_fn(towers, repeats)
        grads = [tf.convert_to_tensor(g) for g in towers()]

        @tf.function
        def apply():
            model.optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(0)
        out["optimizer_apply_ms"] = 1e3 * _common.time_fn(apply, repeats)
    return out


# ---------------------------------------------------------------------------------- parent

def _run_child(mode, log2n, args):
    command = [sys.executable, "-m", "benchmarks.step_time", "--child", mode, str(log2n),
               "--batch", str(args.batch), "--dim", str(args.dim), "--repeats",
               str(args.repeats), "--embedding-dtype", args.embedding_dtype]
    for attempt in range(2):   # one retry: on a shared machine a child can die of contention
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        wall = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            break
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-3:]
        print(f"  {mode} N=2^{log2n} attempt {attempt} failed: {errors}", flush=True)
    else:
        return {"mode": mode, "N": 2**log2n, "error": errors}
    result = json.loads(lines[-1][len("RESULT "):])
    result["child_wall_s"] = wall
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log2n", type=int, nargs="+", default=[14, 16, 18, 20])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--embedding-dtype", default="float32")
    parser.add_argument("--full-max-s", type=float, default=60.0)
    parser.add_argument("--full-max-gib", type=float, default=6.0)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LOG2N"))
    args = parser.parse_args(argv)
    if args.child:
        result = _child(args.child[0], 2**int(args.child[1]), args.batch, args.dim,
                        args.repeats, args.embedding_dtype)
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.quick:
        args.log2n, args.repeats = [10], 2

    from benchmarks import _common
    rows, full_times = [], {}
    for log2n in args.log2n:
        n = 2**log2n
        row = {"N": f"2^{log2n}"}
        for mode in MODES:
            if mode == "full":
                # Extrapolate linearly in N from the largest N measured so far.
                estimate_s = None
                if full_times:
                    last_n = max(full_times)
                    estimate_s = full_times[last_n] * n / last_n
                estimate_gib = n * 32 * args.dim * 4 * 3 / 2**30   # lookup, grads, copies
                if (estimate_s is not None and estimate_s > args.full_max_s) or \
                        estimate_gib > args.full_max_gib:
                    row["full_skipped"] = (f"est {estimate_s or 0:.0f} s, "
                                           f"{estimate_gib:.1f} GiB")
                    continue
            result = _run_child(mode, log2n, args)
            print(f"  {mode:8s} N=2^{log2n}: {result}", flush=True)
            if "error" in result:
                row[f"{mode}_error"] = result["error"]
                continue
            row[f"{mode}_ms"] = result["step_ms"]
            row[f"{mode}_rss_gib"] = result["max_rss_bytes"] / 2**30
            for key in ("sampler_ms", "towers_fwd_bwd_ms", "optimizer_apply_ms",
                        "cache_storage_bytes"):
                if key in result:
                    row[key] = result[key]
            if mode == "full":
                full_times[n] = result["step_ms"] / 1e3
        floors = [row[k] for k in ("floor_ms", "floor_tiled_ms") if k in row]
        if "cache_ms" in row and "inbatch_ms" in row and floors:
            row["cache/(inbatch+floor)"] = row["cache_ms"] / (row["inbatch_ms"] + min(floors))
        if "cache_ms" in row and "full_ms" in row:
            row["full/cache"] = row["full_ms"] / row["cache_ms"]
        if "cache_rss_gib" in row and "inbatch_rss_gib" in row:
            storage = row["cache_storage_bytes"] / 2**30
            row["cache_storage_gib"] = storage
            row["rss_excess_gib"] = row["cache_rss_gib"] - row["inbatch_rss_gib"] - storage
        rows.append(row)

    targets = {}
    ratios = [r["cache/(inbatch+floor)"] for r in rows if "cache/(inbatch+floor)" in r]
    if ratios:
        targets["max cache/(inbatch+floor)"] = max(ratios)
        targets["step_time_met(<=1.25)"] = max(ratios) <= 1.25
    for r in rows:
        if r["N"] == "2^16" and "full/cache" in r:
            targets["full/cache at 2^16"] = r["full/cache"]
            targets["full_softmax_met(>=10)"] = r["full/cache"] >= 10
        if r["N"] == "2^20" and "rss_excess_gib" in r:
            targets["rss_excess_gib at 2^20"] = r["rss_excess_gib"]
            targets["memory_met(<=0.75 GiB)"] = r["rss_excess_gib"] <= 0.75
    config = {k: v for k, v in vars(args).items() if k != "child"}
    path = _common.write_json("step_time", {"config": config, "rows": rows, "targets": targets})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [2**int(r["N"][2:]) for r in rows]
    for mode in MODES:
        points = [(n, r[f"{mode}_ms"]) for n, r in zip(sizes, rows) if f"{mode}_ms" in r]
        if points:
            ax.plot(*zip(*points), marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (cache size / corpus size)")
    ax.set_ylabel("ms per step")
    ax.set_title(f"Step time, B={args.batch}, d={args.dim} ({os.cpu_count()} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(_common.plot_path("step_time"))

    print(_common.table(rows, ["N", "cache_ms", "inbatch_ms", "floor_ms", "floor_tiled_ms",
                               "full_ms",
                               "cache/(inbatch+floor)", "full/cache", "sampler_ms"]))
    print(_common.table(rows, ["N", "towers_fwd_bwd_ms", "optimizer_apply_ms", "cache_rss_gib",
                               "inbatch_rss_gib", "cache_storage_gib", "rss_excess_gib",
                               "full_rss_gib", "full_skipped"]))
    print("targets:", targets)
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
