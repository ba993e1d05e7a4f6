"""Experiment 3: detecting corrupted tasks and flipped support labels (metaif.data.corrupt), and
telling which corrupted data actually hurt the meta-validation loss, validated by retraining.

Scores (higher = more suspicious): influence on the meta-validation loss (exact, Dense); negative
self-influence (no validation set; large = memorised / atypical); Direct-IF; TracIn; TRAK; raw
loss; random. Reported: ROC-AUC and fraction-found-vs-fraction-inspected for the corruption mask,
and, against leave-one-out retraining (exact Newton) of every task (or a sample of examples),
ROC-AUC for the data whose removal actually lowers the validation loss.

    .venv/bin/python experiments/detection.py                   # mnist, omniglot (CPU config)
    .venv/bin/python experiments/detection.py --datasets digits --config smoke
"""

from __future__ import annotations

import sys

import common
from common import fmt

import jax.numpy as jnp
import numpy as np

import metaif
from metaif import evaluation
from metaif.evaluation import metrics

import methods

SCORERS = ("IF Dense (exact)", "Direct-IF", "TracIn (grad dot)", "TRAK (k=32)", "raw loss", "random")


def extra(parser):
    parser.add_argument("--datasets", default="mnist,omniglot")
    parser.add_argument("--task-fraction", type=float, default=0.2)
    parser.add_argument("--support-fraction", type=float, default=0.2)
    parser.add_argument(
        "--loo-steps", type=int, default=60, help="most trust-region Newton steps per leave-one-out retraining"
    )
    parser.add_argument("--tol", type=float, default=1e-10, help="retraining stops at this ‖∇F(λ; w)‖")
    parser.add_argument(
        "--proximal",
        type=float,
        default=0.0,
        help="ρ > 0: harm judged by proximal retraining (F + ρ/2‖λ − λ*‖²) and influence with damping δ = ρ",
    )
    parser.add_argument(
        "--example-sample", type=int, default=16, help="flipped and clean support examples retrained each"
    )
    parser.add_argument(
        "--task-sample",
        type=int,
        default=0,
        help="corrupted and clean tasks retrained each (0: leave-one-out of every task)",
    )


def corrupted_setup(config, level, fraction):
    setup = common.build(config)
    tasks, mask = metaif.data.corrupt(setup.train, fraction, level, seed=config.seed + 7, n_classes=config.ways)
    tasks = metaif.TaskSet(
        {**tasks.support, "y": jnp.asarray(tasks.support["y"], jnp.int32)},
        {**tasks.query, "y": jnp.asarray(tasks.query["y"], jnp.int32)},
    )
    return setup._replace(train=tasks), mask


def all_scores(setup, lam, val_loss, level, damping=0.0):
    table = {**methods.influence_methods(damping), **methods.baseline_methods(damping)}
    out = {}
    for label in SCORERS:
        scores, _, seconds = methods.run_timed(table[label], setup, lam, val_loss)
        out[label] = (np.asarray(getattr(scores, level)), seconds)
    own = metaif.self_influence(setup.problem, lam, setup.train)
    out["−self-influence"] = (-np.asarray(getattr(own, level)), None)
    return out


def stratified_sample(mask: np.ndarray, k: int, rng) -> np.ndarray:
    """Indices (np.argwhere rows) of up to k corrupted and k clean data of `mask`, corrupted first."""
    corrupted, clean = np.argwhere(mask), np.argwhere(~mask)
    return np.concatenate(
        [
            corrupted[rng.choice(len(corrupted), min(k, len(corrupted)), replace=False)],
            clean[rng.choice(len(clean), min(k, len(clean)), replace=False)],
        ]
    )


def detect(scores, mask, harmful=None, subset=None) -> dict:
    row = {}
    for label, (s, seconds) in scores.items():
        r = {"roc_auc": metrics.roc_auc(s, mask), "detection_area": metrics.detection_area(s, mask), "seconds": seconds}
        inspected, found = metrics.detection_curve(s, mask)
        r["found_at_40%"] = float(np.interp(0.4, inspected, found))
        if harmful is not None:
            flat = s.ravel() if subset is None else s[tuple(subset.T)]
            if 0 < harmful.sum() < harmful.size:
                r["harm_auc"] = metrics.roc_auc(flat, harmful)
        row[label] = r
    return row


