"""Safeguarded Newton on the proximal meta-objective F(λ; w) + (ρ/2)‖λ − λ₀‖², behind every retraining.

With ρ = 0 this is the Newton of `metaif.training.newton_core` (same steps, same safeguard); with
ρ > 0 it solves the proximal retraining that damped influence (solver damping δ = ρ) estimates.
Dense: materialises the d×d total Hessian (small models only).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .. import _linalg, _tree
from .._objective import Weights, objective
from .._problem import BilevelProblem, TaskSet

PyTree = Any

_grad = jax.grad(objective, argnums=1)


def newton(problem: BilevelProblem, steps: int, shift, proximal, center: PyTree, start: PyTree, tasks: TaskSet,
           weights: Weights):
    """`steps` safeguarded Newton steps from `start` on F(λ; w) + (proximal/2)‖λ − center‖².

    Each step solves (|H| + (shift + μ)·I) Δ = −∇, with |H| the Hessian with absolute eigenvalues,
    and is accepted only if the objective does not rise; a rejected step raises μ tenfold, an
    accepted one lowers it. Pure and vmappable over `weights`.
    Returns (λ, final objective, final gradient norm of the minimised objective).
    """
    flat_center, unravel = _tree.ravel(center)
    flat_start = _tree.ravel(start)[0]

    def value_of(x):
        return objective(problem, unravel(x), tasks, weights) + 0.5 * proximal * jnp.sum((x - flat_center) ** 2)

    def gradient_of(x):
        return _tree.ravel(_grad(problem, unravel(x), tasks, weights))[0] + proximal * (x - flat_center)

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
        x, value = jnp.where(accept, candidate, x), jnp.where(accept, new_value, value)
        return (x, value, mu), None

    init = (flat_start, value_of(flat_start), jnp.zeros((), flat_start.dtype))
    (flat, value, _), _ = jax.lax.scan(step, init, None, length=steps)
    return unravel(flat), value, jnp.linalg.norm(gradient_of(flat))
