"""Ground truth by retraining: many re-solves of the weighted meta-objective in one jitted call.

* `retrain`: warm-started at λ*, trust-region Newton on F(λ; w) (`metaif.training.newton_steps`)
  until ‖∇‖ <= tol, for a batch of weight settings, `lax.map(..., batch_size=...)` over the batch.
  With `solver=metaif.solvers.CG(...)`: matrix-free Newton–CG (`metaif._newton_cg`), which never
  forms the d×d Hessian (networks such as Conv4).
  With `proximal=ρ` it minimises F(λ; w) + (ρ/2)‖λ − center‖² (center λ* by default) instead:
  the retraining that damped influence (solver damping δ = ρ) estimates, and the meaningful
  ground truth in non-convex networks, where plain retraining can leave λ*'s basin.
* `retrain_cold`: from fresh initialisations over several seeds (optax Adam, then Newton polish),
  the retraining a user would run from scratch; seeds also set the minibatch order.
* `leave_one_out`: the actual change of a target when each datum of one level is removed.

Every retraining reports its final gradient norm (of the objective it minimised), so measured
changes can be told apart from optimiser noise; compare repeated retrainings with
`metaif.evaluation.noise_ceiling`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import _tree, _validate
from .._objective import Weights, check_arguments
from .._problem import BilevelProblem, TaskSet
from .._deprecation import renamed
from .._newton_cg import newton_cg
from ..solvers import CG
from ..training import newton_steps as _newton
from ..training import train_steps

PyTree = Any
Level = Literal["tasks", "support", "query"]
LEVELS = ("tasks", "support", "query")


class Retrained(NamedTuple):
    """Retrained meta-parameters (leading batch axes, e.g. [B] or [S, B]), the final gradient
    norm of the objective each retraining minimised and the Newton steps it took (same axes);
    `products`: the Hessian-vector products each spent (matrix-free `solver=CG(...)` only, else
    None)."""

    meta_params: PyTree
    grad_norm: jax.Array
    iterations: jax.Array | None = None
    products: jax.Array | None = None


def check_level(level: Any) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be 'tasks', 'support' or 'query'; received {_validate.describe(level)}.")
    return level


def level_shape(level: str, n: int, m: int, q: int) -> tuple[int, ...]:
    """The shape of one level's weights: (n,), (n, m) or (n, q)."""
    return {"tasks": (n,), "support": (n, m), "query": (n, q)}[check_level(level)]


def removal_weights(n: int, m: int, q: int, level: Level, indices, dtype=jnp.float64) -> Weights:
    """Weights [B, ...] that each remove one datum: task indices [B] for level "tasks", or
    (task, example) index pairs [B, 2] for "support" and "query"."""
    shape = level_shape(level, n, m, q)
    indices = np.asarray(indices)
    ok_shape = indices.ndim == 1 if level == "tasks" else (indices.ndim == 2 and indices.shape[1] == 2)
    if not ok_shape or not np.issubdtype(indices.dtype, np.integer):
        layout = "[B] task indices" if level == "tasks" else "[B, 2] (task, example) index pairs"
        raise ValueError(
            f"indices for level {level!r} must be integer {layout}; received {_validate.describe(indices)}."
        )
    columns = indices.reshape(indices.shape[0], -1)
    if np.any(columns < 0) or np.any(columns >= np.asarray(shape)):
        raise ValueError(
            f"indices for level {level!r} must lie in [0, {shape}) per column; received values in "
            f"[{columns.min()}, {columns.max()}]."
        )
    ones = Weights.ones(n, m, q, dtype)
    batch = indices.shape[0]
    tiled = Weights(*(jnp.broadcast_to(w, (batch, *w.shape)) for w in ones))
    rows = np.arange(batch)
    if level == "tasks":
        return tiled._replace(tasks=tiled.tasks.at[rows, indices].set(0.0))
    if level == "support":
        return tiled._replace(support=tiled.support.at[rows, indices[:, 0], indices[:, 1]].set(0.0))
    return tiled._replace(query=tiled.query.at[rows, indices[:, 0], indices[:, 1]].set(0.0))


