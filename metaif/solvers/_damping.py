"""Damping δ of the solves (H + δI) x = b: the default, curvature-aware choice, and the warning
when H + δI is not positive definite.

Default (`damping=None` on every matrix-free solver; `Dense(damping=None)` is its dense twin):

    δ = max(RELATIVE_DAMPING · λ_max(H),  NEGATIVE_MARGIN · max(0, −λ_min(H)))

with λ_max and λ_min extreme Ritz values (Dense uses the exact eigenvalues). `CG().solve_one`
(one target, the common call) takes them from the Lanczos run of its own solve, choosing δ after
each product (`_linalg.damped_lanczos_solve`: Krylov spaces do not depend on the shift); solves
of many right-hand sides share an estimate of ESTIMATE_STEPS Lanczos products. Where H is positive semi-definite (a trained
minimum) this is δ = 1e-4 · λ_max: relative to the curvature scale, so δ rescales with the loss and
bounds the condition number of H + δI by about 10⁴ (evidence: benchmarks/solvers.py, mlp-maml,
docs/solvers.md "Damping"). Where H is indefinite, as at a λ from Adam that is not a stationary
point, δ is twice the most negative curvature seen, so H + δI is positive definite and influence
is the response of proximal retraining (minimise F + (δ/2)‖λ − λ*‖², the PBRF view) rather than
an ill-posed solve. The Ritz values bound λ_min from above, so the solve is positive definite on
the space it searched; `SolveInfo.damping` reports the δ used and `SolveInfo.min_eigenvalue` the
smallest Ritz value.

Budget (`CG().solve_one` only): where `maxiter` products leave the solve at this δ with relative
residual above BUDGET_RESIDUAL (H + δI too ill-conditioned for the budget, or λ_min not found in
it), δ is raised to the smallest shift at which the same Krylov space solves to BUDGET_RESIDUAL.
The Lanczos residual is exact for every shift, so no product is spent on the choice: the answer
is an accurate solve at a larger, reported δ (a retraining that stays closer to λ) instead of an
inaccurate one at the smaller δ. Evidence: benchmarks/scale.py --size truth, where 16 products
saw no negative curvature, δ = 1e-4·λ_max left relative residual 0.86 and ranked tasks at
Spearman 0.58 against the converged solve; raised to δ = 1.6 it ranks at 1.0 (docs/real-networks.md).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import _linalg, _tree, _validate

PyTree = Any

RELATIVE_DAMPING = 1e-4
NEGATIVE_MARGIN = 2.0  # δ >= this × the most negative curvature seen
ESTIMATE_STEPS = 5  # Lanczos products for λ_max (mlp-maml: 5 steps give λ_max to 1e-8 relative)
BUDGET_RESIDUAL = 1e-2  # CG().solve_one: δ is raised until the maxiter-product solve meets this


class IndefiniteCurvatureWarning(RuntimeWarning):
    """H + δI showed a non-positive curvature direction: influence there is ill-posed."""


class InaccurateSolveWarning(RuntimeWarning):
    """An influence function's iterative inverse-Hessian solve (CG, Neumann, LiSSA) ended far
    from converged (relative residual above 0.5): its scores can rank differently from the exact
    solve's."""


def optional_non_negative(name: str, value: Any) -> float | None:
    """None (the default relative damping) or a finite number >= 0."""
    if value is None:
        return None
    if not _validate._real(value) or value < 0:
        raise ValueError(
            f"{name} must be None (default: {RELATIVE_DAMPING:g} × the largest eigenvalue of H, raised to "
            f"{NEGATIVE_MARGIN:g} × |λ_min(H)| where H is indefinite) or a "
            f"finite number >= 0; received {_validate.describe(value)}."
        )
    return float(value)


def relative(largest: jax.Array) -> jax.Array:
    """δ = RELATIVE_DAMPING · |λ_max| (the tiniest positive number if λ_max is 0)."""
    return RELATIVE_DAMPING * jnp.maximum(jnp.abs(largest), jnp.finfo(largest.dtype).tiny)


def curvature_aware(smallest: jax.Array, largest: jax.Array) -> jax.Array:
    """The default δ = max(RELATIVE_DAMPING · |λ_max|, NEGATIVE_MARGIN · max(0, −λ_min))."""
    return jnp.maximum(relative(largest), NEGATIVE_MARGIN * jnp.maximum(-smallest, 0.0))


