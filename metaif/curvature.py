"""Which curvature of the meta-objective the influence solves use.

The total Hessian of F(λ) = (1/n) Σ_i t_i L_O^i(θ_i(λ), λ) + R(λ) splits as H = H̄ + H', where H'
holds the third-order part (through d²θ_i/dλ²). Every option is the Hessian, at
λ*, of a surrogate task sum S̃(λ) (plus a multiple of I), so solvers see one interface:

* `Exact()`: H itself (default).
* `Truncated()`: H̄, the Hessian with θ_i(λ) replaced by its linearisation at λ*: H' dropped.
* `Gamma()`: the paper's surrogate (Theorem 5.1), H̄ + Γ·I with Γ = (1/n) Σ_i t_i ‖∂_θ L_O^i‖₁.
* `GaussNewton(predict, output_loss)`: Jᵀ ∇²ℓ J with J the total derivative of the model outputs
  with respect to λ (through θ_i(λ)): positive semi-definite for a convex `output_loss`; the
  network's and the adaptation's second derivatives are dropped (the TLXML choice).

Only the solve changes: the mixed derivatives ∂_ω ∇_λ F stay exact. Each option is exact on its own
terms, so a dense solve with it is the option's "dense twin" for tests.
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import _batching, _tree, _validate
from ._adapt import weighted_mean_loss
from ._module import options, static
from ._objective import adapt_one, losses_per_task

PyTree = Any


def task_sum(problem, meta_params, tasks, weights) -> jax.Array:
    """Σ_i t_i L_O^i(λ) over the tasks given (a chunk)."""
    return jnp.sum(weights.tasks * losses_per_task(problem, meta_params, tasks, weights.support, weights.query))


def _adapted_linearization(problem, meta_params, tasks, weights):
    """θ_lin(λ) = θ(λ*) + (dθ/dλ)(λ − λ*) for every task of the chunk."""
    adapt_all = lambda lam: jax.vmap(functools.partial(adapt_one, problem), in_axes=(None, 0, 0))(
        lam, tasks.support, weights.support
    )
    theta, jac = jax.linearize(adapt_all, meta_params)
    return lambda lam: jax.tree.map(jnp.add, theta, jac(_tree.sub(lam, meta_params)))


def _query_sum(problem, theta, lam, tasks, weights) -> jax.Array:
    """Σ_i t_i (1/q) Σ_j b_ij ℓ_out(θ_i, λ; z_ij) with θ given per task."""
    per_task = jax.vmap(functools.partial(weighted_mean_loss, problem.outer_loss), in_axes=(0, None, 0, 0))(
        theta, lam, tasks.query, weights.query
    )
    return jnp.sum(weights.tasks * per_task)


class Curvature(abc.ABC):
    """A curvature option: `surrogate` returns (S̃, shift) for a chunk of tasks at λ*, where the
    option's matrix is (1/n) Σ_chunks [∇²S̃(λ*) + shift·I] + meta_reg·I. Pytrees (`metaif._module.options`)."""

    @abc.abstractmethod
    def surrogate(self, problem, meta_params, tasks, weights) -> tuple[Callable[[PyTree], jax.Array], jax.Array]: ...

    def check(self, problem, meta_params, tasks) -> None:
        """Validate against the problem (concrete inputs, before any jit). Default: nothing."""


@options
class Exact(Curvature):
    """The exact total Hessian H, third-order terms included."""

    def surrogate(self, problem, meta_params, tasks, weights):
        return (lambda lam: task_sum(problem, lam, tasks, weights)), jnp.zeros((), _tree.float_dtype(meta_params))


@options
class Truncated(Curvature):
    """H̄: the total Hessian without its third-order part (θ_i(λ) linearised at λ*)."""

    def surrogate(self, problem, meta_params, tasks, weights):
        theta_lin = _adapted_linearization(problem, meta_params, tasks, weights)
        return (lambda lam: _query_sum(problem, theta_lin(lam), lam, tasks, weights)), jnp.zeros(
            (), _tree.float_dtype(meta_params)
        )


