"""Experiment 1 (fidelity): do influence scores predict actual retraining, on Omniglot 5-way 1-shot?

For MAML (Unrolled) and iMAML (Proximal):
1. meta-train to a stationary point (Adam, then exact Newton) and report ‖∇F‖ and the smallest
   eigenvalues of the total Hessian;
2. ground truth by exact trust-region Newton retraining warm-started at λ*, run to ‖∇F(λ; w)‖ <=
   --tol (`metaif.evaluation.retrain`; plain, or proximal with --proximal ρ): leave-one-task-out
   on every training task, leave-one-example-out on a random sample of support and query
   examples, and retraining on random 50% task subsets (LDS). Every retraining is repeated from a
   start perturbed in a random direction (the noise ceiling); every retraining's final gradient
   norm, Newton steps and distance from λ* are saved, and each task is also down-weighted by ε
   (the derivative check);
3. every solver / curvature option and every baseline scores the data for the target (meta-
   validation loss on held-out tasks); Pearson/Spearman of −score against the actual change, and
   the LDS, each next to the noise ceiling; runtimes side by side.

    .venv/bin/python experiments/fidelity.py                     # CPU config, both adaptations
    .venv/bin/python experiments/fidelity.py --variants cpu      # MAML only
    .venv/bin/python experiments/fidelity.py --config gpu ...    # paper scale (see README)
"""

from __future__ import annotations

import dataclasses
import sys
import time

import common
from common import CONFIGS, fmt

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import metaif
from metaif import evaluation
from metaif.evaluation import metrics

import methods


def extra(parser):
    parser.add_argument("--variants", default="cpu,cpu-imaml", help="comma-separated CONFIGS names to run")
    parser.add_argument(
        "--gt-steps", type=int, default=60, help="most trust-region Newton steps per retraining (each stops at --tol)"
    )
    parser.add_argument(
        "--task-sample", type=int, default=0, help="leave-one-task-out on this many random tasks (0: all)"
    )
    parser.add_argument(
        "--instance-sample", type=int, default=20, help="support and query examples removed one at a time"
    )
    parser.add_argument("--lds-subsets", type=int, default=20)
    parser.add_argument(
        "--proximal",
        type=float,
        default=0.0,
        help="ρ > 0: proximal ground truth (F + ρ/2‖λ − λ*‖², centre λ* in both passes) and solver damping δ = ρ",
    )
    parser.add_argument(
        "--tol", type=float, default=1e-10, help="retraining stops at, and counts as converged below, this ‖∇F(λ; w)‖"
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=0.1,
        help="also retrain with each task's weight lowered by ε (not removed): −ε·IF against that change separates "
        "the derivative's accuracy from the nonlinearity of removing a whole task (0: skip)",
    )
    parser.add_argument(
        "--perturb", type=float, default=1e-3, help="relative size of the noise-ceiling start perturbation"
    )


def perturbed(meta_params, relative: float, seed: int):
    flat, unravel = jax.flatten_util.ravel_pytree(meta_params)
    direction = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    return unravel(flat + relative * np.linalg.norm(flat) * direction / np.linalg.norm(direction))


def distances(retrained, lam) -> np.ndarray:
    """‖λ_retrained − λ*‖ of every retraining [B]."""
    flat = jax.flatten_util.ravel_pytree(lam)[0]
    return np.asarray(
        jax.vmap(lambda p: jnp.linalg.norm(jax.flatten_util.ravel_pytree(p)[0] - flat))(retrained.meta_params)
    )


