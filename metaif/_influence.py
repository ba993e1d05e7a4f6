"""Task and instance influence on meta-parameters, on scalar targets and on adapted parameters.

Conventions (docs/conventions.md, binding): every task and example carries a weight (t [n],
a [n, m], b [n, q]) that multiplies a fixed-denominator mean. The influence of a weight ω is the
derivative at ω = 1:

    I_λ(ω) = dλ*/dω = −(H + δI)⁻¹ ∂_ω ∇_λ F(λ*)
    I_f(ω) = ∇f(λ*)ᵀ I_λ(ω) = −∂_ω [vᵀ ∇_λ F(λ*; ω)],   v = (H + δI)⁻¹ ∇f(λ*)

Removing a datum (weight 1 → 0) changes a quantity by about −I. A positive influence on a loss
target means the datum raises that loss: it is harmful.

With a target, one solve and one reverse-over-forward pass give every task and example score.
Without one, per-task and per-example mixed gradients are formed by vmap (no Python loops) and
solved in a batch.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _batching, _hessian, _linalg, _problem, _tree, _validate, curvature as _curvature
from ._linalg import SolveInfo
from ._objective import adapt_one, adaptation_gradient, check_arguments, check_finite_losses, task_loss, unit_weights
from .curvature import Curvature
from ._problem import BilevelProblem, TaskSet
from .solvers import CG, Dense, Solver
from .solvers._damping import warn_if_indefinite

PyTree = Any
LEVELS = ("tasks", "support", "query")
DENSE_LIMIT = 256


class Influence(NamedTuple):
    """Influence of every task weight [n], support weight [n, m] and query weight [n, q].

    With a scalar target these are arrays of I_f; without one, pytrees like meta_params with those
    leading axes (I_λ). Sign: removing a datum changes the quantity by about −influence; a
    positive influence on a loss is harmful. Levels that were not requested are None.

    Attributes:
      tasks, support, query: the scores.
      solve: worst-case diagnostics over the inverse-Hessian solves (`metaif.solvers.SolveInfo`).
      objective: F(λ) at the given meta-parameters (all weights 1).
      grad_norm: ‖∇_λ F(λ)‖, how far λ is from the stationary point influence assumes.
      adaptation_residual: max over tasks of ‖∇_θ L_I(θ_i, λ)‖; for `Proximal` adaptation the
        implicit derivatives assume it is ≈ 0 (else raise `steps` or tune `lr`).
    """

    tasks: Any
    support: Any
    query: Any
    solve: SolveInfo
    objective: jax.Array
    grad_norm: jax.Array
    adaptation_residual: jax.Array


class AdaptedInfluence(NamedTuple):
    """Influence of every training weight on one task's adapted parameters θ (or on g(θ)).

    `tasks` [n], `support` [n, m], `query` [n, q]: total effect dθ/dω = ∂θ/∂ω + (dθ/dλ) I_λ(ω),
    pytrees like the params, or arrays for a target g(θ). `direct` [m] is the part ∂θ/∂a_kj that
    does not pass through λ: nonzero only for the adapted training task's own support examples
    (already included in `support[k]`), None for a new task. The indirect part is total − direct.
    """

    tasks: Any
    support: Any
    query: Any
    direct: Any
    solve: SolveInfo
    objective: jax.Array
    grad_norm: jax.Array
    adaptation_residual: jax.Array


# ----------------------------------------------------------------------------- jitted cores


def _operator(problem, curvature, batch_size, meta_params, tasks):
    weights = unit_weights(meta_params, tasks)
    return (weights, *_hessian.operator(problem, meta_params, tasks, weights, curvature, batch_size))


def _diagnostics(problem, batch_size, meta_params, tasks, weights, value, grad):
    residual = _batching.map_tasks(
        lambda data: adaptation_gradient(problem, meta_params, data[0], data[1]), (tasks.support, weights.support), batch_size)
    return value, _tree.norm(grad), jnp.max(residual)


def _task_scores(problem, batch_size, meta_params, tasks, weights, v):
    """−∂_ω [vᵀ ∇_λ F(λ; ω)] for every weight ω, task by task: ([n], [n, m], [n, q])."""
    n = tasks.n_tasks

    def one_task(data):
        support, query, t, a, b = data

        def directional(t, a, b):  # t · vᵀ ∇_λ L_O^i(λ; a, b) / n
            loss = lambda lam: task_loss(problem, lam, support, query, a, b)
            return t * jax.jvp(loss, (meta_params,), (v,))[1] / n

        return jax.grad(directional, argnums=(0, 1, 2))(t, a, b)

    scores = _batching.map_tasks(one_task, (tasks.support, tasks.query, *weights), batch_size)
    return tuple(-s for s in scores)


@functools.partial(jax.jit, static_argnames=("problem", "solver", "curvature", "batch_size"))
def _target_core(problem: BilevelProblem, solver: Solver, curvature: Curvature, batch_size: int | None, meta_params,
                 tasks: TaskSet, target_grad) -> Influence:
    weights, value, grad, op = _operator(problem, curvature, batch_size, meta_params, tasks)
    v, info = solver.solve(solver.prepare(op), target_grad)
    scores = _task_scores(problem, batch_size, meta_params, tasks, weights, v)
    return Influence(*scores, info, *_diagnostics(problem, batch_size, meta_params, tasks, weights, value, grad))


def task_mixed_gradients(problem, meta_params, support, query, a, b, level: str):
    """One task's ∂_ω ∇_λ L_O^i for its weights of one level (t_i enters as L_O^i itself):
    a pytree like meta_params ("tasks") or with a leading axis m ("support") or q ("query")."""

    def task_grad(a, b):
        return jax.grad(task_loss, argnums=1)(problem, meta_params, support, query, a, b)

    if level == "tasks":
        return task_grad(a, b)
    w = a if level == "support" else b
    along = (lambda x: task_grad(x, b)) if level == "support" else (lambda x: task_grad(a, x))
    return jax.vmap(lambda e: jax.jvp(along, (w,), (e,))[1])(jnp.eye(w.shape[0], dtype=w.dtype))


def _mixed_gradients(problem, meta_params, tasks, weights, level, batch_size):
    """∂_ω ∇_λ F for every weight ω of one level: pytrees [n, ...] or [n, m|q, ...]."""
    per_task = lambda data: task_mixed_gradients(problem, meta_params, *data, level)
    grads = _batching.map_tasks(per_task, (tasks.support, tasks.query, weights.support, weights.query), batch_size)
    return _tree.scale(1.0 / tasks.n_tasks, grads)


@functools.partial(jax.jit, static_argnames=("problem", "solver", "curvature", "batch_size", "levels"))
def _params_core(problem: BilevelProblem, solver: Solver, curvature: Curvature, batch_size: int | None,
                 levels: tuple[str, ...], meta_params, tasks: TaskSet) -> Influence:
    weights, value, grad, op = _operator(problem, curvature, batch_size, meta_params, tasks)
    state = solver.prepare(op)

    def neg_solve(b):
        x, info = solver.solve(state, b)
        return _tree.scale(-1.0, x), info

    out, infos = {}, []
    for level in levels:  # at most three static levels, not a loop over data
        rhs = _mixed_gradients(problem, meta_params, tasks, weights, level, batch_size)
        per_task = neg_solve if level == "tasks" else jax.vmap(neg_solve)
        out[level], info = _batching.map_tasks(per_task, rhs, batch_size)
        infos.append(jax.tree.map(jnp.ravel, info))
    info = _linalg.summarize(jax.tree.map(lambda *xs: jnp.concatenate(xs), *infos))
    return Influence(out.get("tasks"), out.get("support"), out.get("query"), info,
                     *_diagnostics(problem, batch_size, meta_params, tasks, weights, value, grad))


@functools.partial(jax.jit, static_argnums=0)
def _grad(fn, x):
    return jax.grad(fn)(x)


def _unit_weights(meta_params, support) -> jax.Array:
    """Support weights [m] of one task, all 1, in the meta-parameters' dtype."""
    return jnp.ones((jax.tree.leaves(support)[0].shape[0],), _tree.float_dtype(meta_params))


