"""Baseline data-attribution scores to compare influence with.

Every baseline returns `Scores(tasks [n], support [n, m], query [n, q])` with the sign convention
of influence on a loss target: higher = more harmful (removing the datum is predicted to lower the
target by about the score). Gradient baselines share influence's form

    score(ω) = −∂_ω [vᵀ ∇_λ F(λ*; ω)]   (exact mixed derivatives, one jvp and one grad per task)

and differ only in v, where influence has v = (H + δI)⁻¹ ∇f(λ*):

* `grad_dot` (TracIn-style gradient similarity): v = ∇f, an identity "Hessian".
* `trak` (TRAK-style): v = Pᵀ (ΦᵀΦ + δI)⁻¹ P ∇f with a random Gaussian projection P [k, d]
  (entries N(0, 1/k)) and Φ [n, k] the projected per-task total gradients ∇L_O^i / √n, so ΦᵀΦ is
  the projected empirical Fisher of F; equivalently score(ω) = −φ_fᵀ(ΦᵀΦ + δI)⁻¹φ_ω with
  φ = P·gradient.
* `single_level`: classical Koh & Liang influence on the flattened problem (no adaptation,
  θ = λ, one-level ERM over all support and query examples pooled), exact Hessian of that loss.
* `direct_if`: influence with `FirstOrder` adaptation (dθ/dλ = I), the paper's Direct-IF.
* `raw_loss`: loss at λ* (task query loss after adaptation; each example's loss under its task's
  adapted parameters); `random_scores`: uniform noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._deprecation import keyword_only, renamed
from .. import _batching, _boundary, _hessian, _module, _tree, _validate
from .._adapt import FirstOrder, weighted_mean_loss
from .._influence import Scores, influence
from .._objective import adapt_one, check_arguments, task_loss, unit_weights
from .._problem import BilevelProblem, TaskSet, check_tasks
from .._scores import bilevel_task_loss, weight_scores
from ..curvature import Curvature
from ..solvers import Solver, default_solver

PyTree = Any


def _check(problem, meta_params, tasks, chunk_size):
    check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    return None if chunk_size is None else _validate.positive_int("chunk_size", chunk_size)


# ----------------------------------------------------------------------------- gradient similarity


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _grad_dot_core(problem, chunk_size, meta_params, tasks, target_grad):
    return weight_scores(bilevel_task_loss(problem), meta_params, tasks, target_grad, chunk_size=chunk_size)


@renamed(batch_size="chunk_size")
def grad_dot(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable[[PyTree], jax.Array],
    *,
    chunk_size: int | None = None,
) -> Scores:
    """TracIn-style gradient similarity at λ*: score(ω) = −∇f(λ*)ᵀ ∂_ω ∇_λ F(λ*), i.e. influence
    with the Hessian replaced by the identity. No Hessian is formed: one jvp and one grad per task.

    Args:
      target: `meta_params -> scalar`, e.g. a meta-test loss.
      chunk_size: tasks processed at a time (memory bound); None: all at once.
    """
    chunk_size = _check(problem, meta_params, tasks, chunk_size)
    return Scores(
        *_grad_dot_core(problem, chunk_size, meta_params, tasks, _boundary.target_gradient(target, meta_params))
    )


# ----------------------------------------------------------------------------- TRAK


def trak_projection(meta_params: PyTree, dim: int, seed: int = 0) -> PyTree:
    """The random projection P of `trak`: a pytree like meta_params with a leading axis `dim`,
    entries N(0, 1/dim) (so E[PᵀP] = I)."""
    dim = _validate.positive_int("dim", dim)
    leaves, treedef = jax.tree.flatten(meta_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    scale = float(1.0 / np.sqrt(dim))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, (dim, *jnp.shape(x)), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    )


def _project(projection, tree):
    """P · tree: [k]."""
    return jax.vmap(lambda row: _tree.vdot(row, tree))(projection)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _trak_core(problem, chunk_size, ridge, projection, meta_params, tasks, target_grad):
    n = tasks.n_tasks
    weights = unit_weights(meta_params, tasks)
    task_grad = lambda data: _project(projection, jax.grad(task_loss, argnums=1)(problem, meta_params, *data))
    phi = _batching.map_tasks(task_grad, (tasks.support, tasks.query, weights.support, weights.query), chunk_size)
    phi = phi / float(np.sqrt(n))  # [n, k]: rows P ∇L_O^i / √n, so ΦᵀΦ = P (Fisher of F) Pᵀ
    kernel = phi.T @ phi + ridge * jnp.eye(phi.shape[1], dtype=phi.dtype)
    coefficients = jnp.linalg.solve(kernel, _project(projection, target_grad))
    v = jax.tree.map(lambda p: jnp.tensordot(coefficients, p, axes=1), projection)
    return weight_scores(bilevel_task_loss(problem), meta_params, tasks, v, chunk_size=chunk_size)


@renamed(damping="ridge", batch_size="chunk_size")
def trak(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable[[PyTree], jax.Array],
    dim: int = 32,
    ridge: float = 1e-3,
    seed: int = 0,
    *,
    chunk_size: int | None = None,
) -> Scores:
    """TRAK-style scores: score(ω) = −φ_fᵀ (ΦᵀΦ + δI)⁻¹ φ_ω, with φ = P·gradient for the random
    Gaussian projection P = `trak_projection(meta_params, dim, seed)`: φ_f = P ∇f(λ*), φ_ω =
    P ∂_ω ∇_λ F(λ*) (per-task and per-example total gradients, exact), and Φ [n, dim] the rows
    P ∇L_O^i(λ*) / √n (per-task total gradients), so ΦᵀΦ is the projected empirical Fisher of F.

    Args:
      dim: projection dimension k.
      ridge: δ > 0 added to ΦᵀΦ (rank at most n); not an influence solver's damping.
    """
    chunk_size = _check(problem, meta_params, tasks, chunk_size)
    ridge = _validate.positive("ridge", ridge)
    projection = trak_projection(meta_params, dim, seed)
    return Scores(
        *_trak_core(
            problem, chunk_size, ridge, projection, meta_params, tasks, _boundary.target_gradient(target, meta_params)
        )
    )


# ----------------------------------------------------------------------------- single level


def _pooled_task_loss(problem):
    """One task's pooled loss without adaptation (θ = λ): (Σ_j a_j ℓ_in(λ; s_j) + Σ_j b_j ℓ_out(λ; q_j)) / (m + q)."""

    def loss(lam, support, query, a, b):
        m, q = a.shape[0], b.shape[0]
        inner = weighted_mean_loss(problem.inner_loss, lam, lam, support, a) * m
        outer = weighted_mean_loss(problem.outer_loss, lam, lam, query, b) * q
        return (inner + outer) / (m + q)

    return loss