def retrain_twice(setup, lam, weights, target, steps, relative, proximal=0.0, tol=1e-10, passes=2):
    """Target changes of retrainings from λ* and from a start perturbed by `relative`·‖λ*‖ in a
    random direction (same weights; with `proximal` > 0 the proximal centre stays λ*), their final
    gradient norms, Newton steps, distances from λ*, and the seconds of the second pass."""
    problem, tasks = setup.problem, setup.train
    base = float(target(lam))
    runs, seconds = [], 0.0
    for k in range(passes):
        start = time.perf_counter()
        begin = lam if k == 0 else perturbed(lam, relative, k)
        runs.append(
            jax.block_until_ready(
                evaluation.retrain(
                    problem, begin, tasks, weights, steps=steps, chunk_size=8, proximal=proximal, center=lam, tol=tol
                )
            )
        )
        seconds = time.perf_counter() - start
    changes = np.stack([np.asarray(evaluation.target_values(target, r)) - base for r in runs])
    norms = np.stack([np.asarray(r.grad_norm) for r in runs])
    return {
        "changes": changes,
        "grad_norms": norms,
        "iterations": np.stack([np.asarray(r.iterations) for r in runs]),
        "moved": np.stack([distances(r, lam) for r in runs]),
    }, seconds


def agreement(predicted, actual, ok) -> dict:
    """Correlations over all retrainings and over those converged in both passes (`ok`)."""
    out = {"pearson": metrics.pearson(predicted, actual), "spearman": metrics.spearman(predicted, actual)}
    if 2 < ok.sum() < ok.size:
        out.update(
            pearson_converged=metrics.pearson(predicted[ok], actual[ok]),
            spearman_converged=metrics.spearman(predicted[ok], actual[ok]),
        )
    elif ok.all():
        out.update(pearson_converged=out["pearson"], spearman_converged=out["spearman"])
    return out


