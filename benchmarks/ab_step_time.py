"""A/B of the training step time: this checkout's library against an earlier commit's, in one run.

    python -m benchmarks.ab_step_time --base HEAD~1 --log2n 16
    python -m benchmarks.ab_step_time --base HEAD~1 --log2n 20 --towers reference
    python -m benchmarks.ab_step_time --quick          # N = 2^10, 1 round: a smoke run

The base commit is checked out (`git worktree add --detach`) into a temporary directory. Both
sides run this checkout's benchmark harness (`benchmarks/step_time.py`, mode `cache` unless
`--mode`) against their own `tfnegcache`, so only the library differs. Each round runs one
child per side, alternating which goes first, so drift in the machine's load falls on both;
each child is a fresh process that times `--repeats` steps after warm-up and reports the
median wall time and the process's CPU time per step (all threads; less sensitive than wall
time to other jobs on a shared machine), and its setup: building the model and warm-starting
its cache through the end of the first step, which traces it. Prints the per-round times, the
medians, minimums and ratios head / base, with the load average before and after, and writes
them as JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from benchmarks import _common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What each child reports (`benchmarks.step_time --child`): the step's median wall and CPU
# time, and the setup through the first (traced) step, wall and CPU.
MEASURES = ("step_ms", "step_cpu_ms", "setup_s", "setup_cpu_s")


def _child(side, mode, log2n, repeats, towers="hashed"):
    """One child's MEASURES, run with `side`'s library."""
    # The side first on sys.path: the side's tfnegcache, and this checkout's benchmarks.
    result = _common.run_child(
        "benchmarks.step_time",
        ["--child", mode, log2n, "--repeats", repeats, "--towers", towers],
        cwd=side, pythonpath=side)
    return {measure: result[measure] for measure in MEASURES}


def _side(directory, library_root):
    """A directory whose `tfnegcache` is `library_root`'s and whose `benchmarks` is ours."""
    os.makedirs(directory)
    os.symlink(os.path.join(library_root, "tfnegcache"), os.path.join(directory, "tfnegcache"))
    os.symlink(os.path.join(ROOT, "benchmarks"), os.path.join(directory, "benchmarks"))
    return directory


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--log2n", type=int, default=16, help="cache size 2^log2n")
    parser.add_argument("--mode", default="cache", help="a benchmarks.step_time mode")
    parser.add_argument("--towers", default="hashed", choices=("hashed", "reference"),
                        help="benchmarks.step_time's tower configuration")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per child")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    if args.quick:
        args.log2n, args.rounds, args.repeats = 10, 1, 3

    base_sha, head_sha = _git("rev-parse", args.base), _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    series = {measure: {"base": [], "head": []} for measure in MEASURES}
    wall, cpu = series["step_ms"], series["step_cpu_ms"]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        _git("worktree", "add", "--detach", base_tree, base_sha)
        try:
            sides = {"base": _side(os.path.join(tmp, "base_side"), base_tree),
                     "head": _side(os.path.join(tmp, "head_side"), ROOT)}
            for round_ in range(args.rounds):
                order = ("base", "head") if round_ % 2 == 0 else ("head", "base")
                for name in order:
                    measured = _child(sides[name], args.mode, args.log2n, args.repeats,
                                      args.towers)
                    for measure, value in measured.items():
                        series[measure][name].append(value)
                print(f"round {round_}: base {wall['base'][-1]:.1f} ms ({cpu['base'][-1]:.1f} "
                      f"CPU), head {wall['head'][-1]:.1f} ms ({cpu['head'][-1]:.1f} CPU)",
                      flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT,
                           check=False, capture_output=True)
    stats = {
        "median_ms": {k: statistics.median(v) for k, v in wall.items()},
        "min_ms": {k: min(v) for k, v in wall.items()},
        "median_cpu_ms": {k: statistics.median(v) for k, v in cpu.items()},
        "median_setup_s": {k: statistics.median(v) for k, v in series["setup_s"].items()},
        "median_setup_cpu_s": {k: statistics.median(v)
                               for k, v in series["setup_cpu_s"].items()},
    }
    ratios = {name: values["head"] / values["base"] for name, values in stats.items()}
    result = {
        "mode": args.mode, "towers": args.towers, "N": 2**args.log2n, "base": base_sha,
        "head": head_sha,
        "head_has_uncommitted_changes": dirty, "rounds": args.rounds, "repeats": args.repeats,
        **series, **stats, "head_over_base": ratios,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    head = head_sha[:8] + ("+changes" if dirty else "")
    print(f"{args.mode} step ({args.towers} towers) at N=2^{args.log2n}, "
          f"base {base_sha[:8]} -> head {head}:")
    for name, values in stats.items():
        print(f"  {name}: {values['base']:.1f} -> {values['head']:.1f} "
              f"(head/base {ratios[name]:.3f})")
    print(f"  load average {load_before[0]:.1f} -> {result['loadavg_after'][0]:.1f}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
