"""Worked example of metaif: the most helpful and harmful tasks and examples, checked by retraining.

Meta-trains a small model on generated tasks (some corrupted), ranks every task and example by its
influence on the meta-test loss, and compares the predictions with actual retraining.

Run with `python -m metaif.demo [--seed S] [--tasks N] [--quick]`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metaif
from metaif import evaluation, problems, solvers

WAYS, DIM, SUPPORT, QUERY, N_TEST = 3, 5, 15, 15, 100


def auc(scores, labels) -> float:
    """Rank-based ROC AUC (Mann-Whitney U; ties get average ranks): P(score of a positive > negative)."""
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="mergesort")] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):
        ranks[scores == value] = ranks[scores == value].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def header(title: str) -> None:
    print(f"\n{title}\n{'-' * len(title)}")


def make_data(n_tasks: int, seed: int):
    """Corrupted training tasks (with their corruption masks) and clean held-out test tasks."""
    # One task distribution (family_seed), two independent draws of tasks from it.
    train = problems.classification_tasks(n_tasks, SUPPORT, QUERY, DIM, WAYS, seed=2 * seed, family_seed=seed)
    test = problems.classification_tasks(N_TEST, SUPPORT, QUERY, DIM, WAYS, seed=2 * seed + 1, family_seed=seed)
    train, task_mask, support_mask = problems.corrupt_labels(train, WAYS, task_fraction=0.2, support_fraction=0.1, seed=seed + 1)
    return train, test, task_mask, support_mask


def make_problem():
    # Convex inner problem (mean cross-entropy + ½‖θ − λ‖²): 60 plain gradient steps converge.
    adapt = metaif.Proximal(reg=1.0, steps=60, lr=0.5)
    return metaif.BilevelProblem(problems.linear_cross_entropy, problems.linear_cross_entropy, adapt, meta_reg=1e-3)


def train(problem, tasks, seed: int, steps: int):
    """Adam from a random start, then exact Newton steps to a stationary point."""
    init = problems.linear_init(jax.random.key(seed), DIM, WAYS)
    adam = metaif.meta_train(problem, init, tasks, optax.adam(5e-2), steps=steps)
    return adam, metaif.newton_refine(problem, adam.meta_params, tasks, steps=8)


def mean_accuracy(problem, lam, tasks) -> float:
    """Query accuracy after adapting to each task's support set, averaged over tasks."""
    params = metaif.adapt_tasks(problem, lam, tasks)
    acc = jax.vmap(problems.accuracy, in_axes=(None, 0, 0, 0))(problems.linear_logits, params, tasks.query["x"], tasks.query["y"])
    return float(acc.mean())


def report_tasks(scores, task_mask) -> None:
    order = np.argsort(scores)
    for title, picked in (("Most harmful tasks (removal lowers the test loss)", order[::-1][:5]),
                          ("Most helpful tasks (removal raises the test loss)", order[:5])):
        header(title)
        print(f"{'task':>6} {'influence':>11} {'change if removed':>18}  corrupted")
        for k in picked:
            print(f"{k:>6} {scores[k]:>+11.3e} {-scores[k]:>+18.3e}  {'yes' if task_mask[k] else 'no'}")


def report_examples(name, scores, flipped=None) -> None:
    header(f"Most harmful {name} examples")
    print(f"{'task':>6} {'example':>8} {'influence':>11}" + ("  label flipped" if flipped is not None else ""))
    for flat in np.argsort(scores, axis=None)[::-1][:5]:
        k, j = np.unravel_index(flat, scores.shape)
        mark = f"  {'yes' if flipped[k, j] else 'no'}" if flipped is not None else ""
        print(f"{k:>6} {j:>8} {scores[k, j]:>+11.3e}{mark}")


def report_detection(problem, lam, tasks, scores, task_mask, support_mask) -> None:
    # Direct effect of each support weight on its own task's query loss, λ held fixed.
    own = jax.grad(lambda w: metaif.task_losses(problem, lam, tasks, support_weights=w).sum())(jnp.ones(support_mask.shape))
    header("Detection quality (AUC: 0.5 = chance, 1 = every corrupted datum ranked first)")
    print(f"{'corrupted tasks,  task influence on test loss':<52} {auc(scores['tasks'], task_mask):.3f}")
    print(f"{'flipped labels,   support influence on test loss':<52} {auc(scores['support'], support_mask):.3f}")
    print(f"{'flipped labels,   direct effect on own query loss':<52} {auc(np.asarray(own), support_mask):.3f}")
    print("Support influence on the test loss acts only through λ: a flipped label's harm is mostly")
    print("local to its own task (last row). The retraining check below confirms these small effects.")


def check_retraining(problem, lam, tasks, target, scores, rng, n_sample: int) -> dict:
    """Leave-one-out retraining for every task and a random sample of examples: {level: (count, seconds)}."""
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    sample = lambda size: np.stack(np.divmod(rng.choice(n * size, n_sample, replace=False), size), axis=1)
    header("Check against leave-one-out retraining (predicted change = -influence)")
    print(f"{'level':>8} {'removals':>9} {'pearson r':>10} {'max |pred|':>11} {'max |actual|':>13} {'retrain |grad F|':>17}")
    timings = {}
    for level, indices in (("tasks", np.arange(n)), ("support", sample(m)), ("query", sample(q))):
        start = time.perf_counter()
        actual, grad_norm = evaluation.leave_one_out(problem, lam, tasks, level, indices, target)
        predicted = -(scores[level][indices] if level == "tasks" else scores[level][indices[:, 0], indices[:, 1]])
        r = np.corrcoef(predicted, np.asarray(actual))[0, 1]
        print(f"{level:>8} {len(indices):>9} {r:>10.4f} {np.abs(predicted).max():>11.3e} "
              f"{float(jnp.abs(actual).max()):>13.3e} {float(grad_norm.max()):>17.1e}")
        timings[level] = (len(indices), time.perf_counter() - start)
    return timings


