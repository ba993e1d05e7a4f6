"""Rung 3: solvers against the dense matrix. Dense and CG agree; both report honest diagnostics."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metaif
from metaif import _linalg, problems
from metaif._tree import ravel

N, M, Q, DIM, WAYS = 5, 6, 6, 3, 3
TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=2)
LOSS = problems.linear_cross_entropy
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)
TARGET = lambda lam: jnp.sum(lam["w"] ** 2) + lam["b"][0]


# The stationary point and the dense Hessian there are fixtures: computed once, when the first test
# of this file needs them, not at import (collection imports every file in every worker). FLAT and
# UNRAVEL come from conftest.py.
@pytest.fixture(scope="module")
def LAM():
    return metaif.newton_refine(PROBLEM, problems.linear_init(jax.random.key(0), DIM, WAYS), TASKS, steps=8).meta_params


@pytest.fixture(scope="module")
def HESSIAN(FLAT, UNRAVEL):
    return jax.hessian(lambda x: metaif.meta_objective(PROBLEM, UNRAVEL(x), TASKS))(FLAT)


def test_dense_matches_explicit_inverse_with_damping(LAM, FLAT, UNRAVEL, HESSIAN):
    damping = 0.3
    scores, info = metaif.task_influence(
        PROBLEM, LAM, TASKS, target=TARGET, solver=metaif.solvers.Dense(damping), return_info=True
    )
    v = jnp.linalg.solve(HESSIAN + damping * jnp.eye(FLAT.size), ravel(jax.grad(TARGET)(LAM))[0])
    task_grads = (
        jnp.stack(
            [
                jax.grad(lambda x: metaif.meta_objective(PROBLEM, UNRAVEL(x), TASKS, task_weights=jnp.eye(N)[k] * N))(
                    FLAT
                )
                - 0.05 * FLAT
                for k in range(N)  # minus the gradient of (meta_reg/2)‖λ‖²
            ]
        )
        / N
    )
    np.testing.assert_allclose(scores, -task_grads @ v, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(info.min_eigenvalue, np.linalg.eigvalsh(np.asarray(HESSIAN))[0], rtol=1e-9)
    assert bool(info.converged) and not bool(info.indefinite) and float(info.relative_residual) < 1e-12


def test_cg_agrees_with_dense(LAM, FLAT, HESSIAN):
    # the default damping of the matrix-free solvers at a positive-definite H, δ = 1e-4·λ_max(H) (5 Lanczos products):
    # Dense with the δ that CG reports solves the same system; Dense(damping=None) uses the exact λ_max
    cg = metaif.influence(PROBLEM, LAM, TASKS, target=TARGET, solver=metaif.solvers.CG(tol=1e-12, maxiter=200))
    dense = metaif.influence(PROBLEM, LAM, TASKS, target=TARGET, solver=metaif.solvers.Dense(float(cg.solve.damping)))
    twin = metaif.influence(PROBLEM, LAM, TASKS, target=TARGET, solver=metaif.solvers.Dense(damping=None))
    for a, b, c in zip(
        (dense.tasks, dense.support, dense.query),
        (cg.tasks, cg.support, cg.query),
        (twin.tasks, twin.support, twin.query),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12 * np.max(np.abs(a)))
        np.testing.assert_allclose(c, b, rtol=1e-6)  # measured 1.6e-8: δ differs by 4.5e-5 relative
    assert bool(cg.solve.converged) and 0 < int(cg.solve.iterations) <= FLAT.size + 2
    eigenvalues = np.linalg.eigvalsh(np.asarray(HESSIAN))
    largest = eigenvalues[-1]
    # the smallest Ritz value of the estimate: an upper bound of λ_min(H) (positive here: no restart)
    assert eigenvalues[0] - 1e-12 <= float(cg.solve.min_eigenvalue) <= largest
    np.testing.assert_allclose(twin.solve.damping, 1e-4 * largest, rtol=1e-12)
    # a Ritz value: never above λ_max, within 4.5e-5 of it (measured) after 5 products
    assert 0.999 * 1e-4 * largest < float(cg.solve.damping) <= 1e-4 * largest * (1 + 1e-12)
    params_dense = metaif.task_influence(PROBLEM, LAM, TASKS, solver=metaif.solvers.Dense(0.1))
    params_cg = metaif.task_influence(PROBLEM, LAM, TASKS, solver=metaif.solvers.CG(damping=0.1, tol=1e-12))
    for a, b in zip(jax.tree.leaves(params_dense), jax.tree.leaves(params_cg)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_cg_reports_non_convergence(LAM):
    scores, info = metaif.task_influence(
        PROBLEM, LAM, TASKS, target=TARGET, solver=metaif.solvers.CG(maxiter=2, tol=1e-12), return_info=True
    )
    assert not bool(info.converged) and int(info.iterations) == 2 and float(info.relative_residual) > 1e-6
    assert np.all(np.isfinite(scores))
    with pytest.warns(metaif.solvers.InaccurateSolveWarning):  # one product leaves relative residual 0.52
        batched = metaif.instance_influence(PROBLEM, LAM, TASKS, solver=metaif.solvers.CG(maxiter=1))
    assert not bool(batched.solve.converged) and int(batched.solve.iterations) == 1


def test_cg_stops_on_negative_curvature():
    matrix = jnp.diag(jnp.array([2.0, 1.0, -1.0]))
    b = jnp.array([1.0, 1.0, 1.0])
    x, info = _linalg.conjugate_gradient(lambda v: matrix @ v, b, tol=1e-12, maxiter=10)
    assert bool(info.indefinite) and not bool(info.converged) and np.all(np.isfinite(x))
    factor = _linalg.eigh(matrix)
    x, info = _linalg.eigh_solve(factor, b, 0.0)
    assert bool(info.indefinite) and float(info.min_eigenvalue) == -1.0
    np.testing.assert_allclose(matrix @ x, b, rtol=1e-12)
    x, info = _linalg.eigh_solve(factor, b, 1.0)  # shifted eigenvalue 0: singular
    assert not bool(info.converged)


def test_cg_on_zero_right_hand_side():
    x, info = _linalg.conjugate_gradient(lambda v: 2.0 * v, jnp.zeros(3), tol=1e-10, maxiter=5)
    assert bool(info.converged) and int(info.iterations) == 0 and np.all(x == 0)


def test_default_damping_is_raised_until_the_budgeted_solve_is_accurate():
    # a spread spectrum (λ_max 1e3, many small eigenvalues, one negative) that 8 products cannot
    # resolve: the curvature rule alone leaves the 8-product Galerkin solve far from its system;
    # the budget raises δ to the smallest grid shift at which the residual is <= 1e-2·‖b‖, and the
    # answer is then the accurate solve of (H + δI) x = b at the δ it reports
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[-0.05], np.geomspace(1e-3, 1e3, 199)])
    basis = np.linalg.qr(rng.normal(size=(200, 200)))[0]
    matrix = jnp.asarray(basis @ np.diag(spectrum) @ basis.T)
    b = jnp.asarray(rng.normal(size=200))
    hvp = lambda v: matrix @ v
    solve = lambda budget: _linalg.damped_lanczos_solve(
        hvp, b, tol=1e-10, maxiter=8, damping_of=metaif.solvers._damping.of_ritz_values, budget_residual=budget
    )
    _, plain = solve(None)
    x, info = solve(1e-2)
    assert float(plain.relative_residual) > 0.1  # the rule alone: inaccurate
    delta = float(info.damping)
    assert delta > float(plain.damping) and int(info.iterations) == 8 and not bool(info.indefinite)
    assert float(info.relative_residual) <= 1e-2 * (1 + 1e-9)  # the checked residual, one more product
    exact = np.linalg.solve(np.asarray(matrix) + delta * np.eye(200), np.asarray(b))
    assert np.linalg.norm(np.asarray(x) - exact) / np.linalg.norm(exact) < 0.05
    # the smallest such shift on the grid: the grid point below it is not accurate
    ratio = (1e2 * max(np.max(np.abs(spectrum)), float(plain.damping)) / float(plain.damping)) ** (
        1 / (_linalg.SHIFT_GRID - 1)
    )
    _, below_info = _linalg.damped_lanczos_solve(
        hvp, b, tol=1e-10, maxiter=8, damping_of=lambda values: jnp.asarray(delta / ratio), budget_residual=None
    )
    assert float(below_info.relative_residual) > 1e-2
    # enough products to meet the budget: δ is the rule's
    _, full = _linalg.damped_lanczos_solve(
        hvp, b, tol=1e-10, maxiter=200, damping_of=metaif.solvers._damping.of_ritz_values, budget_residual=1e-2
    )
    smallest_ritz = float(full.min_eigenvalue)
    np.testing.assert_allclose(float(full.damping), max(1e-4 * 1e3, -2 * smallest_ritz), rtol=1e-6)


def test_default_damping_is_scale_aware(LAM):
    # F scaled by c (loss, meta_reg; inner lr by 1/c so that θ(λ) is unchanged): δ scales with
    # λ_max(H), so the scores of an unscaled target do not change
    c = 10.0
    scaled_loss = lambda params, meta, z: c * LOSS(params, meta, z)
    scaled = metaif.BilevelProblem(scaled_loss, scaled_loss, metaif.Unrolled(steps=2, lr=0.5 / c), meta_reg=0.05 * c)
    for solver in (metaif.solvers.Dense(damping=None), metaif.solvers.CG(tol=1e-12, maxiter=200)):
        base = metaif.influence(PROBLEM, LAM, TASKS, target=TARGET, solver=solver)
        other = metaif.influence(scaled, LAM, TASKS, target=TARGET, solver=solver)
        np.testing.assert_allclose(other.solve.damping, c * base.solve.damping, rtol=1e-9)
        for a, b in zip((base.tasks, base.support, base.query), (other.tasks, other.support, other.query)):
            np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-12 * np.max(np.abs(a)))


def test_indefinite_curvature_warns(LAM, FLAT, UNRAVEL):
    # a concave outer loss: H = −(positive semi-definite) + meta_reg·I is indefinite everywhere
    concave = lambda params, meta, z: -LOSS(params, meta, z)
    problem = metaif.BilevelProblem(LOSS, concave, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)
    hessian = jax.hessian(lambda x: metaif.meta_objective(problem, UNRAVEL(x), TASKS))(FLAT)
    smallest = float(np.linalg.eigvalsh(np.asarray(hessian))[0])
    assert smallest < 0
    for solver, shown in (
        (metaif.solvers.CG(damping=1e-3), "δ = "),
        (metaif.solvers.Dense(), f"smallest eigenvalue of H is {smallest:.3g}"),
    ):
        with pytest.warns(metaif.solvers.IndefiniteCurvatureWarning, match=re.escape(shown)) as record:
            result = metaif.influence(problem, LAM, TASKS, target=TARGET, solver=solver)
        assert bool(result.solve.indefinite)
        assert record[0].filename == __file__  # points at the user's call
        assert "damping" in str(record[0].message) and "lanczos_eigenvalues" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metaif.solvers.IndefiniteCurvatureWarning)
        warnings.simplefilter("ignore", metaif.NonStationaryWarning)  # LAM is not this problem's minimum
        ok = metaif.influence(
            problem, LAM, TASKS, target=TARGET, solver=metaif.solvers.CG(damping=2 * abs(smallest) + 0.1)
        )
        # the defaults are curvature-aware: δ rises above |λ_min(H)| (CG from its Ritz values), no warning
        cg = metaif.influence(problem, LAM, TASKS, target=TARGET, solver=metaif.solvers.CG(tol=1e-12, maxiter=200))
        twin = metaif.influence(problem, LAM, TASKS, target=TARGET, solver=metaif.solvers.Dense(damping=None))
        # CG solved (H + δI) x = b for the δ it reports: the dense solve with that δ agrees
        dense = metaif.influence(
            problem, LAM, TASKS, target=TARGET, solver=metaif.solvers.Dense(damping=float(cg.solve.damping))
        )
    assert not bool(ok.solve.indefinite)
    np.testing.assert_allclose(twin.solve.damping, 2 * abs(smallest), rtol=1e-12)
    assert float(cg.solve.damping) > abs(smallest) and bool(cg.solve.converged) and not bool(cg.solve.indefinite)
    assert smallest - 1e-12 <= float(cg.solve.min_eigenvalue) < 0
    np.testing.assert_allclose(cg.tasks, dense.tasks, rtol=1e-8, atol=1e-12 * float(np.max(np.abs(dense.tasks))))


def test_a_solve_far_from_converged_warns(LAM):
    """One CG product cannot solve this system: the influence call says so (and where to look)."""
    solver = metaif.solvers.CG(damping=1e-3, maxiter=1)
    target = lambda lam: lam["b"][0]
    with pytest.warns(metaif.solvers.InaccurateSolveWarning, match="after 1 products") as record:
        result = metaif.influence(PROBLEM, LAM, TASKS, target=target, solver=solver)
    assert float(result.solve.relative_residual) > 0.5 and not bool(result.solve.converged)
    assert record[0].filename == __file__  # points at the user's call
    assert "maxiter" in str(record[0].message) and "preconditioner" in str(record[0].message)


_CONCURRENT_BATCHED_KERNELS = """
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from metaif import _linalg

