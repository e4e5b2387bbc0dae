"""The Keras 3 front end from the main suite: its tests (`tests/keras3/`) in one subprocess per
backend, with the TF front end's reference numbers computed here (this process runs Keras 2),
and what importing it does to Keras 2 (clean subprocesses)."""

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_importing_keras3_pulls_neither_tf_keras_nor_tfrs_nor_sets_legacy_keras(backend):
    result = run("import os, sys\n"
                 "import tfnegcache.keras3, keras\n"
                 "print(keras.backend.backend(), keras.version(),\n"
                 "      'tf_keras' in sys.modules, 'tensorflow_recommenders' in sys.modules,\n"
                 "      os.environ.get('TF_USE_LEGACY_KERAS'))",
                 KERAS_BACKEND=backend)
    assert result.returncode == 0, result.stderr[-3000:]
    name, version, tf_keras, tfrs, legacy = result.stdout.split()
    assert (name, tf_keras, tfrs, legacy) == (backend, "False", "False", "None")
    assert version.startswith("3.")


def test_after_keras3_tensorflow_keeps_keras_3_and_the_tf_front_end_says_why_not():
    # `import tfnegcache` arms the hook that sets TF_USE_LEGACY_KERAS when TensorFlow loads;
    # with the Keras 3 front end imported, the hook leaves it unset.
    result = run("import os, tfnegcache, tfnegcache.keras3, tensorflow as tf\n"
                 "print(os.environ.get('TF_USE_LEGACY_KERAS'), tf.keras.version())\n"
                 "try:\n"
                 "    tfnegcache.CacheRetrieval\n"
                 "except ImportError as error:\n"
                 "    print(str(error).split('.')[0])",
                 KERAS_BACKEND="tensorflow")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "None" and lines[0].split()[1].startswith("3.")
    assert lines[1] == "tfnegcache requires tf"


def test_without_keras3_the_tf_front_end_still_selects_keras_2():
    result = run("import os, tfnegcache, tensorflow as tf, sys\n"
                 "print(os.environ['TF_USE_LEGACY_KERAS'], tf.keras.layers.Layer.__module__,\n"
                 "      'tfnegcache.keras3' in sys.modules)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "tf_keras.src.engine.base_layer", "False"]


def test_an_unsupported_backend_is_refused_on_import():
    result = run("import tfnegcache.keras3", KERAS_BACKEND="numpy")
    assert result.returncode != 0
    assert ("tfnegcache.keras3 runs on the JAX and TensorFlow backends of Keras 3. Received: "
            "KERAS_BACKEND='numpy'") in result.stderr
