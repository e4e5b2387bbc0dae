"""The equal-time map along the tower-cost axis: where the negative cache starts to pay.

`rho` is the ratio of the towers' forward + backward cost per training example to the cost of
scoring one query against the cache (the `[d] x [d, N]` dot products, the `exp` and the sum).
Both are measured on this machine, in one process per setting, with one thread:

    rho = (in-batch train step at batch B) / (the cache's log-mass of B queries)

Each setting is a pair of towers on configuration A of docs/workload.md (N = 2^16 items in
fine clusters of 16) in one of two shapes: `dense` (the same kind of encoder on both sides, as
in dense retrieval) and `rec` (an expensive query encoder, the workload's MLP for the
candidate, the recommender shape). The encoders are post-norm transformers over the 32 latent
floats projected to `tokens` tokens (`TokenTransformer`). Methods: in-batch and in-batch +
logQ at B and 4B, MNS + logQ with B' = B and 4B uniform negatives, and the library's cache
(whole catalogue, warm-started, k = 1 and k = 4). docs/rho_map.md fixes every setting before
the runs.

Learning is measured in steps and time is measured apart (`--timing`): every run's recall@10
and @100 is evaluated at step counts, and a method's training seconds are its steps times its
step time from the timing pass of the same setting (plus the cache's warm start). So the runs
can share the machine with other work without their results depending on its load, and a
faster library only needs a new timing pass.

    python -m benchmarks.rho_map --timing --setting dense-128x2x32      # step times and rho
    python -m benchmarks.rho_map --train --setting dense-128x2x32 --seed 0 --method cache-k1
    python -m benchmarks.rho_map --report                               # tables and plots
    python -m benchmarks.rho_map --quick                                # smoke run, < 1 min

A training run writes its JSON after every evaluation and a checkpoint beside it; a run that
is stopped resumes from its last checkpoint. Results: `results/rho_map/`
(`TFNEGCACHE_RHO_MAP_DIR` overrides it).
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np

from benchmarks import _common
from benchmarks import workload as W

RESULTS = os.environ.get("TFNEGCACHE_RHO_MAP_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "rho_map")
# Training checkpoints (large; never committed): TFNEGCACHE_RHO_MAP_CKPT overrides it.
CHECKPOINTS = os.environ.get("TFNEGCACHE_RHO_MAP_CKPT") or os.path.join(RESULTS, "ckpt")
TARGET = 0.30


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A post-norm transformer encoder: `width`, `blocks`, `tokens` (4 heads, feed-forward
    4 x width); None in a setting means the workload's MLP (`Dense(128, relu)`, `Dense(64)`)."""

    width: int
    blocks: int
    tokens: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.blocks}x{self.tokens}"


def _settings():
    out = {"mlp": ("mlp", None, None)}
    for spec in [(32, 1, 8), (64, 2, 16), (128, 2, 32), (256, 2, 32)]:
        e = Encoder(*spec)
        out[f"dense-{e.label}"] = ("dense", e, e)
    for spec in [(64, 2, 16), (128, 2, 32), (256, 2, 32), (256, 4, 32)]:
        e = Encoder(*spec)
        out[f"rec-{e.label}"] = ("rec", e, None)
    return out


# setting -> (shape, query encoder, candidate encoder); None: the MLP.
SETTINGS = _settings()
BASELINES = ("inbatch", "inbatch-4b", "inbatch+logq", "inbatch+logq-4b", "mns+logq",
             "mns+logq-4b")
CACHES = ("cache-k1", "cache-k4")
METHODS = BASELINES + CACHES
TOKEN_WIDTH = 8   # floats per token of the fixed projection


