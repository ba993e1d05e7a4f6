"""Process-level settings, applied only when asked: XLA's CPU flags and JAX's persistent
compilation cache. Importing metaif changes neither."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_ENV = "METAIF_COMPILATION_CACHE"


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:  # JAX has no public way to ask without starting a backend
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(xla_bridge, "_backends", {}))


def configure_cpu(*, devices: int | None = None, multi_thread_eigen: bool = False) -> str:
    """Append metaif's CPU flags to `XLA_FLAGS`; call before the first JAX computation.

    Args:
      devices: fake this many CPU devices (`--xla_force_host_platform_device_count`), to test
        sharded code on one machine. None leaves the count alone.
      multi_thread_eigen: False (default) passes `--xla_cpu_multi_thread_eigen=false`: XLA's CPU
        kernels then use one Eigen thread each, which keeps timings on small machines steady.

    Returns the resulting `XLA_FLAGS`. Raises RuntimeError when a JAX backend is already running
    (flags are read once, when the first computation starts a backend).
    """
    flags = os.environ.get("XLA_FLAGS", "").split()
    wanted = [] if multi_thread_eigen else ["--xla_cpu_multi_thread_eigen=false"]
    if devices is not None:
        if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be an int >= 1 or None; received {devices!r}.")
        wanted.append(f"--xla_force_host_platform_device_count={devices}")
    if all(flag in flags for flag in wanted):
        return " ".join(flags)  # already set (by this process or its parent): nothing to change
    if _backends_started():
        raise RuntimeError(
            "metaif.configure_cpu must run before the first JAX computation (XLA reads XLA_FLAGS once, "
            "when a backend starts); call it at the top of your script."
        )
    if devices is not None:
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count=")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in wanted if f not in flags])
    return os.environ["XLA_FLAGS"]


def enable_compilation_cache(path: str | os.PathLike | None = None, *, min_compile_seconds: float = 0.5) -> Path:
    """Turn on JAX's persistent compilation cache: a later process that compiles the same program
    (same code, shapes, options and jax version) loads it from disk instead.

    Args:
      path: the cache folder; default `$METAIF_COMPILATION_CACHE`, else
        `~/.cache/metaif/jax-compilation`.
      min_compile_seconds: programs that compile faster than this are not written.

    Returns the folder. Safe to share between processes; delete it to reclaim the space.
    """
    import jax

    folder = Path(
        path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "metaif" / "jax-compilation"
    ).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
