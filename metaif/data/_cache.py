"""An on-disk cache of decoded arrays: .npz files (no pickle), written atomically.

Location: $METAIF_CACHE, else $XDG_CACHE_HOME/metaif, else ~/.cache/metaif. Entries are named by
a digest of their source (see `_source.fingerprint`), so a changed source never hits a stale entry.
A cache that cannot be read is rebuilt; one that cannot be written is skipped.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    if os.environ.get("METAIF_CACHE"):
        return Path(os.environ["METAIF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaif"


def load(name: str) -> dict[str, np.ndarray] | None:
    """The arrays of cache entry `name`, or None when absent or unreadable."""
    path = cache_dir() / name
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            return {key: entry[key] for key in entry.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Write entry `name` atomically (temporary file + rename); silently skipped on OSError."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                np.savez(out, **arrays)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError:
        return