@_module.options
class _Pooled(Curvature):
    """The single-level curvature: the Hessian of G's task sum (pooled losses, θ = λ)."""

    def surrogate(self, problem, meta_params, tasks, weights):
        pooled = jax.vmap(_pooled_task_loss(problem), in_axes=(None, 0, 0, 0, 0))
        task_sum = lambda lam: jnp.sum(
            weights.tasks * pooled(lam, tasks.support, tasks.query, weights.support, weights.query)
        )
        return task_sum, jnp.zeros((), _tree.float_dtype(meta_params))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _single_level_core(problem, solver, chunk_size, meta_params, tasks, target_grad):
    # ∇²G + meta_reg·I is the operator of the pooled "curvature"; F's value and gradient are unused
    _, _, op = _hessian.operator(problem, meta_params, tasks, curvature=_Pooled(), chunk_size=chunk_size)
    solution, info = solver.solve(solver.prepare(op), target_grad)
    return weight_scores(_pooled_task_loss(problem), meta_params, tasks, solution, chunk_size=chunk_size), info


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size")
def single_level(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable[[PyTree], jax.Array],
    *,
    solver: Solver | None = None,
    chunk_size: int | None = None,
) -> Scores:
    """Classical (Koh & Liang) influence on the flattened problem, ignoring the bilevel structure:
    no adaptation (θ = λ), and one-level ERM over all support and query examples pooled,

        G(λ; t, a, b) = (1/n) Σ_i t_i (Σ_j a_ij ℓ_in(λ, λ; s_ij) + Σ_j b_ij ℓ_out(λ, λ; q_ij)) / (m + q)
                        + (meta_reg/2)‖λ‖²,

    score(ω) = −∇f(λ*)ᵀ (∇²G(λ*) + δI)⁻¹ ∂_ω ∇_λ G(λ*), exact (the paper's "EK-FAC IF
    (single-level)" row without the EK-FAC approximation). λ* is the bilevel solution, not a
    stationary point of G, as in the paper's use. `solver` as in `metaif.influence` (default Dense
    up to 256 parameters, else CG); check `Scores.solve` for an indefinite ∇²G.
    """
    chunk_size = _check(problem, meta_params, tasks, chunk_size)
    if solver is None:
        solver = default_solver(meta_params)
    elif not isinstance(solver, Solver):
        raise TypeError(
            f"solver must be a metaif.solvers.Solver such as metaif.solvers.Dense(); received {_validate.describe(solver)}."
        )
    scores, info = _single_level_core(
        problem, solver, chunk_size, meta_params, tasks, _boundary.target_gradient(target, meta_params)
    )
    return Scores(*scores, info)


