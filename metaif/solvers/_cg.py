"""CG: matrix-free conjugate gradients on exact Hessian-vector products."""

from __future__ import annotations

import dataclasses

from .. import _linalg, _tree, _validate
from ._base import Solver


@dataclasses.dataclass(frozen=True)
class CG(Solver):
    """Conjugate gradients on v ↦ (H + damping·I) v; never materialises H.

    Needs H + damping·I positive definite: on meeting non-positive curvature it stops and reports
    `indefinite=True, converged=False` (raise `damping`). `tol` is relative to ‖b‖.
    """

    damping: float = 0.0
    maxiter: int = 100
    tol: float = 1e-8

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_validate.non_negative("CG.damping", self.damping),
            maxiter=_validate.positive_int("CG.maxiter", self.maxiter),
            tol=_validate.positive("CG.tol", self.tol),
        )

    def prepare(self, operator):
        if self.damping == 0:
            return operator.hvp
        return lambda v: _tree.axpy(self.damping, v, operator.hvp(v))

    def solve(self, state, b):
        return _linalg.conjugate_gradient(state, b, tol=self.tol, maxiter=self.maxiter)
