"""Strict numerics for every test (float64, strict dtype promotion, rank-promotion errors), the
suite's persistent compilation cache and the fixtures shared by the test files."""

import gc
import os
from pathlib import Path

import metaif  # lazy: no JAX yet

# Single-threaded Eigen inside XLA's CPU kernels keeps the 2-core test machine predictable. (It does
# not prevent jaxlib 0.10's batched-LAPACK deadlock; metaif's own kernels avoid that, see
# metaif/_linalg.py and test_solvers.py::test_vmapped_dense_kernels_do_not_deadlock_on_cpu.)
metaif.configure_cpu()

# JAX's persistent compilation cache: compiled programs are written to the user's cache folder
# ($XDG_CACHE_HOME or ~/.cache, then metaif/jax-tests; METAIF_TEST_JAX_CACHE=PATH moves it, "" turns
# it off) and reused by the other pytest worker, by the subprocesses that the tests start (they
# inherit the environment), by later runs and by other clones on the same machine. Entries are keyed
# by the program, jax/jaxlib versions and flags, so a stale entry is never used. JAX writes an entry
# in place (not atomically), so each pytest-xdist worker keeps its own folder: two workers never
# read a half-written entry of the other, and a test that kills a subprocess gives it a cache of
# its own (test_cli.py). No size cap: JAX's capped mode races between processes.
_USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaif" / "jax-tests"
_CACHE = os.environ.setdefault("METAIF_TEST_JAX_CACHE", str(_USER_CACHE))
if _CACHE:  # set, not defaulted: a worker inherits the controller's environment
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(Path(_CACHE) / os.environ.get("PYTEST_XDIST_WORKER", "main"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Most of the suite's CPU time is XLA compiling many small programs. The tests run them with XLA's
# optimisation passes off (the same programs, compiled in a third of the time: measured on
# tests/test_explain.py, 94 s instead of 260 s of CPU); JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns them
# back on. Subprocesses inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402


# A test file that defines a `LAM` fixture (its meta-parameters at a stationary point, computed when
# the first test needs them rather than at import) gets these two with it.
@pytest.fixture(scope="module")
def FLAT(LAM):
    """The file's LAM as one flat vector."""
    return ravel_pytree(LAM)[0]


@pytest.fixture(scope="module")
def UNRAVEL(LAM):
    """Flat vector -> pytree shaped like the file's LAM."""
    return ravel_pytree(LAM)[1]


# Each compiled XLA:CPU program keeps memory mappings: tests/test_explain.py alone leaves 27,606 in
# its process, and a worker that ran several heavy files went past Linux's vm.max_map_count (65,530),
# so XLA crashed with a segmentation fault while compiling. Dropping the compiled programs after each
# file brings a worker back to about 800 mappings (the session fixtures hold arrays, not programs).
@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
