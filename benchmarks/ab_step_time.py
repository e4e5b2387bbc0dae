"""A/B of the training step time: this checkout against an earlier commit, in one run.

    python -m benchmarks.ab_step_time --base HEAD~1 --log2n 16
    python -m benchmarks.ab_step_time --quick          # N = 2^10, 2 rounds: a smoke run

The base commit is checked out (`git worktree add --detach`) into a temporary directory.
Each round runs one `benchmarks.step_time` child per tree, alternating which goes first, so
drift in the machine's load falls on both; each child is a fresh process that times
`--repeats` steps after warm-up (`benchmarks/step_time.py`, mode `cache` unless `--mode`).
Prints the per-round times, the medians and the ratio head / base, with the load average
before and after, and writes them as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(tree, mode, log2n, repeats):
    command = [sys.executable, "-m", "benchmarks.step_time", "--child", mode, str(log2n),
               "--repeats", str(repeats)]
    # cwd first on sys.path: each tree imports its own tfnegcache and benchmarks.
    proc = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=tree))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"step_time child in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])["step_ms"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--log2n", type=int, default=16, help="cache size 2^log2n")
    parser.add_argument("--mode", default="cache", help="a benchmarks.step_time mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per child")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.rounds, args.repeats = 10, 2, 3

    base_sha = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    head_sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
    times = {"base": [], "head": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", base_tree, base_sha], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            trees = {"base": base_tree, "head": ROOT}
            for round_ in range(args.rounds):
                order = ("base", "head") if round_ % 2 == 0 else ("head", "base")
                for name in order:
                    times[name].append(_child(trees[name], args.mode, args.log2n, args.repeats))
                print(f"round {round_}: base {times['base'][-1]:.1f} ms, "
                      f"head {times['head'][-1]:.1f} ms", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT,
                           check=False, capture_output=True)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "mode": args.mode, "N": 2**args.log2n, "base": base_sha, "head": head_sha,
        "head_has_uncommitted_changes": dirty, "rounds": args.rounds, "repeats": args.repeats,
        "step_ms": times, "median_ms": medians, "head_over_base": medians["head"] / medians["base"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"{args.mode} step at N=2^{args.log2n}: base {base_sha[:8]} {medians['base']:.1f} ms, "
          f"head {head_sha[:8]}{'+changes' if dirty else ''} {medians['head']:.1f} ms, "
          f"head/base {result['head_over_base']:.3f} (load {load_before[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f})")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
