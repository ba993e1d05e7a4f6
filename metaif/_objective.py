"""The weighted meta-objective F(λ; t, a, b) (docs/conventions.md) and its building blocks.

    F(λ; t, a, b) = (1/n) Σ_i t_i (1/q) Σ_j b_ij ℓ_out(θ_i(λ; a_i), λ; q_ij) + (meta_reg/2)‖λ‖²

Denominators n, m, q are fixed, so a weight of 0 removes a task or an example. Everything here is
pure and traceable; adaptation is vmapped over tasks.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _batching, _problem, _tree, _validate
from ._adapt import weighted_mean_loss
from ._problem import BilevelProblem, TaskSet

PyTree = Any


class Weights(NamedTuple):
    """Weights of every task [n], support example [n, m] and query example [n, q]."""

    tasks: jax.Array
    support: jax.Array
    query: jax.Array

    @classmethod
    def ones(cls, n: int, m: int, q: int, dtype) -> "Weights":
        return cls(jnp.ones((n,), dtype), jnp.ones((n, m), dtype), jnp.ones((n, q), dtype))


def unit_weights(meta_params: PyTree, tasks: TaskSet) -> Weights:
    """All-ones weights for `tasks` in the meta-parameters' dtype (the point where influence is
    taken), sharded like the tasks' data (see `shard_like_tasks`)."""
    ones = Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, _tree.float_dtype(meta_params))
    return shard_like_tasks(ones, tasks, meta_params)


def place_on_task_mesh(meta_params: PyTree, tasks: TaskSet) -> PyTree:
    """`meta_params` replicated on the mesh of `tasks` when the tasks are sharded over Explicit mesh
    axes and a concrete leaf is not on that mesh (as `jax.pmap` broadcasts unmapped arguments);
    unchanged otherwise (unsharded tasks, Auto axes, where the compiler places values, or tracers,
    which the caller placed). With several processes each passes the same values."""
    layout = _batching.task_layout(tasks.support)
    if layout is None or not layout.explicit:
        return meta_params
    axes = set(layout.entry if isinstance(layout.entry, tuple) else (layout.entry,))
    replicated = jax.sharding.NamedSharding(layout.mesh, jax.P())

    def place(leaf):
        if isinstance(leaf, jax.core.Tracer):
            return leaf
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and axes <= set(mesh.axis_names):
            return leaf
        if jax.process_count() > 1:
            host = np.asarray(leaf)
            return jax.make_array_from_process_local_data(replicated, host, host.shape)
        return jax.device_put(leaf, replicated)

    return jax.tree.map(place, meta_params)


def shard_like_tasks(weights: Weights, tasks: TaskSet, meta_params: PyTree) -> Weights:
    """`weights` with their task axis sharded like `tasks.support` when that is sharded over
    Explicit mesh axes (vmap requires arrays mapped together to share the task sharding); then
    `meta_params` must live on the same mesh (replicated; the public functions place them with
    `place_on_task_mesh`), else a ValueError says how. Unchanged otherwise: unsharded data, or
    Auto axes, where the compiler places weights."""
    layout = _batching.task_layout(tasks.support)
    if layout is None or not layout.explicit:
        return weights
    axes = layout.entry if isinstance(layout.entry, tuple) else (layout.entry,)
    for path, leaf in jax.tree_util.tree_leaves_with_path(meta_params):
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if mesh is None or not set(axes) <= set(mesh.axis_names):
            raise ValueError(
                f"tasks are sharded over the Explicit mesh axis {layout.entry!r}, but meta_params leaf "
                f"{jax.tree_util.keystr(path) or '(root)'} ({_validate.describe(leaf)}) is not on that mesh. "
                "Inside your own jit, replicate the meta-parameters on the mesh first: "
                "metaif.parallel.replicate(meta_params, mesh) (the public functions do it for concrete arrays)."
            )
    sharding = jax.sharding.NamedSharding(layout.mesh, jax.P(layout.entry))
    return Weights(*(jax.sharding.reshard(w, sharding) for w in weights))


def adapt_one(problem: BilevelProblem, meta_params: PyTree, support: PyTree, weights: jax.Array) -> PyTree:
    """θ(λ; a) for one task: support leaves [m, ...], weights [m]."""
    return problem.adapt.solve(problem.inner_loss, meta_params, support, weights)


def task_loss(
    problem: BilevelProblem,
    meta_params: PyTree,
    support: PyTree,
    query: PyTree,
    support_weights: jax.Array,
    query_weights: jax.Array,
) -> jax.Array:
    """One task's weighted query loss after adaptation, L_O^i(λ; a_i, b_i)."""
    params = adapt_one(problem, meta_params, support, support_weights)
    return weighted_mean_loss(problem.outer_loss, params, meta_params, query, query_weights)


