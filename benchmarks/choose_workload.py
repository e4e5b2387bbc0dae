"""Does the full softmax beat every cheap baseline on a workload? The criterion of docs/workload.md.

Trains the four methods of `benchmarks.workload` (`inbatch`, `inbatch+logq`, `mns+logq`,
`full`) on one workload configuration, per seed: the baselines for `--baseline-steps` steps
(their plateau run, with a recall curve) and the full softmax for `--steps` steps; compares all
of them at `--steps` (equal steps) and the baselines' best recall@10 along their plateau run.
With `--wide`, the first seed is re-run at twice the hidden width (all four methods, `--steps`
steps each) to check that the ordering of the methods does not change. The negative cache is
never run here.

    python -m benchmarks.choose_workload --quick                  # < 60 s smoke run
    python -m benchmarks.choose_workload --name chosen --seeds 0 1 2 --wide   # the chosen config

Writes `results/workload/<name>.json` (`TFNEGCACHE_WORKLOAD_DIR` overrides the directory) and
prints a table. Training runs use one intra-op and one inter-op thread (2-core machine shared
with other jobs); run it under `nice`.
"""

import argparse
import json
import os
import time

from benchmarks import _common
from benchmarks import workload as W

import numpy as np

RESULTS = os.environ.get("TFNEGCACHE_WORKLOAD_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "workload")
BASELINES = ("inbatch", "inbatch+logq", "mns+logq")
REMOVED_TARGET = 0.30   # criterion 1: fraction of the best baseline's misses removed
PLATEAU_TOLERANCE = 0.005
SATURATED = 0.99        # criterion 3: full-softmax recall@100 must stay below this


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in < 60 s")
    p.add_argument("--name", default="chosen", help="output file results/workload/<name>.json")
    W.add_workload_args(p)   # the workload (configuration A at 2^16), towers and training
    p.add_argument("--steps", type=int, default=1500, help="S: the equal-steps comparison")
    p.add_argument("--baseline-steps", type=int, default=12000,
                   help="the baselines' plateau run (>= S)")
    p.add_argument("--curve-points", type=int, default=12)
    p.add_argument("--num-test", type=int, default=4000)
    p.add_argument("--num-oracle", type=int, default=1000,
                   help="held-out queries scored by the Bayes-optimal scorer (float64, slow)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--wide", action="store_true", help="also run the 2x-hidden check (seed 1)")
    p.add_argument("--methods", nargs="+", default=list(W.METHODS), choices=W.METHODS)
    p.add_argument("--reuse", nargs="*", default=[],
                   help="names of earlier results/workload JSONs with the same configuration "
                        "whose per-seed runs are taken instead of re-run")
    return p


# Arguments that do not change what one seed's run computes at S (so runs may be reused across
# them): the baselines' plateau-run length and the curve spacing change neither the training
# stream nor the weights at step S (evaluation does not touch the training state).
_NOT_RUN_KEYS = {"name", "seeds", "wide", "reuse", "quick", "baseline_steps", "curve_points"}


def reused_runs(args):
    """`{seed: per-seed result}` from the `--reuse` files; refuses a differing configuration."""
    runs = {}
    for name in args.reuse:
        with open(os.path.join(RESULTS, f"{name}.json"), encoding="utf-8") as f:
            prev = json.load(f)
        differ = {k: (prev["config"].get(k), v) for k, v in vars(args).items()
                  if k not in _NOT_RUN_KEYS and prev["config"].get(k) != v}
        if differ:
            raise SystemExit(f"--reuse {name}: configuration differs: {differ}")
        runs.update({s["seed"]: s for s in prev["per_seed"]})
    return runs


QUICK = dict(num_coarse=4, fine_per_coarse=4, fine_size=8, latent_dim=8, hidden=16, dim=8,
             steps=30, baseline_steps=60, curve_points=3, num_test=200, num_oracle=100,
             batch=32, mns_negatives=32, seeds=[0], wide=True, learning_rate=1e-2)


def _tie_threshold(r1, r2, n):
    """Two standard errors of the difference of two independent binomial recalls on n queries."""
    return 2.0 * np.sqrt((r1 * (1 - r1) + r2 * (1 - r2)) / n)


def _order(rows, n):
    """Methods sorted by recall@10 at S, best first, and the pairs that count as tied."""
    order = sorted(rows, key=lambda m: -rows[m])
    ties = [[a, b] for i, a in enumerate(order) for b in order[i + 1:]
            if abs(rows[a] - rows[b]) < _tie_threshold(rows[a], rows[b], n)]
    return order, ties


def same_order(a, b, ties):
    """True if orders `a` and `b` differ only by swaps of pairs tied in either run."""
    tied = {frozenset(t) for t in ties}
    pos_b = {m: i for i, m in enumerate(b)}
    return all(pos_b[x] < pos_b[y] or frozenset((x, y)) in tied
               for i, x in enumerate(a) for y in a[i + 1:])


def run_seed(args, seed, hidden, plateau_runs=True, log=print):
    w = W.workload_from_args(args, seed)
    test = w.queries(args.num_test, "test")
    log(f"seed {seed}: N = {w.num_items}, hidden {hidden}, same-fine-cluster rate "
        f"{w.same_fine_cluster_rate(args.batch):.4f}")
    began = time.perf_counter()
    oracle = W.oracle_recall(w, {k: v[:args.num_oracle] for k, v in test.items()})
    log(f"  oracle (Bayes-optimal, {args.num_oracle} queries): {oracle} "
        f"({time.perf_counter() - began:.0f} s)")
    rows = []
    for method in args.methods:
        steps = args.steps
        if method != "full" and plateau_runs:
            steps = max(args.baseline_steps, args.steps)
        every = max(1, steps // args.curve_points)
        began = time.perf_counter()
        row = W.train(method, w, steps, test, batch=args.batch,
                      mns_negatives=args.mns_negatives, learning_rate=args.learning_rate,
                      temperature=args.temperature, seed=seed,
                      checkpoints=set(range(every, steps, every)) | {args.steps},
                      log=log, hidden=hidden, layers=args.layers, dim=args.dim,
                      id_dim=args.id_dim)
        at_s = next(p for p in row["curve"] if p["steps"] == args.steps)
        row.update({"at_equal_steps": at_s, "wall_seconds": time.perf_counter() - began})
        if method != "full":
            row["plateau"] = W.plateau(row["curve"], PLATEAU_TOLERANCE)
        rows.append(row)
    return {"seed": seed, "num_items": w.num_items, "hidden": hidden,
            "same_fine_cluster_rate": w.same_fine_cluster_rate(args.batch),
            "oracle": oracle, "rows": rows, "comparison": compare(rows)}


def compare(rows):
    """Misses at equal steps and the fraction of the best baseline's misses the full softmax
    removes, at equal steps and against the baselines' best value along their plateau run."""
    by = {r["method"]: r for r in rows}
    out = {"misses_at_equal_steps": {m: 1 - r["at_equal_steps"]["recall@10"]
                                     for m, r in by.items()}}
    base = [m for m in BASELINES if m in by]
    if "full" in by and base:
        full_miss = out["misses_at_equal_steps"]["full"]
        best = min(base, key=lambda m: out["misses_at_equal_steps"][m])
        best_miss = out["misses_at_equal_steps"][best]
        out.update(best_baseline=best, removed_at_equal_steps=1 - full_miss / best_miss)
        plateau_miss = {m: 1 - by[m]["best_recall@10"] for m in base}
        best_p = min(base, key=lambda m: plateau_miss[m])
        out.update(best_baseline_plateau=best_p, best_baseline_plateau_misses=plateau_miss[best_p],
                   removed_vs_plateau=1 - full_miss / plateau_miss[best_p])
    return out


def summarise(per_seed, args):
    methods = [r["method"] for r in per_seed[0]["rows"]]
    for seed in per_seed:  # recomputed, so reused runs get the current plateau estimator
        for row in seed["rows"]:
            if row["method"] != "full":
                row["plateau"] = W.plateau(row["curve"], PLATEAU_TOLERANCE)
    summary = {}
    for m in methods:
        rows = [next(r for r in s["rows"] if r["method"] == m) for s in per_seed]
        entry = {}
        for key in ("recall@10", "recall@100"):
            vals = np.array([r["at_equal_steps"][key] for r in rows])
            entry[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1))
                          if len(vals) > 1 else 0.0, "min": float(vals.min()),
                          "max": float(vals.max()), "values": vals.tolist()}
        entry["misses"] = 1 - entry["recall@10"]["mean"]
        entry["steps"] = args.steps
        entry["ms_per_step"] = float(np.mean([r["ms_per_step"] for r in rows]))
        if m != "full":
            # Plateau evidence only from seeds whose baselines ran past S.
            long_runs = [(s["seed"], r) for s, r in zip(per_seed, rows) if r["steps"] > args.steps]
            entry["plateau_seeds"] = [seed for seed, _ in long_runs]
            rows = [r for _, r in long_runs] or rows
            entry["plateau_steps"] = [r["plateau"]["plateau_step"] for r in rows]
            entry["plateaued"] = all(r["plateau"]["plateaued"] for r in rows)
            entry["gain_last_quarter"] = [r["plateau"]["gain_last_quarter"] for r in rows]
            entry["plateau_level"] = [r["plateau"]["plateau_level"] for r in rows]
            entry["plateau_run_steps"] = rows[0]["steps"]
            entry["best_recall@10_plateau_run"] = float(np.mean([r["best_recall@10"]
                                                               for r in rows]))
        summary[m] = entry
    removed = [s["comparison"].get("removed_at_equal_steps") for s in per_seed]
    removed_p = [s["comparison"].get("removed_vs_plateau") for s in per_seed
                 if all(r["steps"] > args.steps for r in s["rows"] if r["method"] != "full")]
    return summary, removed, removed_p


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.name = "quick"

    tf = _common.tf()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    began = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    reused = reused_runs(args)
    per_seed = []
    for seed in args.seeds:
        if seed in reused:
            log(f"seed {seed}: reused from {args.reuse}")
        per_seed.append(reused.get(seed) or run_seed(args, seed, args.hidden, log=log))
    summary, removed, removed_p = summarise(per_seed, args)

    n = args.num_test
    base_r10 = {m: summary[m]["recall@10"]["mean"] for m in summary}
    order, ties = _order(base_r10, n)
    wide = None
    if args.wide:
        wide_run = run_seed(args, args.seeds[0], 2 * args.hidden, plateau_runs=False, log=log)
        first = {r["method"]: r["at_equal_steps"]["recall@10"]
                 for r in per_seed[0]["rows"]}
        wide_r10 = {r["method"]: r["at_equal_steps"]["recall@10"] for r in wide_run["rows"]}
        order1, ties1 = _order(first, n)
        order2, ties2 = _order(wide_r10, n)
        wide = {"hidden": 2 * args.hidden, "seed": args.seeds[0], "run": wide_run,
                "order_base": order1, "order_wide": order2, "ties_base": ties1,
                "ties_wide": ties2, "same_order": same_order(order1, order2, ties1 + ties2)}

    full = summary.get("full")
    criterion = None
    if full is not None and all(m in summary for m in BASELINES):
        criterion = {
            "removed_at_equal_steps_mean": float(np.mean(removed)),
            # None when no seed's baselines ran past S (no plateau evidence).
            "removed_vs_plateau_mean": float(np.mean(removed_p)) if removed_p else None,
            "1_negatives_matter": bool(np.mean(removed) >= REMOVED_TARGET and removed_p
                                       and np.mean(removed_p) >= REMOVED_TARGET),
            "2_baselines_plateaued": all(summary[m]["plateaued"] for m in BASELINES),
            "3_full_recall@100_below_0.99": full["recall@100"]["mean"] < SATURATED,
            "3_wide_same_order": None if wide is None else wide["same_order"],
            "4_num_items_at_least_2^16": per_seed[0]["num_items"] >= 2**16,
        }
        criterion["pass"] = all(v for k, v in criterion.items() if k[0].isdigit())

    payload = {"config": vars(args),
               "workload": W.workload_from_args(args, args.seeds[0]).config(),
               "num_items": per_seed[0]["num_items"], "summary": summary,
               "order": order, "ties": ties,
               "removed_at_equal_steps": removed, "removed_vs_plateau": removed_p,
               "criterion": criterion, "wide": wide, "per_seed": per_seed,
               "wall_seconds": time.perf_counter() - began,
               "machine": _common.machine(load_average=False)}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{args.name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)

    print(f"\nN = {per_seed[0]['num_items']}, seeds {args.seeds}, S = {args.steps} steps "
          f"(baselines' plateau run {max(args.steps, args.baseline_steps)})")
    print(f"{'method':13s} {'steps':>6s} {'recall@10':>16s} {'recall@100':>16s} {'misses':>7s} "
          f"{'plateau@':>9s} {'ms/step':>8s}")
    for m, e in summary.items():
        r10, r100 = e["recall@10"], e["recall@100"]
        print(f"{m:13s} {e['steps']:6d} {r10['mean']:8.4f} ± {r10['std']:.4f} "
              f"{r100['mean']:8.4f} ± {r100['std']:.4f} {e['misses']:7.4f} "
              f"{str(e.get('plateau_steps', '-')):>9s} {e['ms_per_step']:8.1f}")
    print(f"misses removed by full vs best baseline at equal steps: "
          f"{[round(x, 3) for x in removed if x is not None]}; vs plateau: "
          f"{[round(x, 3) for x in removed_p if x is not None]}")
    if wide:
        print(f"order (hidden {args.hidden}): {wide['order_base']}; (hidden {wide['hidden']}): "
              f"{wide['order_wide']}; same (ties allowed): {wide['same_order']}")
    print(f"criterion: {criterion}")
    print(f"wrote {path} ({time.perf_counter() - began:.0f} s)")
    return payload


if __name__ == "__main__":
    main()