def run(config, args, log) -> dict:
    out = {}
    # ---- corrupted tasks
    setup, mask = corrupted_setup(config, "task", args.task_fraction)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    val_loss = common.mean_loss(setup, setup.val)
    scores = all_scores(setup, lam, val_loss, "tasks", args.proximal)
    sample = (
        stratified_sample(np.asarray(mask), args.task_sample, np.random.default_rng(config.seed + 1))[:, 0]
        if args.task_sample > 0
        else np.arange(setup.train.n_tasks)
    )
    changes, norms = evaluation.leave_one_out(
        setup.problem,
        lam,
        setup.train,
        "tasks",
        sample,
        val_loss,
        steps=args.loo_steps,
        tol=args.tol,
        proximal=args.proximal,
    )
    changes = np.asarray(changes)
    harmful = changes < 0  # removing the task lowers the validation loss
    sample_mask = np.asarray(mask)[sample]
    res = detect(scores, mask, harmful, sample[:, None])
    influence = scores["IF Dense (exact)"][0][sample]
    out["tasks"] = {
        "setup": common.describe_setup(setup, trained),
        "mask": mask,
        "sample": sample,
        "sampled": args.task_sample > 0,
        "tol": args.tol,
        "loo_changes": changes,
        "loo_grad_norms": np.asarray(norms),
        "corrupted_harmful_fraction": float(harmful[sample_mask].mean()),
        "clean_harmful_fraction": float(harmful[~sample_mask].mean()),
        "if_vs_loo_spearman_corrupted": metrics.spearman(-influence[sample_mask], changes[sample_mask])
        if sample_mask.sum() > 2
        else None,
        "if_vs_loo_spearman_all": metrics.spearman(-influence, changes),
        "scores": res,
        "curves": {k: [x.tolist() for x in metrics.detection_curve(v[0], mask)] for k, v in scores.items()},
    }
    log(
        f"  tasks: corrupted harmful {harmful[sample_mask].mean():.2f}, clean harmful {harmful[~sample_mask].mean():.2f}, "
        f"LOO converged {common.converged_count(norms, args.tol)}, max LOO grad {float(np.max(norms)):.1e}"
    )
    for k, v in res.items():
        log(
            f"    {k:22s} AUC {v['roc_auc']:.3f} found@40% {v['found_at_40%']:.2f} harm-AUC {v.get('harm_auc', float('nan')):.3f}"
        )

    # ---- flipped support labels
    setup, mask = corrupted_setup(config, "support", args.support_fraction)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    val_loss = common.mean_loss(setup, setup.val)
    scores = all_scores(setup, lam, val_loss, "support", args.proximal)
    sample = stratified_sample(np.asarray(mask), args.example_sample, np.random.default_rng(config.seed))
    changes, norms = evaluation.leave_one_out(
        setup.problem,
        lam,
        setup.train,
        "support",
        sample,
        val_loss,
        steps=args.loo_steps,
        tol=args.tol,
        proximal=args.proximal,
    )
    changes = np.asarray(changes)
    harmful = changes < 0
    sample_flipped = mask[sample[:, 0], sample[:, 1]]
    res = detect(scores, mask, harmful, sample)
    influence = scores["IF Dense (exact)"][0][sample[:, 0], sample[:, 1]]
    out["support"] = {
        "setup": common.describe_setup(setup, trained),
        "mask": mask,
        "sample": sample,
        "sampled": True,
        "tol": args.tol,
        "loo_changes": changes,
        "loo_grad_norms": np.asarray(norms),
        "flipped_harmful_fraction": float(harmful[sample_flipped].mean()),
        "clean_harmful_fraction": float(harmful[~sample_flipped].mean()),
        "if_vs_loo_spearman_sample": metrics.spearman(-influence, changes),
        "scores": res,
        "curves": {k: [x.tolist() for x in metrics.detection_curve(v[0], mask)] for k, v in scores.items()},
    }
    log(
        f"  support: flipped harmful {harmful[sample_flipped].mean():.2f}, clean harmful {harmful[~sample_flipped].mean():.2f}, "
        f"LOO converged {common.converged_count(norms, args.tol)}, max LOO grad {float(np.max(norms)):.1e}"
    )
    for k, v in res.items():
        log(
            f"    {k:22s} AUC {v['roc_auc']:.3f} found@40% {v['found_at_40%']:.2f} harm-AUC {v.get('harm_auc', float('nan')):.3f}"
        )
    return out