def losses_per_task(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    support_weights: jax.Array | None = None,
    query_weights: jax.Array | None = None,
) -> jax.Array:
    """[n] weighted query losses after adaptation (weights default to ones), vmapped over tasks."""
    if support_weights is None or query_weights is None:
        ones = unit_weights(meta_params, tasks)
        support_weights = ones.support if support_weights is None else support_weights
        query_weights = ones.query if query_weights is None else query_weights
    # problem is bound, not passed to vmap: under Explicit task sharding (jax 0.10) vmap requires
    # every unmapped argument to be a JAX type.
    per_task = jax.vmap(functools.partial(task_loss, problem), in_axes=(None, 0, 0, 0, 0))
    return per_task(meta_params, tasks.support, tasks.query, support_weights, query_weights)


def accuracies_per_task(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, predict, support_weights: jax.Array
) -> jax.Array:
    """[n] query accuracy after adaptation: the share of query examples whose argmax of
    predict(θ_i, λ, example) equals example["y"]. Pure."""
    theta = jax.vmap(functools.partial(adapt_one, problem), in_axes=(None, 0, 0))(
        meta_params, tasks.support, support_weights
    )
    per_task = jax.vmap(jax.vmap(predict, in_axes=(None, None, 0)), in_axes=(0, None, 0))(
        theta, meta_params, tasks.query
    )
    labels = tasks.query["y"]
    return jnp.mean(jnp.argmax(per_task, -1).astype(jnp.int32) == labels.astype(jnp.int32), axis=-1).astype(
        _tree.float_dtype(meta_params)
    )


def regularizer(problem: BilevelProblem, meta_params: PyTree) -> jax.Array:
    return 0.5 * problem.meta_reg * _tree.sq_norm(meta_params)


def objective(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, weights: Weights) -> jax.Array:
    """F(λ; t, a, b)."""
    losses = losses_per_task(problem, meta_params, tasks, weights.support, weights.query)
    return jnp.mean(weights.tasks * losses) + regularizer(problem, meta_params)


def adaptation_gradient(problem: BilevelProblem, meta_params: PyTree, support: PyTree, weights: jax.Array) -> jax.Array:
    """‖∇_θ L_I(θ(λ), λ)‖ for one task: how far adaptation is from its inner stationary point."""
    params = adapt_one(problem, meta_params, support, weights)
    grad = jax.grad(problem.adapt.objective, argnums=1)(problem.inner_loss, params, meta_params, support, weights)
    return _tree.norm(grad)


# ----------------------------------------------------------------------------- public wrappers

_adapt_jit = jax.jit(adapt_one)
_objective_jit = jax.jit(objective)
_losses_jit = jax.jit(losses_per_task)


def _per_task(fn):
    """fn(problem, λ, support, weights) vmapped over tasks, with problem bound outside vmap."""
    return lambda problem, meta_params, support, weights: jax.vmap(
        functools.partial(fn, problem), in_axes=(None, 0, 0)
    )(meta_params, support, weights)


_accuracies_jit = jax.jit(accuracies_per_task, static_argnames=("predict",))
_adapt_tasks_jit = jax.jit(_per_task(adapt_one))
adaptation_residuals_jit = jax.jit(_per_task(adaptation_gradient))


def full_weights(meta_params, tasks, task_weights=None, support_weights=None, query_weights=None) -> Weights:
    """The given weights (checked: shapes, real dtypes, finite), ones where None, sharded like the tasks."""
    n, m, q = _problem.check_tasks(tasks)
    _problem.check_weights("task_weights", task_weights, (n,))
    _problem.check_weights("support_weights", support_weights, (n, m))
    _problem.check_weights("query_weights", query_weights, (n, q))
    ones = Weights.ones(n, m, q, _tree.float_dtype(meta_params))
    given = (task_weights, support_weights, query_weights)
    for name, weights in zip(("task_weights", "support_weights", "query_weights"), given):
        if weights is not None and _validate.is_concrete(weights):
            bad = int(np.size(weights) - np.count_nonzero(np.isfinite(np.asarray(weights, np.float64))))
            if bad:
                raise ValueError(
                    f"{name} must be finite; it holds {bad} NaN or inf value(s) (first at index "
                    f"{tuple(int(i) for i in np.argwhere(~np.isfinite(np.asarray(weights, np.float64)))[0])}). "
                    "Weights are 1 (keep), 0 (remove) or values in between."
                )
    return shard_like_tasks(
        Weights(*(o if w is None else jnp.asarray(w, o.dtype) for o, w in zip(ones, given))), tasks, meta_params
    )


