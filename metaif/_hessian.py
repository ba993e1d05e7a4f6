"""The curvature operator the solvers see: value, total gradient and v ↦ H v, chunked over tasks.

F(λ) = (1/n) Σ_i t_i L_O^i(λ) + (meta_reg/2)‖λ‖². Every curvature option (`metaif.curvature`) is
(1/n) Σ_chunks [∇²S̃(λ*) + shift·I] + meta_reg·I. Without chunking the products reuse one
linearisation (the forward pass is stored once); with `chunk_size` each product recomputes chunk
by chunk, so memory grows with the chunk, not with n.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from . import _batching, _tree, _validate, curvature as _curvature
from ._objective import check_arguments, unit_weights
from .curvature import Curvature, Exact, task_sum
from ._deprecation import renamed
from .solvers import Operator

PyTree = Any


def _scaled(n: int, summed: PyTree, meta_reg: float, lam: PyTree, shift=0.0) -> PyTree:
    """summed / n + (meta_reg + shift) · lam."""
    return jax.tree.map(lambda s, x: s / n + (meta_reg + shift) * x, summed, lam)


def value_and_grad(problem, meta_params, tasks, weights=None, *, chunk_size: int | None = None):
    """(F, ∇_λ F) at λ with the given weights (default ones), summed chunk by chunk. Pure."""
    weights = unit_weights(meta_params, tasks) if weights is None else weights
    chunk_size = chunk_size
    n = tasks.n_tasks
    chunk = lambda data: jax.value_and_grad(task_sum, argnums=1)(problem, meta_params, *data)
    value, grad = _batching.sum_chunks(chunk, (tasks, weights), chunk_size)
    return value / n + 0.5 * problem.meta_reg * _tree.sq_norm(meta_params), _scaled(
        n, grad, problem.meta_reg, meta_params
    )


def operator(
    problem, meta_params, tasks, weights=None, curvature: Curvature | None = None, chunk_size: int | None = None
):
    """(F, ∇_λ F, Operator) at λ = meta_params for the chosen curvature (default `Exact()`, the
    total Hessian) and weights (default ones). Pure: the operator's products can be used inside
    the same trace (a solver's `prepare`/`solve`, a Lanczos run)."""
    weights = unit_weights(meta_params, tasks) if weights is None else weights
    curvature = Exact() if curvature is None else curvature
    chunk_size = chunk_size
    n, reg = tasks.n_tasks, problem.meta_reg
    data = (tasks, weights)

    def chunk_hvp(chunk, v):
        surrogate, _ = curvature.surrogate(problem, meta_params, *chunk)
        return jax.jvp(jax.grad(surrogate), (meta_params,), (v,))[1]

    if chunk_size is None or chunk_size >= n:
        if isinstance(curvature, Exact):  # one linearisation gives F, ∇F and cached products
            full = lambda lam: jax.value_and_grad(task_sum, argnums=1)(problem, lam, tasks, weights)
            (value, grad), linear = jax.linearize(full, meta_params)
            shift = 0.0
            summed_hvp = lambda v: linear(v)[1]
            value = value / n + 0.5 * reg * _tree.sq_norm(meta_params)
            grad = _scaled(n, grad, reg, meta_params)
        else:
            value, grad = value_and_grad(problem, meta_params, tasks, weights)
            surrogate, shift = curvature.surrogate(problem, meta_params, tasks, weights)
            _, summed_hvp = jax.linearize(jax.grad(surrogate), meta_params)
    else:
        value, grad = value_and_grad(problem, meta_params, tasks, weights, chunk_size=chunk_size)
        shift = _batching.sum_chunks(
            lambda chunk: curvature.surrogate(problem, meta_params, *chunk)[1], data, chunk_size
        )
        summed_hvp = lambda v: _batching.sum_chunks(lambda chunk: chunk_hvp(chunk, v), data, chunk_size)

    shift = shift / n
    hvp = lambda v: _scaled(n, summed_hvp(v), reg, v, shift)

    def sample_hvp(key, v, batch: int):
        index = jax.random.randint(key, (batch,), 0, n)
        chunk = _batching.take_tasks(data, index)
        return _scaled(batch, chunk_hvp(chunk, v), reg, v, shift)

    return value, grad, Operator(hvp, meta_params, sample_hvp, n)


# ----------------------------------------------------------------------------- public


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _hvp(problem, curvature, chunk_size, meta_params, tasks, v):
    weights = unit_weights(meta_params, tasks)
    return operator(problem, meta_params, tasks, weights, curvature=curvature, chunk_size=chunk_size)[2].hvp(v)


@functools.partial(jax.jit, static_argnames=("chunk_size", "batch"))
def _sample_hvp(problem, curvature, chunk_size, meta_params, tasks, key, v, batch):
    weights = unit_weights(meta_params, tasks)
    return operator(problem, meta_params, tasks, weights, curvature=curvature, chunk_size=chunk_size)[2].sample_hvp(
        key, v, batch
    )


@renamed(batch_size="chunk_size")
def hessian_operator(
    problem, meta_params: PyTree, tasks, *, curvature: Curvature | None = None, chunk_size: int | None = None
) -> Operator:
    """The curvature of F at λ = meta_params as a `metaif.solvers.Operator` (jitted products).

    For example the smallest eigenvalues of the total Hessian, to check that λ is a minimum:
    `metaif.solvers.lanczos_eigenvalues(metaif.hessian_operator(problem, lam, tasks), k=5)`.
    `curvature` and `chunk_size` as in `metaif.influence`.
    """
    meta_params = check_arguments(problem, meta_params, tasks)
    _validate.finite_tree("meta_params", meta_params)
    curvature = _curvature.check(curvature)
    curvature.check(problem, meta_params, tasks)
    if chunk_size is not None:
        chunk_size = _validate.positive_int("chunk_size", chunk_size)
    hvp = functools.partial(_hvp, problem, curvature, chunk_size, meta_params, tasks)
    sample = lambda key, v, batch: _sample_hvp(problem, curvature, chunk_size, meta_params, tasks, key, v, batch)
    return Operator(hvp, meta_params, sample, tasks.n_tasks)
