"""The equal-time map: recall against training seconds and steps, per negative strategy and
tower cost, on the chosen workload at 2^20 candidates (docs/time_map.md).

Methods: `inbatch`, `inbatch+logq`, `mns+logq` (plain TF train steps of
`benchmarks.workload`), `cache`, `cache+logq` (the library: `CacheRetrieval` +
`NegativeCache` in a `CachedRetrievalModel`, whose `train_step` runs under `tf.function`),
`full` (the exact full softmax; only affordable on small corpora, e.g. `--quick`).
Tower-cost settings (`--setting`): `mlp` (the workload's MLP on both sides), `seq-query` (a
small transformer encoder for the query, the MLP for the candidate), `seq-both` (the
transformer on both sides).

Every method trains for `--seconds` seconds of training (timed train steps, plus the cache's
warm start and full refreshes; data generation and evaluation are not counted), on the same
stream of fresh queries, and is evaluated at `--time-points` equal fractions of the budget
and at the step counts `--step-points` (recall@10/@100 of `--num-test` held-out queries over
every item, exact top-k). After training each method's step is broken into towers,
scoring/sampling, cache update and refresh by timing isolated `tf.function`s on the same
shapes.

    python -m benchmarks.time_map --setting seq-both --seed 0           # one setting, one seed
    python -m benchmarks.time_map --setting seq-both --methods cache+logq --cache-size 262144
    python -m benchmarks.time_map --report       # tables and plots of everything in the dir
    python -m benchmarks.time_map --quick        # < 30 s smoke run on a tiny corpus

Each method's run lands as its own JSON in `results/time_map/` (`TFNEGCACHE_TIME_MAP_DIR`
overrides it). Threads: set `TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1` and run under
`nice` on a shared machine.
"""

import argparse
import glob
import json
import os
import time

import tfnegcache  # first: TensorFlow, whenever it is imported, gets Keras 2

import numpy as np

from benchmarks import _common
from benchmarks import workload as W