def _to_host(array: jax.Array) -> np.ndarray:
    """A numpy copy of a global array, gathered from every process when it spans several (all
    processes run this together, as they run the same program)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def check_finite_losses(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, weights: Weights, context: str
) -> None:
    """Raise a ValueError naming the tasks whose losses are not finite (skipped under tracing)."""
    if not _validate.is_concrete((meta_params, tasks)):
        return
    losses = _to_host(_losses_jit(problem, meta_params, tasks, weights.support, weights.query))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise ValueError(
            f"{context}: the losses of tasks {bad[:10].tolist()} (first 10 of {bad.size}) are not finite "
            "after adaptation. Check inner_loss/outer_loss for log(0) or overflow, the adaptation's "
            "lr (too large a step diverges), and the tasks' data: NaN or inf inputs, or (metaif's "
            "cross-entropy losses give NaN for it) a class label outside [0, ways)."
        )


def _finite_or_explained(value: jax.Array, problem, meta_params, tasks, weights: Weights, name: str) -> jax.Array:
    """`value` when it is finite (or traced); else an error naming the cause: meta_params, then the
    tasks whose losses are not finite."""
    if not _validate.is_concrete(value) or bool(np.all(np.isfinite(_to_host(value)))):
        return value
    _validate.finite_tree("meta_params", meta_params)
    check_finite_losses(problem, meta_params, tasks, weights, f"{name} is not finite")
    raise ValueError(
        f"{name} is not finite although meta_params and every task loss are; check the weights and meta_reg."
    )


def check_arguments(problem, meta_params, tasks) -> PyTree:
    """Validate the problem, meta-parameters, tasks and the losses' output shapes; returns the
    meta-parameters placed on the tasks' mesh (`place_on_task_mesh`)."""
    _problem.check_problem(problem)
    _validate.floating_tree("meta_params", meta_params)
    _problem.check_tasks(tasks)
    _problem.check_losses(problem, meta_params, tasks)
    return place_on_task_mesh(meta_params, tasks)


def adapt(problem: BilevelProblem, meta_params: PyTree, support: PyTree, weights: jax.Array | None = None) -> PyTree:
    """Adapted parameters θ(λ; a) of one task.

    Args:
      support: one task's support set, leaves [m, ...].
      weights: support weights a [m] (default ones; 0 removes an example).
    Returns:
      a pytree like meta_params. Differentiable in meta_params and weights (any order).
    """
    _problem.check_problem(problem)
    _validate.floating_tree("meta_params", meta_params)
    (m,) = _problem.leading_axes("support", support, ("n_support",))
    _problem.check_weights("weights", weights, (m,))
    batched = jax.tree.map(lambda x: jnp.asarray(x)[None], support)
    tasks = TaskSet(batched, batched)
    _problem.check_losses(problem, meta_params, tasks, which=("inner_loss",))
    w = (
        jnp.ones((m,), _tree.float_dtype(meta_params))
        if weights is None
        else jnp.asarray(weights, _tree.float_dtype(meta_params))
    )
    return _adapt_jit(problem, meta_params, support, w)


def adapt_tasks(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, support_weights=None) -> PyTree:
    """Adapted parameters of every task of a TaskSet, vmapped: a pytree like meta_params with a
    leading axis n. `support_weights` [n, m] as in `meta_objective`."""
    meta_params = check_arguments(problem, meta_params, tasks)
    w = full_weights(meta_params, tasks, None, support_weights, None)
    return _adapt_tasks_jit(problem, meta_params, tasks.support, w.support)


def meta_objective(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    task_weights=None,
    support_weights=None,
    query_weights=None,
) -> jax.Array:
    """F(λ; t, a, b) = (1/n) Σ_i t_i (1/q) Σ_j b_ij ℓ_out(θ_i(λ; a_i), λ; q_ij) + (meta_reg/2)‖λ‖².

    Weights shaped [n], [n, m], [n, q], default ones; denominators stay n, m, q, so a weight of 0
    removes that task or example.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    weights = full_weights(meta_params, tasks, task_weights, support_weights, query_weights)
    return _finite_or_explained(
        _objective_jit(problem, meta_params, tasks, weights), problem, meta_params, tasks, weights, "meta_objective"
    )


def task_losses(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, support_weights=None, query_weights=None
) -> jax.Array:
    """[n] query losses of each task after adaptation (weighted means; default weights 1).

    `lambda lam: metaif.task_losses(problem, lam, test_tasks).mean()` is the meta-test loss, the
    usual influence target.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    w = full_weights(meta_params, tasks, None, support_weights, query_weights)
    return _finite_or_explained(
        _losses_jit(problem, meta_params, tasks, w.support, w.query), problem, meta_params, tasks, w, "task_losses"
    )


def task_accuracies(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, predict) -> jax.Array:
    """[n] query accuracy of each task after adaptation (classification).

    Args:
      predict: `(params, meta_params, example) -> logits [ways]` (for a `metaif.models` model,
        `model.predict`); an example's label is `example["y"]` (the layout of `metaif.data` and
        `metaif.models`). Pass the same function object across calls to reuse compiled code.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.callable_("predict", predict, "(params, meta_params, example) -> logits")
    if not isinstance(tasks.query, dict) or "y" not in tasks.query:
        raise ValueError(
            f"task_accuracies reads labels from tasks.query['y']; tasks.query is {_validate.describe(tasks.query)}."
        )
    return _accuracies_jit(problem, meta_params, tasks, predict, full_weights(meta_params, tasks).support)


def adaptation_residual(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet) -> jax.Array:
    """[n] norms ‖∇_θ L_I(θ_i, λ)‖ of the inner objective at each adapted θ_i.

    For `Proximal` adaptation these should be near 0 (the implicit derivatives assume an exact
    inner minimiser): if not, raise `steps` or tune `lr`. For `Unrolled` they are informative only.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    w = full_weights(meta_params, tasks)
    return adaptation_residuals_jit(problem, meta_params, tasks.support, w.support)
