"""Training step time and peak memory vs cache size N: cache vs in-batch vs full softmax.

    python -m benchmarks.step_time            # N in {2^14, 2^16, 2^18, 2^20}, B=256, d=64
    python -m benchmarks.step_time --quick    # N = 2^10, reference towers: a smoke run

Two tower configurations (`--towers`, default both):

- `hashed`: hashed token bag (2^14 buckets) + MLP on both sides, in-batch negatives kept,
  no temperature. Hashing keeps the tables moderate: with tf-keras Adam a dense update of a
  2^16-row table costs more than the towers, which is no cost of the cache.
- `reference`: the paper's reference code's setup: a 32-token bag over a 50k vocabulary,
  mean, Dense(128, relu), Dense(64) on both sides (dense Adam on the tables), a cache-only
  softmax (`use_in_batch_negatives=False`), temperature 0.05, k = 1.

Every (towers, mode, N) runs in its own subprocess, so its peak RSS (`ru_maxrss` of the child)
is its own. Modes:

- `cache`: a `CachedRetrievalModel` train step with a full cache of N candidates of the
  synthetic corpus (one negative per query);
- `cache_bf16`: the same with `NegativeCache(scoring_dtype=tf.bfloat16)`;
- `inbatch`: the same towers, in-batch negatives only (also reports the towers' forward +
  backward time and the optimizer's apply time separately);
- `parts`: the cache step broken into its parts, each timed alone on the step's own tensors:
  scoring (the log-mass of every slot), sampling (the two-stage draw and the gather of the
  drawn rows, beyond scoring), re-encoding (the candidate tower forward and backward on the
  drawn negatives), cache update (prepare + commit of the step's writes), checks (the step
  with its checks minus the step with every check replaced by the identity, interleaved);
- `full`: the full softmax: all N candidates through the candidate tower with gradients;
  skipped when its estimated time (extrapolated from the smaller N) exceeds `--full-max-s`
  or its estimated memory exceeds `--full-max-gib`;
- `matmul`: `[B, d] x [d, N]` alone, fp32: the scoring floor (the work that cannot be avoided);
- `floor`: `logsumexp` of that matmul, naively (one `[B, N]` matrix);
- `floor_tiled`: the same log-mass by the library's tiled scorer (`sample_cache`, no draw);
- `peak` (once per run): the machine's square 2048 matmul throughput, fp32 and bf16.

The step-time target is `cache / (inbatch + matmul)`: a cache step against an in-batch step
plus the matmul floor of scoring every cached embedding.
"""

import argparse
import os
import resource
import time

import numpy as np

from benchmarks import _common  # first: imports tfnegcache (Keras 2) before TensorFlow

MODES = ("inbatch", "cache", "cache_bf16", "parts", "matmul", "floor", "floor_tiled", "full")
TOWERS = ("hashed", "reference")


# ---------------------------------------------------------------------------------- child

def _config(towers):
    """(TwoTower keyword arguments for the cache model, for the in-batch model, query tokens)."""
    if towers == "reference":
        cache = dict(tower="reference", temperature=0.05, use_in_batch_negatives=False)
        return cache, dict(tower="reference", temperature=0.05), 32
    return dict(tower="hashed"), dict(tower="hashed"), 16


def _peak(repeats):
    tf = _common.tf()
    out = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.random.normal([2048, 2048], dtype=tf.float32)
        a = tf.cast(a, dtype)
        fn = tf.function(lambda: tf.matmul(a, a))
        seconds = _common.time_fn(fn, max(repeats, 5), warmup=2)
        out[f"matmul_2048_{dtype.name}_gflops"] = 2 * 2048**3 / seconds / 1e9
    return out


