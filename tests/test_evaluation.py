"""metaif.evaluation: metrics against reference implementations, retraining ground truth (LDS,
proximal, cold start, noise ceiling, leave-one-out at every level), baselines against their
explicit formulas, and editing against retraining."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metaif
from metaif import evaluation, problems
from metaif._objective import objective
from metaif._tree import ravel
from metaif.evaluation import baselines, metrics

# ----------------------------------------------------------------------------- shared problems

# Logistic regression, MAML-style adaptation, some flipped support labels and some tasks with
# random query labels (so detection has something to find).
N, M, Q, DIM, WAYS = 16, 6, 6, 2, 2
LOSS = problems.linear_cross_entropy
CLEAN = problems.classification_tasks(N, M, Q, DIM, WAYS, scale=8.0, seed=21)
TASKS, BAD_TASKS, BAD_SUPPORT = problems.corrupt_labels(CLEAN, WAYS, task_fraction=0.25, support_fraction=0.2, seed=3)
TEST = problems.classification_tasks(6, M, Q, DIM, WAYS, scale=8.0, seed=22)
PROBLEM = metaif.BilevelProblem(LOSS, LOSS, metaif.Unrolled(steps=2, lr=0.5), meta_reg=0.05)


def TARGET(lam):
    return metaif.task_losses(PROBLEM, lam, TEST).mean()


@functools.cache
def _logistic():
    """λ* (Newton from a fixed init), exact target influences and I_λ."""
    init = problems.linear_init(jax.random.key(0), DIM, WAYS)
    lam = metaif.newton_refine(PROBLEM, init, TASKS, steps=12).meta_params
    return lam, metaif.influence(PROBLEM, lam, TASKS, target=TARGET), metaif.influence(PROBLEM, lam, TASKS)


# Linear regression (θ affine in λ, F quadratic): λ*(w) exactly by one Newton step.
RN, RM, RQ, RP = 5, 6, 4, 3
REG_TASKS, _ = problems.regression_tasks(RN, RM, RQ, RP, noise=0.3, seed=3)
REG_PROBLEM = metaif.BilevelProblem(
    problems.squared_loss, problems.squared_loss, metaif.Unrolled(steps=3, lr=0.1), meta_reg=0.2
)


def _reg_init(key):
    return {"w": jax.random.normal(key, (RP,), jnp.float64)}


@functools.cache
def _regression():
    lam = metaif.newton_refine(REG_PROBLEM, {"w": jnp.zeros(RP)}, REG_TASKS, steps=2).meta_params
    return lam, metaif.influence(REG_PROBLEM, lam, REG_TASKS)


def _flat(tree):
    return np.asarray(ravel(tree)[0])


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_reference_implementations():
    import scipy.stats as scipy_stats  # scipy and scikit-learn are dependencies: no skip
    import sklearn.metrics as sklearn_metrics

    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.integers(0, 4, 200)
    mask = rng.random(200) < 0.3
    np.testing.assert_allclose(metrics.pearson(x, y), scipy_stats.pearsonr(x, y)[0], rtol=1e-12)
    np.testing.assert_allclose(metrics.spearman(x, y), scipy_stats.spearmanr(x, y)[0], rtol=1e-12)
    np.testing.assert_allclose(metrics.ranks(x), scipy_stats.rankdata(x), rtol=0)
    np.testing.assert_allclose(metrics.roc_auc(y, mask), sklearn_metrics.roc_auc_score(mask, y), rtol=1e-12)
    np.testing.assert_allclose(
        metrics.spearman(x.reshape(20, 10), y.reshape(20, 10)), metrics.spearman(x, y)
    )  # any shape
    # detection area = p/2 + (1 − p)·AUC, ties included (both curves linear across a tie)
    p = mask.mean()
    np.testing.assert_allclose(metrics.detection_area(y, mask), p / 2 + (1 - p) * metrics.roc_auc(y, mask), rtol=1e-12)

    scores, flagged = np.array([0.9, 0.8, 0.8, 0.1]), np.array([True, False, True, False])
    inspected, found = metrics.detection_curve(scores, flagged)
    np.testing.assert_allclose(inspected, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(found, [0, 0.5, 0.75, 1.0, 1.0])  # the tie at 0.8 holds one of two flagged
    np.testing.assert_allclose(metrics.roc_auc(scores, flagged), (1 + 0.5 + 1 + 1) / 4)
    np.testing.assert_allclose(metrics.detection_area(np.ones(4), flagged), 0.5)  # uninformative
    np.testing.assert_allclose(
        metrics.detection_area(np.array([2.0, 1, 0, 0]), np.array([True, True, False, False])), 1 - 0.5 / 2
    )
    assert metrics.top_k_overlap(np.arange(6.0), np.array([5.0, 4, 0, 3, 1, 2]), 3) == pytest.approx(1 / 3)
    assert np.isnan(metrics.pearson(np.ones(3), np.arange(3.0)))

    values = np.stack([y, y + 1e-3 * rng.normal(size=200), 2 * y])
    ceiling = evaluation.noise_ceiling(values)
    pairs = [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(
        ceiling.pearson, np.mean([scipy_stats.pearsonr(values[i], values[j])[0] for i, j in pairs])
    )
    np.testing.assert_allclose(
        ceiling.spearman, np.mean([scipy_stats.spearmanr(values[i], values[j])[0] for i, j in pairs])
    )


def test_metrics_reject_bad_input_with_named_arguments():
    with pytest.raises(ValueError, match="x and y must hold the same number"):
        metrics.pearson(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="scores must be finite"):
        metrics.roc_auc(np.array([1.0, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="mask must flag at least one"):
        metrics.roc_auc(np.arange(3.0), np.zeros(3, bool))
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        metrics.detection_curve(np.arange(3.0), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        metrics.top_k_overlap(np.arange(3.0), np.arange(3.0), 4)
    with pytest.raises(ValueError, match=r"values must have shape \[S, B\]"):
        evaluation.noise_ceiling(np.ones(5))


# ----------------------------------------------------------------------------- ground truth


def test_subset_masks_weights_and_predictions():
    weights, masks = evaluation.subset_weights(N, M, Q, "support", fraction=0.25, count=5, seed=1)
    assert masks.shape == (5, N, M) and masks.dtype == np.bool_
    np.testing.assert_array_equal(masks.reshape(5, -1).sum(1), round(0.25 * N * M))
    np.testing.assert_array_equal(weights.support, masks.astype(float))
    assert weights.tasks.shape == (5, N) and float(weights.tasks.min()) == 1.0 and float(weights.query.min()) == 1.0
    again = evaluation.subset_masks((N, M), fraction=0.25, count=5, seed=1)
    np.testing.assert_array_equal(again, masks)  # seeded
    scores = np.arange(6.0)
    kept = np.array([[True, False, True, False, True, True]])
    np.testing.assert_allclose(evaluation.subset_predictions(scores, kept, value=10.0), [10.0 - (1 + 3)])
    with pytest.raises(ValueError, match="fraction must keep between 1 and"):
        evaluation.subset_masks((4,), fraction=0.1)
    with pytest.raises(ValueError, match=r"masks must be boolean \[count, \*scores.shape\]"):
        evaluation.lds(scores, kept.astype(float), np.ones(1))


def test_lds_of_exact_influence_is_high_at_every_level():
    """Half of each level's data removed at random, 32 subsets, exact Newton retraining: the
    Spearman correlation of −Σ_removed I_f with the retrained target (measured 0.950 / 0.927 / 0.964
    for tasks / support / query on this problem)."""
    lam, scores, _ = _logistic()
    lds = {}
    for level in ("tasks", "support", "query"):
        weights, masks = evaluation.subset_weights(N, M, Q, level, fraction=0.5, count=32, seed=0)
        retrained = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=6)
        assert float(jnp.max(retrained.grad_norm)) < 1e-10, level
        lds[level] = evaluation.lds(getattr(scores, level), masks, evaluation.target_values(TARGET, retrained))
    assert min(lds.values()) >= 0.88, lds


def test_leave_one_out_covers_every_datum_of_every_level():
    """indices=None retrains without each datum of a level; results have the level's shape and
    follow −influence (Pearson measured 0.997 / 0.993 / 0.999)."""
    lam, scores, _ = _logistic()
    for level in ("tasks", "support", "query"):
        actual, grad_norm = evaluation.leave_one_out(PROBLEM, lam, TASKS, level, None, TARGET, chunk_size=None)
        assert actual.shape == getattr(scores, level).shape and float(jnp.max(grad_norm)) < 1e-10
        assert metrics.pearson(-getattr(scores, level), actual) >= 0.99, level


def test_proximal_retraining_converges_moves_less_and_matches_damped_influence():
    """Leave-one-task-out with F + (ρ/2)‖λ − λ*‖²: converged, closer to λ* than plain retraining,
    and predicted by influence with solver damping δ = ρ better than by undamped influence
    (relative errors measured 0.059 and 1.30)."""
    lam, _, params = _logistic()
    rho = 0.3
    weights = evaluation.removal_weights(N, M, Q, "tasks", np.arange(N))
    plain = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=6, chunk_size=None)
    prox = evaluation.retrain(PROBLEM, lam, TASKS, weights, steps=6, chunk_size=None, proximal=rho, tol=1e-14)
    assert float(jnp.max(prox.grad_norm)) < 1e-12
    moved = lambda r: np.linalg.norm(
        np.stack([_flat(jax.tree.map(lambda x: x[k], r.meta_params)) for k in range(N)]) - _flat(lam), axis=1
    )
    assert np.all(moved(prox) < moved(plain))
    # the proximal optimum satisfies ∇F(λ; w) + ρ(λ − λ*) = 0
    first = jax.tree.map(lambda x: x[0], prox.meta_params)
    grad = jax.grad(lambda l: metaif.meta_objective(PROBLEM, l, TASKS, task_weights=weights.tasks[0]))(first)
    np.testing.assert_allclose(_flat(grad) + rho * (_flat(first) - _flat(lam)), 0.0, atol=1e-12)

    # center= keeps the proximal centre at λ* while the start moves: the same optimum (a noise ceiling)
    start = jax.tree.map(lambda x: x + 0.05, lam)
    moved_start = evaluation.retrain(
        PROBLEM, start, TASKS, weights, steps=20, chunk_size=None, proximal=rho, center=lam, tol=1e-14
    )
    np.testing.assert_allclose(_flat(moved_start.meta_params), _flat(prox.meta_params), atol=1e-10)
    with pytest.raises(ValueError, match="center must be a pytree like meta_params"):
        evaluation.retrain(PROBLEM, lam, TASKS, weights, proximal=rho, center={"w": jnp.zeros(3)})

    damped = metaif.influence(PROBLEM, lam, TASKS, solver=metaif.solvers.Dense(damping=rho))
    changes = np.stack([_flat(jax.tree.map(lambda x: x[k], prox.meta_params)) for k in range(N)]) - _flat(lam)
    error = lambda infl: np.linalg.norm(
        changes + np.stack([_flat(jax.tree.map(lambda x: x[k], infl.tasks)) for k in range(N)])
    )
    assert error(damped) < 0.1 * np.linalg.norm(changes) and error(damped) < error(params)


def test_cold_retraining_noise_ceiling_is_one_on_a_convex_problem():
    """Linear regression (quadratic F): retraining from scratch with two seeds (different init and
    minibatch order; Adam then Newton) reaches the same optimum as warm-started Newton, so the noise
    ceiling of leave-one-task-out changes is 1."""
    lam, _ = _regression()
    target = lambda l: jnp.sum(l["w"])
    weights = evaluation.removal_weights(RN, RM, RQ, "tasks", np.arange(RN))
    cold = evaluation.retrain_cold(
        REG_PROBLEM,
        _reg_init,
        REG_TASKS,
        weights,
        seeds=(0, 1),
        optimizer=optax.adam(0.05),
        steps=200,
        newton_steps=2,
        minibatch=2,
    )
    assert cold.grad_norm.shape == (2, RN) and float(jnp.max(cold.grad_norm)) < 1e-12
    values = evaluation.target_values(target, cold)
    ceiling = evaluation.noise_ceiling(values)
    assert ceiling.pearson > 1 - 1e-12 and ceiling.spearman == 1.0
    warm = evaluation.target_values(target, evaluation.retrain(REG_PROBLEM, lam, REG_TASKS, weights, steps=2))
    np.testing.assert_allclose(values, np.stack([warm, warm]), rtol=1e-10)


# ----------------------------------------------------------------------------- editing


def test_edit_matches_retraining_to_first_order():
    """Removing weight ε of one task, one support and one query example: λ* − ε Σ I_λ against the
    exactly retrained λ*(1 − ε) has error O(ε²) (measured 5.5e-4, 5.4e-6, 5.4e-8 for ε = 1e-1, 1e-2,
    1e-3); one Newton step of refinement is exact (F quadratic)."""
    lam, params = _regression()
    eps = np.array([1e-1, 1e-2, 1e-3])
    errors = []
    for e in eps:
        removed = {
            "tasks": np.eye(RN)[1] * e,
            "support": np.eye(RN * RM)[2].reshape(RN, RM) * e,
            "query": np.eye(RN * RQ)[7].reshape(RN, RQ) * e,
        }
        weights = evaluation.remaining_weights(REG_TASKS, removed)
        retrained = evaluation.retrain(REG_PROBLEM, lam, REG_TASKS, jax.tree.map(lambda w: w[None], weights), steps=2)
        exact = _flat(jax.tree.map(lambda x: x[0], retrained.meta_params))
        edited = evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS)
        errors.append(np.linalg.norm(_flat(edited.meta_params) - exact))
        assert float(edited.grad_norm) > 0
        refined = evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS, steps=1)
        np.testing.assert_allclose(_flat(refined.meta_params), exact, rtol=0, atol=1e-12)
        assert float(refined.grad_norm) < 1e-12
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 70) & (ratios < 130)), (errors, ratios)  # error ∝ ε²
    # booleans remove whole data; without problem/tasks there is no gradient norm
    plain = evaluation.edit(lam, params, {"tasks": np.eye(RN, dtype=bool)[0]})
    np.testing.assert_allclose(_flat(plain.meta_params), _flat(lam) - _flat(jax.tree.map(lambda x: x[0], params.tasks)))
    assert plain.grad_norm is None


def test_proximal_edit_matches_proximal_retraining():
    """With damping δ = ρ and proximal=ρ, the edit targets F(λ; w) + (ρ/2)‖λ − λ*‖²: its gradient
    norm is that objective's, and one Newton step lands on `retrain(..., proximal=ρ)` exactly
    (F quadratic); the plain steps land elsewhere."""
    lam, _ = _regression()
    rho = 0.5
    params = metaif.influence(REG_PROBLEM, lam, REG_TASKS, solver=metaif.solvers.Dense(damping=rho))
    removed = {"tasks": np.eye(RN, dtype=bool)[3]}
    weights = evaluation.remaining_weights(REG_TASKS, removed)
    retrained = evaluation.retrain(
        REG_PROBLEM, lam, REG_TASKS, jax.tree.map(lambda w: w[None], weights), steps=3, proximal=rho
    )
    exact = _flat(jax.tree.map(lambda x: x[0], retrained.meta_params))
    edited = evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS, proximal=rho)
    proximal_objective = lambda x: (
        metaif.meta_objective(REG_PROBLEM, {"w": x}, REG_TASKS, *weights) + 0.5 * rho * jnp.sum((x - _flat(lam)) ** 2)
    )
    np.testing.assert_allclose(
        float(edited.grad_norm), np.linalg.norm(jax.grad(proximal_objective)(_flat(edited.meta_params))), rtol=1e-10
    )
    refined = evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS, steps=1, proximal=rho)
    np.testing.assert_allclose(_flat(refined.meta_params), exact, rtol=0, atol=1e-12)
    plain = evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS, steps=1)
    assert np.linalg.norm(_flat(plain.meta_params) - exact) > 1e-3
    with pytest.raises(ValueError, match="proximal"):
        evaluation.edit(lam, params, removed, problem=REG_PROBLEM, tasks=REG_TASKS, proximal=-1.0)


def test_unlearning_ascent_starts_as_descent_on_the_reduced_objective():
    """At λ*, ∇F(λ*; 1) = 0, so ascent on the removed share D = F(·; 1) − F(·; w) is descent on
    F(·; w): one small step lowers the reduced objective exactly as a gradient step does."""
    lam, _ = _regression()
    removed = {"tasks": np.eye(RN, dtype=bool)[2]}
    weights = evaluation.remaining_weights(REG_TASKS, removed)
    lr = 0.05
    result = evaluation.unlearn(REG_PROBLEM, lam, REG_TASKS, removed, steps=1, lr=lr)
    reduced = lambda l: metaif.meta_objective(REG_PROBLEM, l, REG_TASKS, *weights)
    grad = jax.grad(reduced)(lam)
    np.testing.assert_allclose(_flat(result.meta_params), _flat(lam) - lr * _flat(grad), rtol=1e-10)
    assert reduced(result.meta_params) < reduced(lam)
    np.testing.assert_allclose(
        result.grad_norm, np.linalg.norm(_flat(jax.grad(reduced)(result.meta_params))), rtol=1e-10
    )


# ----------------------------------------------------------------------------- baselines


@functools.partial(jax.jit, static_argnums=0)
def _mixed_jacobians(fn, lam, tasks):
    """Explicit ∂_ω ∇_λ G(λ; ω) for every weight of each level: [d, n], [d, n, m], [d, n, q]."""
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    gradient = lambda *w: ravel(jax.grad(fn)(lam, tasks, *w))[0]
    return jax.jacobian(gradient, argnums=(0, 1, 2))(jnp.ones(n), jnp.ones((n, m)), jnp.ones((n, q)))


def _bilevel(lam, tasks, t, a, b):
    return objective(PROBLEM, lam, tasks, metaif.Weights(t, a, b))


def _pooled(lam, tasks, t, a, b):
    """G: no adaptation (θ = λ), support and query examples pooled per task."""
    per_example = lambda data: jax.vmap(jax.vmap(LOSS, in_axes=(None, None, 0)), in_axes=(None, None, 0))(
        lam, lam, data
    )
    total = (a * per_example(tasks.support)).sum(1) + (b * per_example(tasks.query)).sum(1)
    return jnp.mean(t * total / (M + Q)) + 0.5 * PROBLEM.meta_reg * jnp.sum(ravel(lam)[0] ** 2)


@jax.jit
def _pooled_hessian(lam, tasks):
    flat, unravel = ravel(lam)
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    return jax.hessian(lambda x: _pooled(unravel(x), tasks, jnp.ones(n), jnp.ones((n, m)), jnp.ones((n, q))))(flat)


def test_baselines_equal_their_explicit_formulas():
    lam, exact, _ = _logistic()
    g = _flat(jax.grad(TARGET)(lam))
    jac = _mixed_jacobians(_bilevel, lam, TASKS)

    dot = baselines.grad_dot(PROBLEM, lam, TASKS, TARGET)
    identity = metaif.influence(PROBLEM, lam, TASKS, TARGET, solver=metaif.solvers.Identity(damping=1.0))
    for level, J in zip(("tasks", "support", "query"), jac):
        expected = -np.tensordot(g, J, axes=1)
        np.testing.assert_allclose(getattr(dot, level), expected, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(getattr(identity, level), expected, rtol=1e-10, atol=1e-14)

    k, delta = 5, 1e-3
    trak = baselines.trak(PROBLEM, lam, TASKS, TARGET, dim=k, ridge=delta, seed=4)
    P = np.stack([_flat(jax.tree.map(lambda x: x[r], baselines.trak_projection(lam, k, seed=4))) for r in range(k)])
    phi = (P @ np.asarray(jac[0]) * N).T / np.sqrt(N)  # ∂_{t_i}∇F = ∇L_O^i / n
    inverse = np.linalg.inv(phi.T @ phi + delta * np.eye(k))
    for level, J in zip(("tasks", "support", "query"), jac):
        expected = -np.tensordot((P @ g) @ inverse @ P, J, axes=1)
        np.testing.assert_allclose(getattr(trak, level), expected, rtol=1e-9, atol=1e-14)

    single = baselines.single_level(PROBLEM, lam, TASKS, TARGET)
    hessian = _pooled_hessian(lam, TASKS)
    v = np.linalg.solve(hessian, g)
    for level, J in zip(("tasks", "support", "query"), _mixed_jacobians(_pooled, lam, TASKS)):
        np.testing.assert_allclose(getattr(single, level), -np.tensordot(v, J, axes=1), rtol=1e-8, atol=1e-14)
    assert bool(single.solve.converged)

    direct = baselines.direct_if(PROBLEM, lam, TASKS, TARGET)
    first_order = dataclasses.replace(PROBLEM, adapt=metaif.FirstOrder(PROBLEM.adapt))
    np.testing.assert_allclose(direct.tasks, metaif.influence(first_order, lam, TASKS, TARGET).tasks, rtol=1e-12)
    assert not np.allclose(direct.tasks, exact.tasks, rtol=1e-3)  # ignoring θ(λ) changes the answer


def test_baselines_shapes_signs_and_detection():
    lam, exact, _ = _logistic()
    own = lambda l: metaif.task_losses(PROBLEM, l, TASKS)[0]  # task 0's own query loss
    scored = {
        "grad_dot": baselines.grad_dot(PROBLEM, lam, TASKS, own),
        "trak": baselines.trak(PROBLEM, lam, TASKS, own, dim=4),
        "influence": metaif.influence(PROBLEM, lam, TASKS, own),
    }
    for name, s in scored.items():
        assert s.tasks.shape == (N,) and s.support.shape == (N, M) and s.query.shape == (N, Q), name
        assert float(s.tasks[0]) < 0, name  # a task lowers its own loss: helpful, negative
    for s in (baselines.raw_loss(PROBLEM, lam, TASKS), baselines.random_scores(TASKS, seed=1)):
        assert s.tasks.shape == (N,) and s.support.shape == (N, M) and s.query.shape == (N, Q)
    np.testing.assert_array_equal(
        baselines.random_scores(TASKS, seed=1).support, baselines.random_scores(TASKS, seed=1).support
    )
    raw = baselines.raw_loss(PROBLEM, lam, TASKS)
    np.testing.assert_allclose(raw.tasks, metaif.task_losses(PROBLEM, lam, TASKS), rtol=1e-12)
    np.testing.assert_allclose(raw.query.mean(1), raw.tasks, rtol=1e-12)
    # flipped support labels have high loss under the adapted parameters (higher = more harmful)
    assert metrics.roc_auc(raw.support, BAD_SUPPORT) > 0.65 and metrics.roc_auc(raw.tasks, BAD_TASKS) > 0.75
    # baselines rank tasks like exact influence on the test target
    assert metrics.spearman(baselines.grad_dot(PROBLEM, lam, TASKS, TARGET).tasks, exact.tasks) > 0.5


# ----------------------------------------------------------------------------- validation


def test_evaluation_rejects_bad_input_with_named_arguments():
    lam, params = _regression()
    with pytest.raises(ValueError, match="level must be 'tasks', 'support' or 'query'"):
        evaluation.removal_weights(RN, RM, RQ, "examples", [0])
    with pytest.raises(ValueError, match=r"indices for level 'support' must be integer \[B, 2\]"):
        evaluation.removal_weights(RN, RM, RQ, "support", [0, 1])
    with pytest.raises(ValueError, match="must lie in"):
        evaluation.removal_weights(RN, RM, RQ, "tasks", [RN])
    with pytest.raises(TypeError, match="weights must be a metaif.Weights"):
        evaluation.retrain(REG_PROBLEM, lam, REG_TASKS, np.ones((2, RN)))
    with pytest.raises(ValueError, match=r"weights.tasks must have shape \[B, 5\]"):
        evaluation.retrain(REG_PROBLEM, lam, REG_TASKS, metaif.Weights.ones(RN, RM, RQ, jnp.float64))
    with pytest.raises(ValueError, match="proximal must be a finite number >= 0"):
        evaluation.retrain(
            REG_PROBLEM, lam, REG_TASKS, evaluation.removal_weights(RN, RM, RQ, "tasks", [0]), proximal=-1.0
        )
    with pytest.raises(ValueError, match="seeds must be a non-empty sequence of ints"):
        evaluation.retrain_cold(
            REG_PROBLEM, _reg_init, REG_TASKS, evaluation.removal_weights(RN, RM, RQ, "tasks", [0]), seeds=[]
        )
    with pytest.raises(TypeError, match="removed must be a non-empty mapping"):
        evaluation.edit(lam, params, {"examples": np.ones(RN, bool)})
    with pytest.raises(ValueError, match=r"removed\['support'\] must be a bool or float array of shape \(5, 6\)"):
        evaluation.edit(lam, params, {"support": np.ones(RN, bool)})
    with pytest.raises(TypeError, match="influence_params must be a metaif.Influence"):
        evaluation.edit(lam, {"tasks": params.tasks}, {"tasks": np.ones(RN, bool)})
    with pytest.raises(ValueError, match="problem and tasks must be given together"):
        evaluation.edit(lam, params, {"tasks": np.ones(RN, bool)}, steps=1)
    with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
        baselines.trak(REG_PROBLEM, lam, REG_TASKS, lambda l: jnp.sum(l["w"]), ridge=0.0)
    with pytest.raises(ValueError, match="target must return a scalar"):
        baselines.grad_dot(REG_PROBLEM, lam, REG_TASKS, lambda l: l["w"])
