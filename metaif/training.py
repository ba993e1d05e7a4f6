"""Meta-training over a finite task set: a jitted optax loop and an exact Newton refinement.

Influence functions assume λ is a stationary point of F (total gradient ≈ 0) and, for the usual
reading, a local minimum (H positive definite). Every `TrainResult` reports the final full-batch
gradient norm so users can see how stationary λ is. When it is not small relative to the effects
you measure: train longer or with a smaller learning rate, finish with `newton_refine` (small
models), or add damping to the influence solver (then influence describes a proximal retraining
that stays near λ).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _batching, _linalg, _tree, _validate
from ._deprecation import renamed
from ._adapt import Proximal
from ._hessian import value_and_grad as _chunked_value_and_grad
from ._objective import (
    Weights,
    full_weights,
    adaptation_residuals_jit,
    check_arguments,
    check_finite_losses,
    objective,
    unit_weights,
)
from ._problem import BilevelProblem, TaskSet

PyTree = Any
_LOG = logging.getLogger("metaif")


class TrainResult(NamedTuple):
    """Meta-training outcome.

    Attributes:
      meta_params: the trained λ.
      losses: [steps] objective per step (on the step's task minibatch when minibatch is set).
      grad_norms: [steps] total-gradient norm per step (minibatch gradient when minibatch is set).
      objective: full-batch F(λ) at the end.
      grad_norm: full-batch ‖∇_λ F(λ)‖ at the end: the stationarity influence assumes.
      adaptation_residual: for `Proximal` adaptation, max over tasks of ‖∇_θ L_I(θ_i, λ)‖ at the
        end (None for `Unrolled`). Implicit derivatives assume exact inner minimisers: a residual
        far above 0 means the inner gradient descent did not converge (e.g. Proximal.lr above
        2 / the inner Hessian's largest eigenvalue: use `Proximal(line_search=True)`) and ∇F,
        Newton steps and influence are off.
    """

    meta_params: PyTree
    losses: jax.Array
    grad_norms: jax.Array
    objective: jax.Array
    grad_norm: jax.Array
    adaptation_residual: jax.Array | None = None

    def summary(self) -> str:
        inner = (
            "" if self.adaptation_residual is None else f", max inner residual {float(self.adaptation_residual):.2e}"
        )
        return f"F = {float(self.objective):.6g}, ||grad F|| = {float(self.grad_norm):.3e}{inner} after {self.losses.shape[0]} steps"


def _adaptation_residual(
    problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, weights: Weights
) -> jax.Array | None:
    """Max inner-stationarity residual over tasks for Proximal adaptation, else None."""
    if not isinstance(problem.adapt, Proximal):
        return None
    return jnp.max(adaptation_residuals_jit(problem, meta_params, tasks.support, weights.support))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _full_value_and_grad(problem, meta_params, tasks, weights, chunk_size=None):
    value, grad = _chunked_value_and_grad(problem, meta_params, tasks, weights, chunk_size=chunk_size)
    return value, _tree.norm(grad)


def train_steps(
    problem: BilevelProblem,
    optimizer: optax.GradientTransformation,
    meta_params: PyTree,
    opt_state: Any,
    tasks: TaskSet,
    weights: Weights | None = None,
    *,
    steps: int,
    key: jax.Array | None = None,
    minibatch: int | None = None,
    chunk_size: int | None = None,
):
    """`steps` optax steps on F(λ; w), on all tasks or on minibatches of `minibatch` tasks drawn
    with `key` (without replacement), each gradient summed `chunk_size` tasks at a time (None:
    all at once). Pure (one `lax.scan`): jit it, checkpoint between calls, or scan it further.
    Returns (λ, optimiser state, [steps] F history, [steps] ‖∇F‖ history)."""
    n = tasks.n_tasks
    weights = unit_weights(meta_params, tasks) if weights is None else weights
    keys = jax.random.split(jax.random.key(0) if key is None else key, steps)

    def step(carry, step_key):
        params, state = carry
        if minibatch is None:
            batch, w = tasks, weights
        else:
            index = jax.random.choice(step_key, n, (minibatch,), replace=False)
            batch, w = _batching.take_tasks((tasks, weights), index)
        value, grad = _chunked_value_and_grad(problem, params, batch, w, chunk_size=chunk_size)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int counters
            updates, state = optimizer.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), (value, _tree.norm(grad))

    (meta_params, opt_state), (values, norms) = jax.lax.scan(step, (meta_params, opt_state), keys)
    return meta_params, opt_state, values, norms


_train_chunk = jax.jit(train_steps, static_argnames=("optimizer", "steps", "minibatch", "chunk_size"))


@renamed(batch_size="minibatch")
def meta_train(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    optimizer: optax.GradientTransformation | None = None,
    steps: int = 1000,
    minibatch: int | None = None,
    seed: int = 0,
    log_every: int | None = None,
    task_weights=None,
    support_weights=None,
    query_weights=None,
    *,
    chunk_size: int | None = None,
) -> TrainResult:
    """Minimise F(λ; t, a, b) over the finite task set with an optax optimiser.

    Args:
      optimizer: an optax `GradientTransformation` (default `optax.adam(1e-2)`); pass the same
        object across calls to reuse compiled code.
      steps: optimiser steps.
      minibatch: tasks per step (sampled without replacement); None for full batch.
      seed: minibatch sampling seed.
      log_every: report progress every this many steps (each chunk is one jitted scan), to the
        `logging` logger "metaif" at INFO level (`logging.basicConfig(level=logging.INFO)` shows it).
      task_weights, support_weights, query_weights: train on a reweighted objective ([n], [n, m],
        [n, q]; 0 removes a datum), e.g. for leave-one-out retraining.
      chunk_size: tasks per chunk of each gradient (`lax.map`; memory, and speed for conv nets on
        CPU, where vmapping per-task weights makes grouped convolutions); None: all at once.

    Returns:
      `TrainResult` with the histories and the final full-batch objective and gradient norm.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    n = tasks.n_tasks
    if minibatch is not None and (
        isinstance(minibatch, bool) or not isinstance(minibatch, int) or not 1 <= minibatch <= n
    ):
        raise ValueError(
            f"minibatch must be None or an int in [1, n_tasks={n}]; received {_validate.describe(minibatch)}."
        )
    if log_every is not None:
        log_every = _validate.positive_int("log_every", log_every)
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, e.g. optax.adam(1e-2); received {_validate.describe(optimizer)}."
        )
    weights = full_weights(meta_params, tasks, task_weights, support_weights, query_weights)
    check_finite_losses(problem, meta_params, tasks, weights, "meta_train at the initial meta_params")
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(meta_params)
    key = jax.random.key(seed)
    chunk = log_every or steps
    values, norms, done = [], [], 0
    while done < steps:
        length = min(chunk, steps - done)
        key, sub = jax.random.split(key)
        meta_params, opt_state, v, g = _train_chunk(
            problem,
            optimizer,
            meta_params,
            opt_state,
            tasks,
            weights,
            steps=length,
            key=sub,
            minibatch=minibatch,
            chunk_size=chunk_size,
        )
        values.append(v)
        norms.append(g)
        done += length
        if log_every is not None:
            _LOG.info("meta_train step %d/%d: F = %.6g, ||grad|| = %.3e", done, steps, float(v[-1]), float(g[-1]))
    value, grad_norm = _full_value_and_grad(problem, meta_params, tasks, weights, chunk_size)
    if not bool(jnp.isfinite(value)):
        check_finite_losses(problem, meta_params, tasks, weights, "meta_train diverged")
        raise ValueError(
            f"meta_train diverged: the objective is {float(value)}. Lower the optimiser's learning rate or the adaptation's lr."
        )
    return TrainResult(
        meta_params,
        jnp.concatenate(values),
        jnp.concatenate(norms),
        value,
        grad_norm,
        _adaptation_residual(problem, meta_params, tasks, weights),
    )


class NewtonResult(NamedTuple):
    """Outcome of `newton_steps` (leading batch axes when vmapped).

    Attributes:
      params: the final λ (pytree).
      objective: the minimised objective at λ.
      grad_norm: its gradient norm at λ.
      objectives: [steps] objective before each step (after the last step taken: the final value).
      grad_norms: [steps] gradient norm before each step (padded likewise).
      iterations: Newton steps taken (each computes one Hessian).
      converged: grad_norm <= tol.
    """

    params: PyTree
    objective: jax.Array
    grad_norm: jax.Array
    objectives: jax.Array
    grad_norms: jax.Array
    iterations: jax.Array
    converged: jax.Array


def trust_region_step(
    values: jax.Array, vectors: jax.Array, gradient: jax.Array, radius: jax.Array, bisections: int = 100
) -> tuple[jax.Array, jax.Array]:
    """The exact minimiser p of the model g·p + ½pᵀHp over ‖p‖ <= radius, H = V diag(values) Vᵀ
    (eigenvalues ascending, [d] and [d, d]; g [d]), and the model's decrease −(g·p + ½pᵀHp).

    p = −(H + σI)⁻¹g with σ >= max(0, −λ_min): σ = 0 (the Newton step) when H is positive definite
    and that step fits, else the σ with ‖p‖ = radius (found by bisection; ‖p(σ)‖ decreases in σ);
    in the "hard case" (g orthogonal to the lowest eigenvectors) a multiple of the lowest
    eigenvector fills up the radius. Negative curvature is followed, never reflected.
    """
    coef = vectors.T @ gradient
    lowest = values[0]

    def step(sigma):
        shifted = values + sigma
        ok = shifted > 0
        return jnp.where(ok, -coef / jnp.where(ok, shifted, 1.0), 0.0)

    newton = step(0.0)
    fits = (lowest > 0) & (jnp.linalg.norm(newton) <= radius)
    low = jnp.maximum(0.0, -lowest)
    high = low + jnp.linalg.norm(gradient) / radius + jnp.finfo(values.dtype).tiny

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        inside = jnp.linalg.norm(step(mid)) <= radius
        return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

    _, sigma = jax.lax.fori_loop(0, bisections, bisect, (low, high))  # ‖step(sigma)‖ <= radius
    sigma = jnp.where(fits, 0.0, sigma)
    p = step(sigma)
    gap = radius**2 - jnp.sum(p**2)
    hard = ~fits & (lowest + sigma <= 1e-12 * jnp.max(jnp.abs(values))) & (gap > 1e-8 * radius**2)
    sign = jnp.where(coef[0] > 0, -1.0, 1.0)
    p = p.at[0].add(jnp.where(hard, sign * jnp.sqrt(jnp.maximum(gap, 0.0)), 0.0))
    decrease = -(coef @ p + 0.5 * jnp.sum(values * p**2))
    return vectors @ p, decrease


def newton_steps(
    problem: BilevelProblem,
    steps: int,
    shift,
    proximal,
    center: PyTree,
    start: PyTree,
    tasks: TaskSet,
    weights: Weights,
    tol=1e-10,
    radius=None,
) -> NewtonResult:
    """Trust-region Newton on F(λ; w) + (proximal/2)‖λ − center‖² from `start`, until the gradient
    norm is <= `tol` or `steps` Newton steps (Hessians) are spent.

    Each step factorises the dense total Hessian H (+ `shift`·I) once and solves the trust-region
    subproblem exactly in its eigenbasis (`trust_region_step`), so negative curvature is followed
    rather than damped away. A step is accepted when the actual decrease is at least 1e-4 of the
    model's (ratio test, guarded against rounding near the optimum); a rejected step shrinks the
    radius to a quarter of the step and re-solves with the same factorisation (function values
    only, up to 30 times), so every Hessian buys an accepted step. Good steps on the boundary
    double the radius. Near a minimum the Newton step fits and convergence is quadratic.

    `proximal` = ρ > 0 gives the proximal retraining that damped influence (damping δ = ρ)
    estimates. `radius`: the initial trust radius (default: the length of the first step with
    |H|, i.e. the Newton step when H is positive definite). Pure, jittable and
    vmappable over `weights` (a `lax.while_loop`; under vmap it runs until every member has
    converged or spent `steps`, finished members stay frozen). Materialises the d×d Hessian
    (small models).
    """
    grad = jax.grad(objective, argnums=1)
    flat_center, unravel = _tree.ravel(center)
    flat_start = _tree.ravel(start)[0]
    dtype = flat_start.dtype
    eps = jnp.finfo(dtype).eps

    def value_of(x):
        return objective(problem, unravel(x), tasks, weights) + 0.5 * proximal * jnp.sum((x - flat_center) ** 2)

    def gradient_of(x):
        return _tree.ravel(grad(problem, unravel(x), tasks, weights))[0] + proximal * (x - flat_center)

    def step(state):
        k, x, value, gradient, radius, values_hist, norms_hist = state
        norm = jnp.linalg.norm(gradient)
        values_hist, norms_hist = values_hist.at[k].set(value), norms_hist.at[k].set(norm)
        factor = _linalg.eigh(jax.jacfwd(gradient_of)(x))
        eig = factor.values + shift
        guard = 10 * eps * jnp.maximum(1.0, jnp.abs(value))
        # first step: the radius is the length of the |H|-Newton step (the Newton step if H > 0)
        absolute = jnp.abs(eig)
        first = jnp.linalg.norm((factor.vectors.T @ gradient) / jnp.where(absolute > 0, absolute, 1.0))
        radius = jnp.where(jnp.isfinite(radius), radius, first)

        def attempt(inner):
            tries, r, _, _, _, _ = inner
            p, predicted = trust_region_step(eig, factor.vectors, gradient, r)
            new_value = value_of(x + p)
            ratio = (value - new_value + guard) / (predicted + guard)
            ok = jnp.isfinite(new_value) & (ratio > 1e-4)
            length = jnp.linalg.norm(p)
            return tries + 1, jnp.where(ok, r, 0.25 * length), ok, p, new_value, ratio

        def retry(inner):
            tries, _, ok, *_ = inner
            return (~ok) & (tries < 30)

        init = (jnp.zeros((), jnp.int32), radius, jnp.zeros((), bool), jnp.zeros_like(x), value, jnp.zeros((), dtype))
        _, r, ok, p, new_value, ratio = jax.lax.while_loop(retry, attempt, attempt(init))
        length = jnp.linalg.norm(p)
        r = jnp.where(ratio < 0.25, 0.25 * length, jnp.where((ratio > 0.75) & (length >= 0.99 * r), 2 * r, r))
        x = jnp.where(ok, x + p, x)
        value = jnp.where(ok, new_value, value)
        return k + 1, x, value, jnp.where(ok, gradient_of(x), gradient), r, values_hist, norms_hist

    def going(state):
        k, _, value, gradient, radius, *_ = state
        return (k < steps) & (jnp.linalg.norm(gradient) > tol) & jnp.isfinite(value) & (radius > 0)

    value0, gradient0 = value_of(flat_start), gradient_of(flat_start)
    radius0 = jnp.asarray(jnp.inf if radius is None else radius, dtype)
    hist = jnp.full((steps,), jnp.nan, dtype)
    init = (jnp.zeros((), jnp.int32), flat_start, value0, gradient0, radius0, hist, hist)
    k, flat, value, gradient, _, values, norms = jax.lax.while_loop(going, step, init)
    norm = jnp.linalg.norm(gradient)
    taken = jnp.arange(steps, dtype=k.dtype) < k
    values, norms = jnp.where(taken, values, value), jnp.where(taken, norms, norm)
    return NewtonResult(unravel(flat), value, norm, values, norms, k, norm <= tol)


@functools.partial(jax.jit, static_argnames=("steps",))
def newton_core(
    problem: BilevelProblem,
    steps: int,
    damping: float,
    tol: float,
    meta_params: PyTree,
    tasks: TaskSet,
    weights: Weights,
) -> NewtonResult:
    """Jitted `newton_steps` on F(λ; w) alone (no proximal term), from meta_params."""
    return newton_steps(problem, steps, damping, 0.0, meta_params, meta_params, tasks, weights, tol)


@renamed(damping="shift")
def newton_refine(
    problem: BilevelProblem,
    meta_params: PyTree,
    tasks: TaskSet,
    steps: int = 50,
    shift: float = 0.0,
    task_weights=None,
    support_weights=None,
    query_weights=None,
    *,
    tol: float = 1e-10,
) -> TrainResult:
    """Polish λ to a stationary point with trust-region Newton steps on the exact total Hessian
    (`newton_steps`), stopping once ‖∇F‖ <= tol or after `steps` steps.

    For small models (d up to a few thousand): each step materialises the d×d Hessian. Converges
    quadratically near a local minimum, reaching gradient norms near machine precision, which
    influence and leave-one-out ground truth need; F never rises. Check `grad_norm` of the
    result: if it is above tol, the budget ran out. `shift` > 0 adds a fixed shift·I to the
    model Hessian (not the influence solver's damping). Weights as in `meta_train`. The histories cover the steps taken.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    shift = _validate.non_negative("shift", shift)
    tol = _validate.non_negative("tol", tol)
    weights = full_weights(meta_params, tasks, task_weights, support_weights, query_weights)
    check_finite_losses(problem, meta_params, tasks, weights, "newton_refine at the initial meta_params")
    result = newton_core(problem, steps, shift, tol, meta_params, tasks, weights)
    if not bool(jnp.isfinite(result.objective)):
        check_finite_losses(problem, result.params, tasks, weights, "newton_refine diverged")
        raise ValueError(
            f"newton_refine diverged (F = {float(result.objective)}): start closer to a minimum or pass shift > 0."
        )
    taken = int(result.iterations)
    return TrainResult(
        result.params,
        result.objectives[:taken],
        result.grad_norms[:taken],
        result.objective,
        result.grad_norm,
        _adaptation_residual(problem, result.params, tasks, weights),
    )