def _filled_model(corpus, num_slots, dim, embedding_dtype, **kwargs):
    tf = _common.tf()
    from benchmarks.token_towers import TwoTower
    model = TwoTower(corpus.tokens_per_candidate, cache_size=num_slots, dim=dim,
                             embedding_dtype=tf.as_dtype(embedding_dtype), **kwargs)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    cache = model.task.cache
    fill = tf.function(lambda t, i: cache.insert(
        {"candidate_tokens": t}, model.candidate_tower(t), i))
    chunk = min(num_slots, 2**12)  # small: the fill's tower pass must not set the peak
    for start in range(0, num_slots, chunk):
        fill(tf.constant(corpus.candidate_tokens[start:start + chunk]),
             tf.constant(corpus.candidate_ids[start:start + chunk]))
    return model


def _parts(model, features, repeats, make_model):
    """The cache step's parts, each timed alone (see the module docstring)."""
    tf = _common.tf()
    from tfnegcache import checks
    from tfnegcache.cache import CacheUpdate
    task, cache = model.task, model.task.cache
    ids = features["candidate_id"]
    queries = model.query_tower(features["query_tokens"])
    exact_in_batch = task.use_in_batch_negatives
    kwargs = dict(temperature=task._temperature,  # pylint: disable=protected-access
                  masked_ids=ids if exact_in_batch else None,
                  excluded_ids=None if exact_in_batch else ids)
    out = {}
    score = tf.function(lambda: cache.log_mass(queries, **kwargs))
    out["scoring_ms"] = 1e3 * _common.time_fn(score, repeats)
    @tf.function
    def drawn():
        negatives = cache.draw(queries, task.num_negatives, **kwargs)
        return negatives.slots, negatives.features
    out["sampler_ms"] = 1e3 * _common.time_fn(drawn, repeats)
    out["sampling_ms"] = max(out["sampler_ms"] - out["scoring_ms"], 0.0)
    drawn_slots, drawn_features = drawn()
    tokens = tf.constant(drawn_features["candidate_tokens"])
    variables = model.candidate_tower.trainable_variables

    @tf.function
    def reencode():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model.candidate_tower(tokens))
        return tape.gradient(loss, variables)
    out["reencode_ms"] = 1e3 * _common.time_fn(reencode, repeats)
    positives = model.candidate_tower(features["candidate_tokens"])
    fresh = model.candidate_tower(tokens)
    slots = tf.constant(drawn_slots)

    @tf.function
    def update():
        cache.update(CacheUpdate(
            {"candidate_tokens": features["candidate_tokens"]}, positives, ids,
            write_back_slots=slots, write_back_embeddings=fresh,
            write_back_valid=tf.ones_like(slots, tf.bool)), advance_step=False)
        return tf.constant(0)
    out["cache_update_ms"] = 1e3 * _common.time_fn(update, repeats)

    # Checks: this model's step against one traced with every check an identity.
    with_checks = tf.function(model.train_step)
    finite, same_rows = checks.finite, checks.same_rows
    checks.finite = lambda tensor, what: tensor
    checks.same_rows = lambda *args_, **kwargs_: tf.no_op()
    try:
        unchecked = make_model()
        without = tf.function(unchecked.train_step)
        without(features)
    finally:
        checks.finite, checks.same_rows = finite, same_rows
    with_checks(features)
    times = {True: [], False: []}
    for call in range(2 * repeats):
        for checked in ((True, False) if call % 2 else (False, True)):
            start = time.perf_counter()
            (with_checks if checked else without)(features)["loss"].numpy()
            times[checked].append(time.perf_counter() - start)
    out["step_ms"] = 1e3 * float(np.median(times[True]))
    out["step_without_checks_ms"] = 1e3 * float(np.median(times[False]))
    out["checks_ms"] = out["step_ms"] - out["step_without_checks_ms"]
    return out


