"""Shared pieces of the benchmarks: TensorFlow on demand, output paths, the machine a result
was measured on, timing, tables, plots, and the benchmarks' child processes.

Importing this module does not import TensorFlow (`tf()` does, on first use), so modules that
only generate data, such as `benchmarks.workload`'s generator, use it without TensorFlow. The
towers the step-time benchmarks train are in `benchmarks.token_towers`.
"""

import tfnegcache  # noqa: F401  (first: TensorFlow, whenever it is imported, gets Keras 2)

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

# Where results go; TFNEGCACHE_BENCHMARK_DIR overrides it (the smoke tests use a temp dir).
RESULTS = os.environ.get("TFNEGCACHE_BENCHMARK_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "benchmarks")

# The environment variables that size TensorFlow's and OpenMP's thread pools.
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def tf():
    """The `tensorflow` module, imported on first use (after `tfnegcache`: Keras 2)."""
    import tensorflow  # pylint: disable=import-outside-toplevel
    return tensorflow


def build_optimizer(optimizer, variables):
    """Creates `optimizer`'s slot variables for `variables` now, as its first
    `apply_gradients` would (under the same name scope). A `tf.function` whose first call
    creates variables is traced twice; with the slots made beforehand, a train step is traced
    once. The benchmarks never time a step's first call, so only their start-up is shorter."""
    with tf().name_scope(optimizer.name):
        optimizer.build(variables)


def machine(load_average=True, threads=False):
    """What a result was measured on: CPU count, platform and TensorFlow version; with
    `load_average` the machine's load (other jobs on a shared machine), with `threads` the
    thread-pool variables of the environment."""
    out = {"cpus": os.cpu_count(), "platform": platform.platform(),
           "tensorflow": _tensorflow_version()}
    if load_average:
        out["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if threads:
        out["threads"] = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    return out


def _tensorflow_version():
    """TensorFlow's version, read from the installed package when TensorFlow is not imported
    yet: a parent that only runs child processes then never imports it (seconds per run)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"].__version__
    try:
        return importlib.metadata.version("tensorflow")
    except importlib.metadata.PackageNotFoundError:   # another distribution, e.g. tf-nightly
        return tf().__version__


def write_json(name, payload):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    payload = dict(payload, machine=machine())
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float)
    return path


def plot_path(name):
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}.png")


def pyplot():
    """`matplotlib.pyplot` drawing to files only (the Agg backend: no display needed)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt


def time_fn(fn, repeats, warmup=1, cpu=None):
    """Median seconds of `fn()` over `repeats` calls after `warmup` calls (fn returns tensors).

    `cpu`: a dict that receives `"cpu_s"`, the process's CPU seconds per call (all threads)
    over the same calls: less sensitive than wall time to other jobs on a shared machine.
    """
    for _ in range(warmup):
        _block(fn())
    times = []
    cpu_start = time.process_time()
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    if cpu is not None:
        cpu["cpu_s"] = (time.process_time() - cpu_start) / repeats
    return float(np.median(times))


def _block(result):
    for t in tf().nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()


def table(rows, columns):
    """Formats a list of dicts as a fixed-width text table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------ child processes
# A benchmark that measures in a fresh process (its own TensorFlow, its own peak memory)
# runs `python -m benchmarks.<name> --child ...`; the child prints one `RESULT {json}` line.

RESULT_PREFIX = "RESULT "


def report_result(result):
    """The child's side: prints `result` as the line `run_child` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class ChildFailed(RuntimeError):
    """A child exited non-zero or printed no RESULT line; `errors` holds the last lines of
    its stderr that name an error."""

    def __init__(self, message, errors):
        super().__init__(message)
        self.errors = errors


def run_child(module, args, attempts=1, label=None, cwd=None, pythonpath=None):
    """Runs `python -m <module> <args>` and returns the dict of the child's last RESULT line,
    with `child_wall_s`, the child's wall seconds.

    `attempts` > 1 retries a failed child (on a shared machine a child can die of
    contention); with a `label` each failure is printed. `cwd` and `pythonpath` (which
    replaces PYTHONPATH) choose the `tfnegcache` and `benchmarks` the child imports. Raises
    `ChildFailed` when every attempt failed.
    """
    command = [sys.executable, "-m", module, *map(str, args)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    for attempt in range(attempts):
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              check=False)
        wall = time.perf_counter() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1][len(RESULT_PREFIX):])
            result["child_wall_s"] = wall
            return result
        errors = [line for line in proc.stderr.splitlines() if "Error" in line][-3:]
        if label is not None:
            print(f"  {label} attempt {attempt} failed: {errors}", flush=True)
    raise ChildFailed(f"{module} child in {cwd or os.getcwd()} failed:\n{proc.stderr[-3000:]}",
                      errors)