RESULTS = os.environ.get("TFNEGCACHE_TIME_MAP_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "time_map")
SETTINGS = {"mlp": ("mlp", "mlp"), "seq-query": ("transformer", "mlp"),
            "seq-both": ("transformer", "transformer")}
BASELINES = ("inbatch", "inbatch+logq", "mns+logq")
CACHES = ("cache", "cache+logq")
METHODS = BASELINES + CACHES + ("full",)
TARGET = 0.30  # the cache must remove this share of the best baseline's misses
# The training clock (`--clock`): "cpu", the process's CPU seconds (every TensorFlow thread of
# this process; on a machine shared with other jobs it does not count their time), or "wall".
CLOCK = {"name": "cpu", "fn": time.process_time}


def _now():
    return CLOCK["fn"]()


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny corpus, every method, < 30 s")
    p.add_argument("--report", action="store_true",
                   help="no training: tables and plots of the JSONs in the results dir")
    p.add_argument("--markdown", action="store_true", help="--report: also markdown tables")
    p.add_argument("--setting", default="seq-both", choices=sorted(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(BASELINES + CACHES), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=60.0, help="training seconds per method")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="what a training second is: the process's CPU time (robust to other "
                        "jobs on a shared machine) or wall time")
    p.add_argument("--time-points", type=int, default=4,
                   help="evaluations at equal fractions of --seconds (the last at the end)")
    p.add_argument("--step-points", type=int, nargs="*", default=[],
                   help="also evaluate at these step counts (the equal-steps comparison)")
    p.add_argument("--num-test", type=int, default=2000)
    # The workload (configuration A of docs/workload.md at 2^20), its towers and optimisation.
    W.add_workload_args(p, ("num_coarse", "fine_per_coarse", "fine_size", "query_noise",
                            "item_scale", "hidden", "layers", "dim", "batch", "mns_negatives",
                            "learning_rate"), num_coarse=256, fine_per_coarse=256)
    # the cache
    p.add_argument("--cache-size", type=int, default=2**16)
    p.add_argument("--num-negatives", type=int, default=4, help="k draws per query")
    p.add_argument("--refresh-every", type=int, default=100,
                   help="re-encode every slot every this many steps (0: never)")
    p.add_argument("--refresh-per-step", type=int, default=0, help="random slots per step")
    p.add_argument("--no-write-back", action="store_true")
    p.add_argument("--cache-normalize", action="store_true",
                   help="unit-norm embeddings for the cache methods (use a temperature)")
    p.add_argument("--cache-temperature", type=float, default=None)
    p.add_argument("--warm-start", choices=["random", "none"], default="random",
                   help="random: a uniform random subset of cache-size items; none: inserts fill it")
    p.add_argument("--eval-item-chunk", type=int, default=2**15)
    p.add_argument("--eval-query-chunk", type=int, default=100)
    p.add_argument("--breakdown-repeats", type=int, default=20)
    return p


# ------------------------------------------------------------------------------ the methods

class _Baseline:
    """A `benchmarks.workload` train step (`inbatch`, `inbatch+logq`, `mns+logq`, `full`)."""

    def __init__(self, method, workload, args, seed):
        tf = _common.tf()
        self.method, self.workload, self.args, self.seed = method, workload, args, seed
        query_arch, candidate_arch = SETTINGS[args.setting]
        self.query_tower, self.candidate_tower, self.variables = W.make_towers(
            workload, hidden=args.hidden, layers=args.layers, dim=args.dim, seed=seed,
            query_arch=query_arch, candidate_arch=candidate_arch)
        self.optimizer = tf.keras.optimizers.Adam(args.learning_rate)
        self._step = W.make_train_step(method, workload, self.query_tower, self.candidate_tower,
                                       self.variables, self.optimizer, args.batch,
                                       args.mns_negatives)
        self.extra_rows = args.mns_negatives if method == "mns+logq" else 0

    def setup_seconds(self):
        return 0.0

    def step(self, s, data):
        tf = _common.tf()
        rng = np.random.default_rng([self.workload.seed, W._MNS_STREAM, self.seed, s])
        extra = rng.integers(0, self.workload.num_items, max(self.args.mns_negatives, 1))
        return self._step(tf.constant(data["query"]), tf.constant(data["item_id"]),
                          tf.constant(extra))

    def after_step(self, steps):
        return 0.0

    def towers(self):
        return self.query_tower, self.candidate_tower


class _Cached:
    """The library's cache: `CacheRetrieval` + `NegativeCache` in a `CachedRetrievalModel`."""

    def __init__(self, method, workload, args, seed):
        tf = _common.tf()
        self.method, self.workload, self.args, self.seed = method, workload, args, seed
        query_arch, candidate_arch = SETTINGS[args.setting]
        query_tower, candidate_tower, _ = W.make_towers(
            workload, hidden=args.hidden, layers=args.layers, dim=args.dim, seed=seed,
            query_arch=query_arch, candidate_arch=candidate_arch)
        net, features = candidate_tower.net, candidate_tower.features
        normalize = args.cache_normalize

        def norm(e):
            return tf.math.l2_normalize(e, axis=-1) if normalize else e

        self.encode = lambda f: norm(net(f["x"]))
        self.query_net = lambda q: norm(query_tower(q))
        self.candidate_tower = lambda ids=None: norm(candidate_tower(ids))
        self.size = min(args.cache_size, workload.num_items)
        cache = tfnegcache.NegativeCache(
            self.size, {"x": tf.TensorSpec([workload.latent_dim], tf.float32)}, args.dim,
            id_dtype=tf.int64, seed=seed)
        task = tfnegcache.CacheRetrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE),
            temperature=args.cache_temperature, remove_accidental_hits=True, cache=cache,
            candidate_model=self.encode, num_negatives=args.num_negatives,
            refresh_per_step=args.refresh_per_step, write_back=not args.no_write_back)
        popularity = tf.constant(workload.popularity.astype(np.float32))
        logq = method == "cache+logq"
        encode, query_net = self.encode, self.query_net

        class Model(tfnegcache.CachedRetrievalModel):
            def __init__(self):
                super().__init__()
                self.query_tower, self.candidate_net, self.task = query_tower, net, task

            def compute_loss(self, inputs, training=False):
                ids = inputs["item_id"]
                x = tf.gather(features, ids)
                kwargs = {}
                if logq:
                    kwargs["candidate_sampling_probability"] = tf.gather(popularity, ids)
                return self.task(query_net(inputs["query"]), encode({"x": x}),
                                 candidate_ids=ids, candidate_features={"x": x},
                                 compute_metrics=False, compute_batch_metrics=False, **kwargs)

        self.model = Model()
        self.model.compile(optimizer=tf.keras.optimizers.Adam(args.learning_rate))
        _common.build_optimizer(self.model.optimizer, self.model.trainable_variables)
        self.cache, self.task, self.features = cache, task, features
        self._step = tf.function(self.model.train_step)
        self.extra_rows = args.batch * args.num_negatives
        self.refresh_seconds = 0.0
        self.refreshes = 0

    def setup_seconds(self):
        """Warm start: a uniform random subset of cache-size items, encoded by the initial
        towers. Counted as training time: the seconds of an equal encoding pass (a full
        refresh right after the warm start, which also traces the refresher)."""
        tf = _common.tf()
        if self.args.warm_start == "none":
            return 0.0
        rng = np.random.default_rng([self.workload.seed, 77, self.seed])
        subset = np.sort(rng.choice(self.workload.num_items, self.size, replace=False))
        dataset = tf.data.Dataset.from_tensor_slices(
            {"x": self.workload.features[subset], "id": subset.astype(np.int64)}).batch(4096)
        self.cache.warm_start(dataset, self.encode, id_key="id", batch_size=4096, batched=True)
        self.cache.refresh_all(self.encode, batch_size=4096)     # traces the refresher
        began = _now()
        self.cache.refresh_all(self.encode, batch_size=4096)
        return _now() - began

    def step(self, s, data):
        tf = _common.tf()
        return self._step({"query": tf.constant(data["query"]),
                           "item_id": tf.constant(data["item_id"])})["loss"]

    def after_step(self, steps):
        if not self.args.refresh_every or steps % self.args.refresh_every:
            return 0.0
        began = _now()
        self.cache.refresh_all(self.encode, batch_size=4096)
        spent = _now() - began
        self.refresh_seconds += spent
        self.refreshes += 1
        return spent

    def towers(self):
        return self.query_net, self.candidate_tower


