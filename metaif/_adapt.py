"""Adaptation strategies: how task i turns meta-parameters λ into adapted parameters θ_i(λ).

Inner objective of one task (docs/conventions.md), with support weights a (shape [m]):
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
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from . import _ekfac, _linalg, _tree, _validate
from ._module import options, static

PyTree = Any
Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]
INNER_SOLVES = ("cg", "dense", "ekfac")


def weighted_mean_loss(
    loss: Loss, params: PyTree, meta_params: PyTree, examples: PyTree, weights: jax.Array
) -> jax.Array:
    """(1/k) Σ_j w_j ℓ(θ, λ; z_j) over one task's examples (leaves [k, ...]) with weights [k]:
    a fixed-denominator mean, so weight 0 removes an example."""
    losses = jax.vmap(loss, in_axes=(None, None, 0))(params, meta_params, examples)
    return jnp.mean(weights * losses)


class Adaptation(abc.ABC):
    """Abstract adaptation strategy; subclasses are pytrees (`metaif._module.options`): numeric
    fields such as `lr` and `reg` are leaves, so a new value does not recompile."""

    @abc.abstractmethod
    def objective(
        self, inner_loss: Loss, params: PyTree, meta_params: PyTree, support: PyTree, weights: jax.Array
    ) -> jax.Array:
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


@options
class Unrolled(Adaptation):
    """MAML: θ = `steps` gradient steps of size `lr` on the weighted mean support loss, from λ."""

    steps: int = static()
    lr: float

    def __post_init__(self):
        _validate.set_fields(
            self,
            steps=_validate.positive_int("Unrolled.steps", self.steps),
            lr=_validate.positive("Unrolled.lr", self.lr),
        )

    def objective(self, inner_loss, params, meta_params, support, weights):
        return weighted_mean_loss(inner_loss, params, meta_params, support, weights)

    def solve(self, inner_loss, meta_params, support, weights):
        return self._gradient_steps(inner_loss, meta_params, support, weights, self.steps, self.lr)


@options
class Proximal(Adaptation):
    """iMAML: θ = argmin_θ (1/m) Σ_j a_j ℓ_in(θ, λ; s_j) + (reg/2)‖θ − λ‖².

    The minimiser is found by `steps` gradient steps of size `lr` from λ. With `line_search=True`
    each step's size is found by backtracking instead (Armijo): it starts at twice the last
    accepted size (at most `lr`) and halves until the objective does not rise and the slope along
    the step is still downhill. Fixed steps diverge once lr·(curvature + reg) > 2, and the curvature of
    a network's loss grows as λ trains; the line search converges for any curvature, at about two
    extra loss evaluations per step, so `lr` is then only a cap. The derivatives of θ use the
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
    steps: int = static()
    lr: float
    inner_solve: Literal["cg", "dense", "ekfac"] = static(default="cg")
    inner_tol: float = 1e-10
    inner_maxiter: int = static(default=200)
    line_search: bool = static(default=False)

    def __post_init__(self):
        if not isinstance(self.line_search, bool):
            raise ValueError(
                f"Proximal.line_search must be True or False; received {_validate.describe(self.line_search)}."
            )
        if self.inner_solve not in INNER_SOLVES:
            raise ValueError(
                f"Proximal.inner_solve must be one of {', '.join(map(repr, INNER_SOLVES))}; "
                f"received {self.inner_solve!r}."
            )
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
            return lambda matvec, b: _linalg.conjugate_gradient(
                matvec, b, tol=self.inner_tol, maxiter=self.inner_maxiter
            )[0]
        predict, output_loss = _split_loss(inner_loss)
        m = jax.tree.leaves(support)[0].shape[0]
        factors = _ekfac.factor(predict, output_loss, theta, meta_params, support, weights / m)
        return lambda matvec, b: _ekfac.inverse(factors, self.reg, b)

    def _backtracking_steps(self, inner_loss, meta_params, support, weights):
        """`steps` gradient steps from λ, each with a backtracked step size s (at most `lr`).

        A trial θ − s·g is accepted when the objective does not rise (Armijo, c = 1e-4, with a
        rounding allowance) and the slope along −g there is still downhill (g(θ − s·g)·g ≥ 0, so the
        step stops short of the line minimum; for a quadratic this is s ≤ gᵀg / gᵀHg). The slope
        test keeps converging below the precision of objective values (√eps). Once ‖g‖ falls to
        rounding level (64·eps·‖g(λ)‖) a rejected trial is not searched further."""
        value_and_grad = jax.value_and_grad(
            lambda theta: self.objective(inner_loss, theta, meta_params, support, weights)
        )
        eps = jnp.finfo(_tree.float_dtype(meta_params)).eps
        max_halvings = 30
        value, grad = value_and_grad(meta_params)
        floor = 64 * eps * _tree.norm(grad)

        def step(carry, _):
            theta, value, grad, size = carry
            sq_grad = _tree.sq_norm(grad)
            slack = 8 * eps * jnp.abs(value)

            def trial(size, halvings):
                point = _tree.axpy(-size, grad, theta)
                new_value, new_grad = value_and_grad(point)
                accepted = (new_value <= value - 1e-4 * size * sq_grad + slack) & (_tree.vdot(new_grad, grad) >= 0)
                return size, point, new_value, new_grad, accepted, halvings

            def rejected(state):  # no search once ‖g‖ is at rounding level: the tests are noise there
                *_, accepted, halvings = state
                return ~accepted & (halvings < max_halvings) & (sq_grad > floor**2)

            def halve(state):
                size, *_, halvings = state
                return trial(size / 2, halvings + 1)

            size, point, new_value, new_grad, accepted, _ = jax.lax.while_loop(
                rejected, halve, trial(jnp.minimum(2 * size, self.lr), 0)
            )
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(accepted, a, b), new, old)
            return (keep(point, theta), keep(new_value, value), keep(new_grad, grad), size), None

        carry = (meta_params, value, grad, jnp.asarray(self.lr, value.dtype))
        (theta, *_), _ = jax.lax.scan(step, carry, None, length=self.steps)
        return theta

    def minimise(self, inner_loss, meta_params, support, weights):
        """The inner descent from λ (no derivative rule: `solve` adds the implicit one)."""
        if self.line_search:
            return self._backtracking_steps(inner_loss, meta_params, support, weights)
        return self._gradient_steps(inner_loss, meta_params, support, weights, self.steps, self.lr)

    def solve(self, inner_loss, meta_params, support, weights):
        return _implicit_argmin(inner_loss, self, meta_params, support, weights)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _implicit_argmin(inner_loss, adaptation, meta_params, support, weights):
    """θ(λ, a) = argmin of the Proximal inner objective, with the implicit-function JVP below. The
    adaptation is an argument (not a closure), so its numeric fields (reg, lr) can be traced."""
    return adaptation.minimise(inner_loss, meta_params, support, weights)


