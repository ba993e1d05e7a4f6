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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _batching, _linalg, _tree, _validate
from ._objective import Weights, _full_weights, check_arguments, check_finite_losses, objective
from ._problem import BilevelProblem, TaskSet

PyTree = Any


class TrainResult(NamedTuple):
    """Meta-training outcome.

    Attributes:
      meta_params: the trained λ.
      losses: [steps] objective per step (on the step's task minibatch when batch_size is set).
      grad_norms: [steps] total-gradient norm per step (minibatch gradient when batch_size is set).
      objective: full-batch F(λ) at the end.
      grad_norm: full-batch ‖∇_λ F(λ)‖ at the end: the stationarity influence assumes.
    """

    meta_params: PyTree
    losses: jax.Array
    grad_norms: jax.Array
    objective: jax.Array
    grad_norm: jax.Array

    def summary(self) -> str:
        return f"F = {float(self.objective):.6g}, ||grad F|| = {float(self.grad_norm):.3e} after {self.losses.shape[0]} steps"


_value_and_grad = jax.value_and_grad(objective, argnums=1)


@functools.partial(jax.jit, static_argnames=("problem",))
def _full_value_and_grad(problem, meta_params, tasks, weights):
    value, grad = _value_and_grad(problem, meta_params, tasks, weights)
    return value, _tree.norm(grad)


def optimizer_steps(problem, optimizer, length, batch_size, meta_params, opt_state, key, tasks, weights):
    """`length` optax steps on F(λ; w), on all tasks or on minibatches of `batch_size` tasks drawn
    with `key`. Pure (scan); returns (λ, optimiser state, F history, ‖∇F‖ history)."""
    n = tasks.n_tasks

    def step(carry, step_key):
        params, state = carry
        if batch_size is None:
            batch, w = tasks, weights
        else:
            index = jax.random.choice(step_key, n, (batch_size,), replace=False)
            batch, w = _batching.take_tasks((tasks, weights), index)
        value, grad = _value_and_grad(problem, params, batch, w)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int counters
            updates, state = optimizer.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), (value, _tree.norm(grad))

    (meta_params, opt_state), (values, norms) = jax.lax.scan(step, (meta_params, opt_state), jax.random.split(key, length))
    return meta_params, opt_state, values, norms


_train_chunk = jax.jit(optimizer_steps, static_argnames=("problem", "optimizer", "length", "batch_size"))


def meta_train(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, optimizer: optax.GradientTransformation | None = None,
               steps: int = 1000, batch_size: int | None = None, seed: int = 0, log_every: int | None = None,
               task_weights=None, support_weights=None, query_weights=None) -> TrainResult:
    """Minimise F(λ; t, a, b) over the finite task set with an optax optimiser.

    Args:
      optimizer: an optax `GradientTransformation` (default `optax.adam(1e-2)`); pass the same
        object across calls to reuse compiled code.
      steps: optimiser steps.
      batch_size: tasks per step (sampled without replacement); None for full batch.
      seed: minibatch sampling seed.
      log_every: print progress every this many steps (each chunk is one jitted scan).
      task_weights, support_weights, query_weights: train on a reweighted objective ([n], [n, m],
        [n, q]; 0 removes a datum), e.g. for leave-one-out retraining.

    Returns:
      `TrainResult` with the histories and the final full-batch objective and gradient norm.
    """
    check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    n = tasks.n_tasks
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n):
        raise ValueError(f"batch_size must be None or an int in [1, n_tasks={n}]; received {_validate.describe(batch_size)}.")
    if log_every is not None:
        log_every = _validate.positive_int("log_every", log_every)
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, e.g. optax.adam(1e-2); received {_validate.describe(optimizer)}.")
    weights = _full_weights(meta_params, tasks, task_weights, support_weights, query_weights)
    check_finite_losses(problem, meta_params, tasks, weights, "meta_train at the initial meta_params")
    with jax.numpy_dtype_promotion("standard"):
        opt_state = optimizer.init(meta_params)
    key = jax.random.key(seed)
    chunk = log_every or steps
    values, norms, done = [], [], 0
    while done < steps:
        length = min(chunk, steps - done)
        key, sub = jax.random.split(key)
        meta_params, opt_state, v, g = _train_chunk(problem, optimizer, length, batch_size, meta_params, opt_state, sub, tasks, weights)
        values.append(v)
        norms.append(g)
        done += length
        if log_every is not None:
            print(f"meta_train step {done}/{steps}: F = {float(v[-1]):.6g}, ||grad|| = {float(g[-1]):.3e}", flush=True)
    value, grad_norm = _full_value_and_grad(problem, meta_params, tasks, weights)
    if not bool(jnp.isfinite(value)):
        check_finite_losses(problem, meta_params, tasks, weights, "meta_train diverged")
        raise ValueError(f"meta_train diverged: the objective is {float(value)}. Lower the optimiser's learning rate or the adaptation's lr.")
    return TrainResult(meta_params, jnp.concatenate(values), jnp.concatenate(norms), value, grad_norm)


