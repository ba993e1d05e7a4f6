"""LiSSA: the Neumann series on minibatch Hessian-vector products (Agarwal, Bullins and Hazan, 2017)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _linalg, _tree, _validate
from . import _checks, _damping
from .._module import options, static
from ._base import Solver
from ._neumann import series_setup


@options
class LiSSA(Solver):
    """Stochastic Neumann series: x = η Σ_{j=0..J} Π_{i<j} (I − η(H_{B_i} + δI)) b, averaged over
    `repeats` independent runs, where H_{B_i} is the unbiased estimate of H from `batch` tasks
    drawn uniformly with replacement (`Operator.sample_hvp`), fresh at every step.

    Independent draws make E[x] equal the deterministic Neumann series with the same η and J, so
    the error is the truncation of the series plus noise that shrinks as 1/√repeats. Step keys are
    `fold_in(fold_in(fold_in(key(seed), 1), repeat), step)`: every right-hand side sees the same
    draws, so the solve is one fixed (random) linear map. Each step costs about batch/n of an exact product.
    `scale=None` chooses η = 1/(1.1·θ) from `estimate_steps` Lanczos products on the exact
    H, plus δ (as `Neumann`, which also has its truncation error); minibatch Hessians can have larger eigenvalues than H, so lower
    `scale` if small batches diverge (huge residual, converged=False).

    Attributes (defaults in parentheses):
      damping: δ >= 0, or None for max(1e-4 × λ_max(H), 2 × max(0, −λ_min(H))) from the same
        Lanczos run (None).
      iterations: J, steps per run (100).
      scale: η > 0, or None to estimate it (None).
      batch: tasks per minibatch product (8; any value, draws are with replacement).
      repeats: independent runs averaged (1).
      seed: seed of the minibatch draws and of the Lanczos start vector (0).
      tol: `converged` means relative residual <= tol (1e-2: a stochastic solve rarely gets
        much closer).
      estimate_steps: Lanczos products for the estimate of η (20; capped at d).

    `SolveInfo.iterations` counts minibatch products (iterations × repeats); the residual is
    checked with one exact product. `indefinite` comes only from the Lanczos estimate.
    """

    damping: float | None = None
    iterations: int = static(default=100)
    scale: float | None = None
    batch: int = static(default=8)
    repeats: int = static(default=1)
    seed: int = 0
    tol: float = 1e-2
    estimate_steps: int = static(default=20)

    def __post_init__(self):
        _validate.set_fields(
            self,
            damping=_damping.optional_non_negative("LiSSA.damping", self.damping),
            iterations=_validate.positive_int("LiSSA.iterations", self.iterations),
            scale=_checks.optional_positive("LiSSA.scale", self.scale),
            batch=_validate.positive_int("LiSSA.batch", self.batch),
            repeats=_validate.positive_int("LiSSA.repeats", self.repeats),
            seed=_checks.non_negative_int("LiSSA.seed", self.seed),
            tol=_validate.positive("LiSSA.tol", self.tol),
            estimate_steps=_validate.positive_int("LiSSA.estimate_steps", self.estimate_steps),
        )

    def prepare(self, operator):
        return operator, *series_setup(self, operator)

    def solve(self, state, b):
        operator, matvec, eta, delta, flagged = state
        key = jax.random.fold_in(jax.random.key(self.seed), 1)  # the Lanczos estimate uses key(seed)

        def run(repeat):
            run_key = jax.random.fold_in(key, repeat)

            def sampled(j, v):
                return _tree.axpy(delta, v, operator.sample_hvp(jax.random.fold_in(run_key, j), v, self.batch))

            return _linalg.neumann_series(sampled, b, eta, self.iterations)[0]

        runs = jax.vmap(run)(jnp.arange(self.repeats))
        x = jax.tree.map(lambda leaf: jnp.mean(leaf, axis=0), runs)
        return x, _linalg.solve_info(
            matvec, x, b, iterations=self.iterations * self.repeats, tol=self.tol, damping=delta, indefinite=flagged
        )
