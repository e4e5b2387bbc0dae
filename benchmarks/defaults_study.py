"""Does the cache's default configuration train at least as well as
in-batch negatives on a workload whose towers move fast early?

The workload is configuration A of docs/workload.md (`make_workload(query_noise=0.75,
item_scale=0.25)`, N = 2^16 items in fine clusters of 16), with MLP towers
(`make_towers(hidden=128, layers=1, dim=64, id_dim=0 or 32)`), plain unnormalised dot
products, temperature 1, Adam 1e-3, B = 256. The cache is a `tfnegcache.CacheRetrieval` with
a whole-corpus `NegativeCache` warm-started with every item, driven by a custom step that does
what `CachedRetrievalModel.train_step` does (task, gradients, `prepare`, optimizer, `commit`).

Besides recall@10/100 on held-out queries, each checkpoint logs diagnostics of the estimator
on a fixed probe batch of 1024 held-out queries:

- `loss_true`: the exact full-softmax cross entropy (every item encoded fresh);
- `loss_cached`: the task's loss on the same batch in evaluation mode (positive + in-batch
  + exact log-mass of the *stale* cache), what the training loss estimates;
- `log_mass_fresh` / `log_mass_stale`: mean over queries of logsumexp of the fresh and of the
  cached (stale) scores over every cached item;
- `cache_weight_stale` / `cache_weight_fresh`: mean softmax weight `P_i` of the cache's column
  with the stale and with the fresh log-mass;
- `norm_fresh`, `norm_cached`, `norm_query`: mean embedding norms; `rel_staleness_all`:
  `sum ||e - v||^2 / sum ||v||^2` over the whole cache; `id_norm_mean/max`: item-id
  embedding row norms (with `id_dim > 0`);
- `cache_staleness`: the task's metric (drawn negatives, mean over the interval).

    python -m benchmarks.defaults_study --quick           # a smoke run (~1 min)
    python -m benchmarks.defaults_study --runs cache_old_k1,inbatch --steps 3000

Results: one JSON per run in results/workload/defaults/ (`--out`).
"""

import argparse
import json
import os
import time

import numpy as np

from benchmarks import _common
from benchmarks import workload as wl

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, os.pardir, "results", "workload", "defaults")

# name -> (kind, options). Cache options go to `CacheRetrieval` (plus `refresh_every`, a full
# refresh every K steps as `CacheRefreshCallback(every_n_steps=K)` does).
RUNS = {
    "inbatch": ("baseline", {"method": "inbatch"}),
    "inbatch+logq": ("baseline", {"method": "inbatch+logq"}),
    "mns+logq": ("baseline", {"method": "mns+logq"}),
    "full": ("baseline", {"method": "full"}),
    # The README's old recommended defaults: write-back only, no refresh, stale estimator.
    "cache_old_k1": ("cache", {"num_negatives": 1, "estimator": "stale"}),
    "cache_old_k4": ("cache", {"num_negatives": 4, "estimator": "stale"}),
    "cache_old_k4_refresh100": ("cache", {"num_negatives": 4, "estimator": "stale",
                                          "refresh_every": 100}),
    # The library's defaults as they are now (no `estimator` argument: whatever the default is).
    "cache_default_k1": ("cache", {"num_negatives": 1}),
    "cache_default_k4": ("cache", {"num_negatives": 4}),
    "cache_default_k4_refresh100": ("cache", {"num_negatives": 4, "refresh_every": 100}),
}


def make_cache_trainer(workload, query_tower, candidate_tower, variables, optimizer, batch,
                       num_negatives=1, temperature=1.0, refresh_every=None, seed=0,
                       **task_options):
    """`(step, cache, task, refresh)`: a warm-started whole-corpus cache and a training step
    (the library's `run_step` over the task's loss)."""
    tf = _common.tf()
    import tfnegcache

    n = workload.num_items
    cache = tfnegcache.NegativeCache(
        size=n, feature_spec={"item_id": tf.TensorSpec([], tf.int64)}, embedding_dim=64,
        seed=seed)

    def encoder(features):
        return candidate_tower(features["item_id"])

    task = tfnegcache.CacheRetrieval(
        temperature=temperature, remove_accidental_hits=True, cache=cache,
        candidate_model=encoder, num_negatives=num_negatives, **task_options)
    ids = tf.data.Dataset.from_tensor_slices({"item_id": np.arange(n, dtype=np.int64)})
    cache.warm_start(ids.map(lambda e: {"item_id": e["item_id"], "id": e["item_id"]}),
                     encoder, batch_size=8192)

    @tf.function
    def step(query, item_id):
        return tfnegcache.run_step(
            lambda: task(query_tower(query), candidate_tower(item_id), candidate_ids=item_id,
                         candidate_features={"item_id": item_id}, compute_metrics=False,
                         compute_batch_metrics=False),
            variables, optimizer)

    def refresh():
        cache.refresh_all(encoder, batch_size=8192)

    return step, cache, task, refresh


