"""Rung 3 for the approximate solvers: Neumann, LiSSA, preconditioned CG, LowRank, Identity and
Lanczos eigenvalues, each against a dense oracle (explicit inverses, eigvalsh, matrix powers) on
synthetic SPD operators with pytree vectors and on a small meta-learning problem."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import metaif
from metaif import _hessian, _linalg, problems
from metaif._objective import unit_weights
from metaif.solvers import CG, Dense, Identity, LiSSA, LowRank, Neumann, Operator, lanczos_eigenvalues
from metaif.solvers._preconditioner import hutchinson_diagonal

# ----------------------------------------------------------------------------- synthetic operators

LIKE = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(3), "s": jnp.zeros(())}  # d = 16, a 0-d leaf included
FLAT, UNRAVEL = ravel_pytree(LIKE)
D = FLAT.size
RNG = np.random.default_rng(0)
B = UNRAVEL(jnp.asarray(RNG.normal(size=D)))
B_FLAT = ravel_pytree(B)[0]


def spd(eigenvalues, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues), len(eigenvalues))))
    return q @ np.diag(eigenvalues) @ q.T


def operator(matrix, task_matrices=None):
    """An Operator for v ↦ matrix v on LIKE-shaped pytrees; sample_hvp averages `batch` task
    matrices drawn with replacement (exact products when none are given)."""
    matrix = jnp.asarray(matrix)
    hvp = lambda v: UNRAVEL(matrix @ ravel_pytree(v)[0])
    if task_matrices is None:
        return Operator(hvp, LIKE, lambda key, v, batch: hvp(v), 1)
    stack = jnp.asarray(task_matrices)

    def sample_hvp(key, v, batch):
        index = jax.random.randint(key, (batch,), 0, stack.shape[0])
        return UNRAVEL(jnp.mean(stack[index], axis=0) @ ravel_pytree(v)[0])

    return Operator(hvp, LIKE, sample_hvp, stack.shape[0])


def run(solver, op, b=B):
    """Jitted prepare + solve; returns (flat x, info). `op` may be a function that builds it."""
    x, info = jax.jit(lambda rhs: solver.solve(solver.prepare(op() if callable(op) else op), rhs))(b)
    return np.asarray(ravel_pytree(x)[0]), info


def dense_solve(matrix, damping=0.0, b=B_FLAT):
    return np.linalg.solve(np.asarray(matrix) + damping * np.eye(len(b)), np.asarray(b))


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


SPECTRUM = np.linspace(0.5, 4.0, D)
H = spd(SPECTRUM)
OP = operator(H)
_E = np.random.default_rng(3).normal(size=(10, D, D))
_E = 0.5 * (_E + _E.transpose(0, 2, 1))
TASK_MATRICES = H + 0.3 * (_E - _E.mean(axis=0))  # 10 "tasks" whose mean is exactly H
STOCHASTIC_OP = operator(H, TASK_MATRICES)

# ----------------------------------------------------------------------------- a small meta-learning problem

N, M, Q, DIM, WAYS = 5, 6, 6, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=2)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)
LAM = problems.linear_init(jax.random.key(0), DIM, WAYS)  # H is positive definite here: eigenvalues 0.05 to 0.32
LAM_FLAT, LAM_UNRAVEL = ravel_pytree(LAM)
_F = lambda x, t: metaif.meta_objective(PROBLEM, LAM_UNRAVEL(x), TASKS, task_weights=t)
HESSIAN = np.asarray(jax.jit(jax.hessian(_F))(LAM_FLAT, jnp.ones(N)))
# ∂_{t_k} ∇_λ F for every task k ([N, d]): the right-hand sides of task influence
TASK_GRADS = np.asarray(jax.jit(jax.jacfwd(jax.grad(_F), argnums=1))(LAM_FLAT, jnp.ones(N))).T


def meta_operator():
    """The library's Operator for the exact total Hessian (with the real sample_hvp); build it
    inside jit."""
    return _hessian.operator(PROBLEM, LAM, TASKS, unit_weights(LAM, TASKS), metaif.curvature.Exact(), None)[2]


TARGET = lambda lam: jnp.sum(lam["w"] ** 2) + lam["b"][0]
TARGET_GRAD = jax.grad(TARGET)(LAM)
TARGET_FLAT = np.asarray(ravel_pytree(TARGET_GRAD)[0])


def expected_task_scores(inverse_applied_to_target_grad):
    return -TASK_GRADS @ inverse_applied_to_target_grad


# ----------------------------------------------------------------------------- Lanczos eigenvalues


def test_lanczos_eigenvalues_match_eigvalsh():
    true = np.linalg.eigvalsh(H)
    low = lanczos_eigenvalues(OP, k=3, which="smallest", iterations=D)
    # under jit too; a function and `like` instead of an Operator
    high, partial = jax.jit(
        lambda: (
            lanczos_eigenvalues(OP.hvp, LIKE, 3, "largest", iterations=D),
            lanczos_eigenvalues(OP, k=2, which="largest", iterations=8),
        )
    )()
    np.testing.assert_allclose(low.values, true[:3], rtol=1e-10)
    np.testing.assert_allclose(high.values, true[::-1][:3], rtol=1e-10)
    # Ritz vectors: orthonormal eigenvectors, and the residual bounds are honest
    vectors = np.stack([ravel_pytree(jax.tree.map(lambda leaf: leaf[i], high.vectors))[0] for i in range(3)])
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(vectors @ H, high.values[:, None] * vectors, atol=1e-9)
    assert np.all(np.asarray(high.residuals) < 1e-8)
    # a partial run: extreme values converge first, every value lies within its residual of an eigenvalue
    gaps = np.min(np.abs(np.asarray(partial.values)[:, None] - true[None, :]), axis=1)
    assert np.all(gaps <= np.asarray(partial.residuals) + 1e-12)
    assert (
        np.all(np.asarray(partial.values) <= true[-1] + 1e-12) and abs(partial.values[0] - true[-1]) < 5e-3
    )  # measured 1.7e-3


def test_lanczos_finds_repeated_eigenvalues_of_the_meta_hessian():
    # the total Hessian has eigenvalue meta_reg = 0.05 four times (softmax shift invariance):
    # Lanczos breaks down on the invariant subspace and must restart to find every copy
    true = np.linalg.eigvalsh(HESSIAN)
    d = LAM_FLAT.size
    low, high = jax.jit(
        lambda: (
            lanczos_eigenvalues(meta_operator(), k=5, which="smallest", iterations=d),
            lanczos_eigenvalues(meta_operator(), k=2, which="largest"),
        )
    )()  # default: min(d, 2k + 20) = d
    np.testing.assert_allclose(low.values, true[:5], rtol=1e-9)
    np.testing.assert_allclose(high.values, true[::-1][:2], rtol=1e-9)
    assert np.all(np.isfinite(np.asarray(low.residuals)))


# ----------------------------------------------------------------------------- Neumann


def test_neumann_is_the_truncated_series():
    damping, eta, terms = 0.2, 0.15, 7
    shifted = H + damping * np.eye(D)
    step = np.eye(D) - eta * shifted
    series = eta * sum(np.linalg.matrix_power(step, j) for j in range(terms + 1)) @ np.asarray(B_FLAT)
    x, info = run(Neumann(damping, iterations=terms, scale=eta), OP)
    np.testing.assert_allclose(x, series, rtol=1e-12)
    assert int(info.iterations) == terms
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(shifted @ x - B_FLAT), rtol=1e-10)
    assert not bool(info.converged) and not bool(info.indefinite) and np.isnan(float(info.min_eigenvalue))


def test_neumann_with_many_terms_equals_dense():
    solver = Neumann(damping=0.1, iterations=400)  # scale=None: η from Lanczos in prepare
    eta = jax.jit(lambda: solver.prepare(OP)[1])()
    np.testing.assert_allclose(eta, 1.0 / (1.1 * (SPECTRUM[-1] + 0.1)), rtol=1e-8)
    x, info = run(solver, OP)  # rate 1 − η(λ_min + δ) ≈ 0.87: 400 terms reach rounding level
    np.testing.assert_allclose(x, dense_solve(H, 0.1), rtol=1e-10)
    assert bool(info.converged) and float(info.relative_residual) < 1e-10


def test_neumann_flags_negative_curvature():
    indefinite = spd(np.r_[-0.5, np.linspace(0.5, 4.0, D - 1)])
    x, info = run(Neumann(1e-3, iterations=50), operator(indefinite))  # δ given: Lanczos for η only
    assert bool(info.indefinite) and not bool(info.converged)
    x, info = run(Neumann(iterations=50), operator(indefinite))  # the default δ clears λ_min = −0.5
    assert not bool(info.indefinite) and float(info.damping) > 0.5
    x, info = run(Neumann(0.0, iterations=200, scale=0.2), operator(indefinite))  # no Lanczos: the series sees it
    assert bool(info.indefinite) and not bool(info.converged)


def test_lissa_with_exact_products_is_neumann():
    # deterministic limit: every minibatch product is the exact one
    neumann, _ = run(Neumann(0.1, iterations=40, scale=0.2), OP)
    lissa, info = run(LiSSA(0.1, iterations=40, scale=0.2, batch=3, repeats=2), OP)
    np.testing.assert_allclose(lissa, neumann, rtol=1e-12)
    assert int(info.iterations) == 80


def test_lissa_is_unbiased_for_the_neumann_series():
    # independent draws per step: E[LiSSA] = Neumann with the same η and J. One run deviates by
    # ~20% here (measured over seeds), so the mean of 1000 runs by ~0.6%; tolerance ≈ 5σ
    neumann, _ = run(Neumann(iterations=20, scale=0.2), STOCHASTIC_OP)
    mean, _ = run(LiSSA(iterations=20, scale=0.2, batch=2, repeats=1000), STOCHASTIC_OP)
    assert rel(mean, neumann) < 0.03


def test_lissa_converges_to_dense_as_iterations_grow():
    exact = dense_solve(H)
    errors = {}
    for terms in (5, 100):
        x, info = run(LiSSA(iterations=terms, batch=4, repeats=100, scale=0.2), STOCHASTIC_OP)
        errors[terms] = rel(x, exact)
    # measured over seeds: ≈ 0.35 at J = 5 (truncation), 0.01–0.02 at J = 100 (noise floor)
    assert errors[5] > 0.25 and errors[100] < 0.05, errors
    assert int(info.iterations) == 100 * 100 and np.isfinite(float(info.relative_residual))


def test_preconditioners_cut_cg_iterations_on_ill_conditioned_problems():
    # bad scaling: Jacobi undoes it (A = S C S, C close to I, S spanning two decades)
    scaling = np.diag(np.logspace(-1, 1, D))
    noise = np.random.default_rng(5).normal(size=(D, D))
    badly_scaled = scaling @ (np.eye(D) + 0.01 * (noise + noise.T)) @ scaling
    op = operator(badly_scaled)
    exact = dense_solve(badly_scaled)
    plain, plain_info = run(CG(0.0, tol=1e-10, maxiter=500), op)
    jacobi, jacobi_info = run(CG(0.0, tol=1e-10, maxiter=500, preconditioner="diagonal", probes=64), op)
    assert bool(plain_info.converged) and bool(jacobi_info.converged)
    assert int(jacobi_info.iterations) < int(plain_info.iterations), (jacobi_info.iterations, plain_info.iterations)
    np.testing.assert_allclose(jacobi, exact, rtol=1e-8)
    np.testing.assert_allclose(plain, exact, rtol=1e-6)
    # a wide spectrum: the low-rank preconditioner removes the top of it
    wide = spd(np.logspace(-2, 3, D), seed=7)
    op = operator(wide)
    exact = dense_solve(wide, 0.01)
    plain, plain_info = run(CG(damping=0.01, tol=1e-10, maxiter=500), op)
    spectral, spectral_info = run(CG(damping=0.01, tol=1e-10, maxiter=500, preconditioner="lowrank", rank=10), op)
    assert bool(spectral_info.converged)
    assert int(spectral_info.iterations) < int(plain_info.iterations), (spectral_info.iterations, plain_info.iterations)
    np.testing.assert_allclose(spectral, exact, rtol=1e-8)


def test_hutchinson_diagonal():
    key = jax.random.key(0)
    diagonal = np.linspace(1.0, 3.0, D)
    estimate = hutchinson_diagonal(operator(np.diag(diagonal)).hvp, LIKE, 4, key)
    np.testing.assert_allclose(ravel_pytree(estimate)[0], diagonal, rtol=1e-12)  # exact: z ⊙ z = 1
    estimate = ravel_pytree(hutchinson_diagonal(OP.hvp, LIKE, 4000, key))[0]
    # error of entry i has standard deviation sqrt(Σ_{j≠i} H_ij² / 4000); allow 5 of them
    sigma = np.sqrt((np.sum(H**2, axis=1) - np.diag(H) ** 2) / 4000)
    assert np.all(np.abs(estimate - np.diag(H)) < 5 * sigma)


def test_preconditioned_cg_kernel_reports_negative_curvature():
    matrix = jnp.diag(jnp.array([2.0, 1.0, -1.0]))
    inverse_diagonal = lambda r: r / jnp.array([2.0, 1.0, 1.0])
    x, info = _linalg.preconditioned_conjugate_gradient(
        lambda v: matrix @ v, jnp.ones(3), tol=1e-12, maxiter=10, preconditioner=inverse_diagonal
    )
    assert bool(info.indefinite) and not bool(info.converged) and np.all(np.isfinite(x))


# ----------------------------------------------------------------------------- LowRank


def test_low_rank_with_full_rank_equals_dense():
    x, info = run(LowRank(rank=D, damping=0.3), OP)
    np.testing.assert_allclose(x, dense_solve(H, 0.3), rtol=1e-10)
    assert bool(info.converged) and int(info.iterations) == 0
    np.testing.assert_allclose(info.min_eigenvalue, SPECTRUM[0], rtol=1e-10)


def test_low_rank_captures_dominant_eigenvalues():
    k, damping = 3, 0.05
    top = np.array([9.0, 5.0, 2.0])
    q, _ = np.linalg.qr(np.random.default_rng(11).normal(size=(D, D)))
    exact_rank_k = q[:, :k] @ np.diag(top) @ q[:, :k].T
    x, info = run(LowRank(rank=k, damping=damping), operator(exact_rank_k))
    np.testing.assert_allclose(x, dense_solve(exact_rank_k, damping), rtol=1e-9)  # discarded eigenvalues are 0
    assert bool(info.converged)
    # with a small tail (eigenvalues ≤ 1e-3) the error is of the order of the tail relative to δ
    tail = exact_rank_k + q[:, k:] @ np.diag(np.linspace(1e-4, 1e-3, D - k)) @ q[:, k:].T
    solver, op = LowRank(rank=k, damping=damping), operator(tail)

    def solve_with_pairs(b):
        state = solver.prepare(op)
        return solver.solve(state, b)[0], state[1]

    x, pairs = jax.jit(solve_with_pairs)(B)
    np.testing.assert_allclose(pairs.values, top, rtol=1e-9)
    assert rel(ravel_pytree(x)[0], dense_solve(tail, damping)) < 2e-2


def test_identity_is_b_over_damping():
    x, info = run(Identity(2.0), OP)
    np.testing.assert_allclose(x, np.asarray(B_FLAT) / 2.0, rtol=1e-15)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(H @ x), rtol=1e-10)  # (H + δI)x − b = Hx
    assert not bool(info.converged) and int(info.iterations) == 0


def test_float32_stays_float32():
    like = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), LIKE)
    matrix = jnp.asarray(H, jnp.float32)
    hvp = lambda v: jax.tree.map(lambda a, b: a.astype(b.dtype), UNRAVEL(matrix @ ravel_pytree(v)[0]), like)
    op = Operator(hvp, like, lambda key, v, batch: hvp(v), 1)
    b = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), B)
    solvers = (
        Neumann(0.1, iterations=300),
        CG(0.1, maxiter=100, tol=1e-6, preconditioner="diagonal"),
        CG(tol=1e-6, maxiter=100),
    )
    results = jax.jit(lambda rhs: [s.solve(s.prepare(op), rhs) for s in solvers])(b)
    for x, info in results:
        assert {leaf.dtype for leaf in jax.tree.leaves((x, info.residual_norm, info.damping))} == {
            jnp.dtype(jnp.float32)
        }
        expected = dense_solve(H, float(info.damping))  # 0.1, or the default 1e-4·λ_max
        assert rel(np.asarray(ravel_pytree(x)[0], np.float64), expected) < 1e-5  # measured 2e-7 / 3e-7


# ----------------------------------------------------------------------------- the meta-learning problem

META_DAMPING = 0.1
META_EXACT = dense_solve(HESSIAN, META_DAMPING, TARGET_FLAT)


@pytest.mark.parametrize("preconditioner", ["diagonal", "lowrank"])
def test_preconditioned_cg_on_the_meta_hessian_matches_dense(preconditioner):
    x, info = run(CG(META_DAMPING, tol=1e-12, preconditioner=preconditioner, rank=4), meta_operator, TARGET_GRAD)
    np.testing.assert_allclose(x, META_EXACT, rtol=1e-9)
    assert bool(info.converged) and not bool(info.indefinite) and float(info.relative_residual) < 1e-10


def test_lissa_on_the_meta_hessian_with_full_batches():
    # the real sample_hvp: `batch` = n tasks drawn with replacement (still random)
    x, info = run(LiSSA(META_DAMPING, iterations=60, batch=N, repeats=50), meta_operator, TARGET_GRAD)
    assert rel(x, META_EXACT) < 0.05  # measured 0.009-0.013 over seeds 0-2
    assert np.isfinite(float(info.relative_residual)) and not bool(info.indefinite)


def test_influence_with_approximate_solvers():
    # target path: one solve, then every task score
    scores, info = metaif.task_influence(
        PROBLEM, LAM, TASKS, target=TARGET, solver=Neumann(META_DAMPING, iterations=300), return_info=True
    )
    np.testing.assert_allclose(scores, expected_task_scores(META_EXACT), rtol=1e-8, atol=1e-12)
    assert bool(info.converged) and int(info.iterations) == 300
    # no target: one vmapped solve per task
    d = LAM_FLAT.size
    # default rank: min(20, d) = d, so exact
    params, info = metaif.task_influence(PROBLEM, LAM, TASKS, solver=LowRank(damping=META_DAMPING), return_info=True)
    flat = np.stack([ravel_pytree(jax.tree.map(lambda leaf: leaf[k], params))[0] for k in range(N)])
    np.testing.assert_allclose(
        flat, -np.linalg.solve(HESSIAN + META_DAMPING * np.eye(d), TASK_GRADS.T).T, rtol=1e-8, atol=1e-12
    )
    assert bool(info.converged) and not bool(info.indefinite)
    np.testing.assert_allclose(info.min_eigenvalue, np.linalg.eigvalsh(HESSIAN)[0], rtol=1e-9)
    with pytest.raises(
        ValueError,
        match=re.escape(f"LowRank.rank must be at most the number of meta-parameters d = {d}; received {d + 1}"),
    ):
        metaif.task_influence(PROBLEM, LAM, TASKS, target=TARGET, solver=LowRank(rank=d + 1))


# ----------------------------------------------------------------------------- defaults and bad arguments


def test_defaults():
    # damping None: δ = RELATIVE_DAMPING · λ_max(H) (benchmarks/solvers.py, docs/solvers.md)
    assert Neumann() == Neumann(None, 100, None, 1e-6, 20, 0)
    assert LiSSA() == LiSSA(None, 100, None, 8, 1, 0, 1e-2, 20)
    assert LowRank() == LowRank(None, None, None, 1e-6, 0)  # rank None: min(20, d)
    assert Identity() == Identity(1.0, 1e-6)
    assert CG() == CG(None, 16, 1e-8, None, 32, None, 0)  # rank None: min(16, d)
    assert Dense() == Dense(0.0)  # the exact oracle; Dense(None) is the matrix-free defaults' twin
    assert metaif.solvers.RELATIVE_DAMPING == 1e-4
    assert hash(LowRank(rank=3)) == hash(LowRank(rank=3))  # static under jit


def test_default_damping_is_relative_to_the_largest_eigenvalue():
    # d = 16 >= the 5 Lanczos steps of CG's estimate; Neumann, LiSSA and LowRank run 20 (= d: exact)
    delta = 1e-4 * SPECTRUM[-1]
    for solver in (
        CG(tol=1e-13, maxiter=100),
        Neumann(iterations=2000),
        LiSSA(iterations=2000, batch=1),
        LowRank(rank=D),
        Dense(damping=None),
    ):
        x, info = run(solver, OP)
        rtol = 1e-2 if isinstance(solver, CG) else 1e-12  # CG: 5 Lanczos products (measured 4.7e-3); others: d
        np.testing.assert_allclose(info.damping, delta, rtol=rtol)
        np.testing.assert_allclose(x, dense_solve(H, float(info.damping)), rtol=1e-8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Neumann(iterations=0), "Neumann.iterations must be an int >= 1; received int 0"),
        (
            lambda: Neumann(scale=-1.0),
            "Neumann.scale must be None (choose automatically) or a finite number > 0; received float -1.0",
        ),
        (
            lambda: Neumann(damping=float("nan")),
            "Neumann.damping must be None (default: 0.0001 × the largest eigenvalue of H, raised to 2 × |λ_min(H)| where H is indefinite) or a finite number >= 0; received float nan",
        ),
        (
            lambda: CG(damping=-1.0),
            "CG.damping must be None (default: 0.0001 × the largest eigenvalue of H, raised to 2 × |λ_min(H)| where H is indefinite) or a finite number >= 0",
        ),
        (
            lambda: Dense(damping="auto"),
            "Dense.damping must be None (default: 0.0001 × the largest eigenvalue of H, raised to 2 × |λ_min(H)| where H is indefinite)",
        ),
        (lambda: LiSSA(batch=0), "LiSSA.batch must be an int >= 1; received int 0"),
        (lambda: LiSSA(repeats=2.5), "LiSSA.repeats must be an int >= 1; received float 2.5"),
        (lambda: LiSSA(seed=-1), "LiSSA.seed must be an int >= 0; received int -1"),
        (lambda: LowRank(damping=0.0), "LowRank.damping must be a finite number > 0; received float 0.0"),
        (lambda: LowRank(rank=5, iterations=3), "LowRank.iterations must be at least LowRank.rank = 5; received 3"),
        (lambda: Identity(damping=0), "Identity.damping must be a finite number > 0; received int 0"),
        (
            lambda: CG(preconditioner="jacobi"),
            "CG.preconditioner must be one of None, 'diagonal', 'lowrank'; received str 'jacobi'",
        ),
        (lambda: CG(probes=0), "CG.probes must be an int >= 1; received int 0"),
        (
            lambda: lanczos_eigenvalues(OP, k=D + 1),
            f"k must be at most the number of meta-parameters d = {D}; received {D + 1}",
        ),
        (
            lambda: lanczos_eigenvalues(OP, k=2, which="middle"),
            "which must be one of 'smallest', 'largest'; received str 'middle'",
        ),
        (lambda: lanczos_eigenvalues(OP, k=3, iterations=2), "iterations must be at least k = 3; received 2"),
        (lambda: lanczos_eigenvalues(OP.hvp, k=1), "like must be given"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_lanczos_rejects_a_non_function():
    with pytest.raises(TypeError, match="operator must be a function"):
        lanczos_eigenvalues(3.0, LIKE)