def run_variant(name: str, config, args, log) -> dict:
    log(f"== {name}: {config}")
    setup = common.build(config)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    target = common.mean_loss(setup, setup.val)
    n, m, q = setup.train.n_tasks, setup.train.n_support, setup.train.n_query
    rng = np.random.default_rng(config.seed)
    out = {"setup": common.describe_setup(setup, trained), "proximal": args.proximal}
    log(f"  d = {out['setup']['d']}, test acc {out['setup']['test_accuracy']:.3f}")

    # ---- ground truth
    truth = {}
    kw = dict(steps=args.gt_steps, relative=args.perturb, proximal=args.proximal, tol=args.tol)
    t0 = time.perf_counter()
    task_index = (
        np.arange(n) if not args.task_sample else np.sort(rng.choice(n, min(args.task_sample, n), replace=False))
    )
    w = evaluation.removal_weights(n, m, q, "tasks", task_index)
    res, seconds = retrain_twice(setup, lam, w, target, **kw)
    truth["tasks"] = {"index": task_index, **res, "seconds_all": seconds * n / task_index.size}
    log(
        f"  task LOO: {time.perf_counter() - t0:.0f}s, max grad norm {res['grad_norms'].max():.2e}, Newton steps "
        f"{np.median(res['iterations']):.0f} median / {res['iterations'].max()} max, |change| median {np.median(np.abs(res['changes'][0])):.2e}, "
        f"moved median {np.median(res['moved'][0]):.3f} (‖λ*‖ = {float(np.linalg.norm(jax.flatten_util.ravel_pytree(lam)[0])):.2f})"
    )
    if args.epsilon > 0:  # lower each task's weight by ε instead of removing it
        t0 = time.perf_counter()
        w_eps = w._replace(tasks=1.0 - args.epsilon * (1.0 - w.tasks))
        res, _ = retrain_twice(setup, lam, w_eps, target, passes=1, **kw)
        truth["tasks_epsilon"] = {"index": task_index, "epsilon": args.epsilon, **res}
        log(
            f"  task ε = {args.epsilon} down-weighting: {time.perf_counter() - t0:.0f}s, max grad norm {res['grad_norms'].max():.2e}, "
            f"moved median {np.median(res['moved'][0]):.3f}"
        )
    sample = {}
    for level, k in (("support", m), ("query", q)):
        flat = rng.choice(n * k, size=min(args.instance_sample, n * k), replace=False)
        pairs = np.stack(np.unravel_index(flat, (n, k)), 1)
        sample[level] = pairs
        t0 = time.perf_counter()
        w = evaluation.removal_weights(n, m, q, level, pairs)
        res, seconds = retrain_twice(setup, lam, w, target, **kw)
        truth[level] = {"pairs": pairs, **res, "seconds_sample": seconds}
        log(
            f"  {level} LOO ({len(pairs)}): {time.perf_counter() - t0:.0f}s, max grad norm {res['grad_norms'].max():.2e}, "
            f"|change| median {np.median(np.abs(res['changes'][0])):.2e}"
        )
    t0 = time.perf_counter()
    w, masks = evaluation.subset_weights(n, m, q, "tasks", 0.5, count=args.lds_subsets, seed=config.seed)
    res, seconds = retrain_twice(setup, lam, w, target, **kw)
    truth["lds"] = {"masks": masks, **res}
    log(
        f"  LDS subsets: {time.perf_counter() - t0:.0f}s, max grad norm {res['grad_norms'].max():.2e}, moved median {np.median(res['moved'][0]):.3f}"
    )
    # predicted displacement ‖I_λ(task)‖ (exact, damping δ = ρ) against the actual ‖λ_retrained − λ*‖
    params_if = metaif.influence(
        setup.problem, lam, setup.train, solver=metaif.solvers.Dense(damping=args.proximal)
    ).tasks
    predicted = np.asarray(jax.vmap(lambda p: jnp.linalg.norm(jax.flatten_util.ravel_pytree(p)[0]))(params_if))
    truth["tasks"]["predicted_moved"] = predicted[task_index]
    log(
        f"  predicted ‖I_λ‖ median {np.median(predicted):.3f}; actual ‖Δλ‖ median {np.median(truth['tasks']['moved'][0]):.3f}"
    )
    ceilings = {}
    for key in ("tasks", "support", "query", "lds"):
        ok = np.all(truth[key]["grad_norms"] < args.tol, axis=0)
        truth[key]["converged"] = ok
        c = metrics.noise_ceiling(truth[key]["changes"])
        ceilings[key] = {"pearson": c.pearson, "spearman": c.spearman, "n_converged": int(ok.sum()), "n": int(ok.size)}
        if ok.sum() > 2:
            c = metrics.noise_ceiling(truth[key]["changes"][:, ok])
            ceilings[key].update(pearson_converged=c.pearson, spearman_converged=c.spearman)
    log(f"  noise ceilings: {ceilings}")

    # ---- scores
    rows = {}
    all_methods = {**methods.influence_methods(args.proximal), **methods.baseline_methods(args.proximal)}
    for label, method in all_methods.items():
        try:
            scores, first, steady = methods.run_timed(method, setup, lam, target)
        except Exception as error:  # report, do not hide, a method that fails here
            log(f"  {label}: FAILED {type(error).__name__}: {error}")
            rows[label] = {"error": f"{type(error).__name__}: {error}"}
            continue
        row = {"seconds_first": first, "seconds": steady, "info": scores.info}
        actual = truth["tasks"]["changes"][0]
        row["tasks"] = agreement(-scores.tasks[task_index], actual, truth["tasks"]["converged"])
        if "tasks_epsilon" in truth and not scores.info.get("second_order"):  # its ε prediction is not −ε·score
            eps_truth = truth["tasks_epsilon"]
            ok = eps_truth["grad_norms"][0] < args.tol
            row["tasks_epsilon"] = agreement(
                -eps_truth["epsilon"] * scores.tasks[task_index], eps_truth["changes"][0], ok
            )
            row["tasks_epsilon"]["relative_error"] = common.relative_error(
                -eps_truth["epsilon"] * scores.tasks[task_index], eps_truth["changes"][0]
            )
        row["scores"] = {"tasks": scores.tasks}
        for level in ("support", "query"):
            if getattr(scores, level) is None:  # a method that scores tasks only
                row[level] = {}
                continue
            pairs = truth[level]["pairs"]
            level_scores = getattr(scores, level)[pairs[:, 0], pairs[:, 1]]
            row[level] = agreement(-level_scores, truth[level]["changes"][0], truth[level]["converged"])
            row["scores"][level] = level_scores
        row["lds"] = evaluation.lds(scores.tasks, truth["lds"]["masks"], truth["lds"]["changes"][0])
        ok = truth["lds"]["converged"]
        row["lds_converged"] = (
            evaluation.lds(scores.tasks, truth["lds"]["masks"][ok], truth["lds"]["changes"][0][ok])
            if ok.sum() > 2
            else None
        )
        row["speedup_tasks"] = truth["tasks"]["seconds_all"] / steady
        per_example = np.mean([truth[lv]["seconds_sample"] / len(truth[lv]["pairs"]) for lv in ("support", "query")])
        row["speedup_examples"] = per_example * n * (m + q) / steady if scores.support is not None else None
        rows[label] = row
        if label == "IF Dense (exact)":
            out["_scores"] = {
                "tasks": scores.tasks,
                **{
                    lv: getattr(scores, lv)[truth[lv]["pairs"][:, 0], truth[lv]["pairs"][:, 1]]
                    for lv in ("support", "query")
                },
            }
        level_sp = lambda level: f"{row[level]['spearman']:.3f}" if row[level] else "–"
        log(
            f"  {label:28s} task sp {row['tasks']['spearman']:.3f} pe {row['tasks']['pearson']:.3f} | "
            f"sup sp {level_sp('support')} | qry sp {level_sp('query')} | LDS {row['lds']:.3f} | "
            f"{steady:.3f}s ({first:.1f}s first)"
        )
    out["ground_truth"] = truth
    out["noise_ceiling"] = ceilings
    out["methods"] = rows
    return out


