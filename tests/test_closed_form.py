"""Rung 1 of the testing ladder: linear-regression tasks, where θ_i is affine in λ, F is quadratic
and λ*(t, a, b) has a closed form. Every influence must equal the derivative of that closed form
(computed independently with explicit matrices) within 1e-6 relative, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import problems

N, M, Q, P = 5, 6, 4, 3
GAMMA, META_REG = 1.5, 0.2
STEPS_UNROLLED, LR_UNROLLED = 3, 0.1


def _data():
    tasks, _ = problems.regression_tasks(N, M, Q, P, noise=0.3, seed=3)
    new_support, _ = problems.regression_tasks(1, 7, 1, P, noise=0.3, seed=11)
    test, _ = problems.regression_tasks(4, M, Q, P, noise=0.3, seed=12)
    return tasks, jax.tree.map(lambda x: x[0], new_support.support), test


TASKS, NEW_SUPPORT, TEST = _data()

ADAPTATIONS = {
    "proximal": metaif.Proximal(reg=GAMMA, steps=600, lr=0.1),
    # a step-size cap far above 2/(curvature + reg): fixed steps of this size diverge
    "proximal-line-search": metaif.Proximal(reg=GAMMA, steps=60, lr=50.0, line_search=True),
    "unrolled": metaif.Unrolled(steps=STEPS_UNROLLED, lr=LR_UNROLLED),
}


def _affine_adaptation(kind, x, y, a):
    """θ = Mλ + r for one task with support (x [m, p], y [m]) and weights a [m]."""
    m = x.shape[0]
    A = x.T @ (a[:, None] * x) / m
    c = x.T @ (a * y) / m
    eye = jnp.eye(P)
    if kind.startswith("proximal"):
        inv = jnp.linalg.inv(A + GAMMA * eye)
        return GAMMA * inv, inv @ c
    B, r = eye - LR_UNROLLED * A, jnp.zeros(P)
    Mk = eye
    for _ in range(STEPS_UNROLLED):
        Mk, r = B @ Mk, B @ r + LR_UNROLLED * c
    return Mk, r


def _closed_form(kind, t, a, b):
    """λ*(t, a, b) by solving the normal equations of the quadratic F."""
    lhs, rhs = META_REG * jnp.eye(P), jnp.zeros(P)
    for i in range(N):
        Mi, ri = _affine_adaptation(kind, TASKS.support["x"][i], TASKS.support["y"][i], a[i])
        xq, yq = TASKS.query["x"][i], TASKS.query["y"][i]
        Pi = xq.T @ (b[i][:, None] * xq) / Q
        di = xq.T @ (b[i] * yq) / Q
        lhs = lhs + t[i] / N * Mi.T @ Pi @ Mi
        rhs = rhs + t[i] / N * Mi.T @ (di - Pi @ ri)
    return jnp.linalg.solve(lhs, rhs)


def _adapted(kind, lam, x, y, a):
    Mi, ri = _affine_adaptation(kind, x, y, a)
    return Mi @ lam + ri


def _test_loss(kind, lam):
    """Mean query loss of the test tasks after adaptation (closed form)."""
    losses = []
    for i in range(TEST.n_tasks):
        theta = _adapted(kind, lam, TEST.support["x"][i], TEST.support["y"][i], jnp.ones(M))
        residual = TEST.query["x"][i] @ theta - TEST.query["y"][i]
        losses.append(0.5 * jnp.mean(residual**2))
    return jnp.mean(jnp.stack(losses))


ONES = (jnp.ones(N), jnp.ones((N, M)), jnp.ones((N, Q)))


def _jacobians(fn):
    """d fn(λ*(t, a, b)) / d(t, a, b) at weights 1, leading axes moved to the front."""
    jac = jax.jacfwd(lambda t, a, b: fn(_closed_form_kind(t, a, b)), argnums=(0, 1, 2))(*ONES)
    return [jnp.moveaxis(j, tuple(range(j.ndim - w.ndim, j.ndim)), tuple(range(w.ndim))) for j, w in zip(jac, ONES)]


def _close(actual, expected, rtol=1e-6):
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(params=list(ADAPTATIONS))
def setup(request):
    kind = request.param
    global _closed_form_kind
    _closed_form_kind = lambda t, a, b: _closed_form(kind, t, a, b)
    problem = metaif.BilevelProblem(problems.squared_loss, problems.squared_loss, ADAPTATIONS[kind], meta_reg=META_REG)
    lam = {"w": _closed_form(kind, *ONES)}
    return kind, problem, lam


def test_meta_params_are_stationary(setup):
    kind, problem, lam = setup
    grad = jax.grad(lambda l: metaif.meta_objective(problem, l, TASKS))(lam)
    assert np.max(np.abs(grad["w"])) < 1e-12


def test_influence_on_meta_params(setup):
    kind, problem, lam = setup
    result = metaif.influence(problem, lam, TASKS)
    expected = _jacobians(lambda l: l)
    for got, want in zip((result.tasks, result.support, result.query), expected):
        _close(got["w"], want)
    assert bool(result.solve.converged) and result.grad_norm < 1e-12
    _close(metaif.task_influence(problem, lam, TASKS)["w"], expected[0])
    instance = metaif.instance_influence(problem, lam, TASKS)
    _close(instance.support["w"], expected[1])
    _close(instance.query["w"], expected[2])


@pytest.mark.parametrize(
    "solver", [metaif.solvers.Dense(), metaif.solvers.CG(damping=0.0, tol=1e-12, maxiter=100)], ids=["dense", "cg"]
)
def test_influence_on_target(setup, solver):
    kind, problem, lam = setup
    target = lambda l: _test_loss(kind, l["w"])
    result = metaif.influence(problem, lam, TASKS, target=target, solver=solver)
    expected = _jacobians(lambda l: _test_loss(kind, l))
    for got, want in zip((result.tasks, result.support, result.query), expected):
        _close(got, want)
    scores, info = metaif.task_influence(problem, lam, TASKS, target=target, solver=solver, return_info=True)
    _close(scores, expected[0])
    assert bool(info.converged)


def test_influence_on_adapted_params_of_training_task(setup):
    kind, problem, lam = setup
    k = 2
    x, y = TASKS.support["x"][k], TASKS.support["y"][k]

    def theta_k(t, a, b):
        return _adapted(kind, _closed_form(kind, t, a, b), x, y, a[k])

    jac = jax.jacfwd(theta_k, argnums=(0, 1, 2))(*ONES)
    expected = [jnp.moveaxis(j, 0, -1) for j in jac]  # [n, p], [n, m, p], [n, q, p]
    result = metaif.adapted_influence(problem, lam, TASKS, k)
    for got, want in zip((result.tasks, result.support, result.query), expected):
        _close(got["w"], want)
    direct = jnp.moveaxis(jax.jacfwd(lambda a: _adapted(kind, lam["w"], x, y, a))(jnp.ones(M)), 0, -1)
    _close(result.direct["w"], direct)

    g = lambda params: jnp.sum(jnp.sin(params["w"]))  # a nonlinear function of θ_k
    scalar = metaif.adapted_influence(problem, lam, TASKS, k, target=g)
    theta = _adapted(kind, lam["w"], x, y, jnp.ones(M))
    for got, want in zip((scalar.tasks, scalar.support, scalar.query), expected):
        _close(got, want @ jnp.cos(theta))


def test_influence_on_adapted_params_of_new_task(setup):
    kind, problem, lam = setup
    x, y = NEW_SUPPORT["x"], NEW_SUPPORT["y"]
    jac = jax.jacfwd(
        lambda t, a, b: _adapted(kind, _closed_form(kind, t, a, b), x, y, jnp.ones(x.shape[0])), argnums=(0, 1, 2)
    )(*ONES)
    expected = [jnp.moveaxis(j, 0, -1) for j in jac]
    result = metaif.adapted_influence(problem, lam, TASKS, NEW_SUPPORT)
    for got, want in zip((result.tasks, result.support, result.query), expected):
        _close(got["w"], want)
    assert result.direct is None


def test_removal_changes_by_minus_influence(setup):
    """Convention: lowering t_k from 1 by ε moves λ* by −ε·I_λ(t_k) to first order, so removing
    task k (ε = 1) moves it by about −I_λ(t_k). λ* is rational in t, so full removal of one of
    five tasks is only approximately linear: check its direction."""
    kind, problem, lam = setup
    influence = metaif.task_influence(problem, lam, TASKS)["w"]
    eps = 1e-5
    for k in range(N):
        small = _closed_form(kind, jnp.ones(N).at[k].set(1.0 - eps), *ONES[1:]) - lam["w"]
        np.testing.assert_allclose(small, -eps * influence[k], rtol=1e-3, atol=1e-3 * eps * np.abs(influence[k]).max())
        removed = _closed_form(kind, jnp.ones(N).at[k].set(0.0), *ONES[1:]) - lam["w"]
        cosine = -removed @ influence[k] / (np.linalg.norm(removed) * np.linalg.norm(influence[k]))
        assert cosine > 0.95
