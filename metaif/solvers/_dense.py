"""Dense: the exact oracle for small models."""

from __future__ import annotations

from .. import _linalg, _tree, _validate
from . import _damping
from .._module import options
from ._base import Solver


@options
class Dense(Solver):
    """Exact solve with the materialised total Hessian (d Hessian-vector products, one symmetric
    eigen-decomposition shared by every right-hand side), plus damping·I.

    Reports the smallest eigenvalue of H: a negative one means λ is not a local minimum of F, and
    influence there is unreliable (train longer, or add damping above |min eigenvalue|;
    `metaif.influence` warns).
    Memory O(d²), time O(d³): for models up to a few thousand meta-parameters.

    Attributes (defaults in parentheses):
      damping: δ >= 0 (0.0: the exact, undamped oracle), or None for the matrix-free solvers'
        default δ = max(1e-4 × λ_max(H), 2 × max(0, −λ_min(H))) with the exact eigenvalues: the
        dense twin of `CG()`, `Neumann()` and `LiSSA()` (which estimate them by Lanczos;
        `LowRank()`, which sees only the top of the spectrum, uses 1e-4 × λ_max).
    """

    damping: float | None = 0.0

    def __post_init__(self):
        _validate.set_fields(self, damping=_damping.optional_non_negative("Dense.damping", self.damping))

    def prepare(self, operator):
        factor = _linalg.eigh(_linalg.dense_matrix(operator.hvp, operator.like))
        delta = _damping.of_ritz_values(factor.values) if self.damping is None else self.damping
        return factor, delta

    def solve(self, state, b):
        factor, delta = state
        flat, unravel = _tree.ravel(b)
        x, info = _linalg.eigh_solve(factor, flat, delta)
        return unravel(x), info