@functools.partial(jax.jit, static_argnames=("problem",))
def _adapt_jacobian_apply(problem, meta_params, support, directions):
    """(dθ/dλ) applied to a batch of directions with any leading axes."""
    ones = _unit_weights(meta_params, support)
    _, jac = jax.linearize(lambda lam: adapt_one(problem, lam, support, ones), meta_params)
    leading = jax.tree.leaves(directions)[0].ndim - jax.tree.leaves(meta_params)[0].ndim
    for _ in range(leading):
        jac = jax.vmap(jac)
    return jac(directions)


@functools.partial(jax.jit, static_argnames=("problem",))
def _direct_params(problem, meta_params, support):
    """∂θ/∂a_j for one task: pytree [m, ...]."""
    ones = _unit_weights(meta_params, support)
    column = lambda e: jax.jvp(lambda a: adapt_one(problem, meta_params, support, a), (ones,), (e,))[1]
    return jax.vmap(column)(jnp.eye(ones.shape[0], dtype=ones.dtype))


@functools.partial(jax.jit, static_argnames=("problem", "target"))
def _direct_target(problem, target, meta_params, support):
    """∂g(θ)/∂a_j for one task: [m]."""
    ones = _unit_weights(meta_params, support)
    return jax.grad(lambda a: target(adapt_one(problem, meta_params, support, a)))(ones)


