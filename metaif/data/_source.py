"""Where dataset files are found and how they are checked: data root, file lookup, checksums.

Every loader resolves its files the same way: the `root` argument, else the `METAIF_DATA`
environment variable; inside it a few conventional sub-folders, then the root itself. A missing
file or a checksum mismatch raises an error that says what is missing, where it was looked for and
where to obtain it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from .. import _validate

ENV = "METAIF_DATA"


def data_root(
    loader: str, root, *, name: str = "root", unset: str = "root is None", how: str = "pass root='/path/to/data'"
) -> Path:
    """The data root: `root`, else $METAIF_DATA; must be an existing folder. `name`, `unset` and
    `how` word the errors (the command says `[data] root` where the API says `root=`)."""
    if root is None:
        env = os.environ.get(ENV)
        if not env:
            raise ValueError(
                f"{loader}: {unset} and the {ENV} environment variable is not set; {how} "
                f"or set {ENV} to the folder that holds the dataset."
            )
        root, origin = env, f"${ENV}"
    else:
        origin = name
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(
            f"{loader}: root must be a path (str or os.PathLike) or None; received {_validate.describe(root)}."
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{loader}: the data root {str(path)!r} (from {origin}) is not an existing folder; "
            f"{how} or set {ENV} to the folder that holds the dataset."
        )
    return path


def candidates(root: Path, subdirs: Iterable[str]) -> list[Path]:
    """root/<sub> for each conventional sub-folder that exists, then root itself."""
    found = [root / sub for sub in subdirs if (root / sub).is_dir()]
    return found + [root]


def find(loader: str, folders: list[Path], names: Iterable[str], what: str, source: str) -> Path:
    """The first existing `folder/name` over folders × names (a name ending in "/" is a folder),
    or a FileNotFoundError that says what was looked for, where, and where to obtain it."""
    names = list(names)
    for base in folders:
        for name in names:
            path = base / name.rstrip("/")
            if path.is_dir() if name.endswith("/") else path.is_file():
                return path
    raise FileNotFoundError(
        f"{loader}: {what} not found; looked for {' or '.join(repr(n) for n in names)} in "
        f"{', '.join(repr(str(f)) for f in folders)}. {source}"
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(arrays: dict, skip=()) -> str:
    """sha256 over named arrays: names, dtypes, shapes and bytes, in name order (`skip`: names left out)."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(set(arrays) - set(skip)):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def check_digest(loader: str, path: Path, expected: str | tuple[str, ...], got: str, what: str, source: str) -> None:
    """Raise a ValueError naming the file when `got` is not one of the `expected` digests."""
    expected = (expected,) if isinstance(expected, str) else tuple(expected)
    if got not in expected:
        raise ValueError(
            f"{loader}: checksum mismatch for {str(path)!r} ({what}): expected {' or '.join(expected)}, got {got}. "
            f"The file is corrupt, truncated or not the official release. {source} "
            "(Pass verify=False to load a modified copy at your own risk.)"
        )


def fingerprint(path: Path) -> str:
    """A digest identifying a source: a file's sha256, or a folder's listing (paths, sizes, mtimes)."""
    if path.is_file():
        return file_digest(path)
    digest = hashlib.sha256()
    for sub in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = sub.stat()
        digest.update(f"{sub.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def require(module: str, package: str, loader: str):
    """Import an optional dependency or raise an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{loader} needs the {package!r} package: pip install {package}") from error