def _child(mode, num_slots, batch, dim, repeats, embedding_dtype, towers="hashed"):
    tf = _common.tf()
    from benchmarks import synthetic

    out = {"mode": mode, "N": num_slots, "towers": towers}
    if mode == "peak":
        out.update(_peak(repeats))
        return out
    rng = np.random.default_rng(0)
    if mode in ("floor", "floor_tiled", "matmul"):
        from tfnegcache import sampling
        queries = tf.constant(rng.normal(size=(batch, dim)).astype(np.float32))
        embeddings = tf.Variable(rng.normal(size=(num_slots, dim)).astype(np.float32))
        no_bias = tf.zeros([num_slots])

        @tf.function
        def floor():
            if mode == "floor_tiled":
                return sampling.sample_cache(queries, embeddings, no_bias, 1.0, 1, None).log_mass
            scores = tf.matmul(queries, embeddings, transpose_b=True)
            if mode == "matmul":
                return scores[:, :1]
            return tf.reduce_logsumexp(scores, -1)
        out["step_ms"] = 1e3 * _common.time_fn(floor, repeats)
        out["gflops"] = 2 * batch * num_slots * dim / (out["step_ms"] / 1e3) / 1e9
        return out

    # Only the modes that train import the towers (with TFRS): the others start faster.
    from benchmarks.token_towers import TwoTower
    cache_kwargs, inbatch_kwargs, query_tokens = _config(towers)
    corpus = synthetic.make_corpus(num_candidates=max(num_slots, 256), seed=0,
                                   query_tokens=query_tokens)
    data = corpus.queries(batch, split="train")
    features = {k: tf.constant(v) for k, v in data.items()}
    tokens_per_candidate = corpus.tokens_per_candidate

    if mode == "full":
        model = TwoTower(tokens_per_candidate, dim=dim, **inbatch_kwargs)
        optimizer = tf.keras.optimizers.Adam(1e-3)
        all_tokens = tf.constant(corpus.candidate_tokens[:num_slots])
        labels = tf.constant(data["candidate_id"])
        temperature = inbatch_kwargs.get("temperature") or 1.0

        @tf.function
        def full_step():
            with tf.GradientTape() as tape:
                q = model.query_tower(features["query_tokens"])
                c = model.candidate_tower(all_tokens)
                logits = tf.matmul(q, c, transpose_b=True) / temperature
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels, logits))
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss
        out["step_ms"] = 1e3 * _common.time_fn(full_step, max(1, repeats // 3))
        return out

    # Setup: building the model (and warm-starting its cache) through the end of the first
    # training step, which traces it: what a user waits for before training starts.
    setup_start, setup_cpu_start = time.perf_counter(), time.process_time()
    if mode in ("cache", "cache_bf16", "parts"):
        kwargs = dict(cache_kwargs)
        if mode == "cache_bf16":
            kwargs["scoring_dtype"] = tf.bfloat16
        make = lambda: _filled_model(corpus, num_slots, dim, embedding_dtype,  # noqa: E731
                                     **kwargs)
        model = make()
        cache = model.task.cache
        out["cache_fill"] = float(cache.fill_fraction())
        out["cache_storage_bytes"] = int(sum(
            int(np.prod(v.shape)) * v.dtype.size for v in cache.weights))
        if mode == "parts":
            out.update(_parts(model, features, repeats, make))
            return out
    else:
        model = TwoTower(tokens_per_candidate, dim=dim,
                         embedding_dtype=tf.as_dtype(embedding_dtype), **inbatch_kwargs)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))

    step = tf.function(model.train_step)
    step(features)["loss"].numpy()
    out["setup_s"] = time.perf_counter() - setup_start
    out["setup_cpu_s"] = time.process_time() - setup_cpu_start
    cpu = {}
    out["step_ms"] = 1e3 * _common.time_fn(lambda: step(features)["loss"], repeats, warmup=2,
                                           cpu=cpu)
    out["step_cpu_ms"] = 1e3 * cpu["cpu_s"]

    if mode == "inbatch":
        variables = model.trainable_variables

        @tf.function
        def towers_pass():
            with tf.GradientTape() as tape:
                loss = model.compute_loss(features, training=True)
            return tape.gradient(loss, variables)
        out["towers_fwd_bwd_ms"] = 1e3 * _common.time_fn(towers_pass, repeats)
        grads = [tf.convert_to_tensor(g) for g in towers_pass()]

        @tf.function
        def apply():
            model.optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(0)
        out["optimizer_apply_ms"] = 1e3 * _common.time_fn(apply, repeats)
    return out