def diagnostics(workload, query_tower, candidate_tower, cache, task, probe, id_table=None):
    """Estimator diagnostics on the probe batch (see the module docstring)."""
    tf = _common.tf()
    import tfnegcache
    q = tf.constant(probe["query"])
    pos = tf.constant(probe["item_id"])
    u = query_tower(q)
    items = candidate_tower()                               # [N, d] fresh
    fresh_scores = tf.matmul(u, items, transpose_b=True)    # [P, N]
    loss_true = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=pos, logits=fresh_scores))
    slot_ids = cache.ids.read_value()
    cached = tf.cast(cache.embeddings.read_value(), tf.float32)
    fresh_by_slot = tf.gather(items, slot_ids)
    stale_scores = tf.matmul(u, cached, transpose_b=True)
    # Same masking as the cache column: every cached item but the query's own positive.
    own = tf.equal(slot_ids[None, :], pos[:, None])
    lm_stale = tf.reduce_logsumexp(tf.where(own, -np.inf, stale_scores), 1)
    lm_fresh = tf.reduce_logsumexp(
        tf.where(own, -np.inf, tf.matmul(u, fresh_by_slot, transpose_b=True)), 1)
    s_pos = tf.reduce_sum(u * tf.gather(items, pos), 1)
    w_stale = tf.sigmoid(lm_stale - s_pos)
    w_fresh = tf.sigmoid(lm_fresh - s_pos)
    loss_cached = tf.reduce_mean(tf.nn.softplus(lm_stale - s_pos))
    diff = tf.reduce_sum(tf.square(cached - fresh_by_slot))
    out = {
        "loss_true": float(loss_true), "loss_cached": float(loss_cached),
        "log_mass_fresh": float(tf.reduce_mean(lm_fresh)),
        "log_mass_stale": float(tf.reduce_mean(lm_stale)),
        "cache_weight_stale": float(tf.reduce_mean(w_stale)),
        "cache_weight_fresh": float(tf.reduce_mean(w_fresh)),
        "norm_fresh": float(tf.reduce_mean(tf.norm(items, axis=1))),
        "norm_fresh_max": float(tf.reduce_max(tf.norm(items, axis=1))),
        "norm_cached_max": float(tf.reduce_max(tf.norm(cached, axis=1))),
        "norm_cached": float(tf.reduce_mean(tf.norm(cached, axis=1))),
        "norm_query": float(tf.reduce_mean(tf.norm(u, axis=1))),
        "rel_staleness_all": float(diff / tf.reduce_sum(tf.square(fresh_by_slot))),
        "age_mean": float(tf.reduce_mean(tf.cast(cache.step - cache.updated_at, tf.float32))),
    }
    if id_table is not None:
        norms = tf.norm(id_table.embeddings, axis=1)
        out["id_norm_mean"] = float(tf.reduce_mean(norms))
        out["id_norm_max"] = float(tf.reduce_max(norms))
    del tfnegcache
    return out


