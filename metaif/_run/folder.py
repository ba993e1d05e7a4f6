"""The run folder of `metaif run` / `metaif demo`: metaif writes only into a new or empty folder, or
one that its `manifest.json` marks as a metaif run folder, so it never overwrites a person's files;
one run at a time holds the folder's lock; `--fresh` deletes only the checkpoints the manifest
records (see `store.Store.clear`), never a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from .config import ConfigError
from .store import MANIFEST, REJECTED, Store, read_manifest, write_manifest
from .ui import warning

LOCK = ".metaif-lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (documented in `metaif run --help`)
    fcntl = None  # type: ignore[assignment]


def check(out: Path, label: str) -> None:
    """A ConfigError when metaif may not write into `out` (described as `label`, e.g. "--out 'x'"):
    an existing folder that is not empty and has no manifest.json, or a folder another run holds."""
    out = Path(out)
    _check_owner(out, label)
    if (out / LOCK).exists():
        with _locked(out, label, probe=True):
            pass


def _check_owner(out: Path, label: str) -> None:
    if out.is_dir() and not (out / MANIFEST).exists():
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name != LOCK)
        if entries:
            shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
            raise ConfigError(
                f"{label} is an existing folder that metaif did not create (it has no {MANIFEST}) and it is "
                f"not empty: it holds {shown}. metaif writes results only into a new or empty folder or one "
                "of its own run folders, so that it never overwrites or deletes your files. Give another "
                "--out (or move those files away; a run folder of an older metaif version can be deleted)."
            )


@contextlib.contextmanager
def claimed(out: Path, label: str, fresh: bool = False, warn=None):
    """Create or adopt the run folder `out` and hold its lock for the duration; with `fresh`, first
    delete the checkpoints its manifest records."""
    out = Path(out)
    warn = warn or warning
    _check_owner(out, label)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, label, warn):
        manifest, _ = read_manifest(out)
        if not (out / MANIFEST).exists():
            from .. import __version__

            manifest["created"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
            manifest["created_by"] = f"metaif {__version__}"
            write_manifest(out, manifest)
        if fresh:
            moved = Store(out, warn).clear()
            if moved:
                warn(
                    f"--fresh deleted the checkpoints metaif recorded in {out / MANIFEST}; {', '.join(moved)} no longer "
                    f"matched what metaif wrote and were moved to {out / REJECTED} instead of being deleted."
                )
        yield out


@contextlib.contextmanager
def _locked(out: Path, label: str, warn=None, probe: bool = False):
    """Hold an exclusive lock on `out/.metaif-lock` (released by the kernel if the process dies;
    the file then still names the dead holder, which the next run reports as taken over). A
    `probe` only checks that the lock is free and leaves the file as it is."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = out / LOCK
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{label} is in use by another metaif run ({_holder(handle.read())}); two runs in one folder "
                "would mix their checkpoints. Wait for that run to finish or stop it, or give this run "
                "another --out."
            ) from None
        if probe:
            yield
            return
        previous = handle.read().strip()
        if previous:
            warn(
                f"{path} was left by a run that stopped without releasing it ({_holder(previous)}, no longer running); "
                "taking it over."
            )
        _rewrite(
            handle,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            ),
        )
        try:
            yield
        finally:
            _rewrite(handle, "")
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()


def _rewrite(handle, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()
    os.fsync(handle.fileno())


def _holder(text: str) -> str:
    """The lock holder as words: "pid 123 on host h, started ..."."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder unknown: the lock file reads {text.strip()[:80]!r}"