@_implicit_argmin.defjvp
def _implicit_argmin_jvp(inner_loss, primals, tangents):
    """dθ = −(∇²_θθ L_I)⁻¹ ∂_(adaptation, λ, data, a) ∇_θ L_I · tangents, by `custom_linear_solve`
    (transposed by JAX for reverse mode; differentiable again, so every order is exact)."""
    adaptation, meta_params, support, weights = primals
    theta = _implicit_argmin(inner_loss, *primals)
    grad_theta = lambda th, adapt, *args: jax.grad(adapt.objective, argnums=1)(inner_loss, th, *args)
    _, rhs = jax.jvp(lambda *args: grad_theta(theta, *args), primals, tangents)
    matvec = lambda u: jax.jvp(lambda th: grad_theta(th, *primals), (theta,), (u,))[1]
    solve = adaptation._linear_solve(inner_loss, theta, meta_params, support, weights)
    theta_dot = jax.lax.custom_linear_solve(matvec, _tree.scale(-1.0, rhs), solve, symmetric=True)
    return theta, theta_dot


def _split_loss(inner_loss):
    """(predict, output_loss) of a loss built as output_loss(predict(θ, λ, z), z)."""
    predict, output_loss = getattr(inner_loss, "predict", None), getattr(inner_loss, "output_loss", None)
    if not (callable(predict) and callable(output_loss)):
        raise ValueError(
            "Proximal(inner_solve='ekfac') needs the inner loss split into predict and output_loss: an object with "
            "attributes predict(params, meta_params, example) -> outputs and output_loss(outputs, example) -> scalar, "
            "such as metaif.models.ExampleLoss or PureModel.cross_entropy; received "
            f"{_validate.describe(inner_loss)}. Use inner_solve='cg' for any other loss."
        )
    return predict, output_loss


@options
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
