"""Strict numerics for every test (float64, strict dtype promotion, rank-promotion errors), the
suite's persistent compilation cache and the fixtures shared by the test files."""

import os
from pathlib import Path

# Single-threaded Eigen inside XLA's CPU kernels keeps the 2-core test machine predictable. (It does
# not prevent jaxlib 0.10's batched-LAPACK deadlock; metaif's own kernels avoid that, see
# metaif/_linalg.py and test_solvers.py::test_vmapped_dense_kernels_do_not_deadlock_on_cpu.)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

# JAX's persistent compilation cache: compiled programs are written to .jax_cache/ in the checkout
# (or METAIF_TEST_JAX_CACHE; "" turns it off) and reused by the other pytest worker, by the
# subprocesses that the tests start (the environment is inherited) and by later runs. A fresh clone
# starts with an empty cache.
_CACHE = os.environ.setdefault("METAIF_TEST_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

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
