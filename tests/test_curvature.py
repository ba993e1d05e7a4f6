"""Curvature options against their dense twins built independently from jax.jacfwd/jax.hessian;
chunked (`batch_size`) equals unchunked; FirstOrder (Direct-IF) has dθ/dλ = I; the minibatch HVP is
unbiased."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import _hessian, _objective, problems
from metaif._tree import ravel

N, M, Q, DIM, HIDDEN, WAYS = 6, 4, 3, 3, 4, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=21)
LOSS = problems.mlp_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.4), meta_reg=0.1)
INIT = problems.mlp_init(jax.random.key(5), (DIM, HIDDEN, WAYS))
UNRAVEL = ravel(INIT)[1]  # the structure of λ (the same at every point)
D = ravel(INIT)[0].size


def predict(params, meta_params, example):
    return problems.mlp_logits(params, example["x"])


def output_loss(outputs, example):
    return problems.cross_entropy(outputs, example["y"])


def _adapted_flat(x):
    """[n, d] adapted parameters of every task as flat vectors (the oracle's θ(λ))."""
    ones = jnp.ones((N, M), x.dtype)
    theta = jax.vmap(_objective.adapt_one, in_axes=(None, None, 0, 0))(PROBLEM, UNRAVEL(x), TASKS.support, ones)
    return jax.vmap(lambda th: ravel(th)[0])(theta)


def _task_query_loss(theta_flat, lam_flat, query):
    losses = jax.vmap(LOSS, in_axes=(None, None, 0))(UNRAVEL(theta_flat), UNRAVEL(lam_flat), query)
    return jnp.mean(losses)


@jax.jit
def _oracles(FLAT):
    """Dense H̄, Γ and Gauss–Newton matrices at FLAT from explicit Jacobians and Hessians."""
    theta = _adapted_flat(FLAT)  # [n, d]
    jac = jax.jacfwd(_adapted_flat)(FLAT)  # [n, d, d]: dθ_i/dλ
    joint = lambda z, query: _task_query_loss(z[:D], z[D:], query)
    hess = jax.vmap(jax.hessian(joint))(jnp.concatenate([theta, jnp.broadcast_to(FLAT, theta.shape)], 1), TASKS.query)
    tt, tl, lt, ll = hess[:, :D, :D], hess[:, :D, D:], hess[:, D:, :D], hess[:, D:, D:]
    h_bar = jnp.einsum("iab,ibc,icd->ad", jac.transpose(0, 2, 1), tt, jac) + jnp.einsum("iba,ibc->ac", jac, tl)
    h_bar += jnp.einsum("iab,ibc->ac", lt, jac) + ll.sum(0)
    gamma = jnp.sum(jnp.abs(jax.vmap(jax.grad(_task_query_loss), in_axes=(0, None, 0))(theta, FLAT, TASKS.query)))
    outputs = lambda x: jax.vmap(lambda th, query: jax.vmap(lambda z: predict(UNRAVEL(th), None, z))(query))(
        _adapted_flat(x), TASKS.query
    )
    j_out = jax.jacfwd(outputs)(FLAT)  # [n, q, ways, d]
    h_out = jax.vmap(jax.vmap(jax.hessian(output_loss)))(outputs(FLAT), TASKS.query)  # [n, q, ways, ways]
    gauss_newton = jnp.einsum("ijad,ijab,ijbe->de", j_out, h_out, j_out) / Q
    reg = PROBLEM.meta_reg * jnp.eye(D)
    return h_bar / N + reg, gamma / N, gauss_newton / N + reg


# λ* and the dense oracles there are fixtures: computed once, when the first test of this file needs
# them, not at import (collection imports every file in every worker).
@pytest.fixture(scope="module")
def LAM():
    return metaif.newton_refine(PROBLEM, INIT, TASKS, steps=12).meta_params


@pytest.fixture(scope="module")
def ORACLES(FLAT):
    """H_BAR, GAMMA, GAUSS_NEWTON."""
    return _oracles(FLAT)


@pytest.fixture(scope="module")
def TASK_GRADS(FLAT):
    return jax.vmap(
        lambda k: (
            jax.grad(
                lambda x: metaif.meta_objective(PROBLEM, UNRAVEL(x), TASKS, task_weights=jnp.zeros(N).at[k].set(1.0))
            )(FLAT)
            - PROBLEM.meta_reg * FLAT
        )
    )(jnp.arange(N))


def _task_influence_flat(LAM, curvature, solver=None, chunk_size=None):
    influence = metaif.task_influence(
        PROBLEM, LAM, TASKS, solver=solver or metaif.solvers.Dense(), curvature=curvature, chunk_size=chunk_size
    )
    return jax.vmap(lambda tree: ravel(tree)[0])(influence)


@pytest.mark.parametrize(
    "curvature,matrix",
    [
        (metaif.curvature.Truncated(), lambda h_bar, gamma, gauss_newton: h_bar),
        (metaif.curvature.Gamma(), lambda h_bar, gamma, gauss_newton: h_bar + gamma * jnp.eye(D)),
        (metaif.curvature.GaussNewton(predict, output_loss), lambda h_bar, gamma, gauss_newton: gauss_newton),
    ],
)
def test_curvature_equals_its_dense_twin(curvature, matrix, LAM, ORACLES, TASK_GRADS):
    expected = -jnp.linalg.solve(matrix(*ORACLES), TASK_GRADS.T).T
    got = _task_influence_flat(LAM, curvature)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-10 * float(jnp.max(jnp.abs(expected))))
    if isinstance(curvature, metaif.curvature.GaussNewton):  # chunked surrogates (all share one code path)
        chunked = _task_influence_flat(LAM, curvature, chunk_size=4)
        np.testing.assert_allclose(chunked, expected, rtol=1e-7, atol=1e-9 * float(jnp.max(jnp.abs(expected))))