@functools.partial(jax.jit, static_argnames=("problem", "target"))
def _adapted_target_grad(problem, target, meta_params, support):
    """∇_λ g(θ(λ)) for a task's support set."""
    ones = _unit_weights(meta_params, support)
    return jax.grad(lambda lam: target(adapt_one(problem, lam, support, ones)))(meta_params)


# ----------------------------------------------------------------------------- validation


class _Options(NamedTuple):
    solver: Solver
    curvature: Curvature
    batch_size: int | None


def _check_inputs(problem, meta_params, tasks, solver, curvature, batch_size) -> _Options:
    check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    if solver is None:
        solver = Dense() if _tree.size(meta_params) <= DENSE_LIMIT else CG()
    elif not isinstance(solver, Solver):
        raise TypeError(
            "solver must be a metaif.solvers.Solver such as metaif.solvers.Dense() or "
            f"metaif.solvers.CG(); received {_validate.describe(solver)}."
        )
    curvature = _curvature.check(curvature)
    curvature.check(problem, meta_params, tasks)
    if batch_size is not None:
        batch_size = _validate.positive_int("batch_size", batch_size)
    return _Options(solver, curvature, batch_size)


def _check_scalar_fn(name: str, fn, argument, argument_name: str) -> None:
    _validate.callable_(name, fn, f"{argument_name} -> scalar")
    try:
        out = jax.eval_shape(fn, argument)
    except Exception as error:
        raise ValueError(f"{name} failed when called on {argument_name}: {error}") from error
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        raise ValueError(f"{name} must return a scalar; it returned {jax.tree.map(lambda s: s.shape, out)}.")


def _target_gradient(target, meta_params):
    _check_scalar_fn("target", target, meta_params, "meta_params")
    grad = _grad(target, meta_params)
    _validate.finite_tree("the gradient of target at meta_params", grad)
    return grad


def _check_result(result, problem, meta_params, tasks) -> None:
    """Turn a silent NaN into an error naming its source, and warn when H + δI is not positive
    definite (both skipped under tracing)."""
    if not _validate.is_concrete(result.objective) or bool(jnp.isfinite(result.objective)):
        warn_if_indefinite(result.solve)
        return
    weights = unit_weights(meta_params, tasks)
    check_finite_losses(problem, meta_params, tasks, weights, f"The meta-objective at meta_params is {float(result.objective)}")
    raise ValueError(f"The meta-objective at meta_params is {float(result.objective)} although every task loss is finite: check meta_params.")


def _compute(problem, meta_params, tasks, target, levels: tuple[str, ...], *options) -> Influence:
    """Validate, then one jitted core: all levels with a target, the requested ones without."""
    options = _check_inputs(problem, meta_params, tasks, *options)
    if target is None:
        result = _params_core(problem, *options, levels, meta_params, tasks)
    else:
        result = _target_core(problem, *options, meta_params, tasks, _target_gradient(target, meta_params))
    _check_result(result, problem, meta_params, tasks)
    return result


# ----------------------------------------------------------------------------- public API


def influence(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable | None = None,
              solver: Solver | None = None, *, curvature: Curvature | None = None,
              batch_size: int | None = None) -> Influence:
    """Influence of every task, support example and query example, in one call.

    Args:
      problem: the `BilevelProblem`.
      meta_params: λ*, a stationary point of F (see `Influence.grad_norm`).
      tasks: the training `TaskSet` (n tasks, m support, q query examples).
      target: optional `meta_params -> scalar` (for example a meta-test loss, see
        `metaif.task_losses`). Pass the same function object across calls to reuse compiled code.
      solver: a `metaif.solvers` solver; default `Dense()` (exact, undamped) up to 256
        meta-parameters (it costs d Hessian-vector products), `CG()` beyond (δ = 1e-4·λ_max(H),
        at most 21 products: docs/solvers.md). Warns (`metaif.solvers.IndefiniteCurvatureWarning`)
        when H + δI is not positive definite.
      curvature: a `metaif.curvature` option for the solves (default `Exact()`, the total
        Hessian with its third-order terms); the mixed derivatives stay exact.
      batch_size: process tasks this many at a time (`lax.map`/`scan`): same answers, peak
        memory bounded by the chunk instead of n. Default: all tasks at once.

    Returns:
      `Influence`: arrays [n], [n, m], [n, q] of I_f with a target; else pytrees like
      meta_params with those leading axes (I_λ = dλ*/dω).
    """
    return _compute(problem, meta_params, tasks, target, LEVELS, solver, curvature, batch_size)


