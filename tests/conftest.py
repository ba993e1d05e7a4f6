"""Strict numerics for every test: float64, strict dtype promotion, rank-promotion errors."""

import jax

import metaif

# Single-threaded Eigen inside XLA's CPU kernels keeps the 2-core test machine predictable. (It does
# not prevent jaxlib 0.10's batched-LAPACK deadlock; metaif's own kernels avoid that, see
# metaif/_linalg.py and test_solvers.py::test_vmapped_dense_kernels_do_not_deadlock_on_cpu.)
metaif.configure_cpu()

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