def table(results: dict) -> str:
    text = ""
    for name, res in results.items():
        s = res["setup"]
        cfg = s["config"]
        text += (
            f"\n### {cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot, {cfg['adapt']} ({name})\n\n"
            f"n = {cfg['n_train']} training tasks, d = {s['d']}, ‖∇F‖ = {fmt(s['grad_norm'])} (after Adam: "
            f"{fmt(s['grad_norm_adam'])}), smallest Hessian eigenvalues {', '.join(fmt(e) for e in s['hessian_min_eigenvalues'][:3])}"
            f" (largest {fmt(s['hessian_max_eigenvalue'])}), test accuracy {fmt(s['test_accuracy'])}.\n"
            f"Ground truth: max final ‖∇F(λ; w)‖ over all retrainings "
            f"{fmt(max(np.max(res['ground_truth'][k]['grad_norms']) for k in ('tasks', 'support', 'query', 'lds')))}"
            + (f"; proximal retraining ρ = {res['proximal']} and solver damping δ = ρ" if res.get("proximal") else "")
            + ".\n\n"
        )
        ceil = res["noise_ceiling"]
        text += (
            "Converged retrainings (‖∇F(λ; w)‖ < tol in both passes): "
            + ", ".join(f"{k} {ceil[k]['n_converged']}/{ceil[k]['n']}" for k in ("tasks", "support", "query", "lds"))
            + ". Correlations below use the converged retrainings only (all retrainings: see the JSON).\n\n"
        )
        c = lambda d, key: d.get(key + "_converged")
        gt = res["ground_truth"]
        tasks_gt = gt["tasks"]
        text += (
            f"Retraining: Newton steps per task removal median {fmt(np.median(tasks_gt['iterations']))}, max "
            f"{fmt(np.max(tasks_gt['iterations']))}; distance moved ‖λ − λ*‖ median {fmt(np.median(tasks_gt['moved'][0]))} "
            f"(max {fmt(np.max(tasks_gt['moved'][0]))}) against the first-order prediction ‖I_λ‖ median "
            f"{fmt(np.median(tasks_gt['predicted_moved']))} (max {fmt(np.max(tasks_gt['predicted_moved']))}); "
            f"50%-subset retrainings moved {fmt(np.median(gt['lds']['moved'][0]))} (median).\n\n"
        )
        eps = gt.get("tasks_epsilon")
        header = [
            "method",
            "task LOO Pearson",
            "task LOO Spearman",
            "task LDS",
            "support LOO Spearman",
            "query LOO Spearman",
            f"task ε={eps['epsilon'] if eps else '–'} Spearman",
            "seconds",
            "× faster than task LOO",
            "× faster than example LOO",
        ]
        rows = [
            [
                "noise ceiling",
                c(ceil["tasks"], "pearson"),
                c(ceil["tasks"], "spearman"),
                c(ceil["lds"], "spearman"),
                c(ceil["support"], "spearman"),
                c(ceil["query"], "spearman"),
                "–",
                "–",
                "–",
                "–",
            ]
        ]
        for label, row in res["methods"].items():
            if "error" in row:
                rows.append([label, "failed", "", "", "", "", "", "", "", ""])
                continue
            rows.append(
                [
                    label,
                    c(row["tasks"], "pearson"),
                    c(row["tasks"], "spearman"),
                    row["lds_converged"],
                    c(row["support"], "spearman"),
                    c(row["query"], "spearman"),
                    c(row["tasks_epsilon"], "spearman") if "tasks_epsilon" in row else None,
                    row["seconds"],
                    row["speedup_tasks"],
                    row["speedup_examples"],
                ]
            )
        text += common.markdown_table(header, rows)
    return text


