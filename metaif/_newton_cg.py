"""Truncated Newton (Newton–CG) with a Levenberg–Marquardt shift: retraining that never forms H.

Minimises G(λ) = F(λ; w) + (ρ/2)‖λ − center‖² from a start. Each Newton step solves
(∇²F(λ; w) + (ρ + shift + μ) I) p = −∇G(λ) with a `metaif.solvers.CG` on exact Hessian-vector
products (`core.operator`, chunked over tasks), so memory is that of a few gradients, not d².

Globalisation for a non-convex F (H may be indefinite at an Adam-trained λ):
* μ >= 0 is raised (×4, at least to μ_ref = 1e-3 (ρ + ‖∇G(start)‖)) when CG meets non-positive
  curvature or the step fails the ratio test (actual / predicted decrease of G < 1/4), and
  lowered (÷4) after a good step (ratio > 3/4); near a minimum with H + ρI > 0 it falls towards 0
  and the steps become Newton steps (fast local convergence).
* The predicted decrease uses the model with curvature H + ρI and needs no extra product: CG's
  residual is orthogonal to its iterate, so pᵀ(H + (ρ + shift + μ)I)p = −∇Gᵀp.
* A step that fails the sufficient-decrease test (ratio <= 1e-4) is backtracked on G (halving,
  up to MAX_HALVINGS times) before it is given up.
* Inexact Newton (Eisenstat–Walker forcing): step k's CG stops at relative residual
  η_k = clip(sqrt(‖∇G_k‖ / ‖∇G_0‖), solver.tol, FORCING_MAX); far from the minimum a rough step
  costs a few products, near it the steps tighten and convergence stays superlinear. The outer
  tolerance on ‖∇G‖ alone decides where it stops.

Everything runs in one `lax.while_loop`; under vmap over weight settings, finished members stay
frozen until the slowest one is done.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _tree
from ._hessian import operator, value_and_grad

PyTree = Any

RAISE, LOWER = 4.0, 0.25  # LM shift factors after a bad and after a good step
REFERENCE = 1e-3  # μ_ref = REFERENCE · (ρ + ‖∇G(start)‖): the default μ₀ and the least raised μ
ACCEPT, BAD, GOOD = 1e-4, 0.25, 0.75  # ratio thresholds: sufficient decrease, raise μ, lower μ
MAX_HALVINGS = 30
FORCING_MAX = 0.1  # the loosest relative residual of a Newton step's CG
_DAMPING = (jax.tree_util.GetAttrKey("damping"),)
_TOL = (jax.tree_util.GetAttrKey("tol"),)


class NewtonCGResult(NamedTuple):
    """Outcome of `newton_cg` (leading batch axes when vmapped).

    Attributes:
      params: the final λ (pytree).
      objective: G at λ.
      grad_norm: ‖∇G(λ)‖.
      iterations: Newton steps taken (linear solves, accepted or not).
      products: Hessian-vector products over all solves (CG products and each solve's residual
        check; a preconditioner's set-up is not counted).
      shift: the final Levenberg–Marquardt shift μ.
      converged: grad_norm <= tol.
    """

    params: PyTree
    objective: jax.Array
    grad_norm: jax.Array
    iterations: jax.Array
    products: jax.Array
    shift: jax.Array
    converged: jax.Array


def with_numbers(solver, damping, tol):
    """`solver` with its damping and tol leaves replaced (traced scalars), rebuilt from pytree
    leaves so the constructor's checks (concrete numbers only) are not re-run. The solver's
    damping must be a number (not None)."""
    numbers = {_DAMPING: damping, _TOL: tol}
    return jax.tree_util.tree_map_with_path(lambda path, leaf: numbers.get(path, leaf), solver)


def newton_cg(
    problem,
    solver,
    steps,
    shift,
    proximal,
    center: PyTree,
    start: PyTree,
    tasks,
    weights,
    tol,
    initial_shift=None,
    chunk_size: int | None = None,
) -> NewtonCGResult:
    """Newton–CG on G(λ) = F(λ; w) + (proximal/2)‖λ − center‖² from `start`, until ‖∇G‖ <= `tol`
    or `steps` Newton steps (linear solves) are spent. Pure and jittable; `steps`, `shift`,
    `proximal`, `tol`, `initial_shift` and the solver's numbers may be traced.

    Args:
      solver: a `metaif.solvers.CG` with a numeric damping (it is replaced by ρ + shift + μ each
        step); its `maxiter`, preconditioner and `tol` (the tightest forcing η_k) set the inner solve.
      shift: a fixed shift added to every system (does not change the minimiser).
      initial_shift: μ₀ (None or NaN: μ_ref = 1e-3 (ρ + ‖∇G(start)‖)).
      chunk_size: tasks per chunk of the gradients and Hessian-vector products (None: all).
    """
    dtype = _tree.float_dtype(start)
    eps = jnp.finfo(dtype).eps

    def value_grad(lam):
        value, grad = value_and_grad(problem, lam, tasks, weights, chunk_size=chunk_size)
        offset = _tree.sub(lam, center)
        return value + 0.5 * proximal * _tree.sq_norm(offset), _tree.axpy(proximal, offset, grad)

    value0, grad0 = value_grad(start)
    norm0 = jnp.maximum(_tree.norm(grad0), jnp.finfo(dtype).tiny)
    reference = jnp.maximum(REFERENCE * (proximal + _tree.norm(grad0)), jnp.finfo(dtype).tiny).astype(dtype)
    mu0 = (
        reference
        if initial_shift is None
        else jnp.where(jnp.isnan(initial_shift), reference, initial_shift).astype(dtype)
    )

    def step(state):
        k, x, value, grad, mu, products = state
        hvp_operator = operator(problem, x, tasks, weights, chunk_size=chunk_size)[2]
        forcing = jnp.clip(jnp.sqrt(_tree.norm(grad) / norm0), solver.tol, jnp.maximum(solver.tol, FORCING_MAX))
        step_solver = with_numbers(solver, proximal + shift + mu, forcing.astype(dtype))
        p, info = step_solver.solve_one(hvp_operator, _tree.scale(-1.0, grad))
        slope = _tree.vdot(grad, p)  # ∇Gᵀp < 0 for a usable step
        curvature = -slope - (shift + mu) * _tree.sq_norm(p)  # pᵀ(H + ρI)p
        usable = ~info.indefinite & jnp.isfinite(curvature) & (slope < 0)
        guard = 10 * eps * jnp.maximum(1.0, jnp.abs(value))

        def attempt(inner):
            tries, alpha, _, _, _, _, first = inner
            candidate = _tree.axpy(alpha, p, x)
            new_value, new_grad = value_grad(candidate)
            predicted = -alpha * slope - 0.5 * alpha**2 * curvature
            ratio = (value - new_value + guard) / (predicted + guard)
            ok = jnp.isfinite(new_value) & (ratio > ACCEPT)
            first = jnp.where(tries == 0, jnp.where(jnp.isfinite(ratio), ratio, -jnp.inf), first)
            return tries + 1, 0.5 * alpha, ok, candidate, new_value, new_grad, first

        def retry(inner):
            tries, _, ok, *_ = inner
            return usable & ~ok & (tries < MAX_HALVINGS)

        one, no = jnp.ones((), dtype), jnp.zeros((), bool)
        inner = (jnp.zeros((), jnp.int32), one, no, x, value, grad, jnp.full((), -jnp.inf, dtype))
        _, _, ok, candidate, new_value, new_grad, ratio = jax.lax.while_loop(retry, attempt, inner)
        ok = ok & usable
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        raised = jnp.maximum(RAISE * mu, reference)
        mu = jnp.where(ratio < BAD, raised, jnp.where(ratio > GOOD, LOWER * mu, mu))
        products = products + info.iterations + 1
        return k + 1, keep(candidate, x), keep(new_value, value), keep(new_grad, grad), mu, products

    def going(state):
        k, _, value, grad, mu, _ = state
        return (k < steps) & (_tree.norm(grad) > tol) & jnp.isfinite(value) & jnp.isfinite(mu)

    zero = jnp.zeros((), jnp.int32)
    init = (zero, start, value0, grad0, mu0, zero)
    k, x, value, grad, mu, products = jax.lax.while_loop(going, step, init)
    norm = _tree.norm(grad)
    return NewtonCGResult(x, value, norm, k, products, mu, norm <= tol)
