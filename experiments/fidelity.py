"""Experiment 1 (fidelity): do influence scores predict actual retraining, on Omniglot 5-way 1-shot?

For MAML (Unrolled) and iMAML (Proximal):
1. meta-train to a stationary point (Adam, then exact Newton) and report ‖∇F‖ and the smallest
   eigenvalues of the total Hessian;
2. ground truth by exact (safeguarded) Newton retraining warm-started at λ*
   (`metaif.evaluation.retrain`): leave-one-task-out on every training task, leave-one-example-out
   on a random sample of support and query examples, and retraining on random 50% task subsets
   (LDS). Every retraining is repeated from a perturbed start (a different seed), the noise
   ceiling; every retraining's final ‖∇F(λ; w)‖ is saved;
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
import numpy as np

import metaif
from metaif import evaluation
from metaif.evaluation import metrics

import methods


def extra(parser):
    parser.add_argument("--variants", default="cpu,cpu-imaml", help="comma-separated CONFIGS names to run")
    parser.add_argument("--gt-steps", type=int, default=14, help="Newton steps per retraining")
    parser.add_argument("--task-sample", type=int, default=0, help="leave-one-task-out on this many random tasks (0: all)")
    parser.add_argument("--instance-sample", type=int, default=20, help="support and query examples removed one at a time")
    parser.add_argument("--lds-subsets", type=int, default=20)
    parser.add_argument("--proximal", type=float, default=0.0,
                        help="ρ > 0: proximal ground truth (F + ρ/2‖λ − λ*‖²) and solver damping δ = ρ; the noise-ceiling pass then "
                             "varies the stopping point (steps + 4) instead of the start, which would move the proximal centre")
    parser.add_argument("--tol", type=float, default=1e-8, help="a retraining counts as converged below this ‖∇F(λ; w)‖")
    parser.add_argument("--perturb", type=float, default=1e-3, help="relative size of the noise-ceiling start perturbation")


def perturbed(meta_params, relative: float, seed: int):
    flat, unravel = jax.flatten_util.ravel_pytree(meta_params)
    direction = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
    return unravel(flat + relative * np.linalg.norm(flat) * direction / np.linalg.norm(direction))


def retrain_twice(setup, lam, weights, target, steps, relative, proximal=0.0):
    """Target changes of retrainings from λ* and from a perturbed start (same weights), their
    final gradient norms and the steady-state seconds of the second pass. With `proximal` > 0 both
    passes start at λ* (the proximal centre) and the second takes 4 more Newton steps."""
    problem, tasks = setup.problem, setup.train
    base = float(target(lam))
    first = jax.block_until_ready(evaluation.retrain(problem, lam, tasks, weights, steps=steps, batch_size=8, proximal=proximal))
    start = time.perf_counter()
    if proximal > 0:
        second = evaluation.retrain(problem, lam, tasks, weights, steps=steps + 4, batch_size=8, proximal=proximal)
    else:
        second = evaluation.retrain(problem, perturbed(lam, relative, 1), tasks, weights, steps=steps, batch_size=8)
    jax.block_until_ready(second)
    seconds = time.perf_counter() - start
    changes = np.stack([np.asarray(evaluation.target_values(target, r)) - base for r in (first, second)])
    norms = np.stack([np.asarray(r.grad_norm) for r in (first, second)])
    return changes, norms, seconds


def agreement(predicted, actual, ok) -> dict:
    """Correlations over all retrainings and over those converged in both passes (`ok`)."""
    out = {"pearson": metrics.pearson(predicted, actual), "spearman": metrics.spearman(predicted, actual)}
    if 2 < ok.sum() < ok.size:
        out.update(pearson_converged=metrics.pearson(predicted[ok], actual[ok]),
                   spearman_converged=metrics.spearman(predicted[ok], actual[ok]))
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
    t0 = time.perf_counter()
    task_index = np.arange(n) if not args.task_sample else np.sort(rng.choice(n, min(args.task_sample, n), replace=False))
    w = evaluation.removal_weights(n, m, q, "tasks", task_index)
    changes, norms, seconds = retrain_twice(setup, lam, w, target, args.gt_steps, args.perturb, args.proximal)
    truth["tasks"] = {"index": task_index, "changes": changes, "grad_norms": norms,
                      "seconds_all": seconds * n / task_index.size}
    log(f"  task LOO: {time.perf_counter() - t0:.0f}s, max grad norm {norms.max():.2e}, |change| median {np.median(np.abs(changes[0])):.2e}")
    sample = {}
    for level, k in (("support", m), ("query", q)):
        flat = rng.choice(n * k, size=min(args.instance_sample, n * k), replace=False)
        pairs = np.stack(np.unravel_index(flat, (n, k)), 1)
        sample[level] = pairs
        t0 = time.perf_counter()
        w = evaluation.removal_weights(n, m, q, level, pairs)
        changes, norms, seconds = retrain_twice(setup, lam, w, target, args.gt_steps, args.perturb, args.proximal)
        truth[level] = {"pairs": pairs, "changes": changes, "grad_norms": norms, "seconds_sample": seconds}
        log(f"  {level} LOO ({len(pairs)}): {time.perf_counter() - t0:.0f}s, max grad norm {norms.max():.2e}, "
            f"|change| median {np.median(np.abs(changes[0])):.2e}")
    t0 = time.perf_counter()
    w, masks = evaluation.subset_weights(n, m, q, "tasks", 0.5, count=args.lds_subsets, seed=config.seed)
    changes, norms, seconds = retrain_twice(setup, lam, w, target, args.gt_steps + 6, args.perturb, args.proximal)
    truth["lds"] = {"masks": masks, "changes": changes, "grad_norms": norms}
    log(f"  LDS subsets: {time.perf_counter() - t0:.0f}s, max grad norm {norms.max():.2e}")
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
        row["scores"] = {"tasks": scores.tasks}
        for level in ("support", "query"):
            pairs = truth[level]["pairs"]
            level_scores = getattr(scores, level)[pairs[:, 0], pairs[:, 1]]
            row[level] = agreement(-level_scores, truth[level]["changes"][0], truth[level]["converged"])
            row["scores"][level] = level_scores
        row["lds"] = evaluation.lds(scores.tasks, truth["lds"]["masks"], truth["lds"]["changes"][0])
        ok = truth["lds"]["converged"]
        row["lds_converged"] = evaluation.lds(scores.tasks, truth["lds"]["masks"][ok], truth["lds"]["changes"][0][ok]) if ok.sum() > 2 else None
        row["speedup_tasks"] = truth["tasks"]["seconds_all"] / steady
        per_example = np.mean([truth[lv]["seconds_sample"] / len(truth[lv]["pairs"]) for lv in ("support", "query")])
        row["speedup_examples"] = per_example * n * (m + q) / steady
        rows[label] = row
        if label == "IF Dense (exact)":
            out["_scores"] = {"tasks": scores.tasks, **{lv: getattr(scores, lv)[truth[lv]["pairs"][:, 0], truth[lv]["pairs"][:, 1]]
                                                       for lv in ("support", "query")}}
        log(f"  {label:28s} task sp {row['tasks']['spearman']:.3f} pe {row['tasks']['pearson']:.3f} | "
            f"sup sp {row['support']['spearman']:.3f} | qry sp {row['query']['spearman']:.3f} | LDS {row['lds']:.3f} | "
            f"{steady:.3f}s ({first:.1f}s first)")
    out["ground_truth"] = truth
    out["noise_ceiling"] = ceilings
    out["methods"] = rows
    return out


def table(results: dict) -> str:
    text = ""
    for name, res in results.items():
        s = res["setup"]
        cfg = s["config"]
        text += (f"\n### {cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot, {cfg['adapt']} ({name})\n\n"
                 f"n = {cfg['n_train']} training tasks, d = {s['d']}, ‖∇F‖ = {fmt(s['grad_norm'])} (after Adam: "
                 f"{fmt(s['grad_norm_adam'])}), smallest Hessian eigenvalues {', '.join(fmt(e) for e in s['hessian_min_eigenvalues'][:3])}"
                 f" (largest {fmt(s['hessian_max_eigenvalue'])}), test accuracy {fmt(s['test_accuracy'])}.\n"
                 f"Ground truth: max final ‖∇F(λ; w)‖ over all retrainings "
                 f"{fmt(max(np.max(res['ground_truth'][k]['grad_norms']) for k in ('tasks', 'support', 'query', 'lds')))}"
                 + (f"; proximal retraining ρ = {res['proximal']} and solver damping δ = ρ" if res.get("proximal") else "") + ".\n\n")
        ceil = res["noise_ceiling"]
        text += ("Converged retrainings (‖∇F(λ; w)‖ < tol in both passes): "
                 + ", ".join(f"{k} {ceil[k]['n_converged']}/{ceil[k]['n']}" for k in ("tasks", "support", "query", "lds"))
                 + ". Correlations below use the converged retrainings only (all retrainings: see the JSON).\n\n")
        c = lambda d, key: d.get(key + "_converged")
        header = ["method", "task LOO Pearson", "task LOO Spearman", "task LDS", "support LOO Spearman",
                  "query LOO Spearman", "seconds", "× faster than task LOO", "× faster than example LOO"]
        rows = [["noise ceiling", c(ceil["tasks"], "pearson"), c(ceil["tasks"], "spearman"), c(ceil["lds"], "spearman"),
                 c(ceil["support"], "spearman"), c(ceil["query"], "spearman"), "–", "–", "–"]]
        for label, row in res["methods"].items():
            if "error" in row:
                rows.append([label, "failed", "", "", "", "", "", "", ""])
                continue
            rows.append([label, c(row["tasks"], "pearson"), c(row["tasks"], "spearman"), row["lds_converged"],
                         c(row["support"], "spearman"), c(row["query"], "spearman"), row["seconds"], row["speedup_tasks"],
                         row["speedup_examples"]])
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
        fig.suptitle(f"Fidelity, {cfg['dataset']} {cfg['adapt']} (exact IF, Dense) — {res['setup']['device']}", fontsize=9)
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
        common.save_json(folder / "fidelity.json", {k: {kk: vv for kk, vv in v.items() if kk != "_scores"} for k, v in results.items()})
    figures(results, folder)
    (folder / "fidelity.md").write_text(f"# Fidelity (command: `{' '.join(['.venv/bin/python'] + sys.argv)}`)\n" + table(results))
    print(table(results))


if __name__ == "__main__":
    main()