# ------------------------------------------------------------------------------ the run

def train_method(method, workload, test, args, log=print):
    """Trains `method` for `args.seconds` of training time; returns its row (curve, steps,
    timings, breakdown)."""
    tf = _common.tf()
    tf.keras.backend.clear_session()
    runner = (_Cached if method in CACHES else _Baseline)(method, workload, args, args.seed)
    query_tower, candidate_tower = runner.towers()

    def evaluate():
        return W.evaluate(workload, query_tower, candidate_tower, test,
                          chunk=args.eval_query_chunk, item_chunk=args.eval_item_chunk)

    setup = runner.setup_seconds()
    spent, step_seconds, refresh_seconds, wall_step_seconds = setup, 0.0, 0.0, 0.0
    time_marks = [args.seconds * (i + 1) / args.time_points for i in range(args.time_points)]
    step_marks = sorted(set(int(s) for s in args.step_points if s > 0))
    curve, steps, loss, eval_seconds = [], 0, float("nan"), 0.0
    began_run = time.perf_counter()
    while spent < args.seconds and steps < args.max_steps:
        data = workload.queries(args.batch, "train", start=steps * args.batch)
        began, began_wall = _now(), time.perf_counter()
        loss = float(runner.step(steps, data))
        if steps > 0:  # the first call traces: not training time
            step_seconds += _now() - began
            spent += _now() - began
            wall_step_seconds += time.perf_counter() - began_wall
        steps += 1
        refreshed = runner.after_step(steps)
        refresh_seconds += refreshed
        spent += refreshed
        if not np.isfinite(loss):
            raise FloatingPointError(f"{method}: loss {loss} at step {steps}")
        due = []
        while step_marks and steps >= step_marks[0]:
            due.append("steps")
            step_marks.pop(0)
        while time_marks and spent >= time_marks[0] - 1e-9:
            due.append("seconds")
            time_marks.pop(0)
        if due:
            e0 = time.perf_counter()
            point = dict(seconds=spent, steps=steps, loss=loss, at=sorted(set(due)),
                         **evaluate())
            eval_seconds += time.perf_counter() - e0
            curve.append(point)
            log(f"  {args.setting} {method:12s} {steps:6d} steps {spent:7.1f} s loss "
                f"{loss:8.4f} r@10 {point['recall@10']:.4f} r@100 {point['recall@100']:.4f}")
    if not curve or curve[-1]["steps"] != steps:
        curve.append(dict(seconds=spent, steps=steps, loss=loss, at=["seconds"], **evaluate()))
    row = {"method": method, "setting": args.setting, "seed": args.seed, "steps": steps,
           "train_seconds": spent, "setup_seconds": setup, "step_seconds": step_seconds,
           "refresh_seconds": refresh_seconds, "final_loss": loss, "curve": curve,
           "recall@10": curve[-1]["recall@10"], "recall@100": curve[-1]["recall@100"],
           "wall_seconds": time.perf_counter() - began_run, "eval_seconds": eval_seconds,
           "clock": CLOCK["name"], "wall_step_seconds": wall_step_seconds}
    if method in CACHES:
        row.update(cache_size=runner.size, cache_fill=float(runner.cache.fill_fraction()),
                   cache_staleness=float(runner.task.staleness.result()),
                   refreshes=runner.refreshes)
    row["breakdown"] = breakdown(runner, workload, args, row)
    return row