def table(results: dict) -> str:
    text = ""
    for name, res in results.items():
        for level, title in (("tasks", "corrupted tasks (random labels)"), ("support", "flipped support labels")):
            r = res[level]
            s = r["setup"]
            frac = r.get("corrupted_harmful_fraction", r.get("flipped_harmful_fraction"))
            sampled = r.get("sampled", level == "support")
            norms = np.asarray(r["loo_grad_norms"], float)
            text += (
                f"\n### {name}: {title}, {int(np.sum(r['mask']))} of {np.size(r['mask'])} corrupted\n\n"
                f"‖∇F‖ = {fmt(s['grad_norm'])}, test accuracy {fmt(s['test_accuracy'])}. Leave-one-out retraining "
                f"(exact trust-region Newton) of {'a sample of ' if sampled else 'every '}{norms.size} "
                f"{'tasks' if level == 'tasks' else 'support examples'}"
                f"{' (half corrupted, half clean)' if sampled else ''}: "
                f"{common.converged_count(norms, r.get('tol', 1e-10))} converged to ‖∇F(λ; w)‖ ≤ {fmt(r.get('tol', 1e-10))}, "
                f"max {fmt(float(np.max(norms)))}. Removing it lowers the validation loss for "
                f"{fmt(frac)} of the corrupted{' (sampled)' if sampled else ''} and {fmt(r['clean_harmful_fraction'])} "
                f"of the clean ones. Spearman(−IF, LOO change) = "
                f"{fmt(r.get('if_vs_loo_spearman_all', r.get('if_vs_loo_spearman_sample')))}.\n\n"
            )
            header = [
                "score",
                "ROC-AUC (corrupted)",
                "found after inspecting 40%",
                "detection area",
                "ROC-AUC (actually harmful, by retraining)",
                "seconds",
            ]
            rows = [
                [k, v["roc_auc"], v["found_at_40%"], v["detection_area"], v.get("harm_auc"), v["seconds"]]
                for k, v in r["scores"].items()
            ]
            text += common.markdown_table(header, rows)
    return text


def figure(results: dict, folder) -> None:
    plt = common.figure()
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 4 * len(results)), squeeze=False)
    for row, (name, res) in zip(axes, results.items()):
        for ax, level in zip(row, ("tasks", "support")):
            for label, (x, y) in res[level]["curves"].items():
                ax.plot(x, y, label=label, lw=1)
            ax.plot([0, 1], [0, 1], "k:", lw=0.7)
            ax.set_xlabel("fraction inspected")
            ax.set_ylabel("fraction of corrupted found")
            ax.set_title(f"{name}: {level}", fontsize=9)
            ax.legend(fontsize=6)
    fig.suptitle(f"Detection of corrupted data — {common.device_caption()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "detection.png", dpi=80)
    plt.close(fig)


def main():
    args, base = common.parse("Detection of corrupted tasks and flipped labels.", extra)
    folder = common.out_dir(args, "detection")
    log = lambda *a: print(*a, flush=True)
    results = common.run_datasets(args, base, run, write, folder, "detection", log)
    print(table(results))


def write(results: dict, folder) -> None:
    """The markdown table and the figure of the datasets done so far."""
    (folder / "detection.md").write_text(
        f"# Detection (command: `{' '.join(['.venv/bin/python'] + sys.argv)}`)\n" + table(results)
    )
    figure(results, folder)


if __name__ == "__main__":
    main()