def make_encoder(spec: Optional[Encoder], latent_dim: int, dim: int, name: str):
    """A Keras model `[M, latent_dim] -> [M, dim]`: the MLP for None, else a transformer.

    The transformer reads the latent floats through a fixed random projection to
    `tokens x TOKEN_WIDTH` floats (the same projection for both towers and every seed, like a
    tokenizer), then `Dense(width)` per token plus a learned position embedding, `blocks`
    post-norm blocks (self-attention with 4 heads of `width / 4`, residual, LayerNorm;
    `Dense(4 width, relu)`, `Dense(width)`, residual, LayerNorm), a mean over tokens and
    `Dense(dim)`.
    """
    tf = _common.tf()
    layers = tf.keras.layers
    if spec is None:
        model = tf.keras.Sequential([layers.Dense(128, activation="relu"), layers.Dense(dim)],
                                    name=name)
        model.build([None, latent_dim])
        return model
    rng = np.random.default_rng([latent_dim, spec.tokens, TOKEN_WIDTH])
    projection = tf.constant((rng.standard_normal((latent_dim, spec.tokens * TOKEN_WIDTH))
                              / np.sqrt(latent_dim)).astype(np.float32))

    class Transformer(tf.keras.Model):
        def __init__(self):
            super().__init__(name=name)
            self.embed = layers.Dense(spec.width)
            self.stack = [(layers.MultiHeadAttention(4, spec.width // 4),
                           layers.LayerNormalization(),
                           layers.Dense(4 * spec.width, activation="relu"),
                           layers.Dense(spec.width), layers.LayerNormalization())
                          for _ in range(spec.blocks)]
            self.out = layers.Dense(dim)

        def build(self, input_shape):
            self.positions = self.add_weight(
                name="positions", shape=[spec.tokens, spec.width],
                initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05))
            super().build(input_shape)

        def call(self, features):
            x = tf.reshape(tf.matmul(features, projection), [-1, spec.tokens, TOKEN_WIDTH])
            x = self.embed(x) + self.positions[None]
            for attention, norm1, hidden, project, norm2 in self.stack:
                x = norm1(x + attention(x, x))
                x = norm2(x + project(hidden(x)))
            return self.out(tf.reduce_mean(x, axis=1))

    model = Transformer()
    model(tf.zeros([1, latent_dim]))
    return model


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--timing", action="store_true", help="step times and rho of a setting")
    mode.add_argument("--train", action="store_true", help="one (setting, seed, method) run")
    mode.add_argument("--report", action="store_true", help="tables and plots of the results")
    mode.add_argument("--quick", action="store_true", help="smoke run on a tiny corpus")
    p.add_argument("--setting", choices=sorted(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="--timing: the methods to time")
    p.add_argument("--log2-items", type=int, default=16, help="corpus size 2^n (even n)")
    p.add_argument("--log2-cache", type=int, default=None,
                   help="cache size 2^n (default: the whole catalogue)")
    p.add_argument("--batch", type=int, default=64, help="B")
    p.add_argument("--seconds", type=float, default=None,
                   help="training seconds per method (default: the setting's budget)")
    p.add_argument("--time-points", type=int, default=5,
                   help="evaluations at seconds / 2^j, j < time-points")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--num-test", type=int, default=2000)
    p.add_argument("--timing-steps", type=int, default=15)
    p.add_argument("--tag", default="", help="suffix of the result names")
    return p


# Training seconds per method (the cap), by setting: fixed in docs/rho_map.md before the runs.
BUDGET = {"mlp": 300.0, "dense-32x1x8": 300.0, "dense-64x2x16": 300.0, "rec-64x2x16": 300.0,
          "rec-128x2x32": 600.0}
DEFAULT_BUDGET = 1800.0
DIM = 64


@dataclasses.dataclass
class Config:
    setting: str
    seed: int
    batch: int
    log2_items: int
    log2_cache: int
    learning_rate: float
    num_test: int

    @property
    def shape(self):
        return SETTINGS[self.setting][0]

    def name(self, method: Optional[str] = None) -> str:
        base = f"{self.setting}_n{self.log2_items}"
        if self.log2_cache != self.log2_items:
            base += f"_c{self.log2_cache}"
        base += f"_b{self.batch}"
        return base if method is None else f"{base}_s{self.seed}_{method}"


def make_corpus(log2_items: int, seed: int):
    """Configuration A of docs/workload.md with `2^log2_items` items (fine clusters of 16)."""
    side = 2 ** ((log2_items - 4) // 2)
    return W.make_workload(num_coarse=side, fine_per_coarse=2 ** (log2_items - 4) // side,
                           fine_size=16, query_noise=0.75, item_scale=0.25, seed=seed)


class Method:
    """One method's towers, optimizer and train step; `step(s)` trains on batch s."""

    def __init__(self, method: str, corpus, config: Config):
        tf = _common.tf()
        self.method, self.corpus, self.config = method, corpus, config
        tf.keras.utils.set_random_seed(config.seed)
        _, query_spec, candidate_spec = SETTINGS[config.setting]
        self.query_tower = make_encoder(query_spec, corpus.latent_dim, DIM, "query_tower")
        self.candidate_net = make_encoder(candidate_spec, corpus.latent_dim, DIM,
                                          "candidate_tower")
        self.features = tf.constant(corpus.features)
        self.optimizer = tf.keras.optimizers.Adam(config.learning_rate)
        self.batch = 4 * config.batch if method in ("inbatch-4b", "inbatch+logq-4b") \
            else config.batch
        self.mns_negatives = {"mns+logq": config.batch, "mns+logq-4b": 4 * config.batch}.get(
            method, 0)
        if method in CACHES:
            self._build_cache(int(method[len("cache-k"):]))
        else:
            self._build_baseline(method.replace("-4b", ""))

    # -- baselines: the plain TF train steps of benchmarks.workload
    def _build_baseline(self, base):
        tf = _common.tf()
        net, features = self.candidate_net, self.features
        candidate_tower = lambda ids=None: net(features if ids is None  # noqa: E731
                                               else tf.gather(features, ids))
        self.variables = self.query_tower.trainable_variables + net.trainable_variables
        self._step = W.make_train_step(base, self.corpus, self.query_tower, candidate_tower,
                                       self.variables, self.optimizer, self.batch,
                                       self.mns_negatives)
        self.model = None

    # -- the library's cache
    def _build_cache(self, k):
        tf = _common.tf()
        import tfnegcache
        net, features, query_tower = self.candidate_net, self.features, self.query_tower
        size = 2 ** self.config.log2_cache
        cache = tfnegcache.NegativeCache(
            size, {"x": tf.TensorSpec([self.corpus.latent_dim], tf.float32)}, DIM,
            id_dtype=tf.int64, seed=self.config.seed)
        encode = lambda f: net(f["x"])  # noqa: E731
        task = tfnegcache.CacheRetrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE),
            remove_accidental_hits=True, cache=cache, candidate_model=encode,
            num_negatives=k)

        class Model(tfnegcache.CachedRetrievalModel):
            def __init__(self):
                super().__init__()
                self.query_tower, self.candidate_net, self.task = query_tower, net, task

            def compute_loss(self, inputs, training=False):
                ids = inputs["item_id"]
                x = tf.gather(features, ids)
                return self.task(query_tower(inputs["query"]), encode({"x": x}),
                                 candidate_ids=ids, candidate_features={"x": x},
                                 compute_metrics=False, compute_batch_metrics=False)

        self.model = Model()
        self.model.compile(optimizer=self.optimizer)
        _common.build_optimizer(self.optimizer, self.model.trainable_variables)
        self.cache, self.task, self.encode = cache, task, encode
        self._train_step = tf.function(self.model.train_step)
        self.variables = self.model.trainable_variables

    def warm_start(self, limit: Optional[int] = None) -> float:
        """The cache's warm start (the catalogue, or a seeded random subset of cache-size
        items, encoded by the current towers); returns its process CPU seconds. `limit`: only
        the first `limit` items (the timing pass traces with one batch first)."""
        if self.model is None:
            return 0.0
        tf = _common.tf()
        n, size = self.corpus.num_items, self.cache.size
        rng = np.random.default_rng([self.config.seed, 77])
        items = np.arange(n) if size >= n else np.sort(rng.choice(n, size, replace=False))
        items = items[:limit]
        began = time.process_time()
        dataset = tf.data.Dataset.from_tensor_slices(
            {"x": self.corpus.features[items], "id": items.astype(np.int64)})
        self.cache.warm_start(dataset, self.encode, id_key="id", batch_size=1024)
        return time.process_time() - began

    def batch_data(self, s: int):
        tf = _common.tf()
        data = self.corpus.queries(self.batch, "train", start=s * self.batch)
        rng = np.random.default_rng([self.corpus.seed, W._MNS_STREAM, self.config.seed, s])
        extra = rng.integers(0, self.corpus.num_items, max(self.mns_negatives, 1))
        return tf.constant(data["query"]), tf.constant(data["item_id"]), tf.constant(extra)

    def step(self, data) -> float:
        query, item_id, extra = data
        if self.model is None:
            return float(self._step(query, item_id, extra))
        return float(self._train_step({"query": query, "item_id": item_id})["loss"])

    def checkpoint(self, step_variable):
        tf = _common.tf()
        if self.model is not None:
            return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                       step=step_variable)
        return tf.train.Checkpoint(query=self.query_tower, candidate=self.candidate_net,
                                   optimizer=self.optimizer, step=step_variable)

    def evaluate(self, test) -> Dict[str, float]:
        """Recall@10 and @100 of `test` over every item (exact top-k, items encoded 1024 at
        a time)."""
        tf = _common.tf()
        if getattr(self, "_items", None) is None:
            net, features = self.candidate_net, self.features

            def items(ids=None):
                return net(tf.gather(features, ids))

            items._chunk_encoder = tf.function(items)   # what W.evaluate calls per chunk
            self._items = items
        return W.evaluate(self.corpus, self.query_tower, self._items, test, chunk=500,
                          item_chunk=1024)