def edit_without_retraining(problem, lam, tasks, test, target, scores, task_mask, k: int) -> None:
    """Remove the k most harmful tasks: first-order prediction vs an actual retraining."""
    worst = np.argsort(scores)[::-1][:k]
    weights = metaif.Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, jnp.float64)
    weights = weights._replace(tasks=weights.tasks.at[worst].set(0.0))
    retrained = evaluation.retrain(problem, lam, tasks, jax.tree.map(lambda w: w[None], weights), steps=8)
    lam_new = jax.tree.map(lambda p: p[0], retrained.meta_params)

    before, after, predicted = float(target(lam)), float(target(lam_new)), -float(scores[worst].sum())
    acc_before, acc_after = mean_accuracy(problem, lam, test), mean_accuracy(problem, lam_new, test)
    header(f"Edit without retraining: remove the {k} most harmful tasks")
    print(f"removed tasks {sorted(worst.tolist())}: {task_mask[worst].sum()} of {k} corrupted")
    print(f"{'':26}{'before':>9} {'after':>9} {'change':>9}")
    print(f"{'test loss, predicted':26}{before:>9.4f} {before + predicted:>9.4f} {predicted:>+9.4f}")
    print(f"{'test loss, retrained':26}{before:>9.4f} {after:>9.4f} {after - before:>+9.4f}")
    print(f"{'test accuracy, retrained':26}{acc_before:>9.4f} {acc_after:>9.4f} {acc_after - acc_before:>+9.4f}")
    print(f"retrained |grad F| = {float(retrained.grad_norm[0]):.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaif.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    parser.add_argument("--tasks", type=int, default=40, help="number of training tasks (default 40)")
    parser.add_argument("--quick", action="store_true", help="fewer Adam steps and retraining samples")
    args = parser.parse_args(argv)
    if args.tasks < 10:
        parser.error("--tasks must be at least 10")

    # Before the first computation: float64, and single-threaded Eigen on CPU (its thread pool can
    # deadlock on vmapped LAPACK calls, seen with jaxlib 0.10.2 on 2 cores).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    jax.config.update("jax_enable_x64", True)
    tasks, test, task_mask, support_mask = make_data(args.tasks, args.seed)
    problem = make_problem()
    print(f"metaif {metaif.__version__} demo: {WAYS}-way linear softmax (dim {DIM}), iMAML-style proximal adaptation")
    print(f"{args.tasks} training tasks of {SUPPORT} support + {QUERY} query examples: {task_mask.sum()} with random "
          f"query labels, {support_mask.sum()} support labels flipped; {N_TEST} clean test tasks")

    header("Meta-training")
    start = time.perf_counter()
    adam, refined = train(problem, tasks, args.seed, steps=300 if args.quick else 1000)
    lam, t_train = refined.meta_params, time.perf_counter() - start
    print(f"adam:   {adam.summary()}")
    print(f"newton: {refined.summary()}")
    print(f"inner stationarity max |grad_theta L_I| = {float(metaif.adaptation_residual(problem, lam, tasks).max()):.1e}")

    target = lambda meta: metaif.task_losses(problem, meta, test).mean()  # the meta-test loss
    start = time.perf_counter()
    result = metaif.influence(problem, lam, tasks, target=target, solver=solvers.Dense())
    scores = {"tasks": np.asarray(result.tasks), "support": np.asarray(result.support), "query": np.asarray(result.query)}
    t_influence = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(metaif.influence(problem, lam, tasks, target=target, solver=solvers.Dense()))
    t_warm = time.perf_counter() - start
    print(f"smallest Hessian eigenvalue = {float(result.solve.min_eigenvalue):.2e} (= meta_reg: softmax is "
          f"invariant to shifting all classes' logits)")

    report_tasks(scores["tasks"], task_mask)
    report_examples("support", scores["support"], support_mask)
    report_examples("query", scores["query"])
    report_detection(problem, lam, tasks, scores, task_mask, support_mask)
    t_loo = check_retraining(problem, lam, tasks, target, scores, np.random.default_rng(args.seed), 10 if args.quick else 30)
    edit_without_retraining(problem, lam, tasks, test, target, scores["tasks"], task_mask, k=max(1, args.tasks // 5))

    n_scores = sum(s.size for s in scores.values())
    header("Timings (seconds, first calls include compilation)")
    print(f"{'meta-training (Adam + Newton)':<36}{t_train:>8.2f}")
    print(f"{f'influence, all {n_scores} scores':<36}{t_influence:>8.2f}   (compiled: {t_warm:.2f})")
    n_loo, seconds = sum(c for c, _ in t_loo.values()), sum(t for _, t in t_loo.values())
    per_removal = t_loo["query"][1] / t_loo["query"][0]  # query level reuses the support level's compilation
    print(f"{f'leave-one-out, {n_loo} retrainings':<36}{seconds:>8.2f}   (compiled: {per_removal:.3f} per removal, "
          f"~{per_removal * n_scores:.0f} for all {n_scores})")


if __name__ == "__main__":
    main()
