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
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _batching, _boundary, _diagnostics, _hessian, _linalg, _problem, _tree, _validate
from ._deprecation import keyword_only, renamed
from ._diagnostics import Diagnostics
from ._linalg import SolveInfo
from ._objective import adapt_one, unit_weights
from ._problem import BilevelProblem, TaskSet
from ._scores import LEVELS, mixed_gradients, target_scores
from .curvature import Curvature
from .solvers import Solver, default_solver

PyTree = Any


class Scores(NamedTuple):
    """Scores of every task [n], support example [n, m] and query example [n, q] (arrays, or
    pytrees with those leading axes); None for a level not computed. `solve` holds an
    inverse-Hessian solve's diagnostics where one was made (baselines), else None."""

    tasks: Any
    support: Any
    query: Any
    solve: SolveInfo | None = None


def _negated(scores) -> Scores:
    return Scores(*(None if s is None else jax.tree.map(jnp.negative, s) for s in scores))


@_diagnostics.forward_attributes
class Influence(NamedTuple):
    """Influence of every task weight [n], support weight [n, m] and query weight [n, q].

    With a scalar target these are arrays of I_f; without one, pytrees like meta_params with those
    leading axes (I_λ). Sign: removing a datum changes the quantity by about −influence
    (`predicted_change()`); a positive influence on a loss is harmful. Levels that were not
    requested are None.

    Attributes:
      tasks, support, query: the scores.
      diagnostics: `metaif.Diagnostics` (the solve, F, ‖∇F‖, the inner residual, the target);
        `solve`, `objective`, `grad_norm` and `adaptation_residual` read from it.
    """

    tasks: Any
    support: Any
    query: Any
    diagnostics: Diagnostics

    def predicted_change(self) -> Scores:
        """−influence: the first-order change of the quantity when each datum is removed."""
        return _negated(self[:3])


@_diagnostics.forward_attributes
class AdaptedInfluence(NamedTuple):
    """Influence of every training weight on one task's adapted parameters θ (or on g(θ)).

    `tasks` [n], `support` [n, m], `query` [n, q]: total effect dθ/dω = ∂θ/∂ω + (dθ/dλ) I_λ(ω),
    pytrees like the params, or arrays for a target g(θ). `direct` [m] is the part ∂θ/∂a_kj that
    does not pass through λ: nonzero only for the adapted training task's own support examples
    (already included in `support[k]`), None for a new task. The indirect part is total − direct.
    `diagnostics` as in `Influence`.
    """

    tasks: Any
    support: Any
    query: Any
    direct: Any
    diagnostics: Diagnostics

    def predicted_change(self) -> Scores:
        """−influence: the first-order change of θ (or g(θ)) when each datum is removed."""
        return _negated(self[:3])


# ----------------------------------------------------------------------------- pure cores


def influence_from_gradient(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target_grad: PyTree,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | None = None,
    target_value: jax.Array | None = None,
) -> Influence:
    """Scores of every task, support and query weight on a target with gradient ∇f(λ) =
    `target_grad`: one solve v = (H + δI)⁻¹∇f and one reverse-over-forward pass per task. Pure
    (no checks, no host transfer): call it inside your own jit, vmap or grad."""
    solver = default_solver(meta_params) if solver is None else solver
    weights = unit_weights(meta_params, tasks)
    value, grad, op = _hessian.operator(
        problem, meta_params, tasks, weights, curvature=curvature, chunk_size=chunk_size
    )
    v, info = solver.solve_one(op, target_grad)
    scores = target_scores(problem, meta_params, tasks, v, weights, chunk_size=chunk_size)
    diagnostics = _diagnostics.compute(
        problem, meta_params, tasks, weights, value, grad, chunk_size=chunk_size, solve=info, v=v, target=target_value
    )
    return Influence(*scores, diagnostics)


def influence_on_target(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable[[PyTree], jax.Array],
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | None = None,
) -> Influence:
    """`influence_from_gradient` with ∇f from `target` (`meta_params -> scalar`). Pure."""
    value, grad = jax.value_and_grad(target)(meta_params)
    return influence_from_gradient(
        problem, meta_params, tasks, grad, solver=solver, curvature=curvature, chunk_size=chunk_size, target_value=value
    )