def _threads():
    tf = _common.tf()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _config(args) -> Config:
    return Config(args.setting, args.seed, args.batch, args.log2_items,
                  args.log2_cache if args.log2_cache is not None else args.log2_items,
                  args.learning_rate, args.num_test)


def _cpu_times(fn, steps, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        began = time.process_time()
        fn()
        times.append(time.process_time() - began)
    return times


def timing(args, log=print):
    """Step time of every method and rho of the setting, one process, one thread."""
    tf = _common.tf()
    from tfnegcache import sampling
    config = _config(args)
    corpus = make_corpus(config.log2_items, 0)
    out = {"setting": config.setting, "config": dataclasses.asdict(config), "methods": {},
           "machine": _common.machine()}
    for method in args.methods:
        tf.keras.backend.clear_session()
        runner = Method(method, corpus, config)
        runner.warm_start(limit=1024)    # traces the encoder and the insert
        setup = runner.warm_start()
        data = runner.batch_data(0)
        times = _cpu_times(lambda: runner.step(data), args.timing_steps)
        out["methods"][method] = {"step_ms": 1e3 * float(np.median(times)),
                                  "step_ms_min": 1e3 * float(np.min(times)),
                                  "warm_start_s": setup}
        log(f"  {config.setting} {method:16s} {out['methods'][method]['step_ms']:8.1f} ms/step"
            + (f", warm start {setup:.1f} s" if setup else ""))
    # The scoring of one step: the library's log-mass of B queries against the cache.
    size = 2 ** config.log2_cache
    queries = tf.random.stateless_normal([config.batch, DIM], [1, 2])
    embeddings = tf.Variable(tf.random.stateless_normal([size, DIM], [3, 4]) * 0.1)
    bias = tf.zeros([size])
    plan = sampling.plan_sampler(size, DIM, config.batch)
    score = tf.function(lambda: sampling.sample_cache(queries, embeddings, bias, 1.0, 1, None,
                                                      plan=plan).log_mass)
    scoring_ms = 1e3 * float(np.median(_cpu_times(lambda: score().numpy(), 20)))
    inbatch = out["methods"].get("inbatch", {}).get("step_ms")
    out["scoring_ms"] = scoring_ms
    out["rho"] = inbatch / scoring_ms if inbatch else None
    log(f"  {config.setting}: scoring {scoring_ms:.1f} ms per step of B = {config.batch}, "
        f"rho = {out['rho']}")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"timing_{config.name()}{args.tag}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {path}")
    return out