def newton_steps(problem: BilevelProblem, steps: int, shift, proximal, center: PyTree, start: PyTree, tasks: TaskSet,
                 weights: Weights):
    """`steps` safeguarded Newton steps from `start` on F(λ; w) + (proximal/2)‖λ − center‖².

    Each step solves (|H| + (shift + μ)·I) Δ = −∇, where |H| takes the dense total Hessian's
    absolute eigenvalues (so Δ descends even near saddles), and is accepted only if the objective
    does not rise; a rejected step raises μ tenfold, an accepted one lowers it. Near a minimum
    μ → 0 and this is plain Newton, converging quadratically. `proximal` = ρ > 0 gives the
    proximal retraining that damped influence (damping δ = ρ) estimates. Pure and vmappable over
    `weights` (many retrainings in one call); materialises the d×d Hessian (small models).
    Returns (λ, objective, ‖gradient‖, objective history [steps], ‖gradient‖ history [steps]).
    """
    grad = jax.grad(objective, argnums=1)
    flat_center, unravel = _tree.ravel(center)
    flat_start = _tree.ravel(start)[0]

    def value_of(x):
        return objective(problem, unravel(x), tasks, weights) + 0.5 * proximal * jnp.sum((x - flat_center) ** 2)

    def gradient_of(x):
        return _tree.ravel(grad(problem, unravel(x), tasks, weights))[0] + proximal * (x - flat_center)

    def step(carry, _):
        x, value, mu = carry
        gradient = gradient_of(x)
        factor = _linalg.eigh(jax.jacfwd(gradient_of)(x))
        scale = jnp.abs(factor.values) + shift + mu
        candidate = x - factor.vectors @ ((factor.vectors.T @ gradient) / scale)
        new_value = value_of(candidate)
        accept = jnp.isfinite(new_value) & (new_value <= value + 1e-12 * jnp.abs(value))
        floor = 1e-3 * jnp.max(jnp.abs(factor.values))
        mu = jnp.where(accept, mu / 10, jnp.maximum(10 * mu, floor))
        x, value_next = jnp.where(accept, candidate, x), jnp.where(accept, new_value, value)
        return (x, value_next, mu), (value, jnp.linalg.norm(gradient))

    init = (flat_start, value_of(flat_start), jnp.zeros((), flat_start.dtype))
    (flat, value, _), (values, norms) = jax.lax.scan(step, init, None, length=steps)
    return unravel(flat), value, jnp.linalg.norm(gradient_of(flat)), values, norms


@functools.partial(jax.jit, static_argnames=("problem", "steps"))
def newton_core(problem: BilevelProblem, steps: int, damping: float, meta_params: PyTree, tasks: TaskSet, weights: Weights):
    """Jitted `newton_steps` on F(λ; w) alone (no proximal term), from meta_params."""
    return newton_steps(problem, steps, damping, 0.0, meta_params, meta_params, tasks, weights)


def newton_refine(problem: BilevelProblem, meta_params: PyTree, tasks: TaskSet, steps: int = 10, damping: float = 0.0,
                  task_weights=None, support_weights=None, query_weights=None) -> TrainResult:
    """Polish λ to a stationary point with safeguarded Newton steps on the exact total Hessian.

    For small models (d up to a few thousand): each step materialises the d×d Hessian. Converges
    quadratically near a local minimum, reaching gradient norms near machine precision, which
    influence and leave-one-out ground truth need; F never rises (steps that would raise it are
    rejected and damped). Check `grad_norm` of the result: far from a minimum more steps are
    needed. `damping` > 0 adds a fixed shift. Weights as in `meta_train`.
    """
    check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    steps = _validate.positive_int("steps", steps)
    damping = _validate.non_negative("damping", damping)
    weights = _full_weights(meta_params, tasks, task_weights, support_weights, query_weights)
    check_finite_losses(problem, meta_params, tasks, weights, "newton_refine at the initial meta_params")
    params, value, grad_norm, values, norms = newton_core(problem, steps, damping, meta_params, tasks, weights)
    if not bool(jnp.isfinite(value)):
        check_finite_losses(problem, params, tasks, weights, "newton_refine diverged")
        raise ValueError(f"newton_refine diverged (F = {float(value)}): start closer to a minimum or pass damping > 0.")
    return TrainResult(params, values, norms, value, grad_norm)