def figures(results: dict, folder) -> None:
    plt = common.figure()
    for name, res in results.items():
        if "_scores" not in res:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
        truth = res["ground_truth"]
        dense = res["_scores"]
        for ax, level in zip(axes, ("tasks", "support", "query")):
            actual = truth[level]["changes"][0]
            pred = -dense[level] if level != "tasks" else -dense[level][truth["tasks"]["index"]]
            ax.scatter(pred, actual, s=10)
            ax.scatter(pred, truth[level]["changes"][1], s=6, marker="x", alpha=0.6, label="retrain 2 (ceiling)")
            lo, hi = min(pred.min(), actual.min()), max(pred.max(), actual.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.7)
            ax.set_xlabel("predicted change (−influence)")
            ax.set_ylabel("actual change (Newton retraining)")
            ax.set_title(f"{level}: Spearman {metrics.spearman(pred, actual):.3f}", fontsize=9)
        axes[0].legend(fontsize=7)
        cfg = res["setup"]["config"]
        fig.suptitle(
            f"Fidelity, {cfg['dataset']} {cfg['adapt']} (exact IF, Dense) — {res['setup']['device']}", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(folder / f"scatter-{name}.png", dpi=80)
        plt.close(fig)

        labels = [k for k, v in res["methods"].items() if "error" not in v]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [res["methods"][k]["tasks"]["spearman"] for k in labels], 0.4, label="task LOO Spearman")
        ax.bar(x + 0.2, [res["methods"][k]["lds"] for k in labels], 0.4, label="task LDS")
        ax.axhline(res["noise_ceiling"]["tasks"]["spearman"], color="k", ls="--", lw=0.8, label="noise ceiling (LOO)")
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
        ax.set_title(f"{cfg['dataset']} {cfg['adapt']}: fidelity per method — {res['setup']['device']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"methods-{name}.png", dpi=80)
        plt.close(fig)


def main():
    args, base = common.parse("Fidelity of task and instance influence against retraining.", extra)
    folder = common.out_dir(args, "fidelity")
    log = lambda *a: print(*a, flush=True)
    explicit = {f.name for f in dataclasses.fields(base) if getattr(args, f.name) is not None}
    results = {}
    names = [args.config] if args.config != "cpu" else args.variants.split(",")
    for name in names:
        overrides = {k: getattr(base, k) for k in explicit}
        config = dataclasses.replace(CONFIGS[name], **overrides)
        res = run_variant(name, config, args, log)
        results[name] = res
        common.save_json(
            folder / "fidelity.json",
            {k: {kk: vv for kk, vv in v.items() if kk != "_scores"} for k, v in results.items()},
        )
    figures(results, folder)
    (folder / "fidelity.md").write_text(
        f"# Fidelity (command: `{' '.join(['.venv/bin/python'] + sys.argv)}`)\n" + table(results)
    )
    print(table(results))


if __name__ == "__main__":
    main()
