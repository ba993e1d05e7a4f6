"""The example of docs/nonstationary.md: influence at a non-stationary λ, diagnosed and repaired.

    .venv/bin/python docs/examples/nonstationary.py

A tanh-MLP MAML learner on generated 3-way tasks, stopped after a few Adam steps (not
stationary). For each setting it prints ‖∇F‖, the smallest total-Hessian eigenvalue (Lanczos on
metaif.hessian_operator), the solver's diagnostics and the Spearman correlation between the
predicted change of the meta-test loss when each task is removed (−I_f) and actual retraining.
"""

import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import warnings  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import metaif  # noqa: E402
from metaif import evaluation, problems, solvers  # noqa: E402
from metaif.evaluation import metrics  # noqa: E402

N, M, Q, DIM, WAYS = 30, 10, 10, 5, 3


def ground_truth(problem, lam, tasks, target, proximal):
    """f(λ_w) − f(λ_1) for w = "task k removed", each λ_w re-solved from λ (with the proximal term
    ρ/2‖λ' − λ‖² when proximal = ρ > 0). Subtracting f(λ_1), the same re-solve with nothing
    removed, takes out the drift that a non-stationary λ would add to every retraining."""
    removal = evaluation.removal_weights(N, M, Q, "tasks", np.arange(N))
    ones = metaif.Weights(*(jnp.ones_like(w[:1]) for w in removal))
    weights = metaif.Weights(*(jnp.concatenate([a, b]) for a, b in zip(ones, removal)))
    result = evaluation.retrain(problem, lam, tasks, weights, steps=60, proximal=proximal, chunk_size=None)
    values = evaluation.target_values(target, result)
    return np.asarray(values[1:] - values[0]), np.asarray(values[1:] - target(lam)), float(result.grad_norm.max())


def relative_error(predicted, actual):
    return float(np.linalg.norm(predicted - actual) / np.linalg.norm(actual))


def row(name, problem, lam, tasks, target, solver, proximal):
    low = solvers.lanczos_eigenvalues(metaif.hessian_operator(problem, lam, tasks), k=1, iterations=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = metaif.influence(problem, lam, tasks, target=target, solver=solver)
    info = scores.solve
    corrected, naive, retrained_gn = ground_truth(problem, lam, tasks, target, proximal)
    predicted = -np.asarray(scores.tasks)
    print(
        f"{name:36s} {float(scores.grad_norm):9.1e} {float(low.values[0]):+10.2e} {type(solver).__name__:>6s} "
        f"{str(bool(info.indefinite)):>10s} {str(bool(info.converged)):>9s} {metrics.spearman(predicted, corrected):+8.3f} "
        f"{relative_error(predicted, corrected):9.2f} {relative_error(predicted, naive):9.2f} {retrained_gn:9.1e}"
        + ("  warned" if caught else "")
    )


def main():
    tasks = problems.classification_tasks(N, M, Q, DIM, WAYS, seed=0)
    test = problems.classification_tasks(50, M, Q, DIM, WAYS, seed=1)
    problem = metaif.BilevelProblem(
        problems.mlp_cross_entropy, problems.mlp_cross_entropy, metaif.Unrolled(steps=1, lr=0.5), meta_reg=1e-3
    )
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    init = problems.mlp_init(jax.random.key(0), (DIM, 8, WAYS))
    with jax.numpy_dtype_promotion("standard"):
        early = metaif.meta_train(problem, init, tasks, optax.adam(1e-2), steps=60)
    refined = metaif.newton_refine(problem, early.meta_params, tasks, steps=30)
    print("after 60 Adam steps:", early.summary())
    print("after newton_refine:", refined.summary())
    lam0, lam1 = early.meta_params, refined.meta_params
    low = float(
        solvers.lanczos_eigenvalues(metaif.hessian_operator(problem, lam0, tasks), k=1, iterations=60).values[0]
    )
    delta = round(2 * max(-low, 1e-3), 3)
    print(f"damping for the early lambda: delta = 2 |lambda_min| = {delta}\n")
    print(
        f"{'lambda, damping, ground truth':36s} {'||grad F||':>9s} {'lambda_min':>10s} {'solver':>6s} {'indefinite':>10s} "
        f"{'converged':>9s} {'Spearman':>8s} {'rel.err':>9s} {'rel.err*':>9s} {'retrain gn':>9s}"
    )
    row("early, delta=0, plain retrain", problem, lam0, tasks, target, solvers.Dense(), 0.0)
    row("early, delta=0, plain retrain", problem, lam0, tasks, target, solvers.CG(damping=0.0, maxiter=64), 0.0)
    row(f"early, delta={delta}, proximal retrain", problem, lam0, tasks, target, solvers.Dense(damping=delta), delta)
    row("refined, delta=0, plain retrain", problem, lam1, tasks, target, solvers.Dense(), 0.0)
    row(f"refined, delta={delta}, proximal retrain", problem, lam1, tasks, target, solvers.Dense(damping=delta), delta)
    print(
        "\nSpearman and rel.err: -I_f against f(lambda_w) - f(lambda_1) (drift-free); rel.err*: against "
        "f(lambda_w) - f(lambda) (drift included); retrain gn: largest ||grad|| of the re-solved objectives."
    )


if __name__ == "__main__":
    main()
