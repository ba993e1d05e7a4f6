"""Rung 3 for EK-FAC, the factored inner solve of `Proximal(inner_solve="ekfac")`: its dense
twin against the exact Gauss–Newton matrix built from Jacobians, exactness where K-FAC is exact,
and the measured error of the inner solve and of the influence scores where it is not."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import metaif
from metaif import _ekfac, models, problems

M, DIN, DOUT = 6, 4, 3


def gauss_newton(loss, params, examples, weights):
    """Σ_j w_j J_jᵀ ∇²ℓ_j J_j, dense, from jax.jacfwd and jax.hessian (independent of _ekfac)."""
    flat, unravel = ravel_pytree(params)

    def one(example, w):
        outputs = lambda x: loss.predict(unravel(x), None, example).reshape(-1)
        jac = jax.jacfwd(outputs)(flat)
        out_hessian = jax.hessian(lambda z: loss.output_loss(z, example))(outputs(flat))
        return w * jac.T @ out_hessian @ jac

    return jnp.sum(jax.vmap(one)(examples, weights), axis=0)


def linear_predict(params, meta_params, example):
    return example["x"] @ params["w"]


LINEAR_LOSS = models.ExampleLoss(linear_predict, models.squared_error)
RNG = np.random.default_rng(0)
EXAMPLES = {"x": jnp.asarray(RNG.normal(size=(M, DIN))), "y": jnp.asarray(RNG.normal(size=(M, DOUT)))}
WEIGHTS = jnp.asarray(RNG.uniform(0.5, 1.5, size=M))


def test_exact_for_a_linear_model_under_squared_error():
    params = {"w": jnp.asarray(RNG.normal(size=(DIN, DOUT)))}
    factors = _ekfac.factor(LINEAR_LOSS.predict, LINEAR_LOSS.output_loss, params, None, EXAMPLES, WEIGHTS)
    exact = gauss_newton(LINEAR_LOSS, params, EXAMPLES, WEIGHTS)
    hessian = jax.hessian(
        lambda x: jnp.sum(WEIGHTS * jax.vmap(LINEAR_LOSS, (None, None, 0))({"w": x.reshape(DIN, DOUT)}, None, EXAMPLES))
    )(params["w"].reshape(-1))
    np.testing.assert_allclose(exact, hessian, atol=1e-12)  # Gauss–Newton = Hessian for a linear model
    np.testing.assert_allclose(_ekfac.dense_matrix(factors), exact, atol=1e-11)
    v = {"w": jnp.asarray(RNG.normal(size=(DIN, DOUT)))}
    np.testing.assert_allclose(
        ravel_pytree(_ekfac.inverse(factors, 0.3, v))[0],
        np.linalg.solve(exact + 0.3 * np.eye(DIN * DOUT), ravel_pytree(v)[0]),
        rtol=1e-10,
    )


def test_proximal_with_ekfac_equals_dense_where_exact():
    # linear regression tasks, iMAML: every inner solve is exact, so the influence is too
    x = jnp.asarray(RNG.normal(size=(5, M + 4, DIN)))
    y = jnp.asarray(RNG.normal(size=(5, M + 4, DOUT)))
    tasks = metaif.TaskSet(support={"x": x[:, :M], "y": y[:, :M]}, query={"x": x[:, M:], "y": y[:, M:]})
    lam = {"w": jnp.asarray(RNG.normal(size=(DIN, DOUT)))}
    target = lambda l: jnp.sum(l["w"] ** 2)
    scores = {}
    for inner in ("dense", "ekfac"):
        problem = metaif.BilevelProblem(
            LINEAR_LOSS, LINEAR_LOSS, metaif.Proximal(1.0, steps=200, lr=0.1, inner_solve=inner), meta_reg=0.1
        )
        with pytest.warns(metaif.NonStationaryWarning):  # a random λ, not a trained one
            scores[inner] = metaif.influence(problem, lam, tasks, target=target, solver=metaif.solvers.Dense())
    for a, b in zip(scores["dense"][:3], scores["ekfac"][:3]):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(a))))


def mlp_loss():
    return models.from_nnx(models.MLP(DIN, [5], DOUT, activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(1)))


def conv_loss():
    return models.from_nnx(
        models.Conv4((6, 6), DOUT, filters=2, blocks=1, activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    )


def classification(shape):
    x = jnp.asarray(RNG.normal(size=(M, *shape)))
    return {"x": x, "y": jnp.asarray(RNG.integers(0, DOUT, size=M))}


@pytest.mark.parametrize("make, shape", [(mlp_loss, (DIN,)), (conv_loss, (6, 6))], ids=["mlp", "conv"])
def test_corrected_eigenvalues_are_the_diagonal_of_the_exact_blocks(make, shape):
    pure = make()
    loss, params, examples = pure.cross_entropy, pure.params, classification(shape)
    factors = _ekfac.factor(loss.predict, loss.output_loss, params, None, examples, WEIGHTS)
    exact = np.asarray(gauss_newton(loss, params, examples, WEIGHTS))
    start = 0
    for qa, qb, values in zip(factors.left, factors.right, factors.values):
        q = np.kron(np.asarray(qa), np.asarray(qb))
        size = q.shape[0]
        block = exact[start : start + size, start : start + size]
        np.testing.assert_allclose(
            np.asarray(values).reshape(-1), np.diag(q.T @ block @ q), rtol=1e-9, atol=1e-12 * np.max(np.abs(block))
        )
        start += size
    assert start == exact.shape[0]
    # dense twin: matvec and inverse are the matrix and its inverse (with the ridge)
    dense = np.asarray(_ekfac.dense_matrix(factors)) + 0.2 * np.eye(start)
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(RNG.normal(size=start)))
    np.testing.assert_allclose(ravel_pytree(_ekfac.matvec(factors, 0.2, v))[0], dense @ ravel_pytree(v)[0], rtol=1e-10)
    np.testing.assert_allclose(
        ravel_pytree(_ekfac.inverse(factors, 0.2, v))[0], np.linalg.solve(dense, ravel_pytree(v)[0]), rtol=1e-9
    )


def test_inner_solve_error_on_an_mlp_is_bounded():
    # tanh MLP, cross-entropy, ridge reg = 1 (Proximal's reg): against the exact Gauss–Newton
    # inverse, EK-FAC's error is that of the block-diagonal (one block per leaf) Gauss–Newton
    # matrix, to within 0.01: the Kronecker eigenbasis with corrected eigenvalues adds little, the
    # dropped couplings between leaves are the approximation. (The network's own second
    # derivatives, also dropped, depend on the point: measured in benchmarks/solvers.py --ekfac.)
    pure = mlp_loss()
    loss, params, examples = pure.cross_entropy, pure.params, classification((DIN,))
    reg, weights = 1.0, WEIGHTS / M
    factors = _ekfac.factor(loss.predict, loss.output_loss, params, None, examples, weights)
    flat, unravel = ravel_pytree(params)
    exact = np.asarray(gauss_newton(loss, params, examples, weights)) + reg * np.eye(flat.size)
    blocks, start = np.zeros_like(exact), 0
    for leaf in jax.tree.leaves(params):
        blocks[start : start + leaf.size, start : start + leaf.size] = exact[
            start : start + leaf.size, start : start + leaf.size
        ]
        start += leaf.size
    errors, block_errors = [], []
    for seed in range(5):
        u = np.random.default_rng(seed).normal(size=flat.size)
        approx = np.asarray(ravel_pytree(_ekfac.inverse(factors, reg, unravel(jnp.asarray(u))))[0])
        want = np.linalg.solve(exact, u)
        errors.append(np.linalg.norm(approx - want) / np.linalg.norm(want))
        block_errors.append(np.linalg.norm(np.linalg.solve(blocks, u) - want) / np.linalg.norm(want))
    assert max(errors) < 0.15, errors  # measured 0.094
    assert max(abs(a - b) for a, b in zip(errors, block_errors)) < 0.01, (errors, block_errors)


def test_ekfac_needs_a_split_loss():
    tasks = problems.classification_tasks(3, 4, 4, DIN, DOUT, seed=0)
    problem = metaif.BilevelProblem(
        problems.linear_cross_entropy,
        problems.linear_cross_entropy,
        metaif.Proximal(1.0, steps=5, lr=0.1, inner_solve="ekfac"),
    )
    lam = problems.linear_init(jax.random.key(0), DIN, DOUT)
    with pytest.raises(
        ValueError,
        match=re.escape("Proximal(inner_solve='ekfac') needs the inner loss split into predict and output_loss"),
    ):
        metaif.influence(problem, lam, tasks, target=lambda l: jnp.sum(l["w"] ** 2), solver=metaif.solvers.Dense(1.0))
    with pytest.raises(
        ValueError, match=re.escape("Proximal.inner_solve must be one of 'cg', 'dense', 'ekfac'; received 'kfac'")
    ):
        metaif.Proximal(1.0, steps=5, lr=0.1, inner_solve="kfac")
