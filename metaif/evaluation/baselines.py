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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _batching, _tree, _validate
from .._adapt import FirstOrder, weighted_mean_loss
from .._influence import influence
from .._linalg import SolveInfo
from .._objective import adapt_one, check_arguments, task_loss, unit_weights
from .._problem import BilevelProblem, TaskSet, check_tasks
from ..curvature import Curvature
from ..solvers import CG, Dense, Operator, Solver

PyTree = Any
DENSE_LIMIT = 256


class Scores(NamedTuple):
    """Scores of every task [n], support example [n, m] and query example [n, q]; higher = more
    harmful. `solve` holds the inverse-Hessian solve's diagnostics where there is one, else None."""

    tasks: jax.Array
    support: jax.Array
    query: jax.Array
    solve: SolveInfo | None = None


# ----------------------------------------------------------------------------- shared pieces


def _weight_scores(task_fn, meta_params, tasks, v, batch_size) -> tuple[jax.Array, jax.Array, jax.Array]:
    """−∂_ω [vᵀ ∇_λ G(λ; ω)] for G(λ; t, a, b) = (1/n) Σ_i t_i task_fn(λ, S_i, Q_i, a_i, b_i) + R(λ)."""
    n = tasks.n_tasks
    weights = unit_weights(meta_params, tasks)

    def one_task(data):
        support, query, t, a, b = data

        def directional(t, a, b):
            loss = lambda lam: task_fn(lam, support, query, a, b)
            return t * jax.jvp(loss, (meta_params,), (v,))[1] / n

        return jax.grad(directional, argnums=(0, 1, 2))(t, a, b)

    scores = _batching.map_tasks(one_task, (tasks.support, tasks.query, *weights), batch_size)
    return tuple(-s for s in scores)


def _check(problem, meta_params, tasks, batch_size):
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    return None if batch_size is None else _validate.positive_int("batch_size", batch_size)


def _target_gradient(target, meta_params):
    _validate.callable_("target", target, "meta_params -> scalar")
    try:
        out = jax.eval_shape(target, meta_params)
    except Exception as error:
        raise ValueError(f"target failed when called on meta_params: {error}") from error
    if len(jax.tree.leaves(out)) != 1 or jax.tree.leaves(out)[0].shape != ():
        raise ValueError(f"target must return a scalar; it returned {jax.tree.map(lambda s: s.shape, out)}.")
    grad = _grad(target, meta_params)
    _validate.finite_tree("the gradient of target at meta_params", grad)
    return grad


@functools.partial(jax.jit, static_argnums=0)
def _grad(fn, x):
    return jax.grad(fn)(x)


def _bilevel_task_loss(problem):
    return lambda lam, support, query, a, b: task_loss(problem, lam, support, query, a, b)


# ----------------------------------------------------------------------------- gradient similarity


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _grad_dot_core(problem, batch_size, meta_params, tasks, target_grad):
    return _weight_scores(_bilevel_task_loss(problem), meta_params, tasks, target_grad, batch_size)


def grad_dot(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable[[PyTree], jax.Array], *,
             batch_size: int | None = None) -> Scores:
    """TracIn-style gradient similarity at λ*: score(ω) = −∇f(λ*)ᵀ ∂_ω ∇_λ F(λ*), i.e. influence
    with the Hessian replaced by the identity. No Hessian is formed: one jvp and one grad per task.

    Args:
      target: `meta_params -> scalar`, e.g. a meta-test loss.
      batch_size: tasks processed at a time (memory bound); None: all at once.
    """
    batch_size = _check(problem, meta_params, tasks, batch_size)
    return Scores(*_grad_dot_core(problem, batch_size, meta_params, tasks, _target_gradient(target, meta_params)))


# ----------------------------------------------------------------------------- TRAK


def trak_projection(meta_params: PyTree, dim: int, seed: int = 0) -> PyTree:
    """The random projection P of `trak`: a pytree like meta_params with a leading axis `dim`,
    entries N(0, 1/dim) (so E[PᵀP] = I)."""
    dim = _validate.positive_int("dim", dim)
    leaves, treedef = jax.tree.flatten(meta_params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    scale = float(1.0 / np.sqrt(dim))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, (dim, *jnp.shape(x)), jnp.result_type(x))
                                        for k, x in zip(keys, leaves)])


def _project(projection, tree):
    """P · tree: [k]."""
    return jax.vmap(lambda row: _tree.vdot(row, tree))(projection)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _trak_core(problem, batch_size, damping, projection, meta_params, tasks, target_grad):
    n = tasks.n_tasks
    weights = unit_weights(meta_params, tasks)
    task_grad = lambda data: _project(projection, jax.grad(task_loss, argnums=1)(problem, meta_params, *data))
    phi = _batching.map_tasks(task_grad, (tasks.support, tasks.query, weights.support, weights.query), batch_size)
    phi = phi / float(np.sqrt(n))  # [n, k]: rows P ∇L_O^i / √n, so ΦᵀΦ = P (Fisher of F) Pᵀ
    kernel = phi.T @ phi + damping * jnp.eye(phi.shape[1], dtype=phi.dtype)
    coefficients = jnp.linalg.solve(kernel, _project(projection, target_grad))
    v = jax.tree.map(lambda p: jnp.tensordot(coefficients, p, axes=1), projection)
    return _weight_scores(_bilevel_task_loss(problem), meta_params, tasks, v, batch_size)