def load_timing(config: Config, tag: str = "") -> dict:
    path = os.path.join(RESULTS, f"timing_{config.name()}{tag}.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def step_marks(seconds: float, step_ms: float, setup_s: float, points: int) -> List[int]:
    """The step counts at which a method's training time reaches `seconds / 2^j`."""
    marks = []
    for j in reversed(range(points)):
        budget = seconds / 2 ** j - setup_s
        marks.append(max(1, int(budget * 1e3 / step_ms)))
    return sorted(set(marks))


def train(args, log=print, stop_after_marks=None):
    """One (setting, seed, method) run to the setting's budget, resumable.

    The JSON is written at every evaluation, then the checkpoint, so the checkpoint's step is
    never past the JSON's last point: a stopped run restores it, drops later points and goes
    on (the data, the MNS draws and the cache's draws are functions of the step, so it
    continues exactly). `stop_after_marks` stops after that many evaluations (tests)."""
    tf = _common.tf()
    config = _config(args)
    seconds = args.seconds or BUDGET.get(config.setting, DEFAULT_BUDGET)
    timed = load_timing(config, args.tag)["methods"][args.method]
    marks = step_marks(seconds, timed["step_ms"], timed["warm_start_s"], args.time_points)
    os.makedirs(RESULTS, exist_ok=True)
    name = config.name(args.method) + args.tag
    path = os.path.join(RESULTS, name + ".json")
    row = {"setting": config.setting, "shape": config.shape, "seed": config.seed,
           "method": args.method, "config": dataclasses.asdict(config), "seconds": seconds,
           "timing": timed, "marks": marks, "curve": [], "complete": False}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("complete") and previous.get("marks") == marks:
            log(f"{name}: complete")
            return previous
        if previous.get("marks") == marks:
            row["curve"] = previous["curve"]
    corpus = make_corpus(config.log2_items, config.seed)
    test = corpus.queries(config.num_test, "test")
    runner = Method(args.method, corpus, config)
    step = tf.Variable(0, dtype=tf.int64)
    checkpoint = runner.checkpoint(step)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(CHECKPOINTS, name),
                                         max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        if runner.model is not None:
            runner.cache.rebuild_index()
        log(f"{name}: resumed at step {int(step.numpy())}")
        row["curve"] = [p for p in row["curve"] if p["steps"] <= int(step.numpy())]
    else:
        row["curve"] = []
        runner.warm_start()
    began = time.process_time()
    wall = time.perf_counter()
    loss = float("nan")
    while int(step.numpy()) < marks[-1]:
        s = int(step.numpy())
        loss = runner.step(runner.batch_data(s))
        step.assign_add(1)
        if not np.isfinite(loss):
            row["diverged_at"] = s
            log(f"{name}: loss {loss} at step {s}")
            break
        if s + 1 in marks:
            e0 = time.perf_counter()
            point = {"steps": s + 1, "loss": loss, **runner.evaluate(test),
                     "eval_seconds": time.perf_counter() - e0}
            if runner.model is not None:
                point["cache_staleness"] = float(runner.task.staleness.result())
            row["curve"].append(point)
            row["cpu_seconds_this_process"] = time.process_time() - began
            row["wall_seconds_this_process"] = time.perf_counter() - wall
            row["machine"] = _common.machine()
            row["complete"] = s + 1 == marks[-1]
            with open(path, "w", encoding="utf-8") as f:
                json.dump(row, f, indent=1)
            manager.save()
            log(f"  {name} step {s + 1:6d} loss {loss:8.4f} r@10 {point['recall@10']:.4f} "
                f"r@100 {point['recall@100']:.4f}")
            if stop_after_marks is not None and len(row["curve"]) >= stop_after_marks:
                break
    if row.get("diverged_at") is not None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1)
    return row


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.report:
        return report()
    if args.quick:
        return quick(args)
    if args.setting is None:
        raise SystemExit("--setting is required")
    if args.timing:
        _threads()
        return timing(args)
    if args.method is None:
        raise SystemExit("--train needs --method")
    _threads()
    return train(args)


