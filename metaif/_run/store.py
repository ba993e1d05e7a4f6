"""The run folder's checkpoint store: every finished stage or chunk is one .npz file (no pickle),
written atomically (temporary file, fsync, os.replace), tagged with the fingerprint of everything
it depends on (settings, the content of upstream checkpoints and input files, metaif's code).

`manifest.json` records each checkpoint's sha256 and fingerprint; it is rewritten atomically after
the file itself. A file whose fingerprint differs from the one asked for is stale (a changed config
or code) and is recomputed. A file that is not recorded, whose bytes no longer match their sha256,
or that does not load is reported by name, moved aside to `rejected/` and recomputed; its
dependents follow, since their fingerprints cover its content. `log.jsonl` records each stage as
computed, reused or rejected.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write

from ..data._cache import UNREADABLE

_PACKAGE = Path(__file__).resolve().parents[1]
# Files that only present results (terminal, report, command line): changing them recomputes nothing.
_PRESENTATION = {"cli.py", "demo.py", "__main__.py", "_run/report.py", "_run/ui.py"}


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


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=1, default=_json_default) + "\n").encode())


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


MANIFEST = "manifest.json"
REJECTED = "rejected"


def read_manifest(out: Path) -> tuple[dict, str | None]:
    """The run folder's manifest (a new, empty one when absent) and why it could not be read, if so."""
    path = Path(out) / MANIFEST
    empty = {"format": "metaif run folder", "version": 1, "checkpoints": {}}
    if not path.exists():
        return empty, None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("checkpoints"), dict):
            raise ValueError("it lacks the table 'checkpoints'")
        for name, entry in manifest["checkpoints"].items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("fingerprint"), str)
            ):
                raise ValueError(f"its entry for {name!r} lacks sha256 or fingerprint")
    except (OSError, ValueError) as error:
        return empty, f"{MANIFEST} cannot be read ({error})"
    return manifest, None


def write_manifest(out: Path, manifest: dict) -> None:
    write_json(Path(out) / MANIFEST, manifest)


class Store:
    """Checkpoints under `<out>/checkpoints/`, their manifest `<out>/manifest.json`, rejected files
    under `<out>/rejected/`, the stage log `<out>/log.jsonl`. `warn(text)` reports a rejected file
    (default: a line on stderr)."""

    def __init__(self, out: Path, warn=None):
        self.out = Path(out)
        self.folder = self.out / "checkpoints"
        self.folder.mkdir(parents=True, exist_ok=True)
        if warn is None:
            from .ui import warning as warn
        self.warn = warn
        self.manifest, problem = read_manifest(self.out)
        if problem:
            self._move_aside(self.out / MANIFEST, "manifest")
            self.warn(
                f"{self.out / MANIFEST}: {problem}; it was moved to {REJECTED}/ and every checkpoint will be "
                "checked as unrecorded (and recomputed)."
            )
            write_manifest(self.out, self.manifest)

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def sha256(self, name: str) -> str:
        """The recorded sha256 of checkpoint `name` (to fingerprint what depends on its content)."""
        return self.manifest["checkpoints"][name]["sha256"]

    def load(self, name: str, fp: str) -> dict[str, np.ndarray] | None:
        """The arrays of checkpoint `name` when it exists, matches the manifest and carries
        fingerprint `fp`; None when it must be computed (a bad file is reported and moved aside)."""
        path = self.path(name)
        entry = self.manifest["checkpoints"].get(name)
        if not path.is_file():
            return None
        if entry is None:
            return self._reject(
                name,
                f"is not recorded in {MANIFEST} (copied in from another run folder, or saved by a "
                "run that was killed before it could record it)",
            )
        if entry.get("fingerprint") != fp:
            return None  # stale: another config or code; overwritten when recomputed
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return self._reject(
                name,
                f"does not match the sha256 recorded in {MANIFEST} when metaif wrote it "
                f"({len(data)} bytes now, {entry.get('bytes')} then): the file was edited, damaged or replaced",
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as entry_:
                arrays = {key: entry_[key] for key in entry_.files}
        except UNREADABLE as error:
            return self._reject(name, f"cannot be read as an .npz file ({type(error).__name__}: {error})")
        if str(arrays.pop("__fingerprint__", "")) != fp:
            return self._reject(name, f"carries another fingerprint than the one {MANIFEST} records for it")
        return arrays

    def save(self, name: str, fp: str, arrays: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, __fingerprint__=np.asarray(fp), **{k: np.asarray(v) for k, v in arrays.items()})
        data = buffer.getvalue()
        atomic_write(self.path(name), data)
        self.manifest["checkpoints"][name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "fingerprint": fp,
            "bytes": len(data),
        }
        write_manifest(self.out, self.manifest)

    def clear(self) -> list[str]:
        """Delete the checkpoints the manifest records (for --fresh); a recorded name whose file no
        longer matches its sha256 is moved aside instead, since metaif did not write those bytes.
        Returns the names of the files moved aside."""
        moved = []
        for name, entry in list(self.manifest["checkpoints"].items()):
            path = self.path(name)
            if path.is_file():
                if hashlib.sha256(path.read_bytes()).hexdigest() == entry.get("sha256"):
                    path.unlink()
                else:
                    moved.append(self._move_aside(path, name))
            del self.manifest["checkpoints"][name]
        write_manifest(self.out, self.manifest)
        return moved

    def _move_aside(self, path: Path, name: str) -> str:
        """Move `path` into rejected/ under a new name; returns that name relative to the run folder."""
        folder = self.out / REJECTED
        folder.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = folder / f"{name}.{stamp}{path.suffix}"
        count = 1
        while target.exists():
            count += 1
            target = folder / f"{name}.{stamp}-{count}{path.suffix}"
        os.replace(path, target)
        return f"{REJECTED}/{target.name}"

    def _reject(self, name: str, reason: str) -> dict[str, np.ndarray] | None:
        """Report and move aside a bad checkpoint; the load's answer is then None (recompute)."""
        moved = self._move_aside(self.path(name), name)
        if self.manifest["checkpoints"].pop(name, None) is not None:
            write_manifest(self.out, self.manifest)
        self.log("rejected", name, reason=reason, moved_to=moved)
        self.warn(
            f"checkpoint {self.path(name)} {reason}. Moved it to {self.out / moved} (not deleted); recomputing it "
            "and the stages that depend on it."
        )
        return None

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
