"""Naive full Gumbel-Max vs `sample_cache` (chunked, two-stage), both inside `tf.function`.

    python -m benchmarks.sampler            # N = 2^20, B = 256, d = 64
    python -m benchmarks.sampler --quick    # a small smoke configuration

Also checks that both draw from the same distribution (chi-square against the exact softmax,
and a two-sample test between them) at a smaller N, and times XLA (`jit_compile=True`)
variants of both.
"""

import argparse

from benchmarks import _common  # first: imports tfnegcache before TensorFlow

import numpy as np
import scipy.stats
import tensorflow as tf

from tfnegcache import sampling


def make_problem(num_slots, batch, dim, seed=0):
    rng = np.random.default_rng(seed)
    queries = tf.constant((rng.normal(size=(batch, dim)) / np.sqrt(dim)).astype(np.float32))
    embeddings = tf.constant(rng.normal(size=(num_slots, dim)).astype(np.float32))
    bias = np.zeros(num_slots, np.float32)
    bias[rng.choice(num_slots, num_slots // 100, replace=False)] = -np.inf   # masked slots
    return queries, embeddings, tf.constant(bias)


def naive(queries, embeddings, bias, seed, num_samples=1):
    """Score the whole cache, then Gumbel-Max over the full `[B, N]` matrix."""
    logits = tf.matmul(queries, embeddings, transpose_b=True) + bias[None, :]
    log_mass = tf.reduce_logsumexp(logits, axis=-1)
    return sampling.gumbel_max_sample(logits, num_samples, seed), log_mass


def ours(queries, embeddings, bias, seed, num_samples=1):
    draw = sampling.sample_cache(queries, embeddings, bias, 1.0, num_samples, seed)
    return draw.slots, draw.log_mass


def pooled_chi_square(counts, expected, min_expected=5.0):
    """Chi-square goodness of fit, pooling bins of small expectation into one."""
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(scipy.stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue)


def distribution_check(num_slots, dim, num_draws):
    queries, embeddings, bias = make_problem(num_slots, 1, dim, seed=1)
    queries = queries * 3.0  # a peaked softmax: the mass is on few slots, as in training
    logits = (queries @ tf.transpose(embeddings) + bias).numpy()[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    plan = sampling.plan_sampler(num_slots, dim, 1)
    seed = tf.constant([5, 9])
    slots_naive, _ = tf.function(naive)(queries, embeddings, bias, seed, num_draws)
    slots_ours, _ = tf.function(ours)(queries, embeddings, bias, seed + 1, num_draws)
    counts_naive = np.bincount(slots_naive.numpy()[0], minlength=num_slots)
    counts_ours = np.bincount(slots_ours.numpy()[0], minlength=num_slots)
    both = counts_naive + counts_ours
    keep = both >= 10
    contingency = np.stack([np.append(counts_naive[keep], counts_naive[~keep].sum()),
                            np.append(counts_ours[keep], counts_ours[~keep].sum())])
    contingency = contingency[:, contingency.sum(0) > 0]
    two_sample_p = float(scipy.stats.chi2_contingency(contingency)[1])
    return {
        "num_slots": num_slots, "num_draws": num_draws,
        "plan": {"block_size": plan.block_size, "num_blocks": plan.num_blocks,
                 "num_chunks": plan.num_chunks},
        "p_naive_vs_exact": pooled_chi_square(counts_naive, probs * num_draws),
        "p_ours_vs_exact": pooled_chi_square(counts_ours, probs * num_draws),
        "p_naive_vs_ours": two_sample_p,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log2n", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-xla", action="store_true", help="skip the jit_compile variants")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.repeats = 14, 2
    num_slots = 2**args.log2n

    queries, embeddings, bias = make_problem(num_slots, args.batch, args.dim)
    plan = sampling.plan_sampler(num_slots, args.dim, args.batch)
    seed = tf.Variable([1, 2], dtype=tf.int64)

    rows = []
    variants = [("naive", naive, False), ("ours", ours, False)]
    if not args.no_xla:
        variants += [("naive+xla", naive, True), ("ours+xla", ours, True)]
    for name, fn, xla in variants:
        compiled = tf.function(fn, jit_compile=xla)

        def call(compiled=compiled):
            seed.assign_add([0, 1])
            return compiled(queries, embeddings, bias, seed)
        try:
            seconds = _common.time_fn(call, args.repeats, warmup=1)
        except (tf.errors.OpError, ValueError) as err:  # e.g. XLA refusing a shape
            rows.append({"sampler": name, "error": str(err).splitlines()[0][:200]})
            continue
        rows.append({"sampler": name, "xla": xla, "ms": 1e3 * seconds})
    by_name = {r["sampler"]: r for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r:
            r["speedup_vs_naive"] = by_name["naive"]["ms"] / r["ms"]

    check = distribution_check(2**10 if args.quick else 2**12, args.dim,
                               20000 if args.quick else 200000)
    result = {
        "config": {"num_slots": num_slots, "batch": args.batch, "dim": args.dim,
                   "repeats": args.repeats, "quick": args.quick,
                   "plan": {"block_size": plan.block_size, "num_blocks": plan.num_blocks,
                            "num_chunks": plan.num_chunks, "chunk_size": plan.chunk_size}},
        "timings": rows,
        "distribution_check": check,
        "targets": {
            "speedup_ours_vs_naive": by_name["naive"]["ms"] / by_name["ours"]["ms"],
            "speedup_met(>=2x)": by_name["naive"]["ms"] / by_name["ours"]["ms"] >= 2.0,
            "same_distribution_met(p>0.01)": min(check["p_ours_vs_exact"],
                                                 check["p_naive_vs_ours"]) > 0.01,
        },
    }
    path = _common.write_json("sampler", result)

    plt = _common.pyplot()
    timed = [r for r in rows if "ms" in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["sampler"] for r in timed], [r["ms"] for r in timed])
    ax.set_ylabel("ms per draw (B queries)")
    ax.set_title(f"Gumbel-Max sampler, N=2^{args.log2n}, B={args.batch}, d={args.dim}")
    fig.tight_layout()
    fig.savefig(_common.plot_path("sampler"))

    print(f"N=2^{args.log2n} B={args.batch} d={args.dim} plan={result['config']['plan']}")
    print(_common.table(rows, ["sampler", "xla", "ms", "speedup_vs_naive", "error"]))
    print("distribution check:", check)
    print("targets:", result["targets"])
    print("wrote", path)
    return result


if __name__ == "__main__":
    main()