def quick(args, log=print):
    """Every step of the map on a 2^10-item corpus: a timing pass, each of `args.methods`
    (`--methods`, every method by default) for 1.5 s of training, the report (about a minute)."""
    args.setting, args.log2_items, args.num_test, args.timing_steps = "dense-32x1x8", 10, 200, 3
    args.seconds, args.tag = 1.5, "_quick"
    _threads()
    timing(args, log)
    for method in args.methods:
        args.method = method
        train(args, log)
    return report(log)


# ------------------------------------------------------------------------------ the report

def removed(cache_r10: float, baseline_r10: float) -> float:
    """The share of the baseline's misses (1 - recall@10) the cache removes."""
    return 1.0 - (1.0 - cache_r10) / (1.0 - baseline_r10)


def recall_at_steps(curve: List[dict], steps: float, key: str = "recall@10"):
    """`key` at `steps`, linear in log(steps) between evaluated points; None beyond them."""
    xs = np.array([p["steps"] for p in curve], float)
    if not len(xs) or steps < xs[0] * (1 - 1e-9) or steps > xs[-1] * (1 + 1e-9):
        return None
    return float(np.interp(np.log(steps), np.log(xs), [p[key] for p in curve]))


def _load(pattern):
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def compare(runs: List[dict], timings: Dict[str, dict]) -> List[dict]:
    """Per (run group, seed, time mark): the best baseline and the better cache at equal
    training time, with the times from the group's current timing pass."""
    groups = {}
    for r in runs:
        groups.setdefault((Config(**r["config"]).name(), r["seed"]), {})[r["method"]] = r
    # Baselines use no cache: a group with another cache size on the same corpus shares them.
    def corpus(name):
        return tuple(part for part in name.split("_") if not part.startswith("c"))
    for (group, seed), methods in groups.items():
        for (other, other_seed), theirs in groups.items():
            if other_seed == seed and other != group and corpus(other) == corpus(group):
                for method, r in theirs.items():
                    if method in BASELINES:
                        methods.setdefault(method, r)
    out = []
    for (group, seed), methods in sorted(groups.items()):
        timed = timings.get(group)
        if timed is None:
            continue
        any_run = next(iter(methods.values()))
        # Every run's marks (runs of one group may have different budgets).
        marks = sorted({r["seconds"] / 2 ** j for r in methods.values()
                        for j in range(len(r["marks"]))})
        longest = max(marks)
        for mark in marks:
            at = {}
            clamped = []
            for method, r in methods.items():
                t = timed["methods"].get(method)
                if t is None or not r["curve"]:
                    continue
                # As `step_marks` counts them: the whole steps done by the mark.
                steps = max(1, int((mark - t["warm_start_s"]) * 1e3 / t["step_ms"]))
                value = recall_at_steps(r["curve"], steps)
                if (value is None and r.get("complete") and r["seconds"] >= mark * (1 - 1e-9)
                        and steps > r["curve"][-1]["steps"]):
                    # Timed faster than when it ran: its last point, which understates it.
                    value = r["curve"][-1]["recall@10"]
                    clamped.append(method)
                if value is not None:
                    at[method] = (value, steps)
            base = {m: v for m, v in at.items() if m in BASELINES}
            cache = {m: v for m, v in at.items() if m in CACHES}
            if not base or not cache:
                continue
            best = max(base, key=lambda m: base[m][0])
            top = max(cache, key=lambda m: cache[m][0])
            row = {"group": group, "setting": any_run["setting"], "shape": any_run["shape"],
                   "seed": seed, "rho": timed.get("rho"), "seconds": mark,
                   "fraction": mark / longest, "best_baseline": best,
                   "baseline_r@10": base[best][0], "cache": top, "cache_r@10": cache[top][0],
                   "removed": removed(cache[top][0], base[best][0]),
                   "baselines_run": sorted(base), "caches_run": sorted(cache),
                   "clamped": clamped}
            for m, (value, steps) in at.items():
                row[f"{m}_r@10"] = value
                row[f"{m}_steps"] = steps
            for m in cache:
                row[f"removed_{m}"] = removed(cache[m][0], base[best][0])
            out.append(row)
    return out