@options
class Gamma(Curvature):
    """The paper's Γ surrogate: H̄ + Γ·I, Γ = (1/n) Σ_i t_i ‖∂_θ L_O^i(θ_i, λ*)‖₁ (Theorem 5.1, with
    metaif's mean over tasks). Γ bounds the size of the dropped third-order part, so H̄ + Γ·I
    over-damps rather than under-damps it."""

    def surrogate(self, problem, meta_params, tasks, weights):
        theta_lin = _adapted_linearization(problem, meta_params, tasks, weights)
        theta = theta_lin(meta_params)
        grad_theta = jax.vmap(
            jax.grad(functools.partial(weighted_mean_loss, problem.outer_loss)), in_axes=(0, None, 0, 0)
        )(theta, meta_params, tasks.query, weights.query)
        l1 = sum(jnp.sum(jnp.abs(leaf).reshape(leaf.shape[0], -1), axis=1) for leaf in jax.tree.leaves(grad_theta))
        shift = jnp.sum(weights.tasks * l1)
        return (lambda lam: _query_sum(problem, theta_lin(lam), lam, tasks, weights)), shift


@options
class GaussNewton(Curvature):
    """Generalised Gauss–Newton: Jᵀ ∇²_o ℓ J, J = d predict(θ_i(λ), λ; z)/dλ (total derivative).

    Args:
      predict: `(params, meta_params, example) -> outputs` (for example logits).
      output_loss: `(outputs, example) -> scalar`, convex in outputs (cross-entropy, squared
        error), with output_loss(predict(θ, λ, z), z) equal to the problem's outer_loss(θ, λ, z)
        (checked on the first query example).
    """

    predict: Callable = static()
    output_loss: Callable = static()

    def __post_init__(self):
        _validate.callable_("GaussNewton.predict", self.predict, "(params, meta_params, example) -> outputs")
        _validate.callable_("GaussNewton.output_loss", self.output_loss, "(outputs, example) -> scalar")

    def _outputs(self, problem, lam, theta, tasks):
        per_example = lambda th, z: self.predict(th, lam, z)
        return jax.vmap(lambda th, query: jax.vmap(per_example, in_axes=(None, 0))(th, query))(theta, tasks.query)

    def surrogate(self, problem, meta_params, tasks, weights):
        theta_lin = _adapted_linearization(problem, meta_params, tasks, weights)
        outputs, jac = jax.linearize(lambda lam: self._outputs(problem, lam, theta_lin(lam), tasks), meta_params)
        q = weights.query.shape[1]
        coef = weights.tasks[:, None] * weights.query / q

        def surrogate_sum(lam):
            linear = jax.tree.map(jnp.add, outputs, jac(_tree.sub(lam, meta_params)))
            losses = jax.vmap(jax.vmap(self.output_loss))(linear, tasks.query)
            return jnp.sum(coef * losses)

        return surrogate_sum, jnp.zeros((), _tree.float_dtype(meta_params))

    def check(self, problem, meta_params, tasks) -> None:
        first = jax.tree.map(lambda x: x[0], _batching.take_tasks(tasks.query, 0))
        params = adapt_one(
            problem,
            meta_params,
            _batching.take_tasks(tasks.support, 0),
            jnp.ones((tasks.n_support,), _tree.float_dtype(meta_params)),
        )
        try:
            split = self.output_loss(self.predict(params, meta_params, first), first)
        except Exception as error:
            raise ValueError(
                f"GaussNewton: output_loss(predict(params, meta_params, example), example) failed: {error}"
            ) from error
        whole = problem.outer_loss(params, meta_params, first)
        if jnp.shape(split) != () or not jnp.allclose(split, whole, rtol=1e-5, atol=1e-8):
            raise ValueError(
                "GaussNewton: output_loss(predict(params, meta_params, example), example) must equal the problem's "
                f"outer_loss(params, meta_params, example); on the first query example it gave {split} against {whole}."
            )


def check(curvature) -> Curvature:
    if curvature is None:
        return Exact()
    if not isinstance(curvature, Curvature):
        raise TypeError(
            "curvature must be a metaif.curvature option such as Exact(), Truncated(), Gamma() or "
            f"GaussNewton(predict, output_loss); received {_validate.describe(curvature)}."
        )
    return curvature


__all__ = ["Curvature", "Exact", "GaussNewton", "Gamma", "Truncated"]
