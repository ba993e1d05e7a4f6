"""Inverse-Hessian-vector-product solvers for influence: x = (H + damping·I)⁻¹ b."""

from .._linalg import SolveInfo as SolveInfo
from ._base import Operator as Operator
from ._base import Solver as Solver
from ._cg import CG as CG
from ._dense import Dense as Dense

__all__ = ["CG", "Dense", "Operator", "SolveInfo", "Solver"]
