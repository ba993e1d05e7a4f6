"""The solver interface: factorise once (`prepare`), solve many (`solve`)."""

from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import jax

from .._linalg import SolveInfo

PyTree = Any


class Operator(NamedTuple):
    """What a solver may use of the curvature H of the meta-objective.

    Attributes:
      hvp: v ↦ H v on pytrees shaped like `like` (exact products of the chosen curvature).
      like: the meta-parameters λ (structure, shapes and dtypes of every vector).
      sample_hvp: (key, v, batch) ↦ H_B v, an unbiased estimate of H v from `batch` tasks drawn
        uniformly with replacement (for stochastic solvers such as LiSSA); `batch` is static.
      n_tasks: the number of training tasks n.
    """

    hvp: Callable[[PyTree], PyTree]
    like: PyTree
    sample_hvp: Callable[[jax.Array, PyTree, int], PyTree]
    n_tasks: int


class Solver(abc.ABC):
    """Computes x = (H + damping·I)⁻¹ b for the curvature H of the meta-objective.

    `prepare(operator)` receives an `Operator` and returns what solves can share (a
    factorisation, eigenpairs, a preconditioner, or the operator itself). `solve(state, b)` returns
    (x, SolveInfo) for one right-hand side; it is vmapped for many. Both run under jit.
    Subclasses are frozen dataclasses: hashable, static under jit.
    """

    damping: float | None

    @abc.abstractmethod
    def prepare(self, operator: Operator) -> Any:
        ...

    @abc.abstractmethod
    def solve(self, state: Any, b: PyTree) -> tuple[PyTree, SolveInfo]:
        ...