def run_cache(workload, steps, test, probe, batch=256, learning_rate=1e-3, checkpoints=(),
              seed=0, log=print, tower_args=None, **options):
    tf = _common.tf()
    tower_args = tower_args or {}
    query_tower, candidate_tower, variables = wl.make_towers(workload, seed=seed, **tower_args)
    id_table = next((v for v in variables if v.shape.rank == 2
                     and v.shape[0] == workload.num_items), None)
    id_layer = None
    if id_table is not None:
        class _T:  # a tiny holder so diagnostics can read `.embeddings`
            embeddings = id_table
        id_layer = _T
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    refresh_every = options.pop("refresh_every", None)
    step, cache, task, refresh = make_cache_trainer(
        workload, query_tower, candidate_tower, variables, optimizer, batch, seed=seed,
        **options)
    pending = sorted(set(int(c) for c in checkpoints if 0 < c < steps) | {steps})
    curve, spent, losses = [], 0.0, []
    began_run = time.perf_counter()
    for s in range(steps):
        data = workload.queries(batch, "train", start=s * batch)
        began = time.perf_counter()
        try:
            loss = float(step(tf.constant(data["query"]), tf.constant(data["item_id"])))
        except tf.errors.InvalidArgumentError as error:
            log(f"  step {s}: {str(error).splitlines()[0][:200]}")
            curve.append({"steps": s + 1, "failed": True})
            break
        if refresh_every and (s + 1) % refresh_every == 0:
            refresh()
        if s > 0:
            spent += time.perf_counter() - began
        losses.append(loss)
        if pending and s + 1 == pending[0]:
            pending.pop(0)
            # The task's loss is TFRS's: summed over the batch. Per query for reading.
            point = dict(steps=s + 1, loss=float(np.mean(losses)) / batch,
                         loss_last=loss / batch,
                         cache_staleness=float(task.staleness.result()),
                         **wl.evaluate(workload, query_tower, candidate_tower, test),
                         **diagnostics(workload, query_tower, candidate_tower, cache, task,
                                       probe, id_layer))
            task.staleness.reset_state()
            losses = []
            curve.append(point)
            log(f"  step {s + 1:5d} loss {point['loss']:.4g} r@10 {point['recall@10']:.4f} "
                f"stale {point['cache_staleness']:.3g} true {point['loss_true']:.3f} "
                f"cached {point['loss_cached']:.4g} M {point['log_mass_stale']:.4g}/"
                f"{point['log_mass_fresh']:.4g} P {point['cache_weight_stale']:.3f}/"
                f"{point['cache_weight_fresh']:.3f} |v| {point['norm_fresh']:.3g} "
                f"|e| {point['norm_cached']:.3g} |u| {point['norm_query']:.3g} "
                f"max|v| {point['norm_fresh_max']:.3g} max|e| {point['norm_cached_max']:.3g}"
                + (f" id {point['id_norm_mean']:.3g}/{point['id_norm_max']:.3g}"
                   if "id_norm_mean" in point else "")
                + f" ({time.perf_counter() - began_run:.0f} s)")
    final = [p for p in curve if "recall@10" in p]
    return {"curve": curve, "ms_per_step": 1e3 * spent / max(steps - 1, 1),
            "recall@10": final[-1]["recall@10"] if final else None,
            "recall@100": final[-1]["recall@100"] if final else None,
            "failed": bool(curve and curve[-1].get("failed"))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="inbatch,cache_old_k1,cache_default_k1",
                        help=f"comma-separated, from {sorted(RUNS)}")
    parser.add_argument("--id-dims", default="0,32", help="comma-separated id_dim values")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-items-log2", type=int, default=16,
                        help="corpus size 2^n (num_coarse = 2^(n-10), 64 fine per coarse)")
    parser.add_argument("--test", type=int, default=2000, help="held-out queries")
    parser.add_argument("--quick", action="store_true",
                        help="2^12 items, 300 steps, in-batch and the default cache only")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_items_log2, args.steps, args.every, args.test = 12, 300, 100, 1000
        if args.runs == parser.get_default("runs"):
            args.runs, args.id_dims = "inbatch,cache_default_k1", "0"
    n_coarse = 2 ** (args.num_items_log2 - 10)
    workload = wl.make_workload(num_coarse=n_coarse, fine_per_coarse=64, query_noise=0.75,
                                item_scale=0.25, seed=args.seed)
    test = workload.queries(args.test, "test")
    probe = workload.queries(1024, "test", start=10 ** 6)
    checkpoints = list(range(args.every, args.steps, args.every))
    os.makedirs(args.out, exist_ok=True)
    results = []
    for id_dim in [int(x) for x in args.id_dims.split(",")]:
        tower_args = dict(hidden=128, layers=1, dim=64, id_dim=id_dim)
        for name in args.runs.split(","):
            kind, options = RUNS[name]
            options = dict(options)
            print(f"{name} id_dim={id_dim} N=2^{args.num_items_log2} steps={args.steps}",
                  flush=True)
            began = time.perf_counter()
            if kind == "baseline":
                result = wl.train(options["method"], workload, args.steps, test,
                                  checkpoints=checkpoints, seed=args.seed,
                                  log=lambda m: print(m, flush=True), **tower_args)
            else:
                result = run_cache(workload, args.steps, test, probe, checkpoints=checkpoints,
                                   seed=args.seed, log=lambda m: print(m, flush=True),
                                   tower_args=tower_args, **options)
            result.update(run=name, id_dim=id_dim, options=RUNS[name][1], steps=args.steps,
                          num_items=workload.num_items, seed=args.seed,
                          seconds=time.perf_counter() - began,
                          workload=workload.config(), towers=tower_args, batch=256,
                          learning_rate=1e-3, temperature=1.0)
            results.append(result)
            suffix = f"_{args.tag}" if args.tag else ""
            path = os.path.join(
                args.out, f"{name}_id{id_dim}_n{args.num_items_log2}_s{args.steps}"
                f"_seed{args.seed}{suffix}.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
            print(f"{name} id_dim={id_dim}: recall@10 {result['recall@10']} -> {path}",
                  flush=True)
    return results


if __name__ == "__main__":
    main()
