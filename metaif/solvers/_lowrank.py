"""LowRank: the inverse of H + δI restricted to H's top eigenpairs (Lanczos), δ elsewhere."""

from __future__ import annotations

from .. import _linalg, _tree, _validate
from . import _checks, _damping, _spectrum
from .._module import options, static
from ._base import Solver

DEFAULT_RANK = 20


@options
class LowRank(Solver):
    """x = V diag(1/(λᵢ + δ)) Vᵀ b + (b − V Vᵀ b)/δ with (λᵢ, Vᵢ) the top-`rank` eigenpairs of H.

    `prepare` runs `iterations` Lanczos products (full reorthogonalisation: `iterations` vectors
    of memory while it runs, `rank` kept); every solve is then O(rank·d), with no
    Hessian-vector product (one more checks the residual). The discarded
    subspace is treated as if H were 0 there: δ acts as its eigenvalue, so `damping` must be > 0
    and sets how much weight those directions get. Exact when rank = d (given enough iterations).
    Accurate only when the rank covers every eigenvalue well above δ (measured against rank in
    docs/solvers.md and the docs' "Measured results" page). Its place is many targets sharing one factorisation (`pairwise_influence`); for one target
    `CG(preconditioner="lowrank")` uses the same eigenpairs better.

    `SolveInfo.min_eigenvalue` is the smallest Ritz value of the Lanczos run (an upper bound of
    λ_min(H); exact when iterations = d) and `indefinite` is whether it is <= −δ.

    Attributes (defaults in parentheses):
      rank: eigenpairs kept, 1 <= rank <= d, or None for min(20, d, iterations) (None).
      damping: δ > 0, or None for 1e-4 × the top Ritz value (λ_max(H), free here) (None).
      iterations: Lanczos products, rank <= iterations <= d, or None for min(d, 2·rank + 20) (None).
      tol: `converged` means relative residual <= tol (1e-6); a truncated spectrum rarely meets it.
      seed: seed of the Lanczos start vector (0).
    """

    rank: int | None = static(default=None)
    damping: float | None = None
    iterations: int | None = static(default=None)
    tol: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        _validate.set_fields(
            self,
            rank=_checks.optional_positive_int("LowRank.rank", self.rank),
            damping=None if self.damping is None else _validate.positive("LowRank.damping", self.damping),
            iterations=_checks.optional_positive_int("LowRank.iterations", self.iterations),
            tol=_validate.positive("LowRank.tol", self.tol),
            seed=_checks.non_negative_int("LowRank.seed", self.seed),
        )
        if self.iterations is not None and self.rank is not None and self.iterations < self.rank:
            raise ValueError(
                f"LowRank.iterations must be at least LowRank.rank = {self.rank}; received {self.iterations}."
            )

    def prepare(self, operator):
        dimension = _tree.size(operator.like)
        if self.rank is None:
            rank = min(DEFAULT_RANK, dimension if self.iterations is None else self.iterations)
        else:
            rank = self.rank
            _checks.at_most_dimension("LowRank.rank", rank, dimension)
        if self.iterations is None:
            steps = _spectrum.default_steps(rank, dimension)
        else:
            _checks.at_most_dimension("LowRank.iterations", self.iterations, dimension)
            steps = self.iterations
        pairs, smallest = _spectrum.extreme_pairs(operator.hvp, operator.like, rank, "largest", steps, self.seed)
        delta = _damping.relative(pairs.values[0]) if self.damping is None else self.damping
        return _damping.damped(operator.hvp, delta), pairs, smallest, delta

    def solve(self, state, b):
        matvec, pairs, smallest, delta = state
        x = low_rank_inverse(pairs, delta, delta, b)
        return x, _linalg.solve_info(
            matvec,
            x,
            b,
            iterations=0,
            tol=self.tol,
            damping=delta,
            indefinite=~(smallest + delta > 0),
            min_eigenvalue=smallest,
        )


def low_rank_inverse(pairs: _spectrum.Eigenpairs, damping, rest, b):
    """V diag(1/(λᵢ + damping)) Vᵀ b + (b − V Vᵀ b)/rest for orthonormal V."""
    coefficients = _linalg.basis_dot(pairs.vectors, b)
    inside = _linalg.basis_combine(pairs.vectors, coefficients / (pairs.values + damping))
    outside = _tree.sub(b, _linalg.basis_combine(pairs.vectors, coefficients))
    return _tree.axpy(1.0 / rest, outside, inside)
