"""The Keras 3 tests: one process per backend (`KERAS_BACKEND=jax` or `tensorflow`, fixed
before Keras loads). `tests/test_keras3.py` runs this directory once per backend; run it
alone with

    KERAS_BACKEND=jax python -m pytest tests/keras3 -q
"""

import json
import os
import subprocess
import sys

# The tests compile many small programs once each, where XLA's compile time is most of the
# cost: compile them without the backend's optimisations (about half the compile time on
# this CPU; the results are the same programs), and with XLA:CPU's older fusion emitters,
# which compile these small programs in about two thirds of the time of the newer ones
# (docs/tests.md). JAX's persistent compilation cache is left off: in one run it served 12
# of 810 compilations, and writing the other 798 to it cost more than those saved (the JAX
# suite took 143 CPU-s with it, 124 without).
for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

LEGACY_KERAS_BEFORE = os.environ.get("TF_USE_LEGACY_KERAS")

import tfnegcache.keras3  # noqa: E402,F401  first: Keras 3, TF_USE_LEGACY_KERAS left alone

import keras  # noqa: E402

# What `import tfnegcache.keras3, keras` did to this process, read before any test module is
# imported (test_import.py checks it): this is the first thing the process does after pytest
# and tests/conftest.py (`import tfnegcache`, which loads no framework) have loaded.
IMPORTED = {"backend": keras.backend.backend(), "version": keras.version(),
            "tf_keras": "tf_keras" in sys.modules,
            "tensorflow_recommenders": "tensorflow_recommenders" in sys.modules,
            "legacy_keras_before": LEGACY_KERAS_BEFORE,
            "legacy_keras": os.environ.get("TF_USE_LEGACY_KERAS")}

import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


@pytest.fixture(scope="session", name="imported")
def fixture_imported():
    """`IMPORTED`: the process's state right after the front end and Keras were imported."""
    return dict(IMPORTED)


def pytest_report_header(config):
    return f"Keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(scope="session", name="tf_reference")
def fixture_tf_reference(tmp_path_factory):
    """The TF front end's numbers on `cases.py` (computed by the main suite, or here)."""
    path = os.environ.get("TFNEGCACHE_TF_REFERENCE")
    if not path:
        path = str(tmp_path_factory.mktemp("tf_reference") / "reference.json")
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        env["TF_USE_LEGACY_KERAS"] = "1"
        result = subprocess.run([sys.executable, os.path.join(HERE, "tf_reference.py"), path],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    with open(path, encoding="utf-8") as f:
        return json.load(f)
