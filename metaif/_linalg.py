"""Linear-algebra kernels on pytrees: conjugate gradients and a dense symmetric eigen-solve.

Both report a `SolveInfo`, so failure is visible in the result and never silent.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import _tree

PyTree = Any


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve (H + damping·I) x = b.

    Attributes:
      iterations: matrix-vector products spent by an iterative solver (0 for a dense solve).
      residual_norm: ‖(H + damping·I) x − b‖, recomputed from x (not the solver's recursion).
      relative_residual: residual_norm / ‖b‖ (0 when b = 0).
      converged: CG: the tolerance was met before `maxiter` and before any non-positive
        curvature; dense: H + damping·I was invertible and the solution is finite.
      indefinite: whether H + damping·I showed a non-positive curvature direction
        (dense: its smallest eigenvalue is <= 0; CG: some search direction had pᵀ(H + δI)p <= 0).
      min_eigenvalue: smallest eigenvalue of H (without damping) for dense solves, NaN otherwise.

    Batched solves (one per right-hand side) carry a leading batch axis on every field.
    """

    iterations: jax.Array
    residual_norm: jax.Array
    relative_residual: jax.Array
    converged: jax.Array
    indefinite: jax.Array
    min_eigenvalue: jax.Array


def _relative(residual: jax.Array, b_norm: jax.Array) -> jax.Array:
    return jnp.where(b_norm > 0, residual / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree], b: PyTree, *, tol: float, maxiter: int
) -> tuple[PyTree, SolveInfo]:
    """Solve A x = b for symmetric positive-definite A given only x ↦ A x.

    Stops when the recursive residual is at most tol·‖b‖, after `maxiter` products, or at the
    first direction of non-positive curvature (then `indefinite` is True and `converged` False).
    """
    b_norm = _tree.norm(b)
    dtype = b_norm.dtype
    threshold = tol * b_norm

    def cond(state):
        k, _, _, _, rs, bad = state
        return (k < maxiter) & (jnp.sqrt(rs) > threshold) & ~bad

    def body(state):
        k, x, r, p, rs, _ = state
        ap = matvec(p)
        pap = _tree.vdot(p, ap)
        bad = ~(pap > 0)
        alpha = jnp.where(bad, 0.0, rs / jnp.where(bad, 1.0, pap))
        x = _tree.axpy(alpha, p, x)
        r = _tree.axpy(-alpha, ap, r)
        rs_new = _tree.sq_norm(r)
        beta = rs_new / jnp.where(rs > 0, rs, 1.0)
        p = _tree.axpy(beta, p, r)
        return k + 1, x, r, p, rs_new, bad

    init = (jnp.zeros((), jnp.int32), _tree.zeros_like(b), b, b, _tree.sq_norm(b), jnp.zeros((), bool))
    k, x, _, _, rs, bad = jax.lax.while_loop(cond, body, init)
    residual = _tree.norm(_tree.sub(matvec(x), b))
    info = SolveInfo(
        iterations=k,
        residual_norm=residual,
        relative_residual=_relative(residual, b_norm),
        converged=(jnp.sqrt(rs) <= threshold) & ~bad,
        indefinite=bad,
        min_eigenvalue=jnp.full((), jnp.nan, dtype),
    )
    return x, info


class Eigh(NamedTuple):
    """Eigen-decomposition of a symmetric matrix: matrix = vectors · diag(values) · vectorsᵀ."""

    values: jax.Array
    vectors: jax.Array


def eigh(matrix: jax.Array) -> Eigh:
    values, vectors = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    return Eigh(values, vectors)


def eigh_solve(factor: Eigh, b: jax.Array, damping: float) -> tuple[jax.Array, SolveInfo]:
    """x = (matrix + damping·I)⁻¹ b for a flat vector b, with diagnostics."""
    shifted = factor.values + damping
    x = factor.vectors @ ((factor.vectors.T @ b) / shifted)
    applied = factor.vectors @ (shifted * (factor.vectors.T @ x))
    residual = jnp.linalg.norm(applied - b)
    b_norm = jnp.linalg.norm(b)
    indefinite = ~(shifted[0] > 0)
    info = SolveInfo(
        iterations=jnp.zeros((), jnp.int32),
        residual_norm=residual,
        relative_residual=_relative(residual, b_norm),
        converged=jnp.all(jnp.isfinite(x)) & jnp.all(shifted != 0),
        indefinite=indefinite,
        min_eigenvalue=factor.values[0],
    )
    return x, info


def dense_matrix(matvec: Callable[[PyTree], PyTree], like: PyTree) -> jax.Array:
    """Materialise the d×d matrix of a linear map on pytrees shaped like `like`."""
    flat, unravel = _tree.ravel(like)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    columns = jax.vmap(lambda e: _tree.ravel(matvec(unravel(e)))[0])(basis)
    return columns.T


def summarize(info: SolveInfo) -> SolveInfo:
    """The worst case over a batch of solves, as scalars: max iterations and residuals, all
    converged, any indefinite, smallest eigenvalue."""
    return SolveInfo(
        iterations=jnp.max(info.iterations),
        residual_norm=jnp.max(info.residual_norm),
        relative_residual=jnp.max(info.relative_residual),
        converged=jnp.all(info.converged),
        indefinite=jnp.any(info.indefinite),
        min_eigenvalue=jnp.min(info.min_eigenvalue),
    )
