"""Execute the notebooks top to bottom and store their outputs (the committed outputs come from this).

    .venv/bin/python notebooks/run_all.py                   # every notebook, full size, in place
    .venv/bin/python notebooks/run_all.py --size small      # the size the test suite runs
    .venv/bin/python notebooks/run_all.py 01_quickstart_digits.ipynb --out /tmp/executed

Each notebook reads its size from METAIF_NOTEBOOK_SIZE (small | full) and prints it in its first
code cell. The kernel is the Python running this script (jupyter's python3 kernel resolves to
sys.executable), so run it with the project's .venv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
SIZES = ("small", "full")


def execute(path: Path, size: str, out: Path | None = None, timeout: int = 1800) -> float:
    """Run one notebook with METAIF_NOTEBOOK_SIZE=size in its own folder; write it to `out`
    (default: in place). Returns the wall-clock seconds. Raises nbclient's CellExecutionError
    (naming the cell and showing its traceback) on the first failing cell."""
    import nbclient
    import nbformat

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}; received {size!r}.")
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("METAIF_NOTEBOOK_SIZE")
    os.environ["METAIF_NOTEBOOK_SIZE"] = size  # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("METAIF_NOTEBOOK_SIZE", None)
        else:
            os.environ["METAIF_NOTEBOOK_SIZE"] = previous
    seconds = time.perf_counter() - start
    nbformat.write(notebook, out or path)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every NN_*.ipynb in notebooks/)")
    parser.add_argument("--size", default="full", choices=SIZES, help="METAIF_NOTEBOOK_SIZE for the run (default full)")
    parser.add_argument("--out", default=None, help="folder for the executed copies (default: overwrite in place)")
    args = parser.parse_args()
    paths = [Path(p).resolve() if Path(p).exists() else HERE / p for p in args.notebooks] or NOTEBOOKS
    for path in paths:
        if not path.exists():
            sys.exit(f"notebook not found: {path}")
        out = None
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            out = Path(args.out) / path.name
        print(f"{path.name} (size {args.size}) ...", flush=True)
        seconds = execute(path, args.size, out)
        print(f"{path.name}: {seconds:.0f} s -> {out or path}", flush=True)


if __name__ == "__main__":
    main()