def test_truncated_differs_from_exact_here_and_gauss_newton_is_psd(ORACLES, LAM, FLAT):
    H_BAR, GAMMA, GAUSS_NEWTON = ORACLES
    exact = jax.jit(jax.hessian(lambda x: metaif.meta_objective(PROBLEM, UNRAVEL(x), TASKS)))(FLAT)
    assert float(jnp.max(jnp.abs(exact - H_BAR))) > 1e-3  # the third-order part matters in this MLP
    op = metaif.hessian_operator(PROBLEM, LAM, TASKS)
    v = jax.random.normal(jax.random.key(3), (D,))
    np.testing.assert_allclose(ravel(op.hvp(UNRAVEL(v)))[0], exact @ v, rtol=1e-9, atol=1e-12)
    smallest = metaif.solvers.lanczos_eigenvalues(op, k=2, iterations=D).values
    np.testing.assert_allclose(smallest, np.linalg.eigvalsh(np.asarray(exact))[:2], rtol=1e-7, atol=1e-10)
    assert float(jnp.min(jnp.linalg.eigvalsh(GAUSS_NEWTON - PROBLEM.meta_reg * jnp.eye(D)))) > -1e-12
    assert GAMMA > 0


def test_truncated_equals_exact_when_adaptation_is_affine():
    tasks = problems.regression_tasks(N, M, Q, DIM, seed=4)[0]
    problem = metaif.BilevelProblem(
        problems.squared_loss, problems.squared_loss, metaif.Proximal(2.0, steps=400, lr=0.2), meta_reg=0.1
    )
    lam = metaif.newton_refine(problem, {"w": jnp.zeros(DIM)}, tasks, steps=4).meta_params
    target = lambda l: jnp.sum(l["w"] ** 2)
    exact = metaif.influence(problem, lam, tasks, target=target)
    truncated = metaif.influence(problem, lam, tasks, target=target, curvature=metaif.curvature.Truncated())
    for a, b in zip(exact[:3], truncated[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    "adapt,solver,batch_sizes",
    [
        (metaif.Unrolled(steps=2, lr=0.4), metaif.solvers.CG(tol=1e-13, maxiter=300, damping=0.05), (2,)),
        (metaif.Proximal(2.0, steps=60, lr=0.3), metaif.solvers.Dense(damping=0.05), (4,)),
    ],
)
def test_chunked_equals_unchunked(adapt, solver, batch_sizes, LAM):
    problem = metaif.BilevelProblem(LOSS, LOSS, adapt, meta_reg=0.1)
    target = lambda lam: jnp.sum(lam[0]["w"] ** 2)
    whole = metaif.influence(problem, LAM, TASKS, target=target, solver=solver)
    for batch_size in batch_sizes:
        chunked = metaif.influence(problem, LAM, TASKS, target=target, solver=solver, chunk_size=batch_size)
        for a, b in zip(whole[:3] + whole[4:], chunked[:3] + chunked[4:]):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)
    if isinstance(adapt, metaif.Proximal):
        return
    params = metaif.task_influence(problem, LAM, TASKS, solver=solver)
    chunked = metaif.task_influence(problem, LAM, TASKS, solver=solver, chunk_size=batch_sizes[-1])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-14)