def trak(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable[[PyTree], jax.Array],
         dim: int = 32, damping: float = 1e-3, seed: int = 0, *, batch_size: int | None = None) -> Scores:
    """TRAK-style scores: score(ω) = −φ_fᵀ (ΦᵀΦ + δI)⁻¹ φ_ω, with φ = P·gradient for the random
    Gaussian projection P = `trak_projection(meta_params, dim, seed)`: φ_f = P ∇f(λ*), φ_ω =
    P ∂_ω ∇_λ F(λ*) (per-task and per-example total gradients, exact), and Φ [n, dim] the rows
    P ∇L_O^i(λ*) / √n (per-task total gradients), so ΦᵀΦ is the projected empirical Fisher of F.

    Args:
      dim: projection dimension k.
      damping: δ > 0 (ΦᵀΦ has rank at most n).
    """
    batch_size = _check(problem, meta_params, tasks, batch_size)
    damping = _validate.positive("damping", damping)
    projection = trak_projection(meta_params, dim, seed)
    return Scores(*_trak_core(problem, batch_size, damping, projection, meta_params, tasks,
                              _target_gradient(target, meta_params)))


# ----------------------------------------------------------------------------- single level


def _pooled_task_loss(problem):
    """One task's pooled loss without adaptation (θ = λ): (Σ_j a_j ℓ_in(λ; s_j) + Σ_j b_j ℓ_out(λ; q_j)) / (m + q)."""

    def loss(lam, support, query, a, b):
        m, q = a.shape[0], b.shape[0]
        inner = weighted_mean_loss(problem.inner_loss, lam, lam, support, a) * m
        outer = weighted_mean_loss(problem.outer_loss, lam, lam, query, b) * q
        return (inner + outer) / (m + q)

    return loss


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _single_level_core(problem, solver, batch_size, meta_params, tasks, target_grad):
    n, reg = tasks.n_tasks, problem.meta_reg
    weights = unit_weights(meta_params, tasks)
    pooled = _pooled_task_loss(problem)
    data = (tasks.support, tasks.query, weights.support, weights.query)

    def chunk_sum(lam, chunk):
        return jnp.sum(jax.vmap(pooled, in_axes=(None, 0, 0, 0, 0))(lam, *chunk))

    def chunk_hvp(chunk, v):
        return jax.jvp(jax.grad(lambda lam: chunk_sum(lam, chunk)), (meta_params,), (v,))[1]

    def hvp(v):  # Hessian of G = (1/n) Σ_i pooled_i + (reg/2)‖λ‖²
        return _tree.axpy(reg, v, _tree.scale(1.0 / n, _batching.sum_chunks(lambda c: chunk_hvp(c, v), data, batch_size)))

    def sample_hvp(key, v, batch):
        index = jax.random.randint(key, (batch,), 0, n)
        return _tree.axpy(reg, v, _tree.scale(1.0 / batch, chunk_hvp(jax.tree.map(lambda x: x[index], data), v)))

    solution, info = solver.solve(solver.prepare(Operator(hvp, meta_params, sample_hvp, n)), target_grad)
    return _weight_scores(pooled, meta_params, tasks, solution, batch_size), info


def single_level(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable[[PyTree], jax.Array],
                 solver: Solver | None = None, *, batch_size: int | None = None) -> Scores:
    """Classical (Koh & Liang) influence on the flattened problem, ignoring the bilevel structure:
    no adaptation (θ = λ), and one-level ERM over all support and query examples pooled,

        G(λ; t, a, b) = (1/n) Σ_i t_i (Σ_j a_ij ℓ_in(λ, λ; s_ij) + Σ_j b_ij ℓ_out(λ, λ; q_ij)) / (m + q)
                        + (meta_reg/2)‖λ‖²,

    score(ω) = −∇f(λ*)ᵀ (∇²G(λ*) + δI)⁻¹ ∂_ω ∇_λ G(λ*), exact (the paper's "EK-FAC IF
    (single-level)" row without the EK-FAC approximation). λ* is the bilevel solution, not a
    stationary point of G, as in the paper's use. `solver` as in `metaif.influence` (default Dense
    up to 256 parameters, else CG); check `Scores.solve` for an indefinite ∇²G.
    """
    batch_size = _check(problem, meta_params, tasks, batch_size)
    if solver is None:
        solver = Dense() if _tree.size(meta_params) <= DENSE_LIMIT else CG()
    elif not isinstance(solver, Solver):
        raise TypeError(f"solver must be a metaif.solvers.Solver such as metaif.solvers.Dense(); received {_validate.describe(solver)}.")
    scores, info = _single_level_core(problem, solver, batch_size, meta_params, tasks, _target_gradient(target, meta_params))
    return Scores(*scores, info)


# ----------------------------------------------------------------------------- Direct-IF


def direct_if(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, target: Callable[[PyTree], jax.Array],
              solver: Solver | None = None, *, curvature: Curvature | None = None, batch_size: int | None = None) -> Scores:
    """The paper's Direct-IF: `metaif.influence` on the same problem with `FirstOrder` adaptation
    (dθ/dλ replaced by the identity, "ignores θ(λ)"), for the Hessian and the mixed derivatives."""
    _check(problem, meta_params, tasks, batch_size)
    adapt = problem.adapt if isinstance(problem.adapt, FirstOrder) else FirstOrder(problem.adapt)
    result = influence(dataclasses.replace(problem, adapt=adapt), meta_params, tasks, target, solver,
                       curvature=curvature, batch_size=batch_size)
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