def influence_on_params(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    levels: tuple[str, ...] = LEVELS,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | None = None,
) -> Influence:
    """I_λ(ω) = −(H + δI)⁻¹ ∂_ω ∇_λ F for every weight of the requested levels: pytrees like
    meta_params with leading axes [n] or [n, m|q] (None for other levels). One factorisation
    (`solver.prepare`), one solve per weight, vmapped. Pure."""
    solver = default_solver(meta_params) if solver is None else solver
    weights = unit_weights(meta_params, tasks)
    value, grad, op = _hessian.operator(
        problem, meta_params, tasks, weights, curvature=curvature, chunk_size=chunk_size
    )
    state = solver.prepare(op)

    def neg_solve(b):
        x, info = solver.solve(state, b)
        return _tree.scale(-1.0, x), info

    out, infos = {}, []
    for level in levels:  # at most three static levels, not a loop over data
        rhs = mixed_gradients(problem, meta_params, tasks, level, weights, chunk_size=chunk_size)
        per_task = neg_solve if level == "tasks" else jax.vmap(neg_solve)
        out[level], info = _batching.map_tasks(per_task, rhs, chunk_size)
        infos.append(jax.tree.map(jnp.ravel, info))
    info = _linalg.summarize(jax.tree.map(lambda *xs: jnp.concatenate(xs), *infos))
    diagnostics = _diagnostics.compute(
        problem, meta_params, tasks, weights, value, grad, chunk_size=chunk_size, solve=info
    )
    return Influence(out.get("tasks"), out.get("support"), out.get("query"), diagnostics)


def _with_flags(problem, solver, curvature, chunk_size, meta_params, tasks, target_grad, target_value):
    result = influence_from_gradient(
        problem,
        meta_params,
        tasks,
        target_grad,
        solver=solver,
        curvature=curvature,
        chunk_size=chunk_size,
        target_value=target_value,
    )
    return result, _boundary.flags(meta_params, result[:3], target_grad, result.tasks)


_checked_gradient = jax.jit(_with_flags, static_argnames=("chunk_size",))


@functools.partial(jax.jit, static_argnames=("target", "chunk_size"))
def _checked_target(problem, solver, curvature, chunk_size, meta_params, tasks, target):
    value, grad = jax.value_and_grad(target)(meta_params)
    return _with_flags(problem, solver, curvature, chunk_size, meta_params, tasks, grad, value)


@functools.partial(jax.jit, static_argnames=("chunk_size", "levels"))
def _checked_params(problem, solver, curvature, chunk_size, levels, meta_params, tasks):
    result = influence_on_params(
        problem, meta_params, tasks, levels, solver=solver, curvature=curvature, chunk_size=chunk_size
    )
    return result, _boundary.flags(meta_params, result[:3])


def _unit_weights(meta_params, support) -> jax.Array:
    """Support weights [m] of one task, all 1, in the meta-parameters' dtype."""
    return jnp.ones((jax.tree.leaves(support)[0].shape[0],), _tree.float_dtype(meta_params))


@jax.jit
def _adapt_jacobian_apply(problem, meta_params, support, directions):
    """(dθ/dλ) applied to a batch of directions with any leading axes."""
    ones = _unit_weights(meta_params, support)
    _, jac = jax.linearize(lambda lam: adapt_one(problem, lam, support, ones), meta_params)
    leading = jax.tree.leaves(directions)[0].ndim - jax.tree.leaves(meta_params)[0].ndim
    for _ in range(leading):
        jac = jax.vmap(jac)
    return jac(directions)


@jax.jit
def _direct_params(problem, meta_params, support):
    """∂θ/∂a_j for one task: pytree [m, ...]."""
    ones = _unit_weights(meta_params, support)
    column = lambda e: jax.jvp(lambda a: adapt_one(problem, meta_params, support, a), (ones,), (e,))[1]
    return jax.vmap(column)(jnp.eye(ones.shape[0], dtype=ones.dtype))


@functools.partial(jax.jit, static_argnames=("target",))
def _direct_target(problem, target, meta_params, support):
    """∂g(θ)/∂a_j for one task: [m]."""
    ones = _unit_weights(meta_params, support)
    return jax.grad(lambda a: target(adapt_one(problem, meta_params, support, a)))(ones)


@functools.partial(jax.jit, static_argnames=("target",))
def _adapted_target(problem, target, meta_params, support):
    """(g(θ(λ)), ∇_λ g(θ(λ))) for a task's support set."""
    ones = _unit_weights(meta_params, support)
    return jax.value_and_grad(lambda lam: target(adapt_one(problem, lam, support, ones)))(meta_params)


def _compute(problem, meta_params, tasks, target, levels: tuple[str, ...], solver, curvature, chunk_size) -> Influence:
    """Validate once, one jitted core (all levels with a target, the requested ones without),
    check the result once."""
    options, meta_params = _boundary.check_options(problem, meta_params, tasks, solver, curvature, chunk_size)
    if target is None:
        result, flags = _checked_params(problem, *options, levels, meta_params, tasks)
    else:
        _boundary.check_scalar_fn("target", target, meta_params, "meta_params")
        result, flags = _checked_target(problem, *options, meta_params, tasks, target)
    _boundary.check_result(result, problem, meta_params, tasks, flags)
    return result


