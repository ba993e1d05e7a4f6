"""Neumann: the truncated Neumann series of (H + δI)⁻¹ b on exact Hessian-vector products."""

from __future__ import annotations

import jax.numpy as jnp

from .. import _linalg, _tree, _validate
from . import _checks, _damping, _spectrum
from .._module import options, static
from ._base import Solver


@options
class Neumann(Solver):
    """x = η Σ_{j=0..J} (I − η(H + δI))^j b (the truncated Neumann series), by the recursion
    r_{j+1} = r_j − η(H + δI) r_j, x = η Σ r_j: J = `iterations` Hessian-vector products per
    right-hand side, no storage beyond three vectors.

    The series converges to (H + δI)⁻¹ b when 0 < η(λ + δ) < 2 for every eigenvalue λ of H, at
    rate 1 − η(λ_min + δ) per term, so relative error ε needs J ≈ 1.1·κ·ln(1/ε) terms with
    κ = (λ_max + δ)/(λ_min + δ); truncated early it acts as a spectral filter (directions of small
    curvature are under-inverted). With the default δ = 1e-4·λ_max, κ is up to 1e4: far more
    terms than the default J = 100 (on an ill-conditioned H it ranks scores far worse than 16 CG
    products: see the docs' "Measured results" page; prefer `CG` unless κ·ln(1/ε) is affordable).
    `scale=None` chooses η = 1/(1.1·θ) in `prepare`, with θ the largest Ritz value of
    `estimate_steps` Lanczos products on H, plus δ (shared by all right-hand sides); that run also
    flags H + δI as indefinite when its smallest Ritz value plus δ is <= 0.

    Attributes (defaults in parentheses):
      damping: δ >= 0, or None for the default max(1e-4 × λ_max(H), 2 × max(0, −λ_min(H))) (None; `metaif.solvers.Dense(damping=None)`
        is the dense twin).
      iterations: J, terms after the first (100).
      scale: η > 0, or None to estimate it (None).
      tol: `converged` means relative residual <= tol (1e-6).
      estimate_steps: Lanczos products for the estimates of η and δ (20; capped at d).
      seed: seed of the Lanczos start vector (0).
    """

    damping: float | None = None
    iterations: int = static(default=100)
    scale: float | None = None
    tol: float = 1e-6
    estimate_steps: int = static(default=20)
    seed: int = 0

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_damping.optional_non_negative("Neumann.damping", self.damping),
            iterations=_validate.positive_int("Neumann.iterations", self.iterations),
            scale=_checks.optional_positive("Neumann.scale", self.scale),
            tol=_validate.positive("Neumann.tol", self.tol),
            estimate_steps=_validate.positive_int("Neumann.estimate_steps", self.estimate_steps),
            seed=_checks.non_negative_int("Neumann.seed", self.seed),
        )

    def prepare(self, operator):
        return series_setup(self, operator)

    def solve(self, state, b):
        matvec, eta, delta, flagged = state
        x, bad = _linalg.neumann_series(lambda j, v: matvec(v), b, eta, self.iterations)
        return x, _linalg.solve_info(
            matvec, x, b, iterations=self.iterations, tol=self.tol, damping=delta, indefinite=flagged | bad
        )


def series_setup(solver, operator):
    """(v ↦ (H + δI)v, η, δ, indefinite flag) for a Neumann-type solver with fields damping,
    scale, estimate_steps and seed: one Lanczos run on H serves both estimates when either is None."""
    if solver.scale is not None and solver.damping is not None:
        delta = jnp.asarray(solver.damping, _tree.float_dtype(operator.like))
        return _damping.damped(operator.hvp, solver.damping), solver.scale, delta, jnp.zeros((), bool)
    smallest, largest = _damping.ritz_range(operator.hvp, operator.like, solver.estimate_steps, solver.seed)
    delta = (
        _damping.curvature_aware(smallest, largest)
        if solver.damping is None
        else jnp.asarray(solver.damping, largest.dtype)
    )
    eta = _spectrum.neumann_scale(largest, delta) if solver.scale is None else solver.scale
    return _damping.damped(operator.hvp, delta), eta, delta, ~(smallest + delta > 0)
