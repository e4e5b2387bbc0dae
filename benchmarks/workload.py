"""A synthetic retrieval workload where the negatives matter, its towers, and four baselines.

Generator (`make_workload`). Items live in a three-level hierarchy of a `latent_dim`-dimensional
latent space: `num_coarse` coarse clusters, each split into `fine_per_coarse` fine clusters of
`fine_size` items (so `N = num_coarse * fine_per_coarse * fine_size`). Item `i`'s latent point is

    z_i = u_coarse(i) + fine_scale * v_fine(i) + item_scale * e_i,

with `u`, `v`, `e` independent standard normal vectors divided by `sqrt(latent_dim)` (unit
expected norm). Items are assigned to clusters by a seeded random permutation, so an item's id
says nothing about its cluster. An item's features are `x_i = z_i` (float32; the candidate
tower reads them, plus an optional item-id embedding). Popularity is Zipf-like,
`p ∝ 1 / rank^popularity_exponent` over a random ranking.

Queries. A query's target `t` is drawn by popularity and its positive is exactly `t`; its
features are `q = z_t + query_noise * n` with `n` standard normal divided by `sqrt(latent_dim)`:
item-specific evidence (the item offset `e_t` is in it) blurred by noise of the same order as
the item offsets, so the posterior of the target spreads over the target's fine-cluster mates.
The Bayes-optimal score of item `i` for query `q` is
`log p_i - ||q - z_i||^2 / (2 query_noise^2 / latent_dim)`, which is a dot product of
`[q, 1]` with `[z_i / s^2, log p_i - ||z_i||^2 / (2 s^2)]` (`s^2 = query_noise^2 / latent_dim`):
dot-product towers can represent it (`oracle_scores`).

Fine clusters are small (`fine_size` items against `N`), so a batch of `B` popularity-drawn
positives rarely holds a fine-cluster mate of a given positive (`same_fine_cluster_rate`), while
the exact full softmax sees every mate at every step.

Determinism: the item table is a function of `seed`; query `i` of a split is a function of
`(seed, split, i)` only (a `SeedSequence` keyed by the index block), so the train and test
streams are disjoint and any slice is reproducible. Memory at `N = 2^20`, `latent_dim = 32`:
128 MiB of float32 features; building takes about a second.

Towers (`Towers`): both are MLPs with `layers` hidden ReLU layers of width `hidden` and a linear
output of width `dim` (Glorot-uniform kernels, zero biases, tf-keras defaults). The candidate
tower reads `x_i` (and, with `id_dim > 0`, the concatenation of `x_i` with a trainable
`id_dim`-wide embedding of the item id, uniform(-0.05, 0.05) initialised); the query tower reads
`q`. Scores are plain, unnormalised dot products `f(q) . g(i) / temperature`.

Methods (`train`), all on the same stream of fresh training queries (batch `s` is queries
`[s B, (s + 1) B)`; none repeats) with the same towers and optimizer:

- `inbatch`: softmax cross-entropy over the batch's positives (accidental hits, a negative
  column with the same id as the row's positive, are masked out);
- `inbatch+logq`: the same with `logit_j -= log Q_j`, `Q_j = p_j` the probability that one
  in-batch slot holds item `j` (the query stream's popularity), on every column, as
  `tfrs.tasks.Retrieval(candidate_sampling_probability=...)` applies it;
- `mns+logq`: mixed negative sampling (Yang et al., WWW 2020): the batch's positives plus
  `mns_negatives` items drawn uniformly from the corpus each step and encoded fresh, logQ by
  the mixture `Q_j = (B p_j + B' / N) / (B + B')`;
- `full`: every item through the candidate tower each step, softmax over the whole corpus.
"""

import dataclasses
import time
from typing import Dict, Optional

import numpy as np

from benchmarks import _common

METHODS = ("inbatch", "inbatch+logq", "mns+logq", "full")
_ITEM_STREAM, _SPLIT_STREAM, _MNS_STREAM = 0, {"train": 1, "test": 2}, 3
_BLOCK = 256  # queries per SeedSequence block of a split stream


