"""Options are pytrees: a new damping, tol, lr, reg or meta_reg reuses the compiled code.

Compilations are counted with JAX's public monitoring events (one backend compile event per XLA
compilation), so the check covers every jitted function an entry point calls, not a chosen few.
"""

import contextlib

import jax
import numpy as np
import optax
import pytest

import metaif
from metaif import problems

# Compilation does not depend on where λ is: untrained meta-parameters on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::metaif.NonStationaryWarning")

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
N, M, Q, DIM, WAYS = 6, 4, 3, 4, 3


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects the names of the functions XLA compiles inside the block."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            compiled.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


TASKS = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=0)
TEST = problems.classification_tasks(4, M, Q, DIM, WAYS, seed=1)
LOSS = problems.linear_cross_entropy
INIT = problems.linear_init(jax.random.key(0), DIM, WAYS)


def _problem(adapt, meta_reg):
    return metaif.BilevelProblem(LOSS, LOSS, adapt, meta_reg=meta_reg)


def _target(problem):
    return lambda lam: metaif.task_losses(problem, lam, TEST).mean()


ADAPTATIONS = {
    "unrolled": (lambda lr, reg: metaif.Unrolled(steps=2, lr=lr)),
    "proximal": (lambda lr, reg: metaif.Proximal(reg=reg, steps=20, lr=lr, inner_tol=1e-9)),
    "proximal-line-search": (lambda lr, reg: metaif.Proximal(reg=reg, steps=20, lr=lr, line_search=True)),
}
SOLVERS = {
    "cg": (lambda damping, tol: metaif.solvers.CG(damping=damping, tol=tol, maxiter=8)),
    "dense": (lambda damping, tol: metaif.solvers.Dense(damping=damping)),
    "neumann": (lambda damping, tol: metaif.solvers.Neumann(damping=damping, tol=tol, iterations=5, scale=0.5)),
    "lowrank": (lambda damping, tol: metaif.solvers.LowRank(damping=damping, tol=tol, rank=3)),
}


@pytest.mark.parametrize("adapt", sorted(ADAPTATIONS))
def test_influence_sweep_compiles_once(adapt):
    make = ADAPTATIONS[adapt]
    settings = [(0.5, 1.0, 1e-2, 0.1, 1e-6), (0.3, 2.0, 2e-2, 0.3, 1e-8), (0.1, 0.5, 0.0, 1.0, 1e-3)]
    results = []
    target = _target(_problem(make(*settings[0][:2]), settings[0][2]))  # one target object: the target itself is code
    for i, (lr, reg, meta_reg, damping, tol) in enumerate(settings):
        problem = _problem(make(lr, reg), meta_reg)
        with count_compiles() as compiled:
            results.append(
                metaif.influence(
                    problem, INIT, TASKS, target=target, solver=metaif.solvers.CG(damping=damping, tol=tol)
                )
            )
        if i > 0:
            assert compiled == [], f"setting {i} recompiled {compiled}"
    # The new values were used: every setting gives different scores.
    assert not np.allclose(results[0].tasks, results[1].tasks)
    assert not np.allclose(results[1].tasks, results[2].tasks)
    assert float(results[1].solve.damping) == pytest.approx(0.3)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_solver_sweep_compiles_once(solver):
    problem = _problem(metaif.Unrolled(steps=1, lr=0.5), 1e-2)
    target = _target(problem)
    make = SOLVERS[solver]
    scores = []
    for i, (damping, tol) in enumerate([(0.1, 1e-6), (0.2, 1e-4), (0.5, 1e-2)]):
        with count_compiles() as compiled:
            scores.append(metaif.influence(problem, INIT, TASKS, target=target, solver=make(damping, tol)).tasks)
        if i > 0:
            assert compiled == [], f"{solver} damping={damping} recompiled {compiled}"
    assert not np.allclose(scores[0], scores[2])


def test_params_influence_and_adapt_sweep_compile_once():
    for i, (lr, damping) in enumerate([(0.5, 0.1), (0.2, 0.4)]):
        problem = _problem(metaif.Unrolled(steps=2, lr=lr), 1e-2)
        with count_compiles() as compiled:
            metaif.task_influence(problem, INIT, TASKS, solver=metaif.solvers.Dense(damping=damping))
            metaif.adapt_tasks(problem, INIT, TASKS)
            metaif.meta_objective(problem, INIT, TASKS)
        if i > 0:
            assert compiled == [], f"recompiled {compiled}"


def test_meta_train_lr_and_reg_sweep_compiles_once():
    optimizer = optax.adam(1e-2)  # the optax optimiser is code: pass the same object
    finals = []
    for i, (lr, meta_reg) in enumerate([(0.5, 1e-2), (0.25, 3e-2)]):
        problem = _problem(metaif.Unrolled(steps=1, lr=lr), meta_reg)
        with count_compiles() as compiled:
            finals.append(metaif.meta_train(problem, INIT, TASKS, optimizer, steps=5).objective)
        if i > 0:
            assert compiled == [], f"recompiled {compiled}"
    assert float(finals[0]) != float(finals[1])


def test_a_structural_change_does_recompile():
    """Control: the counter sees compilations (a new number of steps is a new program)."""
    problem = _problem(metaif.Unrolled(steps=1, lr=0.5), 1e-2)
    target = _target(problem)
    metaif.influence(problem, INIT, TASKS, target=target, solver=metaif.solvers.CG(maxiter=4))
    with count_compiles() as compiled:
        metaif.influence(problem, INIT, TASKS, target=target, solver=metaif.solvers.CG(maxiter=5))
    assert compiled, "a new CG.maxiter must compile a new program"


def test_options_are_pytrees_with_numeric_leaves():
    adapt = metaif.Proximal(reg=2.0, steps=10, lr=0.1)
    assert jax.tree.leaves(adapt) == [2.0, 0.1, 1e-10]
    assert jax.tree.leaves(metaif.solvers.CG(damping=0.5)) == [0.5, 1e-8, 0]
    assert jax.tree.leaves(metaif.solvers.CG()) == [1e-8, 0]  # damping=None: the estimate, a structure
    problem = _problem(adapt, 0.25)
    doubled = jax.tree.map(lambda x: 2 * x, problem)
    assert isinstance(doubled, metaif.BilevelProblem) and doubled.adapt.reg == 4.0 and doubled.meta_reg == 0.5
    assert doubled.adapt.steps == 10 and doubled.inner_loss is LOSS
    # Validation runs at construction only: rebuilding from traced leaves inside jit works.
    value = jax.jit(lambda p: metaif.meta_objective(p, INIT, TASKS))(problem)
    np.testing.assert_allclose(value, metaif.meta_objective(problem, INIT, TASKS), rtol=1e-12)
    with pytest.raises(ValueError, match="Proximal.reg"):
        metaif.Proximal(reg=-1.0, steps=10, lr=0.1)


def test_derivative_in_a_numeric_option():
    """Options are ordinary pytree arguments: d F / d reg by jax.grad equals finite differences."""

    def objective(reg):
        base = metaif.Proximal(reg=2.0, steps=200, lr=0.2, inner_tol=1e-12)
        adapt = jax.tree_util.tree_map_with_path(
            lambda path, x: reg if jax.tree_util.keystr(path) == ".reg" else x, base
        )
        return metaif.meta_objective(_problem(adapt, 1e-2), INIT, TASKS)

    grad = jax.grad(objective)(2.0)
    h = 1e-5
    fd = (objective(2.0 + h) - objective(2.0 - h)) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
