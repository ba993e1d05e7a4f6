"""Neumann: the truncated Neumann series of (H + δI)⁻¹ b on exact Hessian-vector products."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .. import _linalg, _tree, _validate
from . import _checks, _spectrum
from ._base import Solver


@dataclasses.dataclass(frozen=True)
class Neumann(Solver):
    """x = η Σ_{j=0..J} (I − η(H + δI))^j b (paper.md, section 1), by the recursion
    r_{j+1} = r_j − η(H + δI) r_j, x = η Σ r_j: J = `iterations` Hessian-vector products per
    right-hand side, no storage beyond three vectors.

    The series converges to (H + δI)⁻¹ b when 0 < η(λ + δ) < 2 for every eigenvalue λ of H, at
    rate 1 − η(λ_min + δ) per term; truncated early it acts as a spectral filter (directions of
    small curvature are under-inverted). `scale=None` chooses η = 1/(1.1·θ) in `prepare`, with θ
    the largest Ritz value of `estimate_steps` Lanczos products on H + δI (shared by all
    right-hand sides); that run also flags H + δI as indefinite when its smallest Ritz value is
    <= 0.

    Attributes (defaults in parentheses):
      damping: δ >= 0 (0.0).
      iterations: J, terms after the first (100).
      scale: η > 0, or None to estimate it (None).
      tol: `converged` means relative residual <= tol (1e-6).
      estimate_steps: Lanczos products for the estimate of η (20; capped at d).
      seed: seed of the Lanczos start vector (0).
    """

    damping: float = 0.0
    iterations: int = 100
    scale: float | None = None
    tol: float = 1e-6
    estimate_steps: int = 20
    seed: int = 0

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_validate.non_negative("Neumann.damping", self.damping),
            iterations=_validate.positive_int("Neumann.iterations", self.iterations),
            scale=_checks.optional_positive("Neumann.scale", self.scale),
            tol=_validate.positive("Neumann.tol", self.tol),
            estimate_steps=_validate.positive_int("Neumann.estimate_steps", self.estimate_steps),
            seed=_checks.non_negative_int("Neumann.seed", self.seed),
        )

    def prepare(self, operator):
        matvec = damped(operator.hvp, self.damping)
        if self.scale is not None:
            return matvec, self.scale, jnp.zeros((), bool)
        eta, smallest = _spectrum.neumann_scale(matvec, operator.like, self.estimate_steps, self.seed)
        return matvec, eta, ~(smallest > 0)

    def solve(self, state, b):
        matvec, eta, flagged = state
        x, bad = _linalg.neumann_series(lambda j, v: matvec(v), b, eta, self.iterations)
        return x, _linalg.solve_info(matvec, x, b, iterations=self.iterations, tol=self.tol, indefinite=flagged | bad)


def damped(hvp, damping: float):
    """v ↦ H v + damping·v."""
    if damping == 0:
        return hvp
    return lambda v: _tree.axpy(damping, v, hvp(v))
