"""Extreme eigenvalues of the curvature by Lanczos: a public stationarity check
(`lanczos_eigenvalues`) and the spectral estimates the solvers need (top eigenpairs, the Neumann
step size)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from .. import _linalg, _tree, _validate
from . import _checks
from ._base import Operator

PyTree = Any

SCALE_MARGIN = 1.1  # Neumann/LiSSA step size η = 1 / (SCALE_MARGIN · λ̂_max(H + δI))


class Eigenpairs(NamedTuple):
    """k extreme eigenpairs of a symmetric operator, from a Lanczos run.

    Attributes:
      values: [k] eigenvalue estimates, from the extreme inward (ascending for "smallest",
        descending for "largest").
      vectors: pytree like the meta-parameters with leading axis k: orthonormal eigenvector
        estimates, in the order of `values`.
      residuals: [k] ‖H yᵢ − θᵢ yᵢ‖: some eigenvalue of H lies within residualᵢ of valuesᵢ, so a
        small residual certifies the estimate (raise `iterations` while it is not small).
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array


def default_steps(k: int, dimension: int) -> int:
    """Lanczos steps for k extreme eigenpairs when the user gives none: min(d, 2k + 20)."""
    return min(dimension, 2 * k + 20)


def extreme_pairs(
    hvp: Callable[[PyTree], PyTree], like: PyTree, k: int, which: str, steps: int, seed: int
) -> tuple[Eigenpairs, jax.Array]:
    """(k extreme Ritz pairs, the smallest Ritz value of the whole run); no argument checks."""
    run = _linalg.lanczos(hvp, like, steps, jax.random.key(seed))
    index = jnp.arange(k) if which == "smallest" else jnp.arange(steps - 1, steps - 1 - k, -1)
    pick = lambda x: jnp.take(x, index, axis=0)
    return Eigenpairs(pick(run.values), jax.tree.map(pick, run.vectors), pick(run.residuals)), run.values[0]


def neumann_scale(largest: jax.Array, damping: jax.Array) -> jax.Array:
    """η = 1 / (SCALE_MARGIN · θ) for the Neumann series of H + δI, with θ = largest + δ the
    estimate of λ_max(H + δI) from the largest Ritz value of H (never above λ_max(H))."""
    top = jnp.abs(largest + damping)
    return 1.0 / (SCALE_MARGIN * jnp.maximum(top, jnp.finfo(top.dtype).tiny))


def lanczos_eigenvalues(
    operator: Operator | Callable[[PyTree], PyTree],
    like: PyTree | None = None,
    k: int = 1,
    which: str = "smallest",
    *,
    iterations: int | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """The k smallest or largest eigenvalues of a symmetric curvature H, matrix-free.

    Use it to check that λ is a minimum (the smallest eigenvalues of the total Hessian should be
    >= 0) or to choose damping (δ above |smallest eigenvalue|) and Neumann step sizes.

    Args:
      operator: a `metaif.solvers.Operator`, or a function v ↦ H v on pytrees shaped like `like`
        (for example `lambda v: jax.jvp(jax.grad(F), (lam,), (v,))[1]`).
      like: the meta-parameters (needed with a function; taken from an Operator otherwise).
      k: how many eigenvalues, 1 <= k <= d.
      which: "smallest" or "largest".
      iterations: Lanczos steps (Hessian-vector products), k <= iterations <= d; default
        min(d, 2k + 20). Interior and clustered eigenvalues need more: check `residuals`.
        With iterations = d the answer is exact up to rounding.
      seed: seed of the random start vector.

    Returns:
      `Eigenpairs(values [k], vectors [k, ...], residuals [k])`. Ritz values never exceed the true
      range: the "smallest" estimates are upper bounds of the smallest eigenvalues.
    """
    if isinstance(operator, Operator):
        hvp = operator.hvp
        like = operator.like if like is None else like
    else:
        _validate.callable_(
            "operator", operator, "v -> H v on pytrees shaped like `like`, or a metaif.solvers.Operator"
        )
        hvp = operator
        if like is None:
            raise ValueError("like must be given (the meta-parameters) when operator is a function; received None.")
    _validate.floating_tree("like", like)
    dimension = _tree.size(like)
    k = _validate.positive_int("k", k)
    _checks.at_most_dimension("k", k, dimension)
    which = _checks.choice("which", which, ("smallest", "largest"))
    iterations = _checks.optional_positive_int("iterations", iterations)
    seed = _checks.non_negative_int("seed", seed)
    if iterations is None:
        iterations = default_steps(k, dimension)
    elif iterations < k:
        raise ValueError(f"iterations must be at least k = {k}; received {iterations}.")
    _checks.at_most_dimension("iterations", iterations, dimension)
    return extreme_pairs(hvp, like, k, which, iterations, seed)[0]
