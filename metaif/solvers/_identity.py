"""Identity: x = b / damping, the curvature-free baseline (gradient dot products, TracIn-like)."""

from __future__ import annotations

from .. import _linalg, _tree, _validate
from .._module import options
from ._base import Solver
from ._damping import damped


@options
class Identity(Solver):
    """Replaces H + δI by δI: x = b / δ, so a target influence is −(∇f · ∂_ω∇F)/δ, a scaled
    gradient dot product (TracIn-like). A baseline: it ignores curvature entirely.

    Attributes (defaults in parentheses):
      damping: δ > 0 (1.0); it only scales every score.
      tol: `converged` means relative residual ‖(H + δI)x − b‖/‖b‖ <= tol (1e-6), which is
        true only when H is negligible next to δI: the diagnostic says how far the baseline is
        from the influence it stands in for (one Hessian-vector product per right-hand side).
    """

    damping: float = 1.0
    tol: float = 1e-6

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_validate.positive("Identity.damping", self.damping),
            tol=_validate.positive("Identity.tol", self.tol),
        )

    def prepare(self, operator):
        return damped(operator.hvp, self.damping)

    def solve(self, state, b):
        x = _tree.scale(1.0 / self.damping, b)
        return x, _linalg.solve_info(state, x, b, iterations=0, tol=self.tol, damping=self.damping)
