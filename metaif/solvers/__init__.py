"""Inverse-Hessian-vector-product solvers for influence: x = (H + damping·I)⁻¹ b.

Exact: `Dense` (the oracle). Iterative on exact products: `CG` (optionally preconditioned),
`Neumann`. Stochastic: `LiSSA`. Spectral: `LowRank`. Baseline: `Identity`. Every solve returns a
`SolveInfo`; `lanczos_eigenvalues` reports extreme eigenvalues of the curvature.

Damping: every matrix-free solver defaults to the curvature-aware δ = max(1e-4 × λ_max(H),
2 × max(0, −λ_min(H))) (`damping=None`; `LowRank` 1e-4 × λ_max), `Dense` to the exact undamped
solve (`Dense(damping=None)` is the damped twin). `CG()` with one target raises δ further where
its `maxiter` products would leave a relative residual above `BUDGET_RESIDUAL` (1e-2), so its
answer is an accurate solve at the δ it reports. `metaif.influence` and the
other influence functions warn with `IndefiniteCurvatureWarning` when H + δI is not positive
definite, and with `InaccurateSolveWarning` when an iterative solve (CG, Neumann, LiSSA) ends with
relative residual above 0.5.
"""

from .._linalg import SolveInfo as SolveInfo
from ._base import Operator as Operator
from ._base import Solver as Solver
from ._cg import CG as CG
from ._damping import BUDGET_RESIDUAL as BUDGET_RESIDUAL
from ._damping import RELATIVE_DAMPING as RELATIVE_DAMPING
from ._damping import InaccurateSolveWarning as InaccurateSolveWarning
from ._damping import IndefiniteCurvatureWarning as IndefiniteCurvatureWarning
from ._default import DENSE_LIMIT as DENSE_LIMIT
from ._default import default_solver as default_solver
from ._dense import Dense as Dense
from ._identity import Identity as Identity
from ._lissa import LiSSA as LiSSA
from ._lowrank import LowRank as LowRank
from ._neumann import Neumann as Neumann
from ._spectrum import Eigenpairs as Eigenpairs
from ._spectrum import lanczos_eigenvalues as lanczos_eigenvalues

__all__ = [
    "BUDGET_RESIDUAL",
    "CG",
    "DENSE_LIMIT",
    "Dense",
    "Eigenpairs",
    "Identity",
    "InaccurateSolveWarning",
    "IndefiniteCurvatureWarning",
    "LiSSA",
    "LowRank",
    "Neumann",
    "Operator",
    "RELATIVE_DAMPING",
    "SolveInfo",
    "Solver",
    "default_solver",
    "lanczos_eigenvalues",
]
