"""Adaptation strategies: how task i turns meta-parameters λ into adapted parameters θ_i(λ).

Inner objective of one task (paper.md section 2), with support weights a (shape [m]):
    L_I(θ, λ; a) = (1/m) Σ_j a_j ℓ_in(θ, λ; s_j) + Ω(θ, λ).

* `Proximal` (iMAML): Ω = (reg/2)‖θ − λ‖²; θ(λ, a) is its minimiser. The derivative comes from the
  implicit function theorem through `jax.custom_jvp` + `lax.custom_linear_solve`, so it can be
  differentiated again to any order (the total Hessian's third-order terms included).
* `Unrolled` (MAML): Ω = 0; θ is `steps` gradient steps from λ; derivatives by differentiating
  the steps (`lax.scan`).
* `FirstOrder(base)`: the same θ, with dθ/dλ replaced by the identity (first-order MAML); the
  derivatives in the support weights stay exact. Influence with it is the paper's Direct-IF
  baseline ("ignores θ(λ)").
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from . import _ekfac, _linalg, _tree, _validate

PyTree = Any
Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]
INNER_SOLVES = ("cg", "dense", "ekfac")


def weighted_mean_loss(loss: Loss, params: PyTree, meta_params: PyTree, examples: PyTree, weights: jax.Array) -> jax.Array:
    """(1/k) Σ_j w_j ℓ(θ, λ; z_j) over one task's examples (leaves [k, ...]) with weights [k]:
    a fixed-denominator mean, so weight 0 removes an example."""
    losses = jax.vmap(loss, in_axes=(None, None, 0))(params, meta_params, examples)
    return jnp.mean(weights * losses)


class Adaptation(abc.ABC):
    """Abstract adaptation strategy; subclasses are frozen dataclasses (hashable, static)."""

    @abc.abstractmethod
    def objective(self, inner_loss: Loss, params: PyTree, meta_params: PyTree, support: PyTree, weights: jax.Array) -> jax.Array:
        """The inner objective L_I(θ, λ; a) whose gradient steps adapt θ."""

    @abc.abstractmethod
    def solve(self, inner_loss: Loss, meta_params: PyTree, support: PyTree, weights: jax.Array) -> PyTree:
        """θ(λ; a) for one task (support leaves [m, ...], weights [m]); differentiable in λ, a."""

    def _gradient_steps(self, inner_loss, meta_params, support, weights, steps, lr):
        grad = jax.grad(self.objective, argnums=1)

        def step(theta, _):
            return _tree.axpy(-lr, grad(inner_loss, theta, meta_params, support, weights), theta), None

        theta, _ = jax.lax.scan(step, meta_params, None, length=steps)
        return theta


@dataclasses.dataclass(frozen=True)
class Unrolled(Adaptation):
    """MAML: θ = `steps` gradient steps of size `lr` on the weighted mean support loss, from λ."""

    steps: int
    lr: float

    def __post_init__(self):
        _validate.set_fields(self, steps=_validate.positive_int("Unrolled.steps", self.steps),
                             lr=_validate.positive("Unrolled.lr", self.lr))

    def objective(self, inner_loss, params, meta_params, support, weights):
        return weighted_mean_loss(inner_loss, params, meta_params, support, weights)

    def solve(self, inner_loss, meta_params, support, weights):
        return self._gradient_steps(inner_loss, meta_params, support, weights, self.steps, self.lr)


@dataclasses.dataclass(frozen=True)
class Proximal(Adaptation):
    """iMAML: θ = argmin_θ (1/m) Σ_j a_j ℓ_in(θ, λ; s_j) + (reg/2)‖θ − λ‖².

    The minimiser is found by `steps` gradient steps of size `lr` from λ; its derivatives use the
    implicit function theorem (valid to any order), with inner linear solves (∇²_θθ L_I)⁻¹ u by
    * `inner_solve="cg"`: conjugate gradients, matrix-free (needs the inner objective strongly
      convex: `reg` above the loss's negative curvature);
    * `inner_solve="dense"`: a dense solve (small models);
    * `inner_solve="ekfac"`: an approximation, (G_EKFAC + reg·I)⁻¹ u with G_EKFAC the
      eigenvalue-corrected Kronecker factorisation of the inner loss's Gauss–Newton matrix, one
      block per parameter leaf (`metaif._ekfac`): no Hessian-vector products, positive definite
      by construction. Needs the inner loss split as `predict` and `output_loss` (a
      `metaif.models` loss such as `PureModel.cross_entropy`). Exact for a linear model without
      bias under squared error; otherwise it drops the network's second derivatives and the
      couplings between leaves and outside the Kronecker eigenbasis (docs/solvers.md measures it).
    Derivatives are exact (up to the inner solve) when the steps converge: check
    `metaif.adaptation_residual`.
    """

    reg: float
    steps: int
    lr: float
    inner_solve: Literal["cg", "dense", "ekfac"] = "cg"
    inner_tol: float = 1e-10
    inner_maxiter: int = 200

    def __post_init__(self):
        if self.inner_solve not in INNER_SOLVES:
            raise ValueError(f"Proximal.inner_solve must be one of {', '.join(map(repr, INNER_SOLVES))}; "
                             f"received {self.inner_solve!r}.")
        _validate.set_fields(
            self,
            reg=_validate.positive("Proximal.reg", self.reg),
            steps=_validate.positive_int("Proximal.steps", self.steps),
            lr=_validate.positive("Proximal.lr", self.lr),
            inner_tol=_validate.positive("Proximal.inner_tol", self.inner_tol),
            inner_maxiter=_validate.positive_int("Proximal.inner_maxiter", self.inner_maxiter),
        )

    def objective(self, inner_loss, params, meta_params, support, weights):
        distance = _tree.sq_norm(_tree.sub(params, meta_params))
        return weighted_mean_loss(inner_loss, params, meta_params, support, weights) + 0.5 * self.reg * distance

    def _linear_solve(self, inner_loss, theta, meta_params, support, weights):
        """`solve(matvec, b)` ≈ (∇²_θθ L_I)⁻¹ b at θ for `lax.custom_linear_solve`."""
        if self.inner_solve == "dense":
            def dense(matvec, b):
                flat_b, unravel = _tree.ravel(b)
                return unravel(_linalg.dense_solve(_linalg.dense_matrix(matvec, b), flat_b))
            return dense
        if self.inner_solve == "cg":
            return lambda matvec, b: _linalg.conjugate_gradient(matvec, b, tol=self.inner_tol, maxiter=self.inner_maxiter)[0]
        predict, output_loss = _split_loss(inner_loss)
        m = jax.tree.leaves(support)[0].shape[0]
        factors = _ekfac.factor(predict, output_loss, theta, meta_params, support, weights / m)
        return lambda matvec, b: _ekfac.inverse(factors, self.reg, b)

    def solve(self, inner_loss, meta_params, support, weights):
        grad_theta = jax.grad(self.objective, argnums=1)

        @jax.custom_jvp
        def argmin(lam, data, w):
            return self._gradient_steps(inner_loss, lam, data, w, self.steps, self.lr)

        @argmin.defjvp
        def argmin_jvp(primals, tangents):
            theta = argmin(*primals)
            _, rhs = jax.jvp(lambda *args: grad_theta(inner_loss, theta, *args), primals, tangents)
            matvec = lambda u: jax.jvp(lambda th: grad_theta(inner_loss, th, *primals), (theta,), (u,))[1]
            solve = self._linear_solve(inner_loss, theta, *primals)
            theta_dot = jax.lax.custom_linear_solve(matvec, _tree.scale(-1.0, rhs), solve, symmetric=True)
            return theta, theta_dot

        return argmin(meta_params, support, weights)


def _split_loss(inner_loss):
    """(predict, output_loss) of a loss built as output_loss(predict(θ, λ, z), z)."""
    predict, output_loss = getattr(inner_loss, "predict", None), getattr(inner_loss, "output_loss", None)
    if not (callable(predict) and callable(output_loss)):
        raise ValueError(
            "Proximal(inner_solve='ekfac') needs the inner loss split into predict and output_loss: an object with "
            "attributes predict(params, meta_params, example) -> outputs and output_loss(outputs, example) -> scalar, "
            "such as metaif.models.ExampleLoss or PureModel.cross_entropy; received "
            f"{_validate.describe(inner_loss)}. Use inner_solve='cg' for any other loss.")
    return predict, output_loss


@dataclasses.dataclass(frozen=True)
class FirstOrder(Adaptation):
    """`base`'s adapted parameters with dθ/dλ replaced by the identity: θ(sg(λ), a) + λ − sg(λ).

    Values equal `base`; derivatives in λ are first-order (FO-MAML), derivatives in the support
    weights a stay exact. Train with it for first-order MAML; compute influence with it (a
    problem whose `adapt` is `FirstOrder(problem.adapt)`) for the paper's Direct-IF baseline.
    """

    base: Adaptation

    def __post_init__(self):
        if not isinstance(self.base, Adaptation) or isinstance(self.base, FirstOrder):
            raise TypeError(
                "FirstOrder.base must be an Adaptation such as Unrolled(...) or Proximal(...) (not FirstOrder); "
                f"received {_validate.describe(self.base)}."
            )

    def objective(self, inner_loss, params, meta_params, support, weights):
        return self.base.objective(inner_loss, params, meta_params, support, weights)

    def solve(self, inner_loss, meta_params, support, weights):
        fixed = jax.lax.stop_gradient(meta_params)
        theta = self.base.solve(inner_loss, fixed, support, weights)
        return jax.tree.map(lambda th, lam, f: th + (lam - f), theta, meta_params, fixed)
