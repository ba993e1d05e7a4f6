"""The default solver: exact while the dense Hessian is cheap, conjugate gradients beyond."""

from __future__ import annotations

from typing import Any

from .. import _tree
from ._base import Solver
from ._cg import CG
from ._dense import Dense

DENSE_LIMIT = 256  # meta-parameters: up to this d, Dense() (d Hessian-vector products) is the default


def default_solver(meta_params: Any) -> Solver:
    """`Dense()` (exact, undamped) for d <= 256 meta-parameters, `CG()` beyond."""
    return Dense() if _tree.size(meta_params) <= DENSE_LIMIT else CG()