def of_ritz_values(values: jax.Array) -> jax.Array:
    """The default δ from ascending Ritz (or exact) eigenvalues."""
    return curvature_aware(values[0], values[-1])


def ritz_range(hvp: Callable[[PyTree], PyTree], like: PyTree, steps: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """(smallest, largest) Ritz value of min(steps, d) Lanczos products on H: the largest is at most
    λ_max(H) and converges first; the smallest bounds λ_min(H) from above."""
    values = _linalg.lanczos(hvp, like, min(steps, _tree.size(like)), jax.random.key(seed)).values
    return values[0], values[-1]


def resolve(damping: float | None, hvp: Callable[[PyTree], PyTree], like: PyTree, seed: int) -> jax.Array:
    """The δ a solver uses: `damping` if given, else the default rule (`curvature_aware`) on the
    extreme Ritz values of ESTIMATE_STEPS Lanczos products."""
    dtype = _tree.float_dtype(like)
    if damping is not None:
        return jnp.asarray(damping, dtype)
    return curvature_aware(*ritz_range(hvp, like, ESTIMATE_STEPS, seed))


def damped(hvp: Callable[[PyTree], PyTree], damping) -> Callable[[PyTree], PyTree]:
    """v ↦ H v + δ·v (δ a number or a traced scalar)."""
    if isinstance(damping, (int, float)) and damping == 0:
        return hvp
    return lambda v: _tree.axpy(damping, v, hvp(v))


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def caller_level() -> int:
    """The `stacklevel` of the first frame outside the metaif package (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


INACCURATE = 0.5  # relative residual above which `warn_if_inaccurate` warns


def warn_if_inaccurate(info: _linalg.SolveInfo) -> bool:
    """Warn (InaccurateSolveWarning, pointing at the user's call) when a concrete SolveInfo of an
    iterative solve (products spent: CG, Neumann, LiSSA; not the spectral LowRank or Identity,
    whose residual is large by design) ends with a worst relative residual above INACCURATE;
    silent under tracing. Returns whether it warned."""
    if info is None or not _validate.is_concrete(info.relative_residual):
        return False
    residual = float(np.max(np.asarray(info.relative_residual)))
    products = int(np.max(np.asarray(info.iterations)))
    if not (residual > INACCURATE and products > 0):
        return False
    warnings.warn(
        f"The inverse-Hessian solve stopped at relative residual {residual:.3g} after {products} products "
        f"(δ = {float(np.max(np.asarray(info.damping))):.3g}): x is far from (H + δI)⁻¹b, so the scores can rank "
        "differently from the exact solve's. H + δI is badly conditioned here (λ_max(H)/δ large). Raise the "
        "solver's maxiter (e.g. solver=metaif.solvers.CG(maxiter=64)), add a preconditioner "
        "(CG(preconditioner='lowrank')) or raise the damping; result.solve holds the numbers.",
        InaccurateSolveWarning,
        stacklevel=caller_level(),
    )
    return True


def warn_if_indefinite(info: _linalg.SolveInfo) -> bool:
    """Warn (IndefiniteCurvatureWarning, pointing at the user's call) when a concrete SolveInfo
    reports non-positive curvature; silent under tracing. Returns whether it warned."""
    if info is None or not _validate.is_concrete(info.indefinite) or not bool(np.any(np.asarray(info.indefinite))):
        return False
    delta = float(np.max(np.asarray(info.damping)))
    smallest = float(np.min(np.asarray(info.min_eigenvalue)))
    known = "" if np.isnan(smallest) else f"; the smallest eigenvalue of H is {smallest:.3g}"
    advice = f"above {abs(smallest):.3g}" if not np.isnan(smallest) and smallest < 0 else "above |λ_min(H)|"
    warnings.warn(
        f"The inverse-Hessian solve met non-positive curvature: H + δI with δ = {delta:.3g} is not positive "
        f"definite{known}. meta_params is then not a local minimum of the meta-objective (or δ is too small), "
        f"influence is ill-posed there and the scores can rank badly (iterative solvers stop early). "
        f"Pass a damping {advice} (for example solver=metaif.solvers.CG(damping=...)), estimating λ_min(H) with "
        f"metaif.solvers.lanczos_eigenvalues(metaif.hessian_operator(problem, meta_params, tasks), which='smallest'); "
        f"or train further (metaif.newton_refine).",
        IndefiniteCurvatureWarning,
        stacklevel=caller_level(),
    )
    return True
