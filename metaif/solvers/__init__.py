"""Inverse-Hessian-vector-product solvers for influence: x = (H + damping·I)⁻¹ b.

Exact: `Dense` (the oracle). Iterative on exact products: `CG` (optionally preconditioned),
`Neumann`. Stochastic: `LiSSA`. Spectral: `LowRank`. Baseline: `Identity`. Every solve returns a
`SolveInfo`; `lanczos_eigenvalues` reports extreme eigenvalues of the curvature.
"""

from .._linalg import SolveInfo as SolveInfo
from ._base import Operator as Operator
from ._base import Solver as Solver
from ._cg import CG as CG
from ._dense import Dense as Dense
from ._identity import Identity as Identity
from ._lissa import LiSSA as LiSSA
from ._lowrank import LowRank as LowRank
from ._neumann import Neumann as Neumann
from ._spectrum import Eigenpairs as Eigenpairs
from ._spectrum import lanczos_eigenvalues as lanczos_eigenvalues

__all__ = [
    "CG", "Dense", "Eigenpairs", "Identity", "LiSSA", "LowRank", "Neumann", "Operator", "SolveInfo", "Solver",
    "lanczos_eigenvalues",
]
