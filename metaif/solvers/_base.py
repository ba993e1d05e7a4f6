"""The solver interface: factorise once (`prepare`), solve many (`solve`)."""

from __future__ import annotations

import abc
from typing import Any, Callable

from .._linalg import SolveInfo

PyTree = Any


class Solver(abc.ABC):
    """Computes x = (H + damping·I)⁻¹ b for the total Hessian H of the meta-objective.

    `prepare(hvp, like)` receives the exact product v ↦ H v on pytrees shaped like `like` (the
    meta-parameters) and returns what solves can share (a factorisation, or the operator itself).
    `solve(state, b)` returns (x, SolveInfo) for one right-hand side; it is vmapped for many.
    Subclasses are frozen dataclasses: hashable, static under jit.
    """

    damping: float

    @abc.abstractmethod
    def prepare(self, hvp: Callable[[PyTree], PyTree], like: PyTree) -> Any:
        ...

    @abc.abstractmethod
    def solve(self, state: Any, b: PyTree) -> tuple[PyTree, SolveInfo]:
        ...
