"""Second-order task removal: one exact Newton step on the reduced objective, for every task.

Removing an amount ε of task k's weight (t_k: 1 → 1 − ε; ε = 1 removes the task) leaves the
reduced objective F_k(λ) = F(λ) − ε L_O^k(λ)/n. First-order influence predicts its minimiser as
λ* − ε I_λ(t_k), with I_λ(t_k) = (H + δI)⁻¹ ∇L_O^k / n: it keeps the gradient that the removal
adds but not the change it makes to the Hessian. One Newton step on F_k from λ* keeps both:

    Δ_k = −(H − ε H_k/n + δI)⁻¹ (∇F(λ*) − ε ∇L_O^k(λ*)/n),        H_k = ∇²_λ L_O^k(λ*)

(second order in the removal; exact when F is quadratic in λ, and equal to −ε I_λ(t_k) to first
order in ε at a stationary λ*). With damping δ = ρ it is the Newton step of the proximal
retraining F_k(λ) + (ρ/2)‖λ − λ*‖², `metaif.evaluation.retrain(..., proximal=ρ)`.

Every task's system is solved by conjugate gradients preconditioned with the exact (H + δI)⁻¹
(the dense total Hessian, factored once): the preconditioned operator is the identity minus a
perturbation of size ε‖H_k‖/(n λ_min), so a handful of iterations suffice when the removal is
small. Each iteration costs one product with task k's own Hessian (1/n of a full Hessian-vector
product) and two d×d matrix-vector products. Tasks are vmapped (chunked with `chunk_size`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _batching, _boundary, _diagnostics, _hessian, _linalg, _tree, _validate
from ._deprecation import renamed
from ._diagnostics import Diagnostics
from ._objective import check_arguments, task_loss, unit_weights
from ._problem import BilevelProblem, TaskSet

PyTree = Any
DENSE_LIMIT = 8192


@_diagnostics.forward_attributes
class TaskRemoval(NamedTuple):
    """Predicted effect of removing (an amount ε of) each training task, second order in the removal.

    Attributes:
      delta: pytree like meta_params with leading axis [n]: Δ_k ≈ λ*_{−k} − λ*, the change of the
        meta-parameters (not an influence: no sign flip; first order it is −ε I_λ(t_k)).
      change: [n] target(λ* + Δ_k) − target(λ*) with a target, else None (first order: −ε I_f).
      diagnostics: `metaif.Diagnostics` at meta_params; its `solve` has a leading axis [n], one
        per task's Newton system: `indefinite[k]` means H − εH_k/n + δI is not positive
        definite, so λ* is no longer a minimum of the reduced objective and no local prediction
        (first or second order) holds for task k. `solve`, `objective`, `grad_norm` and
        `adaptation_residual` read from it.
    """

    delta: Any
    change: Any
    diagnostics: Diagnostics


@functools.partial(jax.jit, static_argnames=("maxiter", "chunk_size"))
def _core(
    problem: BilevelProblem, maxiter: int, chunk_size: int | None, meta_params, tasks: TaskSet, amount, damping, tol
):
    n = tasks.n_tasks
    flat, unravel = _tree.ravel(meta_params)
    weights = unit_weights(meta_params, tasks)
    value, grad, op = _hessian.operator(problem, meta_params, tasks, weights, chunk_size=chunk_size)
    hessian = _linalg.dense_matrix(op.hvp, meta_params)
    factor = _linalg.eigh(hessian)
    shifted = factor.values + damping
    floor = jnp.finfo(flat.dtype).tiny
    inverse = 1.0 / jnp.maximum(jnp.abs(shifted), floor)  # (|H + δI|)⁻¹: positive definite even if H + δI is not
    precondition = lambda r: factor.vectors @ (inverse * (factor.vectors.T @ r))
    full_grad = _tree.ravel(grad)[0]

    def one_task(data):
        support, query, a, b = data
        loss_grad = jax.grad(lambda x: task_loss(problem, unravel(x), support, query, a, b))
        task_grad, task_hvp = jax.linearize(loss_grad, flat)
        matvec = lambda v: hessian @ v + damping * v - (amount / n) * task_hvp(v)
        rhs = -(full_grad - (amount / n) * task_grad)
        step, info = _linalg.preconditioned_conjugate_gradient(
            matvec, rhs, tol=tol, maxiter=maxiter, preconditioner=precondition, damping=damping
        )
        return step, info._replace(min_eigenvalue=factor.values[0])

    steps, info = _batching.map_tasks(
        one_task, (tasks.support, tasks.query, weights.support, weights.query), chunk_size
    )
    diagnostics = _diagnostics.compute(
        problem, meta_params, tasks, weights, value, grad, chunk_size=chunk_size, solve=info
    )
    return jax.vmap(unravel)(steps), diagnostics, _boundary.flags(meta_params, steps)


@functools.partial(jax.jit, static_argnames=("target", "chunk_size"))
def _target_changes(target: Callable, chunk_size: int | None, meta_params, delta):
    moved = lambda d: target(jax.tree.map(jnp.add, meta_params, d))
    return _batching.map_tasks(moved, delta, chunk_size) - target(meta_params)


@renamed(batch_size="chunk_size")
def task_removal(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable | None = None,
    *,
    amount: float = 1.0,
    damping: float = 0.0,
    maxiter: int = 64,
    tol: float = 1e-10,
    chunk_size: int | None = None,
) -> TaskRemoval:
    """Predict removing each training task by one exact Newton step on the reduced objective.

    Second order in the removal: unlike influence (`task_influence`), it accounts for the change of
    the Hessian when task k goes, which matters when one task is a large share of the data (small
    n, nearly flat directions of H). Δ_k = −(H − ε H_k/n + δI)⁻¹ (∇F(λ*) − ε ∇L_O^k(λ*)/n);
    module docstring for the derivation. Needs the dense d×d total Hessian (d ≤ 8192).

    Args:
      problem, meta_params, tasks: as in `metaif.influence` (λ* should be a stationary point).
      target: optional `meta_params -> scalar`; then `change[k]` = target(λ* + Δ_k) − target(λ*).
        Pass the same function object across calls to reuse compiled code.
      amount: ε in (0, 1], the share of each task's weight removed (1: remove the task).
      damping: δ >= 0, added to H (proximal retraining toward λ* with ρ = δ).
      maxiter, tol: preconditioned CG per task; stops at relative residual tol.
      chunk_size: tasks per chunk (`lax.map`), bounding memory; default all at once.

    Returns:
      `TaskRemoval`: delta (pytree [n, ...]), change ([n] or None), per-task SolveInfo [n].
      Warns (`metaif.solvers.IndefiniteCurvatureWarning`) when some reduced Hessian is indefinite.

    Example:
      >>> removal = metaif.task_removal(problem, lam, tasks, val_loss)
      >>> removal.change          # [n] predicted change of val_loss when each task is removed
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    d = _tree.size(meta_params)
    if d > DENSE_LIMIT:
        raise ValueError(
            f"task_removal forms the dense d×d total Hessian, so d must be <= {DENSE_LIMIT}; meta_params has "
            f"d = {d}. Use the first-order metaif.task_influence for larger models."
        )
    amount = _validate.positive("amount", amount)
    if amount > 1.0:
        raise ValueError(f"amount must be in (0, 1] (the share of each task's weight removed); received {amount}.")
    damping = _validate.non_negative("damping", damping)
    maxiter = _validate.positive_int("maxiter", maxiter)
    tol = _validate.positive("tol", tol)
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    if target is not None:
        _boundary.check_scalar_fn("target", target, meta_params, "meta_params")
    dtype = _tree.float_dtype(meta_params)
    delta, diagnostics, flags = _core(
        problem,
        maxiter,
        chunk_size,
        meta_params,
        tasks,
        jnp.asarray(amount, dtype),
        jnp.asarray(damping, dtype),
        jnp.asarray(tol, dtype),
    )
    result = TaskRemoval(delta, None, diagnostics)
    _boundary.check_result(result, problem, meta_params, tasks, flags._replace(scores_finite=True))
    if target is not None:
        change = _target_changes(target, chunk_size, meta_params, delta)
        if _validate.is_concrete(change) and not np.all(np.isfinite(np.asarray(change))):
            raise ValueError(
                "target(meta_params + delta) is not finite for some tasks: their Newton steps left the region where "
                "target is defined (see .solve.indefinite); use damping > 0 or the first-order task_influence."
            )
        result = result._replace(change=change)
    return result