def check_batched_weights(weights: Any, tasks: TaskSet, name: str = "weights") -> int:
    """Validate a `Weights` whose leaves have a common leading batch axis B; returns B."""
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    if not isinstance(weights, Weights):
        raise TypeError(
            f"{name} must be a metaif.Weights(tasks [B, n], support [B, n, m], query [B, n, q]); "
            f"received {_validate.describe(weights)}."
        )
    batch = np.shape(weights.tasks)[:1]
    for field, tail in zip(Weights._fields, ((n,), (n, m), (n, q))):
        shape = np.shape(getattr(weights, field))
        if len(batch) != 1 or shape != batch + tail:
            raise ValueError(
                f"{name}.{field} must have shape [B, {', '.join(map(str, tail))}] with one batch size B "
                f"for all three fields; received shapes {[np.shape(w) for w in weights]} "
                "(use metaif.evaluation.removal_weights or subset_weights)."
            )
    return batch[0]


def _map(fn: Callable, data: PyTree, chunk_size: int | None) -> PyTree:
    """fn over the leading axis: one vmap when chunk_size is None or covers it, else lax.map chunks."""
    if chunk_size is None or chunk_size >= jax.tree.leaves(data)[0].shape[0]:
        return jax.vmap(fn)(data)
    return jax.lax.map(fn, data, batch_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("steps", "chunk_size"))
def _retrain(problem, steps, damping, proximal, tol, chunk_size, meta_params, center, tasks, weights):
    def solve(w):
        result = _newton(problem, steps, damping, proximal, center, meta_params, tasks, w, tol)
        return result.params, result.grad_norm, result.iterations

    return Retrained(*_map(solve, weights, chunk_size))


@functools.partial(jax.jit, static_argnames=("chunk_size", "task_chunk_size"))
def _retrain_cg(
    problem,
    solver,
    steps,
    shift,
    initial_shift,
    proximal,
    tol,
    chunk_size,
    task_chunk_size,
    meta_params,
    center,
    tasks,
    weights,
):
    def solve(w):
        result = newton_cg(
            problem, solver, steps, shift, proximal, center, meta_params, tasks, w, tol, initial_shift, task_chunk_size
        )
        return result.params, result.grad_norm, result.iterations, result.products

    return Retrained(*_map(solve, weights, chunk_size))


def _check_solver(solver: Any) -> CG | None:
    if solver is None or isinstance(solver, CG):
        return solver
    raise TypeError(
        "solver must be None (dense trust-region Newton, small models) or a metaif.solvers.CG instance "
        "(matrix-free Newton–CG), e.g. metaif.solvers.CG(maxiter=200, tol=1e-8); "
        f"received {_validate.describe(solver)}."
    )


def _chunk_size(value, weights: Weights, repeats: int = 1):
    """The validated batch size, None when it covers all `repeats`·B settings (one compiled vmap)."""
    if value is None:
        return None
    value = _validate.positive_int("chunk_size", value)
    return None if value >= repeats * weights.tasks.shape[0] else value


