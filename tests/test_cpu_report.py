"""The suite's own CPU report (`tests/cpu_report.py`): its summary, and the plugin in a run."""

import configparser
import json
import os
import shlex
import subprocess
import sys

import cpu_report

HERE = os.path.dirname(os.path.abspath(__file__))
# The runs below are in a temporary directory, outside this repository's pytest.ini: give them
# its options (the unused plugins it leaves out), and no cache directory.
_INI = configparser.ConfigParser(interpolation=None)
_INI.read(os.path.join(os.path.dirname(HERE), "pytest.ini"), encoding="utf-8")
PLUGINS_OFF = (*shlex.split(_INI["pytest"]["addopts"]), "-p", "no:cacheprovider")


def test_summary_adds_up_by_file_and_lists_the_largest_tests(tmp_path):
    rows = [("tests/test_a.py::x", 2.0), ("tests/test_b.py::y", 5.0), ("tests/test_a.py::z", 4.0)]
    for worker, (test, cpu) in zip(("gw0", "gw1", "gw0"), rows):
        with open(tmp_path / f"cpu_{worker}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, "wall_s": 1.0, "cpu_s": cpu}) + "\n")
    assert cpu_report.summary(tmp_path, top=2) == [
        "     6.0  tests/test_a.py", "     5.0  tests/test_b.py", "    11.0  total, 3 tests",
        "     5.0  tests/test_b.py::y", "     4.0  tests/test_a.py::z"]


def test_the_plugin_charges_a_test_for_the_child_it_waited_for(tmp_path):
    (tmp_path / "test_spin.py").write_text(
        "import subprocess, sys\n"
        "def test_child():\n"
        "    subprocess.run([sys.executable, '-c', 'sum(range(30_000_000))'], check=True)\n"
        "def test_nothing():\n"
        "    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=HERE, TFNEGCACHE_CPU_REPORT=str(tmp_path / "cpu"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "cpu_report",
                             *PLUGINS_OFF, str(tmp_path / "test_spin.py")],
                            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    rows = {json.loads(line)["test"].split("::")[1]: json.loads(line)
            for line in open(tmp_path / "cpu" / "cpu_main.jsonl", encoding="utf-8")}
    assert set(rows) == {"test_child", "test_nothing"}
    assert rows["test_child"]["cpu_s"] > 0.2 > rows["test_nothing"]["cpu_s"]


def test_under_xdist_each_test_is_recorded_once_by_the_worker_that_ran_it(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_a():\n    pass\ndef test_b():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PYTHONPATH=HERE, TFNEGCACHE_CPU_REPORT=str(tmp_path / "cpu"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "cpu_report",
                             *PLUGINS_OFF, str(tmp_path / "test_two.py")],
                            env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    files = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert "cpu_main.jsonl" not in files and all(f.startswith("cpu_gw") for f in files)
    tests = sorted(json.loads(line)["test"].split("::")[1]
                   for f in files for line in open(tmp_path / "cpu" / f, encoding="utf-8"))
    assert tests == ["test_a", "test_b"]
