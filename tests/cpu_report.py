"""Where the suite's CPU goes: a pytest plugin that records each test's CPU seconds (its own
process's, plus those of the child processes it waited for) and a summary by test file.

    PYTHONPATH=tests TFNEGCACHE_CPU_REPORT=/tmp/cpu python -m pytest -q -n 2 \\
        --dist loadfile tests -p cpu_report
    python tests/cpu_report.py /tmp/cpu            # CPU seconds by file, then the top tests

Each pytest process (each xdist worker) appends one JSON line per test to
`$TFNEGCACHE_CPU_REPORT/cpu_<worker>.jsonl`. A child's CPU counts once it has been waited
for, so a test that leaves a process running for a later test (a module fixture) is charged
where that process is reaped. Processes forked by `tests/forkserver.py` count the same way;
the fork server's own start (importing TensorFlow, once per pytest process) is charged to no
test. docs/tests.md quotes a run of this.
"""

import collections
import glob
import json
import os
import resource
import sys
import time

_started = {}
_recording = False   # set by pytest_configure: this process runs the tests


def pytest_configure(config):
    # Under xdist the controller is told of every test too; only the workers run them.
    global _recording  # pylint: disable=global-statement
    workers = getattr(config.option, "numprocesses", None)
    _recording = bool(os.environ.get("PYTEST_XDIST_WORKER")) or not workers


def _cpu():
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Children forked by tests/forkserver.py's server are the server's: it reports them.
    forkserver = sys.modules.get("forkserver")
    forked = forkserver.child_cpu() if forkserver else 0.0
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime + forked


def pytest_runtest_logstart(nodeid, location):  # pylint: disable=unused-argument
    if _recording:
        _started[nodeid] = (time.monotonic(), *_cpu())


def pytest_runtest_logfinish(nodeid, location):  # pylint: disable=unused-argument
    directory = os.environ.get("TFNEGCACHE_CPU_REPORT")
    if not directory or nodeid not in _started:
        return
    wall, own, children = _started.pop(nodeid)
    own_now, children_now = _cpu()
    os.makedirs(directory, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(directory, f"cpu_{worker}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": nodeid, "wall_s": time.monotonic() - wall,
                            "cpu_s": own_now - own + children_now - children}) + "\n")


def summary(directory, top=15):
    """Lines: CPU seconds by test file (largest first), the total, then the `top` tests."""
    rows = [json.loads(line) for path in sorted(glob.glob(os.path.join(directory, "*.jsonl")))
            for line in open(path, encoding="utf-8")]
    by_file = collections.Counter()
    for row in rows:
        by_file[row["test"].split("::")[0]] += row["cpu_s"]
    lines = [f"{cpu:8.1f}  {name}" for name, cpu in by_file.most_common()]
    lines.append(f"{sum(by_file.values()):8.1f}  total, {len(rows)} tests")
    lines += [f"{row['cpu_s']:8.1f}  {row['test']}"
              for row in sorted(rows, key=lambda r: -r["cpu_s"])[:top]]
    return lines


if __name__ == "__main__":
    print("\n".join(summary(sys.argv[1])))
