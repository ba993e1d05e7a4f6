"""Scores from a solved vector: the mixed derivatives ∂_ω ∇_λ F that every influence is made of.

With v = (H + δI)⁻¹ ∇f(λ*), the influence of a weight ω on f is

    I_f(ω) = −∂_ω [vᵀ ∇_λ F(λ*; ω)]

and one reverse-over-forward pass per task (a jvp along v inside a grad in the weights) gives it for
the task weight and every support and query weight of that task. Pure and traceable; tasks are
vmapped or chunked (`chunk_size`). `n_tasks` is the n of F's 1/n: pass it when `tasks` is a slice
of the training set, so a slice's scores equal the same rows of the whole set's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import _batching
from ._objective import Weights, task_loss, unit_weights
from ._problem import BilevelProblem, TaskSet

PyTree = Any
TaskLoss = Callable[[PyTree, PyTree, PyTree, jax.Array, jax.Array], jax.Array]
LEVELS = ("tasks", "support", "query")


def weight_scores(
    task_fn: TaskLoss,
    meta_params: PyTree,
    tasks: TaskSet,
    v: PyTree,
    weights: Weights | None = None,
    *,
    chunk_size: int | None = None,
    n_tasks: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """−∂_ω [vᵀ ∇_λ G(λ; ω)] for G(λ; t, a, b) = (1/n) Σ_i t_i task_fn(λ, S_i, Q_i, a_i, b_i): arrays
    [n_chunk], [n_chunk, m], [n_chunk, q] for the tasks given.

    `task_fn(meta_params, support, query, support_weights, query_weights) -> scalar` is one task's
    weighted loss (the bilevel one for influence; baselines pass others).
    """
    n = tasks.n_tasks if n_tasks is None else n_tasks
    weights = unit_weights(meta_params, tasks) if weights is None else weights

    def one_task(data):
        support, query, t, a, b = data

        def directional(t, a, b):  # t · vᵀ ∇_λ task_fn(λ; a, b) / n
            loss = lambda lam: task_fn(lam, support, query, a, b)
            return t * jax.jvp(loss, (meta_params,), (v,))[1] / n

        return jax.grad(directional, argnums=(0, 1, 2))(t, a, b)

    scores = _batching.map_tasks(one_task, (tasks.support, tasks.query, *weights), chunk_size)
    return tuple(-s for s in scores)


def bilevel_task_loss(problem: BilevelProblem) -> TaskLoss:
    """One task's weighted query loss after adaptation, L_O^i(λ; a_i, b_i), as a `TaskLoss`."""
    return lambda lam, support, query, a, b: task_loss(problem, lam, support, query, a, b)


def target_scores(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    v: PyTree,
    weights: Weights | None = None,
    *,
    chunk_size: int | None = None,
    n_tasks: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Influence scores −∂_ω [vᵀ ∇_λ F] of every task [n], support [n, m] and query [n, q] weight,
    given the solved vector v = (H + δI)⁻¹ ∇f (a pytree like meta_params)."""
    return weight_scores(
        bilevel_task_loss(problem), meta_params, tasks, v, weights, chunk_size=chunk_size, n_tasks=n_tasks
    )


def task_mixed_gradients(
    problem: BilevelProblem, meta_params: PyTree, support: PyTree, query: PyTree, a: jax.Array, b: jax.Array, level: str
) -> PyTree:
    """One task's ∂_ω ∇_λ L_O^i for its weights of one level (t_i enters as L_O^i itself): a pytree
    like meta_params ("tasks") or with a leading axis m ("support") or q ("query")."""

    def task_grad(a, b):
        return jax.grad(task_loss, argnums=1)(problem, meta_params, support, query, a, b)

    if level == "tasks":
        return task_grad(a, b)
    w = a if level == "support" else b
    along = (lambda x: task_grad(x, b)) if level == "support" else (lambda x: task_grad(a, x))
    return jax.vmap(lambda e: jax.jvp(along, (w,), (e,))[1])(jnp.eye(w.shape[0], dtype=w.dtype))


def mixed_gradients(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    level: str,
    weights: Weights | None = None,
    *,
    chunk_size: int | None = None,
    n_tasks: int | None = None,
) -> PyTree:
    """∂_ω ∇_λ F for every weight ω of one level ("tasks", "support" or "query"): pytrees like
    meta_params with leading axes [n] or [n, m|q]. Influence on λ is −(H + δI)⁻¹ of each."""
    n = tasks.n_tasks if n_tasks is None else n_tasks
    weights = unit_weights(meta_params, tasks) if weights is None else weights

    def per_task(data):
        support, query, a, b = data
        return task_mixed_gradients(problem, meta_params, support, query, a, b, level)

    grads = _batching.map_tasks(per_task, (tasks.support, tasks.query, weights.support, weights.query), chunk_size)
    return jax.tree.map(lambda g: g / n, grads)
