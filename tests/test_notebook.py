"""Executes notebooks/negative_cache_movielens.ipynb top to bottom in a real Jupyter kernel."""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import ml_fixture

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "negative_cache_movielens.ipynb"
KERNEL = "tfnegcache-test"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
    # A kernelspec for this very interpreter, found first through JUPYTER_PATH, so the kernel
    # sees the same packages as the test whatever kernels the machine has installed.
    ipykernel_kernelspec.write_kernel_spec(path=str(tmp_path / "jupyter" / "kernels" / KERNEL),
                                           overrides={"display_name": KERNEL})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel imports tfnegcache from this checkout (CI also has it `pip install -e`d).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("TFNEGCACHE_NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("TFNEGCACHE_NOTEBOOK_DATA_DIR",
                       str(ml_fixture.write_grouplens(tmp_path / "ml-100k")))
    monkeypatch.setenv("TFNEGCACHE_NOTEBOOK_EXPORT_DIR", str(tmp_path / "saved_models"))
    monkeypatch.setenv("MPLBACKEND", "agg")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=300,
                            startup_timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first cell that errors
    print(f"\nnotebook ran in {time.perf_counter() - start:.0f} s")

    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs)
    assert "negative cache" in outputs and "same top-10 scores" in outputs
    assert (tmp_path / "saved_models" / "movielens_negative_cache" / "1" /
            "saved_model.pb").exists()
