"""The solver interface: factorise once (`prepare`), solve many (`solve`)."""

from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple

import jax

from .._linalg import SolveInfo, dense_matrix

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

    def to_dense(self) -> jax.Array:
        """The d×d matrix of `hvp` (d products; columns in the order of `jax.flatten_util.ravel_pytree`):
        the dense twin for tests and small models."""
        return dense_matrix(self.hvp, self.like)


class Solver(abc.ABC):
    """Computes x = (H + damping·I)⁻¹ b for the curvature H of the meta-objective.

    `prepare(operator)` receives an `Operator` and returns what solves can share (a
    factorisation, eigenpairs, a preconditioner, or the operator itself). `solve(state, b)` returns
    (x, SolveInfo) for one right-hand side; it is vmapped for many. Both run under jit.
    Subclasses are pytrees (`metaif._module.options`): numeric fields (damping, tol, scale, seed)
    are leaves, so a new value reuses compiled code; counts and kinds are static.
    """

    damping: float | None

    @abc.abstractmethod
    def prepare(self, operator: Operator) -> Any: ...

    @abc.abstractmethod
    def solve(self, state: Any, b: PyTree) -> tuple[PyTree, SolveInfo]: ...

    def solve_one(self, operator: Operator, b: PyTree) -> tuple[PyTree, SolveInfo]:
        """`solve(prepare(operator), b)` for a single right-hand side; solvers whose `prepare`
        also multiplies by H override it to run everything in one loop (one compiled product)."""
        return self.solve(self.prepare(operator), b)
