"""Dense: the exact oracle for small models."""

from __future__ import annotations

import dataclasses

from .. import _linalg, _tree, _validate
from ._base import Solver


@dataclasses.dataclass(frozen=True)
class Dense(Solver):
    """Exact solve with the materialised total Hessian (d Hessian-vector products, one symmetric
    eigen-decomposition shared by every right-hand side), plus damping·I.

    Reports the smallest eigenvalue of H: a negative one means λ is not a local minimum of F, and
    influence there is unreliable (train longer, or add damping above |min eigenvalue|).
    Memory O(d²), time O(d³): for models up to a few thousand meta-parameters.
    """

    damping: float = 0.0

    def __post_init__(self):
        _validate.set_fields(self, damping=_validate.non_negative("Dense.damping", self.damping))

    def prepare(self, operator):
        return _linalg.eigh(_linalg.dense_matrix(operator.hvp, operator.like))

    def solve(self, state, b):
        flat, unravel = _tree.ravel(b)
        x, info = _linalg.eigh_solve(state, flat, self.damping)
        return unravel(x), info