def test_first_order_adaptation_is_identity_in_lambda(LAM, FLAT):
    support = jax.tree.map(lambda x: x[0], TASKS.support)
    base, first = PROBLEM.adapt, metaif.FirstOrder(PROBLEM.adapt)
    problem_fo = metaif.BilevelProblem(LOSS, LOSS, first, meta_reg=0.1)
    np.testing.assert_allclose(
        ravel(metaif.adapt(problem_fo, LAM, support))[0], ravel(metaif.adapt(PROBLEM, LAM, support))[0]
    )
    jac = jax.jacfwd(lambda x: ravel(_objective.adapt_one(problem_fo, UNRAVEL(x), support, jnp.ones(M)))[0])(FLAT)
    np.testing.assert_allclose(jac, jnp.eye(D), atol=0)
    along_a = lambda p: jax.jacfwd(lambda a: ravel(_objective.adapt_one(p, LAM, support, a))[0])(jnp.ones(M))
    np.testing.assert_allclose(along_a(problem_fo), along_a(PROBLEM), rtol=1e-12, atol=1e-14)
    # the first-order surrogate's Hessian is indefinite at this λ (the undamped default Dense says so)
    with pytest.warns(metaif.solvers.IndefiniteCurvatureWarning, match="not positive definite"):
        direct = metaif.influence(problem_fo, LAM, TASKS, target=lambda lam: jnp.sum(lam[0]["w"] ** 2))
    assert bool(direct.solve.indefinite)
    assert np.all(np.isfinite(direct.tasks)) and np.all(np.isfinite(direct.support))
    with pytest.raises(TypeError, match="FirstOrder.base"):
        metaif.FirstOrder(first)
    with pytest.raises(TypeError, match="FirstOrder.base"):
        metaif.FirstOrder("unrolled")
    _ = base


def test_minibatch_hvp_is_unbiased(LAM):
    weights = _objective.unit_weights(LAM, TASKS)
    _, _, op = _hessian.operator(PROBLEM, LAM, TASKS, weights, metaif.curvature.Exact(), None)
    v = UNRAVEL(jax.random.normal(jax.random.key(1), (D,)))
    exact = ravel(op.hvp(v))[0]
    keys = jax.random.split(jax.random.key(2), 1000)
    samples = jax.jit(jax.vmap(lambda k: ravel(op.sample_hvp(k, v, 2))[0]))(keys)
    error = jnp.abs(samples.mean(0) - exact)
    bound = 5 * samples.std(0) / np.sqrt(len(keys)) + 1e-12
    assert bool(jnp.all(error <= bound)), (error, bound)
    assert op.n_tasks == N


def test_bad_curvature_options_are_named(LAM):
    with pytest.raises(TypeError, match="curvature must be"):
        metaif.influence(PROBLEM, LAM, TASKS, curvature="exact")
    with pytest.raises(TypeError, match="GaussNewton.predict"):
        metaif.curvature.GaussNewton(None, output_loss)
    wrong = metaif.curvature.GaussNewton(predict, lambda o, z: 2.0 * output_loss(o, z))
    with pytest.raises(ValueError, match="must equal the problem's"):
        metaif.influence(PROBLEM, LAM, TASKS, curvature=wrong)
    with pytest.raises(ValueError, match="chunk_size"):
        metaif.influence(PROBLEM, LAM, TASKS, chunk_size=0)
