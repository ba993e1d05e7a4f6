"""CG: matrix-free (preconditioned) conjugate gradients on exact Hessian-vector products."""

from __future__ import annotations

import jax

from .. import _linalg, _tree, _validate
from . import _checks, _damping, _preconditioner, _spectrum
from .._module import options, static
from ._base import Solver

PRECONDITIONERS = (None, "diagonal", "lowrank")
DEFAULT_RANK = 16


@options
class CG(Solver):
    """Conjugate gradients on v ↦ (H + damping·I) v; never materialises H.

    Needs H + damping·I positive definite. With a given `damping`, on meeting non-positive
    curvature it stops and reports `indefinite=True, converged=False` (raise `damping`;
    `metaif.influence` warns). With the default `damping=None`, δ is curvature-aware
    (`metaif.solvers._damping`): max(1e-4·λ_max(H), 2·max(0, −λ_min(H))) from the Ritz values
    of the solve's own Lanczos run (one target: δ is re-chosen after each product, and the
    solution is the Galerkin solve of (H + δI) x = b in that Krylov space, what CG computes), so
    an indefinite H (a λ from Adam) gives the damped, proximal influence instead of an early
    stop. Where the `maxiter` products still leave a relative residual above 1e-2
    (`metaif.solvers.BUDGET_RESIDUAL`; or above `tol` if larger), the last step raises δ to the
    smallest shift at which they do not: an accurate solve at a larger δ, never an inaccurate
    one. `SolveInfo.damping` is the δ used. `tol` is relative to ‖b‖.

    The defaults are a budgeted solve for ranking, chosen from benchmarks/solvers.py (mlp-maml,
    docs/solvers.md) and benchmarks/scale.py (Conv4 at an Adam point): at most 16 products per
    target, and one more for the residual check. How well
    they rank scores against the exact solve with the same δ (`Dense(damping=None)`), and how
    the error falls as `maxiter` grows, is measured in the docs' "Measured results" page (raise
    `maxiter` for accurate magnitudes). `converged` is False when `tol` was not met.

    `preconditioner` (built once in `prepare`, shared by every right-hand side):
      None: plain CG.
      "diagonal": Jacobi, P = max(d̂, floor) + δ with d̂ the Hutchinson estimate of diag(H) from
        `probes` Rademacher products and floor = 1e-3 · mean |d̂|. Helps when parameters have
        very different curvature scales.
      "lowrank": P⁻¹ = V diag(1/(λᵢ + δ)) Vᵀ + (I − VVᵀ)/(λ_rank + δ) from the top-`rank`
        eigenpairs of H (min(d, 2·rank + 20) Lanczos products): removes the largest eigenvalues
        from CG's condition number, (λ_max + δ)/(λ_min + δ) becomes about (λ_rank + δ)/(λ_min + δ).

    Attributes (defaults in parentheses):
      damping: δ >= 0, or None for the curvature-aware default above (None; `Dense(damping=None)`
        is its dense twin, with exact eigenvalues and no restarts).
      maxiter: most products per right-hand side (16).
      tol: relative residual to stop at (1e-8).
      preconditioner: None, "diagonal" or "lowrank" (None).
      probes: Hutchinson probes for "diagonal" (32).
      rank: eigenpairs for "lowrank", at most d, or None for min(16, d) (None).
      seed: seed of the probes or of the Lanczos start vector (0).
    """

    damping: float | None = None
    maxiter: int = static(default=16)
    tol: float = 1e-8
    preconditioner: str | None = static(default=None)
    probes: int = static(default=32)
    rank: int | None = static(default=None)
    seed: int = 0

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_damping.optional_non_negative("CG.damping", self.damping),
            maxiter=_validate.positive_int("CG.maxiter", self.maxiter),
            tol=_validate.positive("CG.tol", self.tol),
            preconditioner=_checks.choice("CG.preconditioner", self.preconditioner, PRECONDITIONERS),
            probes=_validate.positive_int("CG.probes", self.probes),
            rank=_checks.optional_positive_int("CG.rank", self.rank),
            seed=_checks.non_negative_int("CG.seed", self.seed),
        )

    def prepare(self, operator):
        delta = _damping.resolve(self.damping, operator.hvp, operator.like, self.seed)
        matvec = _damping.damped(operator.hvp, delta if self.damping is None else self.damping)
        if self.preconditioner is None:
            return matvec, None, delta
        if self.preconditioner == "diagonal":
            key = jax.random.key(self.seed)
            return matvec, _preconditioner.jacobi(operator.hvp, operator.like, delta, self.probes, key), delta
        dimension = _tree.size(operator.like)
        if self.rank is None:
            rank = min(DEFAULT_RANK, dimension)
        else:
            rank = self.rank
            _checks.at_most_dimension("CG.rank", rank, dimension)
        steps = _spectrum.default_steps(rank, dimension)
        return matvec, _preconditioner.spectral(operator.hvp, operator.like, delta, rank, steps, self.seed), delta

    def solve_one(self, operator, b):
        """One right-hand side, without a preconditioner, in one loop around one product: with the
        default damping the Lanczos–Galerkin solve that picks δ from its own Ritz values
        (`_linalg.damped_lanczos_solve`); with a given damping CG and its residual check
        (`_linalg.fused_conjugate_gradient`, the same numbers as `solve(prepare(operator), b)`)."""
        if self.preconditioner is not None:
            return super().solve_one(operator, b)
        if self.damping is None:
            return _linalg.damped_lanczos_solve(
                operator.hvp,
                b,
                tol=self.tol,
                maxiter=min(self.maxiter, _tree.size(operator.like)),
                damping_of=_damping.of_ritz_values,
                budget_residual=_damping.BUDGET_RESIDUAL,
            )
        return _linalg.fused_conjugate_gradient(
            operator.hvp, b, tol=self.tol, maxiter=self.maxiter, damping=self.damping
        )

    def solve(self, state, b):
        matvec, preconditioner, delta = state
        return _linalg.preconditioned_conjugate_gradient(
            matvec, b, tol=self.tol, maxiter=self.maxiter, preconditioner=preconditioner, damping=delta
        )