def task_influence(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable | None = None,
                   solver: Solver | None = None, *, curvature: Curvature | None = None, batch_size: int | None = None,
                   return_info: bool = False):
    """Task influence I(t_k) for every training task.

    Returns an array [n] of I_f(t_k) with a target `meta_params -> scalar`, else a pytree like
    meta_params with leading axis n holding I_λ(t_k) = dλ*/dt_k (the paper's task-IF). Removing
    task k changes the quantity by about −I(t_k). With `return_info=True`, returns
    (scores, SolveInfo). See `influence` for the arguments.
    """
    result = _compute(problem, meta_params, tasks, target, ("tasks",), solver, curvature, batch_size)
    return (result.tasks, result.solve) if return_info else result.tasks


def instance_influence(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable | None = None,
                       solver: Solver | None = None, *, curvature: Curvature | None = None,
                       batch_size: int | None = None) -> Influence:
    """Instance influence of every support example [n, m] and query example [n, q].

    Returns an `Influence` whose `.support` and `.query` hold I_f (arrays, with a target) or
    I_λ (pytrees like meta_params with leading axes [n, m] and [n, q]). With a target, `.tasks`
    comes free and is filled too. See `influence` for the arguments and conventions.
    """
    return _compute(problem, meta_params, tasks, target, ("support", "query"), solver, curvature, batch_size)


def adapted_influence(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, task: int | PyTree,
                      target: Callable | None = None, solver: Solver | None = None, *,
                      curvature: Curvature | None = None, batch_size: int | None = None) -> AdaptedInfluence:
    """Influence of every training task and example on one task's adapted parameters θ.

    Args:
      task: an int k (training task k: direct effect of its own support weights plus the effect
        through λ) or a new task's support pytree with leaves [m', ...] (effect through λ only).
      target: optional `params -> scalar` g(θ), for example a prediction or a loss of the
        adapted model; then the scores are arrays.
      Other arguments as in `influence`.

    Returns:
      `AdaptedInfluence` with dθ/dω (or dg(θ)/dω) for every weight: leading axes [n], [n, m],
      [n, q], plus the direct part `direct` [m] for a training task.
    """
    options = _check_inputs(problem, meta_params, tasks, solver, curvature, batch_size)
    n = tasks.n_tasks
    is_index = isinstance(task, numbers.Integral) or (
        hasattr(task, "dtype") and jnp.ndim(task) == 0 and jnp.issubdtype(task.dtype, jnp.integer) and _validate.is_concrete(task))
    if is_index and not isinstance(task, (bool, np.bool_)):
        if not -n <= int(task) < n:
            raise ValueError(f"task must be a training-task index in [0, {n}) or a support pytree; received {task}.")
        index = int(task) % n
        support = _batching.take_tasks(tasks.support, index)
    else:
        index = None
        support = task
        expected = jax.tree.structure(tasks.support)
        if jax.tree.structure(support) != expected:
            raise ValueError(
                f"task must be an int or a support set with the structure of tasks.support ({expected}); "
                f"received {_validate.describe(support)}."
            )
        _problem.leading_axes("task", support, ("n_support",))

    if target is None:
        result = _params_core(problem, *options, LEVELS, meta_params, tasks)
        _check_result(result, problem, meta_params, tasks)
        apply = functools.partial(_adapt_jacobian_apply, problem, meta_params, support)
        scores = [apply(result.tasks), apply(result.support), apply(result.query)]
        direct = None if index is None else _direct_params(problem, meta_params, support)
    else:
        _check_scalar_fn("target", target, meta_params, "params (shaped like meta_params)")
        grad = _adapted_target_grad(problem, target, meta_params, support)
        _validate.finite_tree("the gradient of target(adapted params) with respect to meta_params", grad)
        result = _target_core(problem, *options, meta_params, tasks, grad)
        _check_result(result, problem, meta_params, tasks)
        scores = [result.tasks, result.support, result.query]
        direct = None if index is None else _direct_target(problem, target, meta_params, support)
    if direct is not None:
        scores[1] = jax.tree.map(lambda s, d: _batching.add_at_task(s, index, d), scores[1], direct)
    return AdaptedInfluence(*scores, direct, *result[3:])
