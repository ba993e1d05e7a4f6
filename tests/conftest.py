"""Strict numerics for every test: float64, strict dtype promotion, rank-promotion errors."""

import os

# XLA's multi-threaded Eigen pool on CPU can deadlock on vmapped LAPACK calls (seen with batched
# LU on 2 cores, jaxlib 0.10.2); single-threaded Eigen avoids it. Set before any computation.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