@dataclasses.dataclass(eq=False)
class Workload:
    """The item table of a hierarchical-latent workload; build it with `make_workload`."""

    num_coarse: int
    fine_per_coarse: int
    fine_size: int
    latent_dim: int
    fine_scale: float
    item_scale: float
    query_noise: float
    popularity_exponent: float
    item_visible: float
    seed: int
    features: np.ndarray = dataclasses.field(repr=False)       # [N, latent_dim] float32
    latent: np.ndarray = dataclasses.field(repr=False)         # [N, latent_dim] float32, z_i
    fine_cluster: np.ndarray = dataclasses.field(repr=False)   # [N] int32
    coarse_cluster: np.ndarray = dataclasses.field(repr=False)  # [N] int32
    popularity: np.ndarray = dataclasses.field(repr=False)     # [N] float64, sums to 1

    @property
    def num_items(self) -> int:
        return self.features.shape[0]

    def _cumulative(self) -> np.ndarray:
        """The popularity CDF (cached), last entry forced to 1 against rounding."""
        if getattr(self, "_cdf", None) is None:
            self._cdf = np.cumsum(self.popularity)
            self._cdf[-1] = 1.0
        return self._cdf

    def config(self) -> Dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}

    def queries(self, num: int, split: str = "train", start: int = 0) -> Dict[str, np.ndarray]:
        """Queries `start .. start + num - 1` of a split: `query` `[n, latent_dim]` float32,
        `item_id` `[n]` int64 (the positive). Query `i` does not depend on the slice."""
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be one of {tuple(_SPLIT_STREAM)}, got {split!r}")
        if num < 0 or start < 0:
            raise ValueError(f"num and start must be >= 0, got {num}, {start}")
        first, last = start // _BLOCK, -(-(start + num) // _BLOCK)
        ids, queries = [], []
        cumulative = self._cumulative()
        for block in range(first, last):
            rng = np.random.default_rng([self.seed, _SPLIT_STREAM[split], block])
            target = np.searchsorted(cumulative, rng.random(_BLOCK), side="right")
            target = np.minimum(target, self.num_items - 1)
            noise = rng.standard_normal((_BLOCK, self.latent_dim)) / np.sqrt(self.latent_dim)
            ids.append(target)
            queries.append(self.latent[target] + self.query_noise * noise)
        lo = start - first * _BLOCK
        return {"query": np.concatenate(queries)[lo:lo + num].astype(np.float32),
                "item_id": np.concatenate(ids)[lo:lo + num].astype(np.int64)}

    def oracle_scores(self, query: np.ndarray) -> np.ndarray:
        """The Bayes-optimal log posterior (up to a per-query constant), `[n, N]`."""
        s2 = self.query_noise ** 2 / self.latent_dim
        z = self.latent.astype(np.float64)
        bias = np.log(self.popularity) - 0.5 * (z * z).sum(1) / s2
        return query.astype(np.float64) @ z.T / s2 + bias

    def same_fine_cluster_rate(self, batch: int) -> float:
        """The chance that at least one of a positive's `batch - 1` in-batch negatives (drawn by
        popularity) shares its fine cluster, averaged over positives drawn by popularity."""
        mass = np.bincount(self.fine_cluster, weights=self.popularity)
        others = mass[self.fine_cluster] - self.popularity
        return float(np.sum(self.popularity * (1.0 - (1.0 - others) ** (batch - 1))))