# ----------------------------------------------------------------------------- public API


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size")
def influence(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable | None = None,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
) -> Influence:
    """Influence of every task, support example and query example, in one call.

    Args:
      problem: the `BilevelProblem`.
      meta_params: λ*, a stationary point of F (see `Influence.grad_norm`).
      tasks: the training `TaskSet` (n tasks, m support, q query examples).
      target: optional `meta_params -> scalar` (for example a meta-test loss, see
        `metaif.task_losses`). Pass the same function object across calls to reuse compiled code.
      solver: a `metaif.solvers` solver; default `Dense()` (exact, undamped) up to 256
        meta-parameters (it costs d Hessian-vector products), `CG()` beyond (curvature-aware δ
        from its own Lanczos run, raised until 16 products solve to 1e-2: docs/solvers.md).
        Warns (`metaif.solvers.IndefiniteCurvatureWarning`) when H + δI is not positive definite.
      curvature: a `metaif.curvature` option for the solves (default `Exact()`, the total
        Hessian with its third-order terms); the mixed derivatives stay exact.
      chunk_size: process tasks this many at a time (`lax.map`/`scan`): same answers, peak
        memory bounded by the chunk instead of n. None: all tasks at once. "auto" (default): all
        at once when they fit, else the largest chunk whose working memory, estimated from the
        traced program, fits in half the device's free memory; one task at a time for
        convolutional models on CPU (faster there than vmapped convolutions).

    Returns:
      `Influence`: arrays [n], [n, m], [n, q] of I_f with a target; else pytrees like
      meta_params with those leading axes (I_λ = dλ*/dω).
    """
    return _compute(problem, meta_params, tasks, target, LEVELS, solver, curvature, chunk_size)


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size")
def task_influence(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable | None = None,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
    return_info: bool = False,
):
    """Task influence I(t_k) for every training task.

    Returns an array [n] of I_f(t_k) with a target `meta_params -> scalar`, else a pytree like
    meta_params with leading axis n holding I_λ(t_k) = dλ*/dt_k (the paper's task-IF). Removing
    task k changes the quantity by about −I(t_k). With `return_info=True`, returns
    (scores, SolveInfo). See `influence` for the arguments.
    """
    result = _compute(problem, meta_params, tasks, target, ("tasks",), solver, curvature, chunk_size)
    return (result.tasks, result.diagnostics.solve) if return_info else result.tasks


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size")
def instance_influence(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable | None = None,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
) -> Influence:
    """Instance influence of every support example [n, m] and query example [n, q].

    Returns an `Influence` whose `.support` and `.query` hold I_f (arrays, with a target) or
    I_λ (pytrees like meta_params with leading axes [n, m] and [n, q]). With a target, `.tasks`
    comes free and is filled too. See `influence` for the arguments and conventions.
    """
    return _compute(problem, meta_params, tasks, target, ("support", "query"), solver, curvature, chunk_size)


@keyword_only(5, ("solver",))
@renamed(batch_size="chunk_size")
def adapted_influence(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    task: int | PyTree,
    target: Callable | None = None,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
) -> AdaptedInfluence:
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
    options, meta_params = _boundary.check_options(problem, meta_params, tasks, solver, curvature, chunk_size)
    n = tasks.n_tasks
    is_index = isinstance(task, numbers.Integral) or (
        hasattr(task, "dtype")
        and jnp.ndim(task) == 0
        and jnp.issubdtype(task.dtype, jnp.integer)
        and _validate.is_concrete(task)
    )
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
        result, flags = _checked_params(problem, *options, LEVELS, meta_params, tasks)
        _boundary.check_result(result, problem, meta_params, tasks, flags)
        apply = functools.partial(_adapt_jacobian_apply, problem, meta_params, support)
        scores = [apply(result.tasks), apply(result.support), apply(result.query)]
        direct = None if index is None else _direct_params(problem, meta_params, support)
    else:
        _boundary.check_scalar_fn("target", target, meta_params, "params (shaped like meta_params)")
        value, grad = _adapted_target(problem, target, meta_params, support)
        result, flags = _checked_gradient(problem, *options, meta_params, tasks, grad, value)
        _boundary.check_result(result, problem, meta_params, tasks, flags, target_name="target(adapted params)")
        scores = [result.tasks, result.support, result.query]
        direct = None if index is None else _direct_target(problem, target, meta_params, support)
    if direct is not None:
        scores[1] = jax.tree.map(lambda s, d: _batching.add_at_task(s, index, d), scores[1], direct)
    return AdaptedInfluence(*scores, direct, result.diagnostics)
