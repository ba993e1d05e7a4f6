"""An on-disk cache of decoded arrays: .npz files (no pickle), written atomically.

Location: $METAIF_CACHE, else $XDG_CACHE_HOME/metaif, else ~/.cache/metaif. Entries are named by
a digest of their source (see `_source.fingerprint`), so a changed source never hits a stale entry.
Each entry carries the sha256 of its arrays: an entry that cannot be read, or whose arrays were
edited since it was written, is rebuilt from the source; one that cannot be written is skipped.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .._io import atomic_write

from ._source import arrays_sha256

_DIGEST = "__sha256__"
# What a damaged .npz can raise while being read (zip structure, compression, array header, array data).
UNREADABLE = (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def cache_dir() -> Path:
    if os.environ.get("METAIF_CACHE"):
        return Path(os.environ["METAIF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaif"


def load(name: str) -> dict[str, np.ndarray] | None:
    """The arrays of cache entry `name`, or None when absent, unreadable or not what was written."""
    path = cache_dir() / name
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            arrays = {key: entry[key] for key in entry.files}
    except UNREADABLE:
        return None
    if str(arrays.pop(_DIGEST, "")) != arrays_sha256(arrays):
        return None
    return arrays


def save(name: str, arrays: dict[str, np.ndarray]) -> None:
    """Write entry `name` atomically (temporary file + rename); silently skipped on OSError."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / name, lambda out: np.savez(out, **arrays, **{_DIGEST: np.asarray(arrays_sha256(arrays))}))
    except OSError:
        return
