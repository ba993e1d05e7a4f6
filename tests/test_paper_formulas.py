"""The paper's formulas (arXiv:2501.15963) against metaif's weight derivatives (docs/conventions.md).

The paper writes task-IF = −H_p⁻¹ D_λ L_O^k, query instance-IF = −H_p⁻¹ D_λ ℓ(z; θ_k(λ)) and the
two-stage support instance-IF = −H_p⁻¹ D_λ P with P = ∇_θL_Oᵀ (∂²_θθ L_I)⁻¹ ∇_θ ℓ(z; θ_k), where
H_p = Σ_i D²_λ L_O^i = n·∇²F. Here they are built literally with dense matrices and an
independent inner solver (unrolled Newton iterations), then compared with

    task-IF = I_λ(t_k),   query-IF = q · I_λ(b_kj),   support-IF = −m · I_λ(a_kj).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import problems
from metaif._tree import ravel

N, M, Q, DIM, WAYS, REG, META_REG = 4, 5, 6, 3, 2, 2.0, 0.05
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=5)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Proximal(REG, steps=300, lr=0.3), meta_reg=META_REG)
INIT = problems.linear_init(jax.random.key(0), DIM, WAYS)
UNRAVEL = ravel(INIT)[1]  # the structure of λ (the same at every point)


def _task(k):
    return jax.tree.map(lambda x: x[k], TASKS.support), jax.tree.map(lambda x: x[k], TASKS.query)


def _mean_loss(theta, data):
    return jnp.mean(jax.vmap(LOSS, in_axes=(None, None, 0))(UNRAVEL(theta), None, data))


def _inner(theta, lam, support):
    return _mean_loss(theta, support) + 0.5 * REG * jnp.sum((theta - lam) ** 2)


def _adapt(lam, support):
    """Independent inner solver: 8 Newton steps, differentiated by unrolling."""

    def newton(_, theta):
        g = jax.grad(_inner)(theta, lam, support)
        return theta - jnp.linalg.solve(jax.hessian(_inner)(theta, lam, support), g)

    return jax.lax.fori_loop(0, 8, newton, lam)


def _query_loss(lam, k):
    support, query = _task(k)
    return _mean_loss(_adapt(lam, support), query)


def _objective(lam):
    losses = jax.vmap(lambda s, q: _mean_loss(_adapt(lam, s), q))(TASKS.support, TASKS.query)
    return jnp.mean(losses) + 0.5 * META_REG * jnp.sum(lam**2)


# λ*, the paper's H_p there and metaif's influences are fixtures: computed once, when the first test
# of this file needs them, not at import (collection imports every file in every worker).
@pytest.fixture(scope="module")
def LAM():
    return metaif.newton_refine(PROBLEM, INIT, TASKS, steps=8).meta_params


@pytest.fixture(scope="module")
def H_PAPER(FLAT):
    return N * jax.jit(jax.hessian(_objective))(FLAT)


@pytest.fixture(scope="module")
def INFLUENCE(LAM):
    return metaif.influence(PROBLEM, LAM, TASKS, solver=metaif.solvers.Dense())


def _flat(tree):
    return jax.vmap(lambda t: ravel(t)[0])(tree)


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-7 * np.max(np.abs(expected)))


def test_task_if(FLAT, H_PAPER, INFLUENCE):
    paper = jnp.stack(
        [-jnp.linalg.solve(H_PAPER, jax.jit(jax.grad(_query_loss), static_argnums=1)(FLAT, k)) for k in range(N)]
    )
    _close(_flat(INFLUENCE.tasks), paper)


def test_query_instance_if(FLAT, H_PAPER, INFLUENCE):
    ours = jax.vmap(_flat)(INFLUENCE.query)
    for k in (0, 3):
        support, query = _task(k)
        for j in (0, Q - 1):
            example = jax.tree.map(lambda x: x[j], query)
            loss = lambda lam: LOSS(UNRAVEL(_adapt(lam, support)), None, example)
            paper = -jnp.linalg.solve(H_PAPER, jax.jit(jax.grad(loss))(FLAT))
            _close(Q * ours[k, j], paper)


def test_support_instance_if_two_stage(FLAT, H_PAPER, INFLUENCE):
    ours = jax.vmap(_flat)(INFLUENCE.support)
    for k in (1, 2):
        support, query = _task(k)
        for j in (0, M - 1):
            example = jax.tree.map(lambda x: x[j], support)

            def stage_two(lam):  # P = ∇_θ L_Oᵀ (∂²_θθ L_I)⁻¹ ∇_θ ℓ(z; θ_k)
                theta = _adapt(lam, support)
                grad_query = jax.grad(_mean_loss)(theta, query)
                grad_example = jax.grad(lambda th: LOSS(UNRAVEL(th), None, example))(theta)
                return grad_query @ jnp.linalg.solve(jax.hessian(_inner)(theta, lam, support), grad_example)

            paper = -jnp.linalg.solve(H_PAPER, jax.jit(jax.grad(stage_two))(FLAT))
            _close(-M * ours[k, j], paper)


def test_stage_one_is_the_direct_effect_on_theta(LAM, FLAT):
    """Stage one, −(∂²_θθ L_I)⁻¹ ∇_θ ℓ(z; θ_k), is m times metaif's direct effect ∂θ_k/∂a_kj."""
    k = 1
    support, _ = _task(k)
    result = metaif.adapted_influence(PROBLEM, LAM, TASKS, k)
    theta = jax.jit(_adapt)(FLAT, support)
    hess = jax.hessian(_inner)(theta, FLAT, support)
    for j in range(M):
        example = jax.tree.map(lambda x: x[j], support)
        stage_one = -jnp.linalg.solve(hess, jax.grad(lambda th: LOSS(UNRAVEL(th), None, example))(theta))
        _close(M * ravel(jax.tree.map(lambda x: x[j], result.direct))[0], stage_one)