# ----------------------------------------------------------------------------- Direct-IF


@keyword_only(4, ("solver",))
@renamed(batch_size="chunk_size")
def direct_if(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    target: Callable[[PyTree], jax.Array],
    *,
    solver: Solver | None = None,
    curvature: Curvature | None = None,
    chunk_size: int | None = None,
) -> Scores:
    """The paper's Direct-IF: `metaif.influence` on the same problem with `FirstOrder` adaptation
    (dθ/dλ replaced by the identity, "ignores θ(λ)"), for the Hessian and the mixed derivatives."""
    _check(problem, meta_params, tasks, chunk_size)
    adapt = problem.adapt if isinstance(problem.adapt, FirstOrder) else FirstOrder(problem.adapt)
    result = influence(
        dataclasses.replace(problem, adapt=adapt),
        meta_params,
        tasks,
        target,
        solver=solver,
        curvature=curvature,
        chunk_size=chunk_size,
    )
    return Scores(result.tasks, result.support, result.query, result.solve)


# ----------------------------------------------------------------------------- loss and random


@jax.jit
def _raw_loss_core(problem, meta_params, tasks):
    weights = unit_weights(meta_params, tasks)
    theta = jax.vmap(adapt_one, in_axes=(None, None, 0, 0))(problem, meta_params, tasks.support, weights.support)
    per_example = lambda loss: jax.vmap(jax.vmap(loss, in_axes=(None, None, 0)), in_axes=(0, None, 0))
    support = per_example(problem.inner_loss)(theta, meta_params, tasks.support)
    query = per_example(problem.outer_loss)(theta, meta_params, tasks.query)
    return jnp.mean(query, axis=1), support, query


def raw_loss(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet) -> Scores:
    """Loss as a harm detector: each task's query loss after adaptation [n], and each support
    [n, m] and query [n, q] example's loss under its task's adapted parameters θ_i(λ*)."""
    _check(problem, meta_params, tasks, None)
    return Scores(*_raw_loss_core(problem, meta_params, tasks))


def random_scores(tasks: TaskSet, seed: int = 0, dtype=np.float64) -> Scores:
    """Uniform random scores in [0, 1) with the shapes of every level (the chance baseline)."""
    n, m, q = check_tasks(tasks)
    rng = np.random.default_rng(seed)
    return Scores(*(jnp.asarray(rng.random(shape), dtype) for shape in ((n,), (n, m), (n, q))))
