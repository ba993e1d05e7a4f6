"""The run folder's checkpoint store: every finished stage or chunk is one .npz file (no pickle),
written atomically (temporary file, fsync, os.replace), tagged with the fingerprint of everything
it depends on (config sections, upstream stages, metaif's code). A file whose fingerprint does not
match is stale and recomputed; a file that cannot be read is recomputed. `log.jsonl` records each
stage as computed or reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_PACKAGE = Path(__file__).resolve().parents[1]
# Files that only present results (terminal, report, command line): changing them recomputes nothing.
_PRESENTATION = {"cli.py", "demo.py", "__main__.py", "_run/report.py", "_run/ui.py"}
_UMASK = os.umask(0)
os.umask(_UMASK)


def code_version() -> str:
    """metaif's version and a digest of its source files: a code change invalidates checkpoints.
    $METAIF_CODE_VERSION, when set, replaces the digest (to keep checkpoints across a code change
    you know to be irrelevant, at your own risk; the tests use it)."""
    from .. import __version__

    if os.environ.get("METAIF_CODE_VERSION"):
        return f"{__version__}+{os.environ['METAIF_CODE_VERSION']}"
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        if path.relative_to(_PACKAGE).as_posix() in _PRESENTATION:
            continue
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:16]}"


def fingerprint(*parts: Any) -> str:
    """A digest of JSON-serialisable parts (configs, upstream fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are ordinary files
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=1, default=_json_default) + "\n").encode())


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Store:
    """Checkpoints under `<out>/checkpoints/`, the stage log `<out>/log.jsonl`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.folder = self.out / "checkpoints"
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def load(self, name: str, fp: str) -> dict[str, np.ndarray] | None:
        """The arrays of checkpoint `name` when it exists, reads, and carries fingerprint `fp`."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                arrays = {key: entry[key] for key in entry.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if str(arrays.pop("__fingerprint__", "")) != fp:
            return None
        return arrays

    def save(self, name: str, fp: str, arrays: dict[str, Any]) -> None:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, __fingerprint__=np.asarray(fp), **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write(self.path(name), buffer.getvalue())

    def log(self, event: str, name: str, **fields: Any) -> None:
        record = {"time": round(time.time(), 3), "event": event, "stage": name, **fields}
        with open(self.out / "log.jsonl", "a") as handle:
            handle.write(json.dumps(record, default=_json_default) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def cached(self, name: str, fp: str, compute, describe: str | None = None) -> dict[str, np.ndarray]:
        """Checkpoint `name` if current, else compute() -> dict of arrays, saved before returning."""
        arrays = self.load(name, fp)
        if arrays is not None:
            self.log("reused", name)
            return arrays
        start = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        seconds = time.perf_counter() - start
        arrays.setdefault("seconds", np.asarray(seconds))
        self.save(name, fp, arrays)
        self.log("computed", name, seconds=round(seconds, 3))
        return arrays


def save_tree(prefix: str, tree) -> dict[str, np.ndarray]:
    """A pytree's leaves as arrays named prefix0, prefix1, ... (restore with `load_tree`)."""
    import jax

    return {f"{prefix}{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def load_tree(prefix: str, arrays: dict[str, np.ndarray], like):
    """The pytree with the structure of `like` from arrays written by `save_tree`."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(like)
    return jax.tree.unflatten(treedef, [jnp.asarray(arrays[f"{prefix}{i}"]) for i in range(len(leaves))])