def per_step(runs: List[dict], steps=(500, 2000)) -> List[dict]:
    """recall@10 of each run at fixed step counts: how learning per step changes with the
    towers."""
    out = []
    for r in runs:
        row = {"group": Config(**r["config"]).name(), "seed": r["seed"], "method": r["method"]}
        for s in steps:
            row[f"r@10 at {s} steps"] = recall_at_steps(r["curve"], s)
        row["last steps"] = r["curve"][-1]["steps"] if r["curve"] else 0
        row["last r@10"] = r["curve"][-1]["recall@10"] if r["curve"] else None
        out.append(row)
    return out


def crossover(points: List[tuple]):
    """The rho where `removed` crosses 0, linear in log rho between neighbours (None if it
    does not cross; the first crossing from below)."""
    points = sorted(points)
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if v0 < 0 <= v1:
            return float(np.exp(np.log(r0) + (0 - v0) / (v1 - v0) * (np.log(r1) - np.log(r0))))
    return None


def summarise(comparison: List[dict]) -> List[dict]:
    """At each (group, seed)'s last compared mark (T when every method ran to T): mean and
    spread over seeds per group, and whether the best baseline had converged there (gained
    less than 0.01 recall@10 from the mark before, half the time)."""
    last = {}
    for c in comparison:
        key = (c["group"], c["seed"])
        if key not in last or c["seconds"] > last[key]["seconds"]:
            last[key] = c
    previous = {}
    for c in comparison:
        key = (c["group"], c["seed"])
        if abs(c["seconds"] - last[key]["seconds"] / 2) < 1e-6:
            previous[key] = c
    groups = {}
    for key, c in last.items():
        before = previous.get(key)
        c = dict(c, baseline_gain=(c["baseline_r@10"] - before["baseline_r@10"]
                                   if before else None))
        groups.setdefault(c["group"], []).append(c)
    out = []
    for group, rows in sorted(groups.items(), key=lambda kv: (kv[1][0]["shape"],
                                                              kv[1][0]["rho"] or 0)):
        values = np.array([c["removed"] for c in rows])
        out.append({"group": group, "shape": rows[0]["shape"], "rho": rows[0]["rho"],
                    "seeds": " ".join(str(c["seed"]) for c in rows),
                    "removed_mean": float(values.mean()),
                    "removed_sd": float(values.std(ddof=1)) if len(rows) > 1 else None,
                    "removed_per_seed": " / ".join(f"{v:+.3f}" for v in values),
                    "baseline_r@10": float(np.mean([c["baseline_r@10"] for c in rows])),
                    "best_baselines": " ".join(sorted({c["best_baseline"] for c in rows})),
                    "cache_r@10": float(np.mean([c["cache_r@10"] for c in rows])),
                    "caches": " ".join(sorted({c["cache"] for c in rows})),
                    "seconds": min(c["seconds"] for c in rows),
                    "baselines_run": " ".join(rows[0]["baselines_run"]),
                    "baseline_gain_last_doubling": " / ".join(
                        "-" if c["baseline_gain"] is None else f"{c['baseline_gain']:+.3f}"
                        for c in rows)})
    return out


