"""Worked example: meta-train a small model on generated tasks, find the most helpful and most
harmful tasks and examples by influence, and check the predictions against retraining.

Run with `python -m metaif.demo [--seed S] [--tasks N] [--quick]`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


WAYS, DIM, SUPPORT, QUERY = 3, 5, 15, 15


def auc(scores, labels) -> float:
    """Rank-based ROC AUC (Mann-Whitney U, ties get average ranks): P(score_pos > score_neg)."""
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def header(title: str) -> None:
    print(f"\n{title}\n{'-' * len(title)}")


def make_data(n_tasks: int, seed: int):
    """Corrupted training tasks (with masks) and clean held-out test tasks."""
    from metaif import problems

    clean = problems.classification_tasks(n_tasks, SUPPORT, QUERY, DIM, WAYS, seed=seed)
    train, task_mask, support_mask = problems.corrupt_labels(clean, WAYS, task_fraction=0.2, support_fraction=0.1, seed=seed + 1)
    test = problems.classification_tasks(100, SUPPORT, QUERY, DIM, WAYS, seed=seed + 1000)
    return train, test, task_mask, support_mask


def make_problem():
    import metaif
    from metaif import problems

    # Convex inner problem (mean cross-entropy + (reg/2)|θ - λ|²): plain gradient steps converge.
    adapt = metaif.Proximal(reg=1.0, steps=60, lr=0.5, inner_solve="dense")
    return metaif.BilevelProblem(problems.linear_cross_entropy, problems.linear_cross_entropy, adapt, meta_reg=1e-3)


def test_accuracy(problem, lam, tasks) -> float:
    """Mean query accuracy of the adapted linear model over the test tasks."""
    from metaif import problems
    from metaif._objective import adapt_one

    ones = jnp.ones((tasks.n_support,), jnp.float64)
    params = jax.vmap(adapt_one, in_axes=(None, None, 0, None))(problem, lam, tasks.support, ones)
    acc = jax.vmap(problems.accuracy, in_axes=(None, 0, 0, 0))(problems.linear_logits, params, tasks.query["x"], tasks.query["y"])
    return float(acc.mean())


def train(problem, tasks, seed: int, steps: int):
    import metaif
    import optax
    from metaif import problems

    init = problems.linear_init(jax.random.key(seed), DIM, WAYS)
    adam = metaif.meta_train(problem, init, tasks, optax.adam(5e-2), steps=steps)
    return adam, metaif.newton_refine(problem, adam.meta_params, tasks, steps=8)


def report_tasks(scores, task_mask) -> None:
    order = np.argsort(scores)
    header("Most harmful tasks (removing them lowers the test loss)")
    print(f"{'task':>6} {'influence':>12} {'change if removed':>18}  corrupted")
    for k in order[::-1][:5]:
        print(f"{k:>6} {scores[k]:>+12.3e} {-scores[k]:>+18.3e}  {'yes' if task_mask[k] else 'no'}")
    header("Most helpful tasks (removing them raises the test loss)")
    print(f"{'task':>6} {'influence':>12} {'change if removed':>18}  corrupted")
    for k in order[:5]:
        print(f"{k:>6} {scores[k]:>+12.3e} {-scores[k]:>+18.3e}  {'yes' if task_mask[k] else 'no'}")


def report_examples(name, scores, flipped=None) -> None:
    header(f"Most harmful {name} examples")
    print(f"{'task':>6} {'example':>8} {'influence':>12}" + ("  label flipped" if flipped is not None else ""))
    for flat in np.argsort(scores, axis=None)[::-1][:5]:
        k, j = np.unravel_index(flat, scores.shape)
        extra = f"  {'yes' if flipped[k, j] else 'no'}" if flipped is not None else ""
        print(f"{k:>6} {j:>8} {scores[k, j]:>+12.3e}{extra}")


def check_retraining(problem, lam, tasks, target, result, rng, n_sample: int) -> dict:
    """Leave-one-out retraining for every task and a sample of examples; returns timings."""
    from metaif import evaluation

    header("Check against leave-one-out retraining (predicted change = -influence)")
    print(f"{'level':>8} {'removals':>9} {'pearson r':>10} {'max |pred|':>11} {'max |actual|':>13} {'max retrain |grad|':>19}")
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    levels = [("tasks", np.arange(n), result.tasks),
              ("support", np.stack([rng.integers(0, n, n_sample), rng.integers(0, m, n_sample)], 1), result.support),
              ("query", np.stack([rng.integers(0, n, n_sample), rng.integers(0, q, n_sample)], 1), result.query)]
    start = time.perf_counter()
    for level, indices, scores in levels:
        actual, grad_norm = evaluation.leave_one_out(problem, lam, tasks, level, indices, target)
        predicted = -np.asarray(scores)[tuple(indices.T)] if indices.ndim == 2 else -np.asarray(scores)[indices]
        r = np.corrcoef(predicted, np.asarray(actual))[0, 1]
        print(f"{level:>8} {len(indices):>9} {r:>10.4f} {np.abs(predicted).max():>11.3e} "
              f"{np.abs(actual).max():>13.3e} {float(np.max(grad_norm)):>19.2e}")
    return time.perf_counter() - start


def edit_without_retraining(problem, lam, tasks, test, target, scores, task_mask, k: int) -> float:
    """Remove the k most harmful tasks: compare the predicted and retrained test loss."""
    from metaif import evaluation
    from metaif._objective import Weights

    worst = np.argsort(scores)[::-1][:k]
    weights = Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, jnp.float64)
    weights = weights._replace(tasks=weights.tasks.at[worst].set(0.0))
    start = time.perf_counter()
    retrained = evaluation.retrain(problem, lam, tasks, jax.tree.map(lambda w: w[None], weights), steps=8)
    elapsed = time.perf_counter() - start
    lam_new = jax.tree.map(lambda p: p[0], retrained.meta_params)

    before, after = float(target(lam)), float(target(lam_new))
    header(f"Edit without retraining: remove the {k} most harmful tasks")
    print(f"removed tasks: {sorted(worst.tolist())} ({task_mask[worst].sum()} of {k} corrupted)")
    print(f"{'':24}{'before':>10} {'after':>10} {'change':>11}")
    print(f"{'test loss (retrained)':24}{before:>10.4f} {after:>10.4f} {after - before:>+11.4f}")
    print(f"{'test loss (predicted)':24}{before:>10.4f} {before - scores[worst].sum():>10.4f} {-scores[worst].sum():>+11.4f}")
    acc_before, acc_after = test_accuracy(problem, lam, test), test_accuracy(problem, lam_new, test)
    print(f"{'test accuracy':24}{acc_before:>10.4f} {acc_after:>10.4f} {acc_after - acc_before:>+11.4f}")
    print(f"retraining gradient norm: {float(retrained.grad_norm[0]):.2e}")
    return elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaif.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    parser.add_argument("--tasks", type=int, default=40, help="number of training tasks (default 40)")
    parser.add_argument("--quick", action="store_true", help="fewer training steps and retraining samples")
    args = parser.parse_args(argv)
    if args.tasks < 10:
        parser.error("--tasks must be at least 10")

    jax.config.update("jax_enable_x64", True)  # before any array is created
    import metaif
    from metaif import solvers

    rng = np.random.default_rng(args.seed)
    tasks, test, task_mask, support_mask = make_data(args.tasks, args.seed)
    problem = make_problem()
    print(f"metaif {metaif.__version__} demo: {args.tasks} training tasks ({task_mask.sum()} with random query labels, "
          f"{support_mask.sum()} flipped support labels), {test.n_tasks} clean test tasks")
    print(f"{WAYS}-way linear softmax, dim {DIM}, {SUPPORT} support + {QUERY} query examples per task, "
          f"iMAML (proximal) adaptation")

    header("Meta-training")
    start = time.perf_counter()
    adam, refined = train(problem, tasks, args.seed, steps=300 if args.quick else 1000)
    lam = refined.meta_params
    t_train = time.perf_counter() - start
    print(f"adam:   {adam.summary()}")
    print(f"newton: {refined.summary()}")
    print(f"max inner residual |grad_theta L_I|: {float(metaif.adaptation_residual(problem, lam, tasks).max()):.2e}")

    target = lambda meta: metaif.task_losses(problem, meta, test).mean()  # meta-test loss
    start = time.perf_counter()
    result = metaif.influence(problem, lam, tasks, target=target, solver=solvers.Dense())
    scores = jax.tree.map(np.asarray, (result.tasks, result.support, result.query))
    t_influence = time.perf_counter() - start
    print(f"smallest Hessian eigenvalue: {float(result.solve.min_eigenvalue):.3e}  "
          f"(solve residual {float(result.solve.relative_residual):.1e})")

    report_tasks(scores[0], task_mask)
    report_examples("support", scores[1], support_mask)
    report_examples("query", scores[2])
    header("Detection quality (AUC; 0.5 = chance, 1 = perfect)")
    print(f"corrupted tasks      by task influence:    {auc(scores[0], task_mask):.3f}")
    print(f"flipped support labels by support influence: {auc(scores[1], support_mask):.3f}")

    t_loo = check_retraining(problem, lam, tasks, target, result._replace(tasks=scores[0], support=scores[1], query=scores[2]),
                             rng, 10 if args.quick else 30)
    t_edit = edit_without_retraining(problem, lam, tasks, test, target, scores[0], task_mask, k=max(1, args.tasks // 5))

    header("Timings (seconds, including compilation)")
    print(f"meta-training {t_train:8.2f}\ninfluence     {t_influence:8.2f}   (every task and example at once)\n"
          f"leave-one-out {t_loo:8.2f}\nretrain edit  {t_edit:8.2f}")


if __name__ == "__main__":
    main()