@jax.jit
def four(mats, b):  # four independent vmapped solves and eigendecompositions that XLA may run at once
    solves = sum(jax.vmap(_linalg.dense_solve)(m, b) for m in mats)
    return solves, sum(jax.vmap(_linalg.eigh)(m).values for m in mats)

keys = jax.random.split(jax.random.key(0), 4)
mats = [jax.random.normal(k, (64, 40, 40)) for k in keys]
mats = [m + jnp.swapaxes(m, 1, 2) + 20 * jnp.eye(40) for m in mats]
b = jnp.ones((64, 40))
for i in range(5):
    x, w = four(mats, b + i)
expected = sum(np.linalg.solve(np.asarray(m), np.asarray(b + 4)[..., None])[..., 0] for m in mats)
np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-10)
np.testing.assert_allclose(np.asarray(w), sum(np.linalg.eigvalsh(np.asarray(m)) for m in mats), rtol=1e-10)
print("ok")
"""


def test_vmapped_dense_kernels_do_not_deadlock_on_cpu():
    """jaxlib 0.10's batched CPU LAPACK kernels block XLA pool threads on their own sub-tasks, so
    as many concurrent vmapped `jnp.linalg.solve` calls as the pool has threads hang the process
    (measured: the 2-core machine hung at the first call of this script with jnp.linalg.solve,
    and iMAML's dense implicit solves hung a Newton step). metaif's `dense_solve` and `eigh`
    (used by Proximal(inner_solve="dense"), EK-FAC, Dense and Newton) loop over the batch on CPU.
    Run in a subprocess with a timeout, so a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _CONCURRENT_BATCHED_KERNELS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