def breakdown(runner, workload, args, row):
    """Milliseconds per step of each part, from isolated `tf.function`s on the run's shapes
    (after training; medians of `--breakdown-repeats` calls), next to the measured step."""
    tf = _common.tf()
    measured = 1e3 * row["step_seconds"] / max(row["steps"] - 1, 1)
    out = {"step_ms": measured,
           "refresh_ms": 1e3 * row["refresh_seconds"] / max(row["steps"], 1),
           "setup_ms": 1e3 * row["setup_seconds"] / max(row["steps"], 1),
           "total_ms": 1e3 * row["train_seconds"] / max(row["steps"], 1)}
    if runner.method == "full":
        return out
    data = workload.queries(args.batch, "train", start=0)
    query = tf.constant(data["query"])
    rng = np.random.default_rng(1)
    ids = np.concatenate([data["item_id"],
                          rng.integers(0, workload.num_items, runner.extra_rows)])
    ids = tf.constant(ids.astype(np.int64))
    query_tower, candidate_tower = runner.towers()
    if isinstance(runner, _Cached):
        variables = runner.model.trainable_variables
    else:
        variables = runner.variables
    optimizer = tf.keras.optimizers.Adam(args.learning_rate)
    labels = tf.range(args.batch)

    @tf.function
    def towers():
        with tf.GradientTape() as tape:
            logits = tf.matmul(query_tower(query), candidate_tower(ids), transpose_b=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    repeats = args.breakdown_repeats

    def timed(fn):
        """Seconds per call: CPU seconds (mean) with the CPU clock, else the wall median."""
        cpu = {}
        wall = _common.time_fn(fn, repeats, warmup=2, cpu=cpu)
        return cpu["cpu_s"] if CLOCK["name"] == "cpu" else wall

    out["towers_ms"] = 1e3 * timed(towers)
    out["sampling_ms"] = 0.0
    out["cache_update_ms"] = 0.0
    if isinstance(runner, _Cached):
        cache, k = runner.cache, args.num_negatives
        queries = query_tower(query)
        batch_ids = ids[:args.batch]

        @tf.function
        def sample():
            draw = cache.draw(queries, k, args.cache_temperature, masked_ids=batch_ids)
            return draw.slots, draw.stale, draw.log_mass

        out["sampling_ms"] = 1e3 * timed(sample)

        @tf.function
        def floor():
            # The scoring floor: the [B, cache] scores and their logsumexp, no draw.
            return tf.reduce_logsumexp(tf.matmul(
                queries, tf.cast(cache.embeddings, queries.dtype), transpose_b=True), -1)

        out["scoring_floor_ms"] = 1e3 * timed(floor)
        embeddings = tf.stop_gradient(candidate_tower(batch_ids))
        slots = tf.constant(rng.integers(0, runner.size, args.batch * k).astype(np.int64))
        fresh = tf.stop_gradient(runner.encode(cache.gather(slots)[0]))
        features = {"x": tf.gather(runner.features, batch_ids)}

        @tf.function
        def update():
            cache.update(tfnegcache.CacheUpdate(
                features, embeddings, batch_ids, write_back_slots=slots,
                write_back_embeddings=fresh, write_back_valid=tf.ones([args.batch * k], tf.bool)))
            return cache.num_filled

        out["cache_update_ms"] = 1e3 * timed(update)
    parts = out["towers_ms"] + out["sampling_ms"] + out["cache_update_ms"]
    out["other_ms"] = measured - parts
    return out


def run_name(args, method):
    name = f"{args.setting}_s{args.seed}_{method}"
    if method in CACHES:
        name += f"_c{int(np.log2(args.cache_size))}"
    return name


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.report:
        return report(markdown=args.markdown)
    CLOCK.update(name=args.clock, fn=time.process_time if args.clock == "cpu" else time.perf_counter)
    if args.quick:
        args.num_coarse, args.fine_per_coarse, args.cache_size = 8, 8, 256
        args.seconds, args.time_points, args.step_points = 1.0, 2, [5]
        args.num_test, args.refresh_every, args.breakdown_repeats = 100, 10, 3
        args.setting = "seq-query" if args.setting == "seq-both" else args.setting
        args.methods = list(METHODS)
        args.eval_item_chunk = 512
    tf = _common.tf()
    tf.config.threading.set_intra_op_parallelism_threads(
        int(os.environ.get("TF_NUM_INTRAOP_THREADS", "1")))
    tf.config.threading.set_inter_op_parallelism_threads(
        int(os.environ.get("TF_NUM_INTEROP_THREADS", "1")))
    workload = W.workload_from_args(args)
    test = workload.queries(args.num_test, "test")
    print(f"N = {workload.num_items}, setting {args.setting}, seed {args.seed}, "
          f"{args.seconds:g} s per method, same-fine-cluster rate "
          f"{workload.same_fine_cluster_rate(args.batch):.4f}", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    rows = []
    for method in args.methods:
        row = train_method(method, workload, test, args, log=lambda m: print(m, flush=True))
        row.update(config={k: v for k, v in vars(args).items() if k not in ("methods",)},
                   workload=workload.config(), num_items=workload.num_items,
                   machine=_common.machine(threads=True))
        path = os.path.join(RESULTS, run_name(args, method) + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1, default=float)
        b = row["breakdown"]
        print(f"{method}: {row['steps']} steps, r@10 {row['recall@10']:.4f}, r@100 "
              f"{row['recall@100']:.4f}; ms/step total {b['total_ms']:.1f} = step "
              f"{b['step_ms']:.1f} + refresh {b['refresh_ms']:.1f} + setup {b['setup_ms']:.1f}; "
              f"towers {b.get('towers_ms', float('nan')):.1f}, sampling "
              f"{b.get('sampling_ms', 0):.1f}, update {b.get('cache_update_ms', 0):.1f}; "
              f"wrote {path}", flush=True)
        rows.append(row)
    print(_table(rows))
    return rows


# ------------------------------------------------------------------------------ the report

def _flat(rows):
    """One dict per run: its recall and its step-time breakdown, for the report's tables."""
    flat = []
    for r in rows:
        b = r["breakdown"]
        flat.append({"setting": r["setting"], "seed": r["seed"], "method": r["method"],
                     "cache": r.get("cache_size"), "steps": r["steps"],
                     "r@10": r["recall@10"], "r@100": r["recall@100"],
                     "ms/step": b["total_ms"], "towers": b.get("towers_ms"),
                     "sampling": b.get("sampling_ms"),
                     "(scoring floor)": b.get("scoring_floor_ms"),
                     "update": b.get("cache_update_ms"), "refresh": b["refresh_ms"],
                     "warm start": b.get("setup_ms"), "other": b.get("other_ms")})
    return flat


def _table(rows):
    return _common.table(_flat(rows), ["setting", "seed", "method", "cache", "steps", "r@10",
                                       "r@100", "ms/step", "towers", "sampling", "update",
                                       "refresh", "other"])


def _at_steps(curve, steps):
    """recall@10 of a curve at a step count (linear interpolation; None outside it)."""
    xs = [p["steps"] for p in curve]
    if steps < xs[0] or steps > xs[-1]:
        return None
    return float(np.interp(steps, xs, [p["recall@10"] for p in curve]))


def removed(cache_r10, baseline_r10):
    """The share of the baseline's misses (1 - recall@10) the cache removes."""
    return 1.0 - (1.0 - cache_r10) / (1.0 - baseline_r10)


def load(directory=None):
    rows = []
    for path in sorted(glob.glob(os.path.join(directory or RESULTS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            row = json.load(f)
        if "method" in row and "curve" in row:
            rows.append(row)
    return rows


def compare(rows):
    """Per (setting, seed, cache size): the cache methods against the best baseline at equal
    time (the end of the budget) and at equal steps (the cache's last step count)."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["setting"], r["seed"]), []).append(r)
    for (setting, seed), group in sorted(groups.items()):
        base = {r["method"]: r for r in group if r["method"] in BASELINES}
        if not base:
            continue
        best_method = max(base, key=lambda m: base[m]["recall@10"])
        best = base[best_method]["recall@10"]
        for r in group:
            if r["method"] not in CACHES:
                continue
            # Equal steps: the largest step count at which the cache run and every baseline
            # were evaluated (a --step-points mark), else the baselines interpolated at the
            # cache's last step.
            marks = [p["steps"] for p in r["curve"]
                     if all(any(q["steps"] == p["steps"] for q in b["curve"])
                            for b in base.values())]
            steps = max(marks) if marks else r["steps"]
            cache_at = _at_steps(r["curve"], steps)
            at_steps = {m: _at_steps(b["curve"], steps) for m, b in base.items()}
            known = {m: v for m, v in at_steps.items() if v is not None}
            best_steps = max(known.values()) if known else None
            out.append({"setting": setting, "seed": seed, "method": r["method"],
                        "cache": r["cache_size"], "r@10": r["recall@10"],
                        "best_baseline": best_method, "best_r@10": best,
                        "removed_equal_time": removed(r["recall@10"], best),
                        "equal_steps": steps, "r@10_equal_steps": cache_at,
                        "best_r@10_equal_steps": best_steps,
                        "removed_equal_steps": (removed(cache_at, best_steps)
                                                if best_steps is not None else None)})
            # The baselines linearly interpolated between their checkpoints at the cache's
            # last step count (their curves are concave: this understates them).
            interp = [v for v in (_at_steps(b["curve"], r["steps"]) for b in base.values())
                      if v is not None]
            out[-1]["best_r@10_interp_at_cache_steps"] = max(interp) if interp else None
    return out


def _markdown(rows, columns):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _seed_summary(comparison):
    """Mean and spread over seeds of each (setting, method, cache) comparison."""
    groups = {}
    for c in comparison:
        groups.setdefault((c["setting"], c["method"], c["cache"]), []).append(c)
    out = []
    for (setting, method, cache), group in sorted(groups.items()):
        removed_t = np.array([c["removed_equal_time"] for c in group])
        r10 = np.array([c["r@10"] for c in group])
        best = np.array([c["best_r@10"] for c in group])
        out.append({"setting": setting, "method": method, "cache": cache,
                    "seeds": " ".join(str(c["seed"]) for c in group),
                    "r@10": float(r10.mean()), "best_baseline_r@10": float(best.mean()),
                    "removed_mean": float(removed_t.mean()),
                    "removed_sd": float(removed_t.std(ddof=1)) if len(group) > 1 else None,
                    "removed_per_seed": " / ".join(f"{v:.3f}" for v in removed_t)})
    return out


def report(directory=None, markdown=False):
    rows = load(directory)
    if not rows:
        print("no runs in", directory or RESULTS)
        return []
    rows.sort(key=lambda r: (r["setting"], r["seed"], METHODS.index(r["method"]),
                             r.get("cache_size") or 0))
    print(_table(rows))
    comparison = compare(rows)
    print()
    print(_common.table(comparison, ["setting", "seed", "method", "cache", "r@10",
                                     "best_baseline", "best_r@10", "removed_equal_time",
                                     "equal_steps", "r@10_equal_steps", "best_r@10_equal_steps",
                                     "removed_equal_steps", "best_r@10_interp_at_cache_steps"]))
    seeds = _seed_summary(comparison)
    print()
    print(_common.table(seeds, list(seeds[0]) if seeds else []))
    if markdown:
        flat = _flat(rows)
        print("\n" + _markdown(flat, list(flat[0])))
        print("\n" + _markdown(comparison, list(comparison[0])) if comparison else "")
        print("\n" + _markdown(seeds, list(seeds[0])) if seeds else "")
    summary = {"comparison": comparison, "seeds": seeds, "target": TARGET}
    with open(os.path.join(directory or RESULTS, "summary.json"), "w",
              encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=float)
    _plot(rows, directory or RESULTS)
    return comparison


def _plot(rows, directory):
    plt = _common.pyplot()
    for setting in sorted({r["setting"] for r in rows}):
        mine = [r for r in rows if r["setting"] == setting and r["seed"] == 0] or \
            [r for r in rows if r["setting"] == setting]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for r in mine:
            label = r["method"] + (f" 2^{int(np.log2(r['cache_size']))}"
                                   if r.get("cache_size") else "")
            style = "o-" if r["method"] in CACHES else "s--"
            for ax, x, k in ((axes[0], "seconds", "recall@10"), (axes[1], "steps", "recall@10"),
                             (axes[2], "seconds", "recall@100")):
                ax.plot([p[x] for p in r["curve"]], [p[k] for p in r["curve"]], style,
                        label=label)
        for ax, x, k in ((axes[0], "training seconds", "recall@10"),
                         (axes[1], "training steps", "recall@10"),
                         (axes[2], "training seconds", "recall@100")):
            ax.set_xlabel(x)
            ax.set_ylabel(f"held-out {k}")
            ax.set_title(f"{setting}, N = {mine[0]['num_items']}")
        axes[1].set_xscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(directory, f"{setting}.png")
        fig.savefig(path)
        plt.close(fig)
        print("wrote", path)


if __name__ == "__main__":
    main()