def report(log=print):
    """Tables (text and markdown), `summary.json` and the plots, from the results dir."""
    timings = {Config(**t["config"]).name(): t for t in _load("timing_*.json")}
    runs = [r for r in _load("*_s*_*.json") if "curve" in r]
    comparison = compare(runs, timings)
    summary = summarise(comparison)
    steps = per_step(runs)
    columns = ["group", "shape", "rho", "seconds", "seeds", "removed_mean", "removed_sd",
               "removed_per_seed", "baseline_r@10", "best_baselines", "cache_r@10", "caches",
               "baseline_gain_last_doubling", "baselines_run"]
    log(_common.table(summary, columns))
    log("")
    log(_common.table(comparison, ["group", "seed", "rho", "seconds", "best_baseline",
                                   "baseline_r@10", "cache", "cache_r@10", "removed"]))
    log("")
    log(_common.table(steps, list(steps[0]) if steps else []))
    crossings = {}
    for shape in ("dense", "rec"):
        points = [(s["rho"], s["removed_mean"]) for s in summary
                  if s["shape"] in (shape, "mlp") and s["rho"]]
        crossings[shape] = crossover(points)
    log(f"crossover rho: {crossings}")
    payload = {"summary": summary, "comparison": comparison, "per_step": steps,
               "crossover": crossings, "target": TARGET,
               "timing": {k: {"rho": v.get("rho"), "scoring_ms": v.get("scoring_ms"),
                              "methods": v["methods"]} for k, v in timings.items()}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    if summary:
        _plot(summary, comparison, runs, timings, crossings)
    return payload


def _plot(summary, comparison, runs, timings, crossings):
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape, style in (("dense", "o-"), ("rec", "s--")):
        rows = sorted((s for s in summary if s["shape"] in (shape, "mlp") and s["rho"]),
                      key=lambda s: s["rho"])
        if not rows:
            continue
        xs = [s["rho"] for s in rows]
        ys = [100 * s["removed_mean"] for s in rows]
        errs = [100 * (s["removed_sd"] or 0) for s in rows]
        label = {"dense": "encoders on both sides (dense retrieval)",
                 "rec": "expensive query, MLP candidate (recommender)"}[shape]
        ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=label)
        if crossings.get(shape):
            ax.axvline(crossings[shape], ls=":", color=ax.lines[-1].get_color())
            ax.annotate(f"crossover rho = {crossings[shape]:.2g}", (crossings[shape], 0),
                        textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.axhline(0, color="gray", lw=0.8)
    ax.axhline(100 * TARGET, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("rho = towers' cost per example / scoring cost per query (measured)")
    ax.set_ylabel("misses removed at equal time vs best baseline (%)")
    ax.set_title("Negative cache (2^16, whole catalogue) at equal training time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(RESULTS, "rho_map.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print("wrote", path)
    # recall@10 against training seconds, one panel per group (seed 0)
    groups = sorted({Config(**r["config"]).name() for r in runs})
    cols = min(4, len(groups))
    rows_ = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.2 * rows_), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        timed = timings.get(group)
        for r in runs:
            if Config(**r["config"]).name() != group or r["seed"] != 0 or timed is None:
                continue
            t = timed["methods"].get(r["method"])
            if t is None or not r["curve"]:
                continue
            xs = [t["warm_start_s"] + p["steps"] * t["step_ms"] / 1e3 for p in r["curve"]]
            style = "o-" if r["method"] in CACHES else "s--"
            ax.plot(xs, [p["recall@10"] for p in r["curve"]], style, ms=3, label=r["method"])
        ax.set_xscale("log")
        ax.set_title(f"{group} (rho {timed['rho']:.2g})" if timed and timed.get("rho")
                     else group, fontsize=9)
        ax.set_xlabel("training seconds (timing pass)", fontsize=8)
        ax.set_ylabel("recall@10", fontsize=8)
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(RESULTS, "rho_map_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
