"""Every notebook in notebooks/ runs top to bottom at METAIF_NOTEBOOK_SIZE=small without error.

Each runs on a temporary copy (the committed outputs are left alone) in a fresh kernel of the
Python running the tests (jupyter's python3 kernel resolves to sys.executable). The Omniglot
notebook needs ../shared/data/omniglot (or METAIF_DATA) and is skipped without it.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

import nbclient  # noqa: E402  (test dependencies: a missing one must fail, not skip)
import nbformat  # noqa: E402

from _paths import DATA, ROOT  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NEEDS_DATA = {"02_cleaning_omniglot.ipynb": "omniglot"}


def _runner():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "notebooks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_notebooks_listed():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart_digits.ipynb",
        "02_cleaning_omniglot.ipynb",
        "03_choosing_a_solver.ipynb",
    ]


@pytest.mark.slow
def test_kernel_is_this_python(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    printed = notebook.cells[0].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_small_size(path, tmp_path, monkeypatch):
    folder = NEEDS_DATA.get(path.name)
    if folder and not (DATA / folder).exists():
        pytest.skip(f"{path.name} needs {DATA / folder} (set METAIF_DATA)")
    monkeypatch.setenv("METAIF_DATA", str(DATA))
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    _runner().execute(copy, "small", timeout=600)  # raises CellExecutionError on any failing cell
    executed = nbformat.read(copy, as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), "a code cell did not run"
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    first = "".join(o.get("text", "") for o in code[0].outputs)
    assert first.startswith("size=small"), first
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs), "no plot was produced"