# ---------------------------------------------------------------------------------- parent

def _run_child(mode, log2n, args, towers="hashed"):
    """One (towers, mode, N) measured in a child process; on failure, its errors."""
    try:
        # One retry: on a shared machine a child can die of contention.
        return _common.run_child(
            "benchmarks.step_time",
            ["--child", mode, log2n, "--batch", args.batch, "--dim", args.dim, "--repeats",
             args.repeats, "--embedding-dtype", args.embedding_dtype, "--towers", towers],
            attempts=2, label=f"{towers} {mode} N=2^{log2n}")
    except _common.ChildFailed as failed:
        return {"mode": mode, "N": 2**log2n, "error": failed.errors}


PART_COLUMNS = ("towers_fwd_bwd_ms", "optimizer_apply_ms", "scoring_ms", "sampling_ms",
                "reencode_ms", "cache_update_ms", "checks_ms")


def _row(towers, log2n, args, peak, full_times):
    n = 2**log2n
    row = {"towers": towers, "N": f"2^{log2n}"}
    for mode in args.modes:
        if mode == "full":
            # Extrapolate linearly in N from the largest N measured so far.
            estimate_s = None
            if full_times:
                last_n = max(full_times)
                estimate_s = full_times[last_n] * n / last_n
            estimate_gib = n * 32 * args.dim * 4 * 3 / 2**30   # lookup, grads, copies
            if (estimate_s is not None and estimate_s > args.full_max_s) or \
                    estimate_gib > args.full_max_gib:
                row["full_skipped"] = f"est {estimate_s or 0:.0f} s, {estimate_gib:.1f} GiB"
                continue
        if towers != args.towers[0] and mode in ("matmul", "floor", "floor_tiled"):
            # Tower-independent: measured once per N, with the first towers' rows.
            continue
        result = _run_child(mode, log2n, args, towers)
        print(f"  {towers} {mode:11s} N=2^{log2n}: {result}", flush=True)
        if "error" in result:
            row[f"{mode}_error"] = result["error"]
            continue
        if mode == "parts":
            for key in PART_COLUMNS + ("step_without_checks_ms",):
                if key in result:
                    row[key] = result[key]
            row["parts_step_ms"] = result["step_ms"]
            continue
        row[f"{mode}_ms"] = result["step_ms"]
        row[f"{mode}_rss_gib"] = result["max_rss_bytes"] / 2**30
        for key in ("towers_fwd_bwd_ms", "optimizer_apply_ms", "cache_storage_bytes", "gflops"):
            if key in result:
                row[key if key != "gflops" else f"{mode}_gflops"] = result[key]
        if mode == "full":
            full_times[n] = result["step_ms"] / 1e3
    return row


