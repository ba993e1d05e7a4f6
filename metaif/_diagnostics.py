"""`Diagnostics`: the one record every influence result carries about the point and the solve."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _batching, _tree
from ._linalg import SolveInfo
from ._objective import Weights, adaptation_gradient
from ._problem import BilevelProblem, TaskSet

PyTree = Any
FORWARDED = ("solve", "objective", "grad_norm", "adaptation_residual")


class Diagnostics(NamedTuple):
    """How well the assumptions behind an influence result hold (arrays; scalars unless noted).

    Attributes:
      solve: the inverse-Hessian solves' `metaif.solvers.SolveInfo` (worst case over right-hand
        sides, or one per task where a result says so); None where nothing was solved.
      objective: F(λ) with every weight 1.
      grad_norm: ‖∇_λ F(λ)‖. Influence linearises around a stationary point (0).
      adaptation_residual: max over tasks of ‖∇_θ L_I(θ_i, λ)‖. `Proximal` adaptation's implicit
        derivatives assume ≈ 0 (raise `steps`, or use `line_search=True`).
      target: f(λ) for a scalar target, else None.
      nonstationary_change: for a scalar target, −vᵀ∇F(λ) with v = (H + δI)⁻¹∇f: the change of f
        that retraining with nothing removed would make (to first order, within the damped
        model). 0 at a stationary point; compare it with the scores: where it is not small, λ is
        not where training would end and the scores describe the response of a retraining that
        stays near λ (damped). None without a target.
    """

    solve: SolveInfo | None
    objective: jax.Array
    grad_norm: jax.Array
    adaptation_residual: jax.Array
    target: jax.Array | None = None
    nonstationary_change: jax.Array | None = None


def compute(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    weights: Weights,
    value: jax.Array,
    grad: PyTree,
    *,
    chunk_size: int | None = None,
    solve: SolveInfo | None = None,
    v: PyTree | None = None,
    target: jax.Array | None = None,
) -> Diagnostics:
    """Diagnostics from F, ∇F (computed by the caller with the operator) and, with a target, the
    solved v and f(λ). Costs one adaptation per task (the inner residual)."""
    residual = _batching.map_tasks(
        lambda data: adaptation_gradient(problem, meta_params, data[0], data[1]),
        (tasks.support, weights.support),
        chunk_size,
    )
    change = None if v is None else -_tree.vdot(v, grad)
    return Diagnostics(solve, value, _tree.norm(grad), jnp.max(residual), target, change)


def forward_attributes(cls: type) -> type:
    """Give a result class with a `diagnostics` field the attributes `solve`, `objective`,
    `grad_norm` and `adaptation_residual` (read from its diagnostics)."""

    def forwarded(name: str) -> property:
        def read(self: Any) -> Any:
            return getattr(self.diagnostics, name)

        return property(read, doc=f"`diagnostics.{name}` (see `metaif.Diagnostics`).")

    for name in FORWARDED:
        setattr(cls, name, forwarded(name))
    return cls