def make_workload(num_coarse=64, fine_per_coarse=64, fine_size=16, latent_dim=32,
                  fine_scale=0.5, item_scale=0.25, query_noise=0.25,
                  popularity_exponent=0.8, item_visible=1.0, seed=0) -> Workload:
    """Builds a workload (see the module docstring); `N = num_coarse * fine_per_coarse *
    fine_size` items (the defaults: 2^16)."""
    for name, value in [("num_coarse", num_coarse), ("fine_per_coarse", fine_per_coarse),
                        ("fine_size", fine_size), ("latent_dim", latent_dim)]:
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    for name, value in [("fine_scale", fine_scale), ("item_scale", item_scale),
                        ("query_noise", query_noise), ("popularity_exponent", popularity_exponent),
                        ("item_visible", item_visible), ("seed", seed)]:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    rng = np.random.default_rng([seed, _ITEM_STREAM])
    num_fine = num_coarse * fine_per_coarse
    n = num_fine * fine_size
    scale = np.float32(1.0 / np.sqrt(latent_dim))  # float32: a float64 scalar would upcast
    coarse_centres = rng.standard_normal((num_coarse, latent_dim), dtype=np.float32) * scale
    fine_offsets = rng.standard_normal((num_fine, latent_dim), dtype=np.float32) * scale
    fine = (rng.permutation(n) // fine_size).astype(np.int32)
    coarse = fine // np.int32(fine_per_coarse)
    clusters = coarse_centres[coarse]
    clusters += np.float32(fine_scale) * fine_offsets[fine]
    items = np.float32(item_scale * scale) * rng.standard_normal((n, latent_dim),
                                                                 dtype=np.float32)
    latent = (clusters + items).astype(np.float32, copy=False)
    features = latent if item_visible == 1 else (
        clusters + np.float32(item_visible) * items).astype(np.float32, copy=False)
    ranks = rng.permutation(n).astype(np.float64) + 1.0
    popularity = ranks ** -popularity_exponent
    popularity /= popularity.sum()
    return Workload(num_coarse, fine_per_coarse, fine_size, latent_dim, fine_scale, item_scale,
                    query_noise, popularity_exponent, item_visible, seed, features, latent, fine,
                    coarse, popularity)


def sampling_probability(workload: Workload, method: str, batch: int,
                         mns_negatives: int = 0) -> Optional[np.ndarray]:
    """`[N]` the logQ probabilities of `method` (None for `inbatch` and `full`): the probability
    that one negative slot holds each item. Each sums to 1 over the corpus."""
    if method == "inbatch+logq":
        return workload.popularity
    if method == "mns+logq":
        uniform = 1.0 / workload.num_items
        return (batch * workload.popularity + mns_negatives * uniform) / (batch + mns_negatives)
    return None


# ---------------------------------------------------------------------------------------------
# The command line of a workload experiment: make_workload's parameters, with configuration A
# of docs/workload.md at 2^16 items as their defaults, then the towers' and the training's.
# name -> (type, default, help).

FLAGS = {
    "num_coarse": (int, 64, None),
    "fine_per_coarse": (int, 64, None),
    "fine_size": (int, 16, None),
    "latent_dim": (int, 32, None),
    "fine_scale": (float, 0.5, None),
    "item_scale": (float, 0.25, None),
    "query_noise": (float, 0.75, None),
    "popularity_exponent": (float, 0.8, None),
    "item_visible": (float, 1.0,
                     "share of the item offset in the item features (0: only via id embedding)"),
    "hidden": (int, 128, None),
    "layers": (int, 1, None),
    "dim": (int, 64, None),
    "id_dim": (int, 0, "item-id embedding width (0: none)"),
    "batch": (int, 256, None),
    "mns_negatives": (int, 256, "B', MNS uniform negatives"),
    "learning_rate": (float, 1e-3, None),
    "temperature": (float, 1.0, None),
}
WORKLOAD_PARAMETERS = ("num_coarse", "fine_per_coarse", "fine_size", "latent_dim", "fine_scale",
                       "item_scale", "query_noise", "popularity_exponent", "item_visible")


def add_workload_args(parser, names=tuple(FLAGS), **defaults):
    """Adds the flags `names` of `FLAGS` to `parser` in that order (`--num-coarse` for
    `num_coarse`); `defaults` replaces some of their defaults."""
    unknown = set(defaults) - set(names)
    if unknown:
        raise ValueError(f"defaults for flags not added: {sorted(unknown)}")
    for name in names:
        kind, default, text = FLAGS[name]
        parser.add_argument("--" + name.replace("_", "-"), type=kind,
                            default=defaults.get(name, default), help=text)


def workload_from_args(args, seed=None):
    """`make_workload` of the workload flags in `args` (make_workload's defaults for those
    not added) and of `seed`, by default `args.seed`."""
    kwargs = {name: getattr(args, name) for name in WORKLOAD_PARAMETERS if hasattr(args, name)}
    return make_workload(**kwargs, seed=args.seed if seed is None else seed)


# ---------------------------------------------------------------------------------------------
# TensorFlow: towers, losses, training, evaluation. Imported lazily (`_common.tf()`) so the
# generator is usable (and testable) without TensorFlow.

def _transformer(tf, latent_dim, dim, tokens=8, d_model=32, heads=2, key_dim=16, ffn=64,
                 blocks=1, name=None):
    """A small transformer encoder over a feature vector: the `latent_dim` floats viewed as
    `tokens` tokens, `Dense(d_model)` per token + a learned position embedding, `blocks`
    post-norm encoder blocks (self-attention, feed-forward `ffn`), mean pool, `Dense(dim)`."""
    if latent_dim % tokens:
        raise ValueError(f"latent_dim {latent_dim} is not a multiple of tokens {tokens}")
    layers = tf.keras.layers

    class Tower(tf.keras.Model):
        def __init__(self):
            super().__init__(name=name)
            self.embed = layers.Dense(d_model)
            self.blocks = [(layers.MultiHeadAttention(heads, key_dim), layers.LayerNormalization(),
                            layers.Dense(ffn, activation="relu"), layers.Dense(d_model),
                            layers.LayerNormalization()) for _ in range(blocks)]
            self.out = layers.Dense(dim)

        def build(self, input_shape):
            self.positions = self.add_weight(
                name="positions", shape=[tokens, d_model],
                initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05))
            super().build(input_shape)

        def call(self, features):
            x = tf.reshape(features, [-1, tokens, latent_dim // tokens])
            x = self.embed(x) + self.positions[None]
            for attention, norm1, hidden, project, norm2 in self.blocks:
                x = norm1(x + attention(x, x))
                x = norm2(x + project(hidden(x)))
            return self.out(tf.reduce_mean(x, axis=1))

    tower = Tower()
    tower(tf.zeros([1, latent_dim]))
    return tower


TOWER_ARCHS = ("mlp", "transformer")


def make_towers(workload: Workload, hidden=256, layers=2, dim=64, id_dim=0, seed=0,
                query_arch="mlp", candidate_arch="mlp", transformer=None):
    """`(query_tower, candidate_tower, variables)`; `candidate_tower(ids)` reads the item
    table itself (all items when `ids` is None).

    `query_arch`, `candidate_arch`: `"mlp"` (the workload's MLP, `hidden` x `layers`) or
    `"transformer"` (`_transformer`, with the keyword arguments in `transformer`). The
    candidate network itself is `candidate_tower.net` (it maps `[M, latent_dim]` features)."""
    tf = _common.tf()
    tf.keras.utils.set_random_seed(seed)
    for arch in (query_arch, candidate_arch):
        if arch not in TOWER_ARCHS:
            raise ValueError(f"tower arch must be one of {TOWER_ARCHS}, got {arch!r}")

    def mlp(name):
        stack = [tf.keras.layers.Dense(hidden, activation="relu") for _ in range(layers)]
        return tf.keras.Sequential(stack + [tf.keras.layers.Dense(dim)], name=name)

    def net(arch, name, width):
        if arch == "transformer":
            if id_dim and name == "candidate_tower":
                raise ValueError("the transformer candidate tower takes no id embedding")
            return _transformer(tf, width, dim, name=name, **(transformer or {}))
        model = mlp(name)
        model.build([None, width])
        return model

    query_mlp = net(query_arch, "query_tower", workload.latent_dim)
    item_mlp = net(candidate_arch, "candidate_tower", workload.latent_dim + id_dim)
    features = tf.constant(workload.features)
    id_table = None
    if id_dim:
        id_table = tf.keras.layers.Embedding(
            workload.num_items, id_dim,
            embeddings_initializer=tf.keras.initializers.RandomUniform(-0.05, 0.05),
            name="item_id_embedding")
        id_table.build([None])

    def candidate_tower(ids=None):
        x = features if ids is None else tf.gather(features, ids)
        if id_table is not None:
            x = tf.concat([x, id_table(tf.range(workload.num_items) if ids is None else ids)], 1)
        return item_mlp(x)

    candidate_tower.net = item_mlp
    candidate_tower.features = features
    variables = query_mlp.trainable_variables + item_mlp.trainable_variables
    if id_table is not None:
        variables += id_table.trainable_variables
    return query_mlp, candidate_tower, variables


def make_train_step(method, workload, query_tower, candidate_tower, variables, optimizer,
                    batch, mns_negatives=0, temperature=1.0):
    """A `tf.function(query, item_id, extra_ids) -> loss` for `method`. `extra_ids` are the MNS
    uniform negatives (ignored by the other methods)."""
    tf = _common.tf()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    q = sampling_probability(workload, method, batch, mns_negatives)
    log_q = None if q is None else tf.constant(np.log(q), tf.float32)
    _common.build_optimizer(optimizer, variables)

    @tf.function
    def step(query, item_id, extra_ids):
        with tf.GradientTape() as tape:
            queries = query_tower(query)
            if method == "full":
                logits = tf.matmul(queries, candidate_tower(), transpose_b=True) / temperature
                labels = item_id
            else:
                ids = item_id if method != "mns+logq" else tf.concat([item_id, extra_ids], 0)
                logits = tf.matmul(queries, candidate_tower(ids), transpose_b=True) / temperature
                if log_q is not None:
                    logits -= tf.gather(log_q, ids)[None, :]
                labels = tf.range(tf.shape(item_id)[0], dtype=tf.int64)
                # Accidental hits: a negative column holding the row's own positive item.
                hit = tf.equal(item_id[:, None], ids[None, :])
                own = tf.one_hot(labels, tf.shape(ids)[0], on_value=True, off_value=False)
                logits = tf.where(hit & ~own, tf.cast(-1e9, logits.dtype), logits)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=labels, logits=logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    return step


def evaluate(workload, query_tower, candidate_tower, test, ks=(10, 100), chunk=1024,
             item_chunk=None):
    """Recall@k of `test` queries over all items, by exact top-k.

    `item_chunk`: encode the items that many at a time (a large corpus or an expensive tower;
    None: all at once), and score `chunk` queries at a time against all of them (keep
    `chunk * N` floats in memory in mind)."""
    tf = _common.tf()
    if item_chunk is None:
        items = candidate_tower()
    else:
        encode = _chunk_encoder(candidate_tower)
        items = tf.concat([encode(tf.range(start, min(start + item_chunk, workload.num_items),
                                           dtype=tf.int64))
                           for start in range(0, workload.num_items, item_chunk)], 0)
    top = max(ks)
    found = []
    for start in range(0, len(test["item_id"]), chunk):
        queries = query_tower(tf.constant(test["query"][start:start + chunk]))
        _, idx = tf.math.top_k(tf.matmul(queries, items, transpose_b=True), top)
        found.append(idx.numpy() == test["item_id"][start:start + chunk, None])
    found = np.concatenate(found)
    return {f"recall@{k}": float(found[:, :k].any(1).mean()) for k in ks}


def _chunk_encoder(candidate_tower):
    """`candidate_tower(ids)` as one `tf.function` per tower (memoised on the tower)."""
    tf = _common.tf()
    if getattr(candidate_tower, "_chunk_encoder", None) is None:
        candidate_tower._chunk_encoder = tf.function(lambda ids: candidate_tower(ids))
    return candidate_tower._chunk_encoder


def oracle_recall(workload, test, ks=(10, 100), chunk=512):
    """Recall@k of the Bayes-optimal scorer: the ceiling of any method."""
    top = max(ks)
    found = []
    for start in range(0, len(test["item_id"]), chunk):
        scores = workload.oracle_scores(test["query"][start:start + chunk])
        idx = np.argpartition(-scores, top, axis=1)[:, :top]
        order = np.argsort(-np.take_along_axis(scores, idx, 1), axis=1)
        idx = np.take_along_axis(idx, order, 1)
        found.append(idx == test["item_id"][start:start + chunk, None])
    found = np.concatenate(found)
    return {f"recall@{k}": float(found[:, :k].any(1).mean()) for k in ks}


def train(method, workload, steps, test, batch=256, mns_negatives=256, learning_rate=1e-3,
          temperature=1.0, checkpoints=(), seed=0, log=None, **tower_args):
    """Trains `method` for `steps` steps; evaluates at each step count in `checkpoints` (and at
    the end). Returns `{"curve": [...], "ms_per_step": ..., "recall@10": ..., ...}`."""
    tf = _common.tf()
    query_tower, candidate_tower, variables = make_towers(workload, seed=seed, **tower_args)
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    step = make_train_step(method, workload, query_tower, candidate_tower, variables, optimizer,
                           batch, mns_negatives, temperature)
    pending = sorted(set(int(c) for c in checkpoints if 0 < c < steps) | {steps})
    curve, spent, loss = [], 0.0, float("nan")
    for s in range(steps):
        data = workload.queries(batch, "train", start=s * batch)
        rng = np.random.default_rng([workload.seed, _MNS_STREAM, seed, s])
        extra = rng.integers(0, workload.num_items, max(mns_negatives, 1))
        began = time.perf_counter()
        loss = float(step(tf.constant(data["query"]), tf.constant(data["item_id"]),
                          tf.constant(extra)))
        if s > 0:  # the first call traces
            spent += time.perf_counter() - began
        if not np.isfinite(loss):
            raise FloatingPointError(f"{method}: loss {loss} at step {s}")
        if pending and s + 1 == pending[0]:
            pending.pop(0)
            point = dict(steps=s + 1, loss=loss,
                         **evaluate(workload, query_tower, candidate_tower, test))
            curve.append(point)
            if log:
                log(f"  {method:13s} step {s + 1:6d} loss {loss:8.4f} "
                    f"r@10 {point['recall@10']:.4f} r@100 {point['recall@100']:.4f} "
                    f"({1e3 * spent / max(s, 1):.1f} ms/step)")
    final = curve[-1]
    return {"method": method, "steps": steps, "final_loss": loss,
            "ms_per_step": 1e3 * spent / max(steps - 1, 1), "curve": curve,
            "recall@10": final["recall@10"], "recall@100": final["recall@100"],
            "best_recall@10": max(p["recall@10"] for p in curve)}


def plateau(curve, tolerance=0.005, band=0.01):
    """Plateau evidence of a recall@10 curve.

    `gain_last_quarter`: the recall@10 gained over the last 25% of the steps, estimated as the
    least-squares slope through the checkpoints of the last half of the run times a quarter of
    the steps. (A single checkpoint is noisy: with 4000 held-out queries one recall@10 value
    has a binomial standard error of about 0.007, above the 0.005 tolerance, so differences of
    single points, and worse their maxima, would call a flat curve rising.)
    `raw_gain_last_quarter`: the last checkpoint minus the value at 75% of the steps
    (interpolated), for reference. `plateaued`: `gain_last_quarter < tolerance`.
    `plateau_level`: the mean of the checkpoints in the last quarter. `plateau_step`: the first
    checkpoint within `band` of that level.
    """
    steps = np.array([p["steps"] for p in curve], float)
    r10 = np.array([p["recall@10"] for p in curve])
    last = steps[-1]
    half = steps >= 0.5 * last
    if half.sum() >= 2:
        slope = float(np.polyfit(steps[half], r10[half], 1)[0])
    else:
        slope = float((r10[-1] - r10[0]) / max(last - steps[0], 1.0))
    gain = float(slope * 0.25 * last)
    raw = float(r10[-1] - np.interp(0.75 * last, steps, r10))
    level = float(r10[steps >= 0.75 * last].mean())
    plateau_step = int(steps[np.argmax(r10 >= level - band)])
    return {"gain_last_quarter": gain, "raw_gain_last_quarter": raw, "plateaued": bool(gain < tolerance),
            "plateau_level": level, "plateau_step": plateau_step}