def _derive(row, floors, peak):
    """Ratios of one row; `floors` holds the tower-independent floors of its N."""
    for key, value in floors.items():
        row.setdefault(key, value)
    if "cache_ms" in row and "inbatch_ms" in row and "matmul_ms" in row:
        row["cache/(inbatch+matmul)"] = row["cache_ms"] / (row["inbatch_ms"] + row["matmul_ms"])
    if "cache_bf16_ms" in row and "cache_ms" in row:
        row["bf16/fp32 cache step"] = row["cache_bf16_ms"] / row["cache_ms"]
    if "cache_ms" in row and "full_ms" in row:
        row["full/cache"] = row["full_ms"] / row["cache_ms"]
    if "cache_rss_gib" in row and "inbatch_rss_gib" in row:
        storage = row["cache_storage_bytes"] / 2**30
        row["cache_storage_gib"] = storage
        row["rss_excess_gib"] = row["cache_rss_gib"] - row["inbatch_rss_gib"] - storage
    if "matmul_gflops" in row and peak.get("matmul_2048_float32_gflops"):
        row["floor/peak fp32"] = row["matmul_gflops"] / peak["matmul_2048_float32_gflops"]
    if "parts_step_ms" in row:
        known = sum(row.get(k, 0.0) for k in PART_COLUMNS)
        row["other_ms"] = row["parts_step_ms"] - known
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log2n", type=int, nargs="+", default=[14, 16, 18, 20])
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=TOWERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + ("peak",))
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
                        args.repeats, args.embedding_dtype, args.towers[0])
        result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _common.report_result(result)
        return result
    if args.quick:   # a smoke run: every part of the harness once, on the reference towers
        args.log2n, args.repeats, args.towers = [10], 2, ["reference"]
        args.modes = ["inbatch", "cache", "parts", "matmul"]

    peak = _run_child("peak", 10, args)
    print(f"  peak: {peak}", flush=True)
    rows = []
    for towers in args.towers:
        full_times = {}
        for log2n in args.log2n:
            rows.append(_row(towers, log2n, args, peak, full_times))
    floors = {}
    for row in rows:
        floors.setdefault(row["N"], {k: row[k] for k in
                                     ("matmul_ms", "floor_ms", "floor_tiled_ms", "matmul_gflops")
                                     if k in row})
    rows = [_derive(row, floors[row["N"]], peak) for row in rows]

    targets = {}
    for towers in args.towers:
        at_14 = [r for r in rows if r["towers"] == towers and r["N"] == "2^14"]
        if at_14 and "cache/(inbatch+matmul)" in at_14[0]:
            ratio = at_14[0]["cache/(inbatch+matmul)"]
            targets[f"{towers}: cache/(inbatch+matmul) at 2^14"] = ratio
            targets[f"{towers}: step_time_met(<=1.15)"] = ratio <= 1.15
        for r in rows:
            if r["towers"] == towers and r["N"] == "2^20" and "cache_ms" in r:
                targets[f"{towers}: cache step at 2^20 (ms)"] = r["cache_ms"]
                if towers == "reference":
                    targets["reference: cache_2^20_met(<=300 ms)"] = r["cache_ms"] <= 300
            if r["towers"] == towers and r["N"] == "2^20" and "rss_excess_gib" in r:
                targets[f"{towers}: rss_excess_gib at 2^20"] = r["rss_excess_gib"]
    config = {k: v for k, v in vars(args).items() if k != "child"}
    path = _common.write_json("step_time", {"config": config, "peak": peak, "rows": rows,
                                            "targets": targets})

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(args.towers), figsize=(6 * len(args.towers), 4),
                             squeeze=False)
    for ax, towers in zip(axes[0], args.towers):
        mine = [r for r in rows if r["towers"] == towers]
        sizes = [2**int(r["N"][2:]) for r in mine]
        for mode in ("inbatch", "cache", "cache_bf16", "matmul", "floor_tiled", "full"):
            points = [(n, r[f"{mode}_ms"]) for n, r in zip(sizes, mine) if f"{mode}_ms" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (cache size / corpus size)")
        ax.set_ylabel("ms per step")
        ax.set_title(f"{towers} towers, B={args.batch}, d={args.dim} ({os.cpu_count()} CPUs)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(_common.plot_path("step_time"))

    print(f"machine peak: {peak}")
    print(_common.table(rows, ["towers", "N", "cache_ms", "cache_bf16_ms", "inbatch_ms",
                               "matmul_ms", "floor_ms", "floor_tiled_ms", "full_ms",
                               "cache/(inbatch+matmul)", "bf16/fp32 cache step", "full/cache",
                               "floor/peak fp32"]))
    print(_common.table(rows, ["towers", "N", "parts_step_ms", *PART_COLUMNS, "other_ms"]))
    print(_common.table(rows, ["towers", "N", "cache_rss_gib", "inbatch_rss_gib",
                               "cache_storage_gib", "rss_excess_gib", "full_rss_gib",
                               "full_skipped"]))
    print("targets:", targets)
    print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
