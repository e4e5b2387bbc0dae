"""The Keras 3 front end from the main suite: its tests (`tests/keras3/`) in one fresh subprocess
per backend, with the TF front end's reference numbers computed here (this process runs
Keras 2), and an unsupported backend refused on import (a clean subprocess).

What importing the front end does to a clean process of each backend, and what TensorFlow and
the TF front end do after it, is checked inside that backend's subprocess
(`tests/keras3/test_import.py`); that `import tfnegcache` alone leaves it out and selects
Keras 2, in `tests/test_keras_guard.py`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["jax", "tensorflow"]


def clean_env(**extra):
    """The environment without TF_USE_LEGACY_KERAS or KERAS_BACKEND, this checkout first on
    the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_USE_LEGACY_KERAS", "KERAS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get(
        "PYTHONPATH")] if p])
    env.update(extra)
    return env


def run(code, **env):
    return subprocess.run([sys.executable, "-c", code], env=clean_env(**env),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module", name="reference")
def fixture_reference(tmp_path_factory):
    """The TF front end's numbers on tests/keras3/cases.py, from this (Keras 2) process."""
    spec = importlib.util.spec_from_file_location(
        "tf_reference", ROOT / "tests" / "keras3" / "tf_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("keras3") / "tf_reference.json"
    path.write_text(json.dumps(module.compute()), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module", name="suites")
def fixture_suites(reference, tmp_path_factory):
    """`tests/keras3` started once per backend, the backends side by side (one per core):
    {backend: (process, stdout path, stderr path)}."""
    directory = tmp_path_factory.mktemp("keras3_suites")
    started = {}
    for backend in BACKENDS:
        out, err = directory / f"{backend}.out", directory / f"{backend}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            started[backend] = (subprocess.Popen(
                [sys.executable, "-m", "pytest", "tests/keras3", "-q", "-p", "no:cacheprovider",
                 "-W", "ignore::DeprecationWarning"],
                env=clean_env(KERAS_BACKEND=backend, TFNEGCACHE_TF_REFERENCE=reference),
                stdout=stdout, stderr=stderr, text=True, cwd=ROOT), out, err)
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_keras3_suite_passes_on(backend, suites):
    proc, out, err = suites[backend]
    try:
        returncode = proc.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    stdout, stderr = out.read_text(), err.read_text()
    summary = stdout.strip().splitlines()[-1:] if stdout else []
    assert returncode == 0, stdout[-6000:] + stderr[-3000:]
    assert summary and " passed" in summary[0] and "failed" not in summary[0], summary


def test_an_unsupported_backend_is_refused_on_import():
    result = run("import tfnegcache.keras3", KERAS_BACKEND="numpy")
    assert result.returncode != 0
    assert ("tfnegcache.keras3 runs on the JAX and TensorFlow backends of Keras 3. Received: "
            "KERAS_BACKEND='numpy'") in result.stderr