@renamed(damping="shift", batch_size="chunk_size")
def retrain(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    weights: Weights,
    steps: int = 50,
    shift: float = 0.0,
    chunk_size: int | None = 8,
    *,
    proximal: float = 0.0,
    center: PyTree | None = None,
    tol: float = 1e-10,
    solver: CG | None = None,
    task_chunk_size: int | None = None,
) -> Retrained:
    """Re-solve the objective for each weight setting in `weights` (leaves [B, n], [B, n, m],
    [B, n, q]), warm-started at meta_params, by Newton steps until the gradient norm is <= tol
    or `steps` steps are spent: dense trust-region Newton by default, matrix-free Newton–CG with
    `solver=metaif.solvers.CG(...)`.

    Args:
      steps: the most Newton steps per retraining (dense Hessians, or Newton–CG linear solves).
      shift: a fixed shift added to the model Hessian of every step (does not change the
        solution).
      chunk_size: weight settings solved at a time (`lax.map`); None: all at once (vmap; a batch
        runs until its slowest member finishes).
      proximal: ρ >= 0; minimise F(λ; w) + (ρ/2)‖λ − center‖² (the retraining that influence
        with solver damping δ = ρ estimates). 0: plain retraining.
      center: the proximal centre (default meta_params, the start); a pytree like meta_params.
        Pass λ* here and a perturbed start as meta_params for a noise ceiling of proximal
        retraining.
      tol: stop once ‖∇‖ <= tol.
      solver: None: dense trust-region Newton (`metaif.training.newton_steps`; materialises the
        d×d Hessian, small models). A `metaif.solvers.CG`: truncated Newton that never forms H
        (`metaif._newton_cg`): each step solves (H + (ρ + shift + μ)I) p = −∇ by CG on exact
        Hessian-vector products with the solver's `maxiter` and preconditioner, under a
        Levenberg–Marquardt shift μ >= 0 (raised on non-positive curvature or a poor step,
        lowered after good ones; backtracking as a fallback), so an indefinite H (an
        Adam-trained λ) is handled. The solver's `damping` is μ₀ (None: 1e-3 (ρ + ‖∇(start)‖)).
        Each step's CG stops at relative residual clip(sqrt(‖∇_k‖ / ‖∇_0‖), solver.tol, 0.1)
        (inexact Newton: cheap rough steps far away, near-exact ones close by); `tol` above alone
        decides convergence. Use a small CG tol (1e-6 to 1e-8) and maxiter of 100 or more.
        The objective must be twice differentiable: with ReLU or max-pooling the MAML
        meta-gradient jumps and ‖∇‖ <= tol may not be reachable (`metaif.models.Conv4`).
      task_chunk_size: with `solver`, tasks per chunk of the gradients and Hessian-vector
        products (None: all tasks at once). For conv nets on CPU, 1 is much faster than vmapped
        tasks (per-task conv weights vmap into grouped convolutions).

    Returns:
      `Retrained` with leading axis B; `grad_norm` (of the minimised objective) above tol means
      the budget ran out; `iterations` the Newton steps taken; with `solver`, `products` the
      Hessian-vector products spent.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    check_batched_weights(weights, tasks)
    steps = _validate.positive_int("steps", steps)
    shift = _validate.non_negative("shift", shift)
    proximal = _validate.non_negative("proximal", proximal)
    tol = _validate.non_negative("tol", tol)
    if center is None:
        center = meta_params
    else:
        _validate.finite_tree("center", center)
        _check_like("center", center, meta_params)
    weights = Weights(*(jnp.asarray(w, _tree.float_dtype(meta_params)) for w in weights))
    solver = _check_solver(solver)
    if task_chunk_size is not None:
        task_chunk_size = _validate.positive_int("task_chunk_size", task_chunk_size)
        if solver is None:
            raise ValueError(
                f"task_chunk_size chunks the matrix-free path; received task_chunk_size={task_chunk_size} with "
                "solver=None (dense Newton). Pass solver=metaif.solvers.CG(...) or task_chunk_size=None."
            )
    if solver is None:
        return _retrain(
            problem, steps, shift, proximal, tol, _chunk_size(chunk_size, weights), meta_params, center, tasks, weights
        )
    # damping is μ₀, passed on its own (NaN: the default; one compiled program for None and numbers);
    # the solver keeps a numeric leaf there, which each step replaces with ρ + shift + μ
    initial_shift = np.nan if solver.damping is None else solver.damping
    solver = dataclasses.replace(solver, damping=0.0)
    return _retrain_cg(
        problem,
        solver,
        steps,
        shift,
        initial_shift,
        proximal,
        tol,
        _chunk_size(chunk_size, weights),
        task_chunk_size,
        meta_params,
        center,
        tasks,
        weights,
    )


def _check_like(name: str, value: PyTree, like: PyTree) -> None:
    """A ValueError unless `value` has the structure and leaf shapes of `like` (meta_params)."""
    shapes = lambda t: jax.tree.map(np.shape, t)
    if jax.tree.structure(value) != jax.tree.structure(like) or shapes(value) != shapes(like):
        raise ValueError(
            f"{name} must be a pytree like meta_params (structure and shapes {shapes(like)}); "
            f"received {_validate.describe(value)} with shapes {shapes(value)}."
        )


# ----------------------------------------------------------------------------- cold start


def _adam(problem, optimizer, steps, minibatch, params, key, tasks, weights):
    """`steps` optimiser steps on F(λ; w) (task minibatches drawn with `key` when minibatch)."""
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int counters
        state = optimizer.init(params)
    return train_steps(problem, optimizer, params, state, tasks, weights, steps=steps, key=key, minibatch=minibatch)[0]


@functools.partial(jax.jit, static_argnames=("init", "optimizer", "steps", "newton_steps", "minibatch", "chunk_size"))
def _retrain_cold(
    problem, init, optimizer, steps, newton_steps, tol, minibatch, chunk_size, start, seeds, tasks, weights
):
    def one(pair):
        seed, w = pair
        init_key, order_key = jax.random.split(jax.random.key(seed))
        params = start if init is None else init(init_key)
        params = _adam(problem, optimizer, steps, minibatch, params, order_key, tasks, w)
        result = _newton(problem, newton_steps, 0.0, 0.0, params, params, tasks, w, tol)
        return result.params, result.grad_norm, result.iterations

    count, batch = seeds.shape[0], weights.tasks.shape[0]
    pairs = (jnp.repeat(seeds, batch), jax.tree.map(lambda x: jnp.tile(x, (count,) + (1,) * (x.ndim - 1)), weights))
    params, grad_norm, iterations = _map(one, pairs, chunk_size)
    unflatten = lambda x: x.reshape((count, batch) + x.shape[1:])
    return Retrained(jax.tree.map(unflatten, params), unflatten(grad_norm), unflatten(iterations))


@renamed(batch_size="chunk_size", task_batch="minibatch")
def retrain_cold(
    problem: BilevelProblem,
    init: Callable[[jax.Array], PyTree] | PyTree,
    tasks: TaskSet,
    weights: Weights,
    seeds=(0, 1),
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 500,
    newton_steps: int = 30,
    minibatch: int | None = None,
    chunk_size: int | None = 8,
    *,
    tol: float = 1e-10,
) -> Retrained:
    """Retrain from scratch for every weight setting and seed: `steps` optimiser steps from a fresh
    initialisation, then up to `newton_steps` trust-region Newton steps (until ‖∇F‖ <= tol), all
    in one jitted call.

    Args:
      init: `key -> meta_params` (a fresh initialisation per seed; pass the same function object
        across calls to reuse compiled code), or fixed meta_params (then seeds vary only the
        minibatch order, which needs `minibatch`).
      weights: `Weights` with leaves [B, n], [B, n, m], [B, n, q].
      seeds: S ints; each seeds the initialisation and the task-minibatch order.
      optimizer: optax transformation (default `optax.adam(1e-2)`).
      minibatch: tasks per optimiser step (without replacement); None for full batch.
      chunk_size: retrainings (seed × setting pairs) run at a time; None: all at once.

    Returns:
      `Retrained` with leading axes [S, B] and the final ‖∇F(λ; w)‖ of each retraining.
    """
    steps = _validate.positive_int("steps", steps)
    newton_steps = _validate.positive_int("newton_steps", newton_steps)
    tol = _validate.non_negative("tol", tol)
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or seeds.size < 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be a non-empty sequence of ints; received {_validate.describe(seeds)}.")
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, e.g. optax.adam(1e-2); received {_validate.describe(optimizer)}."
        )
    start = init(jax.random.split(jax.random.key(int(seeds[0])))[0]) if callable(init) else init
    start = check_arguments(problem, start, tasks)
    _validate.finite_tree("init", start)
    check_batched_weights(weights, tasks)
    n = tasks.n_tasks
    if minibatch is not None and (
        isinstance(minibatch, bool) or not isinstance(minibatch, int) or not 1 <= minibatch <= n
    ):
        raise ValueError(
            f"minibatch must be None or an int in [1, n_tasks={n}]; received {_validate.describe(minibatch)}."
        )
    weights = Weights(*(jnp.asarray(w, _tree.float_dtype(start)) for w in weights))
    fn = init if callable(init) else None
    return _retrain_cold(
        problem,
        fn,
        optimizer,
        steps,
        newton_steps,
        tol,
        minibatch,
        _chunk_size(chunk_size, weights, seeds.size),
        None if callable(init) else start,
        jnp.asarray(seeds),
        tasks,
        weights,
    )


# ----------------------------------------------------------------------------- targets and LOO


@functools.partial(jax.jit, static_argnums=(0, 1))
def _map_target(target, axes, batched_params):
    fn = target
    for _ in range(axes):
        fn = jax.vmap(fn)
    return fn(batched_params)


def target_values(target: Callable[[PyTree], jax.Array], retrained: Retrained) -> jax.Array:
    """target(λ) of every retrained λ: an array shaped like `retrained.grad_norm` ([B] or [S, B])."""
    if not isinstance(retrained, Retrained):
        raise TypeError(f"retrained must be a metaif.evaluation.Retrained; received {_validate.describe(retrained)}.")
    _validate.callable_("target", target, "meta_params -> scalar")
    return _map_target(target, np.ndim(retrained.grad_norm), retrained.meta_params)


def all_indices(level: str, n: int, m: int, q: int) -> np.ndarray:
    """Every datum of a level: task indices [n], or (task, example) pairs [n·m | n·q, 2]."""
    shape = level_shape(level, n, m, q)
    return np.arange(n) if level == "tasks" else np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), 1)


@renamed(batch_size="chunk_size")
def leave_one_out(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    level: Level,
    indices,
    target: Callable[[PyTree], jax.Array],
    steps: int = 50,
    chunk_size: int | None = 8,
    *,
    proximal: float = 0.0,
    tol: float = 1e-10,
    solver: CG | None = None,
    task_chunk_size: int | None = None,
):
    """Actual change of `target` when each datum in `indices` is removed and F is re-solved.

    Args:
      level: "tasks", "support" or "query".
      indices: task indices [B] or (task, example) pairs [B, 2]; None for every datum of the level.
      steps, proximal, tol, solver, task_chunk_size: as in `retrain` (proximal 0: plain
        retraining; solver=metaif.solvers.CG(...): matrix-free Newton–CG).

    Returns (changes = target(λ_without) − target(λ*), final gradient norms): arrays [B], or the
    level's shape ([n], [n, m] or [n, q]) when indices is None. Compare with −influence.
    """
    check_level(level)
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    full = indices is None
    indices = all_indices(level, n, m, q) if full else indices
    weights = removal_weights(n, m, q, level, indices, _tree.float_dtype(meta_params))
    result = retrain(
        problem,
        meta_params,
        tasks,
        weights,
        steps=steps,
        chunk_size=chunk_size,
        proximal=proximal,
        tol=tol,
        solver=solver,
        task_chunk_size=task_chunk_size,
    )
    changes = target_values(target, result) - target(meta_params)
    if full:
        shape = level_shape(level, n, m, q)
        return changes.reshape(shape), result.grad_norm.reshape(shape)
    return changes, result.grad_norm
