"""Many targets at once: pairwise influence [T, n], self-influence, influence on a new task.

Conventions as in `metaif.influence`: I_f(ω) = ∇f(λ*)ᵀ I_λ(ω); removing a datum changes f by about
−I_f(ω); a positive influence on a loss is harmful.

Pairwise scores need one inverse-Hessian-vector product per target, V = (H + δI)⁻¹ Jᵀ (batched:
Dense and LowRank factorise once and reuse it for every target). The scores are then formed one of
two ways, chosen by cost:
* "per_target": one reverse-over-forward pass of vₜᵀ ∇_λ F per target (cost ∝ T);
* "mixed": every task's mixed derivatives ∂_ω ∇_λ L_O^i (1 + m + q columns), contracted with all T
  rows of V (cost independent of T apart from a matrix product). Chosen when T > 1 + m + q.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from . import _batching, _boundary, _diagnostics, _hessian, _linalg, _problem, _tree, _validate
from ._deprecation import keyword_only, renamed
from ._diagnostics import Diagnostics
from ._influence import Influence
from ._objective import adapt_one, task_loss, unit_weights
from ._scores import LEVELS, target_scores, task_mixed_gradients
from ._problem import TaskSet
from .curvature import Curvature
from .solvers import Solver

PyTree = Any
Method = Literal["auto", "per_target", "mixed"]


@_diagnostics.forward_attributes
class NewTaskInfluence(NamedTuple):
    """A new task adapted from its support set, its predictions, and what moved them.

    Attributes:
      params: θ_new, adapted from λ* on the new support set (like meta_params).
      predictions: predict(θ_new, λ*, x) for every given input, shape [P, ...].
      tasks, support, query: influence of every training weight on every prediction,
        [P..., n], [P..., n, m], [P..., n, q] (total = through_meta + through_adaptation).
      through_meta: the part through λ's direct appearance in predict (∂_λ p · I_λ), as
        an `Influence`-like triple (tasks, support, query).
      through_adaptation: the part through θ_new(λ) (∂_θ p · dθ/dλ · I_λ), same shapes.
      diagnostics: as in `Influence` (`solve`, `objective`, `grad_norm`, `adaptation_residual`
        read from it).

    Sign: removing a training datum changes a prediction by about −influence.
    """

    params: PyTree
    predictions: jax.Array
    tasks: jax.Array
    support: jax.Array
    query: jax.Array
    through_meta: tuple
    through_adaptation: tuple
    diagnostics: Diagnostics


# ----------------------------------------------------------------------------- jitted cores


def _contract(rows: PyTree, columns: PyTree) -> jax.Array:
    """Σ over leaves of rows [T, ...] · columns [k, ...]ᵀ → [T, k]."""
    products = [
        r.reshape(r.shape[0], -1) @ c.reshape(c.shape[0], -1).T
        for r, c in zip(jax.tree.leaves(rows), jax.tree.leaves(columns))
    ]
    return sum(products[1:], products[0])


def _mixed_scores(problem, chunk_size, meta_params, tasks, weights, vectors):
    """Scores of every weight for every row of `vectors` [T, ...] by contracting each task's
    mixed derivatives: ([T, n], [T, n, m], [T, n, q])."""
    n = tasks.n_tasks

    def one_task(data):
        columns = [task_mixed_gradients(problem, meta_params, *data, level) for level in LEVELS]
        columns[0] = jax.tree.map(lambda x: x[None], columns[0])
        return tuple(-_contract(vectors, c) / n for c in columns)  # [T, 1], [T, m], [T, q]

    t, a, b = _batching.map_tasks(one_task, (tasks.support, tasks.query, weights.support, weights.query), chunk_size)
    return t[..., 0].T, jnp.moveaxis(a, 0, 1), jnp.moveaxis(b, 0, 1)


def _setup(problem, solver, curvature, chunk_size, meta_params, tasks):
    """(weights, F, ∇F, the solver's prepared state) at λ."""
    weights = unit_weights(meta_params, tasks)
    value, grad, op = _hessian.operator(
        problem, meta_params, tasks, weights, curvature=curvature, chunk_size=chunk_size
    )
    return weights, value, grad, solver.prepare(op)


@functools.partial(jax.jit, static_argnames=("chunk_size", "target_chunk_size", "method"))
def _pairwise_core(problem, solver, curvature, chunk_size, target_chunk_size, method, meta_params, tasks, jacobian):
    weights, value, grad, state = _setup(problem, solver, curvature, chunk_size, meta_params, tasks)
    vectors, info = _batching.map_tasks(lambda b: solver.solve(state, b), jacobian, target_chunk_size)
    if method == "mixed":
        scores = _mixed_scores(problem, chunk_size, meta_params, tasks, weights, vectors)
    else:
        per_target = lambda v: target_scores(problem, meta_params, tasks, v, weights, chunk_size=chunk_size)
        scores = _batching.map_tasks(per_target, vectors, target_chunk_size)
    diagnostics = _diagnostics.compute(
        problem, meta_params, tasks, weights, value, grad, chunk_size=chunk_size, solve=_linalg.summarize(info)
    )
    return Influence(*scores, diagnostics), _boundary.flags(meta_params, scores, jacobian)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _self_core(problem, solver, curvature, chunk_size, meta_params, tasks):
    weights, value, grad, state = _setup(problem, solver, curvature, chunk_size, meta_params, tasks)
    n = tasks.n_tasks

    def one_task(data):
        support, query, a, b = data
        loss = lambda lam, a, b: task_loss(problem, lam, support, query, a, b)
        g = jax.grad(loss)(meta_params, a, b)
        u, info = solver.solve(state, g)
        directional = lambda a, b: jax.jvp(lambda lam: loss(lam, a, b), (meta_params,), (u,))[1]
        through_a, through_b = jax.grad(directional, argnums=(0, 1))(a, b)
        direct_a = jax.grad(lambda a: loss(meta_params, a, b))(a)
        return -_tree.vdot(g, u) / n, direct_a - through_a / n, -through_b / n, info

    t, a, b, info = _batching.map_tasks(
        one_task, (tasks.support, tasks.query, weights.support, weights.query), chunk_size
    )
    diagnostics = _diagnostics.compute(
        problem, meta_params, tasks, weights, value, grad, chunk_size=chunk_size, solve=_linalg.summarize(info)
    )
    return Influence(t, a, b, diagnostics), _boundary.flags(meta_params, (t, a, b))


@functools.partial(jax.jit, static_argnums=0)
def _jacobian(targets, meta_params):
    return jax.jacrev(targets)(meta_params)


@functools.partial(jax.jit, static_argnums=0)
def _mapped_jacobian(target, meta_params, target_data):
    return jax.vmap(jax.grad(target), in_axes=(None, 0))(meta_params, target_data)


# ----------------------------------------------------------------------------- public API


def _target_jacobian(targets, meta_params, target_data=None):
    """Jacobian rows [T, ...] of a vector target (or of a scalar target mapped over
    `target_data`), validated."""
    if target_data is not None:
        _validate.callable_("targets", targets, "(meta_params, one item of target_data) -> scalar")
        (count,) = _problem.leading_axes("target_data", target_data, ("T",))
        if count == 0:
            raise ValueError("target_data must hold at least one target (leading axis T > 0); received T = 0.")
        try:
            out = jax.eval_shape(targets, meta_params, jax.tree.map(lambda x: x[0], target_data))
        except Exception as error:
            raise ValueError(f"targets failed when called on (meta_params, target_data[0]): {error}") from error
        leaves = jax.tree.leaves(out)
        if len(leaves) != 1 or leaves[0].shape != ():
            raise ValueError(
                f"targets must return a scalar for one item of target_data; it returned {jax.tree.map(lambda s: s.shape, out)}."
            )
        jacobian = _mapped_jacobian(targets, meta_params, target_data)
        _validate.finite_tree("the gradients of targets at meta_params", jacobian)
        return jacobian
    _validate.callable_("targets", targets, "meta_params -> array [T]")
    try:
        out = jax.eval_shape(targets, meta_params)
    except Exception as error:
        raise ValueError(f"targets failed when called on meta_params: {error}") from error
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or len(leaves[0].shape) != 1 or leaves[0].shape[0] == 0:
        raise ValueError(
            "targets must return a non-empty 1-D array [T] (one value per target, e.g. the query loss of each "
            f"test task); it returned {jax.tree.map(lambda s: s.shape, out)}. Reshape outputs with .ravel()."
        )
    jacobian = _jacobian(targets, meta_params)
    _validate.finite_tree("the Jacobian of targets at meta_params", jacobian)
    return jacobian


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size", target_batch_size="target_chunk_size")
def pairwise_influence(
    problem,
    meta_params: PyTree,
    tasks: TaskSet,
    targets: Callable,
    *,
    solver: Solver | None = None,
    target_data: PyTree | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
    target_chunk_size: int | None = None,
    method: Method = "auto",
) -> Influence:
    """Influence of every task and example on each of T targets at once.

    Args:
      targets: `meta_params -> [T]`, for example the query loss of each test task,
        `lambda lam: metaif.task_losses(problem, lam, test_tasks)`, or the loss or margin of
        individual test predictions. With `target_data`, a scalar function
        `(meta_params, item) -> scalar` mapped over the leading axis T of `target_data` (a
        TaskSet of test tasks, a batch of test examples...): its gradients cost T single-item
        passes instead of T passes over every item (use it when each target depends on one item).
      target_data: optional pytree with leading axis T, see `targets`.
      target_chunk_size: solve and score this many targets at a time (memory bound on T).
      method: "per_target" (cost ∝ T), "mixed" (cost ∝ 1 + m + q, then a matrix product) or
        "auto" (the cheaper). Same answers.
      Other arguments as in `metaif.influence`.

    Returns:
      `Influence` with `tasks` [T, n], `support` [T, n, m], `query` [T, n, q]: row t holds
      I_{f_t}(ω). Removing a datum changes target t by about −score; positive = raises it.
    """
    if method not in ("auto", "per_target", "mixed"):
        raise ValueError(f"method must be 'auto', 'per_target' or 'mixed'; received {method!r}.")
    options, meta_params = _boundary.check_options(problem, meta_params, tasks, solver, curvature, chunk_size)
    if target_chunk_size is not None:
        target_chunk_size = _validate.positive_int("target_chunk_size", target_chunk_size)
    jacobian = _target_jacobian(targets, meta_params, target_data)
    count = jax.tree.leaves(jacobian)[0].shape[0]
    if method == "auto":
        method = "mixed" if count > 1 + tasks.n_support + tasks.n_query else "per_target"
    result, flags = _pairwise_core(problem, *options, target_chunk_size, method, meta_params, tasks, jacobian)
    _boundary.check_result(result, problem, meta_params, tasks, flags, target_name="targets")
    return result


@keyword_only(3, ("solver",))
@renamed(batch_size="chunk_size")
def self_influence(
    problem,
    meta_params: PyTree,
    tasks: TaskSet,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
) -> Influence:
    """Influence of each training datum on its own task's query loss L_O^k (no validation set).

    Target of task k and of its examples: L_O^k(λ; a_k) = (1/q) Σ_j ℓ_out(θ_k(λ; a_k), λ; q_kj), the
    task's mean query loss after adaptation. Scores, shapes [n], [n, m], [n, q]:
      tasks[k]     = ∇L_O^kᵀ I_λ(t_k) = −(1/n) gₖᵀ (H + δI)⁻¹ gₖ, gₖ = ∇_λ L_O^k (≤ 0 when H + δI ≻ 0);
      support[k,j] = ∂L_O^k/∂a_kj (through θ_k, λ fixed) + ∇L_O^kᵀ I_λ(a_kj);
      query[k,j]   = ∇L_O^kᵀ I_λ(b_kj) (a query example reaches its task's loss only through λ).
    A large negative score marks data the model fits to lower its own loss, with no support from
    other tasks: memorised or atypical data (candidates for label noise). To judge harm to
    generalisation, use influence on a held-out target instead.
    Cost: one inverse-Hessian-vector product per task (Dense reuses one factorisation).
    """
    options, meta_params = _boundary.check_options(problem, meta_params, tasks, solver, curvature, chunk_size)
    result, flags = _self_core(problem, *options, meta_params, tasks)
    _boundary.check_result(result, problem, meta_params, tasks, flags)
    return result


@keyword_only(6, ("solver",))
@renamed(batch_size="chunk_size", target_batch_size="target_chunk_size")
def new_task_influence(
    problem,
    meta_params: PyTree,
    tasks: TaskSet,
    support: PyTree,
    predict: Callable,
    inputs: PyTree,
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | Literal["auto"] | None = "auto",
    target_chunk_size: int | None = None,
) -> NewTaskInfluence:
    """Adapt to a new task from its support set, predict on `inputs`, and attribute each
    prediction to every training task and example.

    Args:
      support: the new task's support set, a pytree with the structure of `tasks.support` and
        leaves [m', ...].
      predict: `(params, meta_params, example) -> outputs` (for example logits [ways]).
      inputs: examples with a leading axis [P] (each one passed to predict).
      Other arguments as in `pairwise_influence`.

    Returns:
      `NewTaskInfluence`: θ_new, predictions [P, ...] and influences [P, ..., n], [P, ..., n, m],
      [P, ..., n, q], split into the part through λ's direct use in predict and the part through
      the adaptation θ_new(λ).
    """
    options, meta_params = _boundary.check_options(problem, meta_params, tasks, solver, curvature, chunk_size)
    if jax.tree.structure(support) != jax.tree.structure(tasks.support):
        raise ValueError(
            f"support must have the structure of tasks.support ({jax.tree.structure(tasks.support)}); "
            f"received {_validate.describe(support)}."
        )
    (m_new,) = _problem.leading_axes("support", support, ("n_support",))
    _problem.leading_axes("inputs", inputs, ("n_inputs",))
    _validate.callable_("predict", predict, "(params, meta_params, example) -> outputs")
    ones = jnp.ones((m_new,), _tree.float_dtype(meta_params))
    params = jax.jit(adapt_one)(problem, meta_params, support, ones)
    per_input = jax.vmap(predict, in_axes=(None, None, 0))
    try:
        predictions = per_input(params, meta_params, inputs)
    except Exception as error:
        raise ValueError(f"predict(params, meta_params, example) failed on the inputs: {error}") from error
    shape = jnp.shape(predictions)
    jacobian = _new_task_jacobian(problem, predict, meta_params, support, inputs, params)
    _validate.finite_tree("the derivative of predict with respect to meta_params", jacobian)
    method = "mixed" if 2 * predictions.size > 1 + tasks.n_support + tasks.n_query else "per_target"
    result, flags = _pairwise_core(problem, *options, target_chunk_size, method, meta_params, tasks, jacobian)
    _boundary.check_result(result, problem, meta_params, tasks, flags, target_name="predict")
    split = lambda scores: tuple(s.reshape((2,) + shape + s.shape[1:]) for s in scores)
    meta_part, adapt_part = zip(*[(s[0], s[1]) for s in split(result[:3])])
    totals = [a + b for a, b in zip(meta_part, adapt_part)]
    return NewTaskInfluence(params, predictions, *totals, meta_part, adapt_part, result.diagnostics)


_adapt_jit = jax.jit(adapt_one)


@functools.partial(jax.jit, static_argnames=("predict",))
def _new_task_jacobian(problem, predict, meta_params, support, inputs, params):
    """Jacobian rows of λ ↦ [p(θ*, λ; x), p(θ(λ), λ*; x)] (flattened): the two first-order parts
    of d p(θ(λ), λ)/dλ."""
    ones = jnp.ones((jax.tree.leaves(support)[0].shape[0],), _tree.float_dtype(meta_params))
    per_input = jax.vmap(predict, in_axes=(None, None, 0))

    def parts(lam):
        through_meta = per_input(params, lam, inputs)
        through_adaptation = per_input(adapt_one(problem, lam, support, ones), meta_params, inputs)
        return jnp.concatenate([jnp.ravel(through_meta), jnp.ravel(through_adaptation)])

    return jax.jacrev(parts)(meta_params)
