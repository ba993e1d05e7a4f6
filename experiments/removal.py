"""Experiment 2 (the paper's table): remove the 40% most harmful training data, by each method's
ranking, then compare test accuracy after retraining with test accuracy after an edit without
retraining (λ* − Σ I_λ of the removed data, optionally + 2 Newton steps) and after the
gradient-ascent unlearning baseline. Runtimes in the same run.

Harm is judged on the meta-validation loss (held-out val tasks); accuracy and loss are measured
on separate held-out test tasks. "LOO oracle" ranks tasks by their actual leave-one-out change of
the validation loss (exact Newton retraining of every task), the paper's "retrain" row.

    .venv/bin/python experiments/removal.py                       # omniglot, mnist, digits (CPU)
    .venv/bin/python experiments/removal.py --datasets digits --config smoke
"""

from __future__ import annotations

import sys
import time

import common
from common import fmt

import jax
import numpy as np

import metaif
from metaif import evaluation

import methods

RANKERS = (
    "IF Dense (exact)",
    "IF CG",
    "Direct-IF",
    "single-level IF",
    "TracIn (grad dot)",
    "TRAK (k=32)",
    "raw loss",
    "random",
)


def extra(parser):
    parser.add_argument("--datasets", default="omniglot,mnist,digits")
    parser.add_argument("--fraction", type=float, default=0.4)
    parser.add_argument("--retrain-steps", type=int, default=80, help="most trust-region Newton steps per retraining")
    parser.add_argument("--loo-steps", type=int, default=60, help="most Newton steps per leave-one-out retraining")
    parser.add_argument("--tol", type=float, default=1e-10, help="retraining stops at this ‖∇F(λ; w)‖")
    parser.add_argument(
        "--proximal",
        type=float,
        default=0.0,
        help="ρ > 0: proximal retraining (F + ρ/2‖λ − λ*‖²) and influence with damping δ = ρ for rankings and edits",
    )
    parser.add_argument("--no-oracle", action="store_true", help="skip the leave-one-out oracle ranking (large n)")


def top_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    flat = np.asarray(scores).ravel()
    k = int(round(fraction * flat.size))
    mask = np.zeros(flat.size, bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(np.shape(scores))


def evaluate(setup, lam, test_loss, val_loss) -> dict:
    """Test accuracy and loss, and the validation loss that the rankings target."""
    return {
        "test_accuracy": common.accuracy(setup, lam),
        "test_loss": float(test_loss(lam)),
        "val_loss": float(val_loss(lam)),
    }


def edit_gaps(row: dict, base: dict) -> None:
    """Add to `row` each edit's accuracy gap to retraining (points) and its recovery of the
    retrained test-loss change (Δ edited / Δ retrained), for the plain edit and edit+2 Newton."""
    d_retrain = row["retrained"]["test_loss"] - base["test_loss"]
    for key, name in (("edit", "edited"), ("edit2", "edited+2 Newton")):
        d_edit = row[name]["test_loss"] - base["test_loss"]
        row[f"{key}_recovery"] = d_edit / d_retrain if d_retrain != 0 else float("nan")
        row[f"{key}_gap_points"] = 100 * (row[name]["test_accuracy"] - row["retrained"]["test_accuracy"])


def retrain_removal(
    problem, start, tasks, removed, *, steps: int, tol: float, proximal: float = 0.0, center=None
) -> evaluation.Retrained:
    """One exact retraining with `removed` taken out, warm-started at `start` (proximal toward
    `center`, default `start`, when proximal > 0); unbatched `Retrained`."""
    weights = evaluation.remaining_weights(tasks, removed)
    result = evaluation.retrain(
        problem,
        start,
        tasks,
        metaif.Weights(*(w[None] for w in weights)),
        steps=steps,
        tol=tol,
        chunk_size=None,
        proximal=proximal,
        center=center,
    )
    return jax.block_until_ready(jax.tree.map(lambda x: x[0], result))


def heading(name: str, setup: dict) -> str:
    """The markdown heading of one dataset's results."""
    c = setup["config"]
    return (
        f"\n### {name}: {c['ways']}-way {c['shots']}-shot {c['adapt']}, n = {c['n_train']}, d = {setup['d']}, "
        f"‖∇F‖ = {fmt(setup['grad_norm'])}\n\n"
    )


def run_dataset(config, args, log) -> dict:
    setup = common.build(config)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    problem, tasks = setup.problem, setup.train
    n = tasks.n_tasks
    val_loss, test_loss = common.mean_loss(setup, setup.val), common.mean_loss(setup, setup.test)
    base = evaluate(setup, lam, test_loss, val_loss)
    out = {
        "setup": common.describe_setup(setup, trained),
        "base": base,
        "rows": [],
        "proximal": args.proximal,
        "tol": args.tol,
    }
    log(f"  base: {base}")

    # I_λ of every datum (for edits), timed
    solver = metaif.solvers.Dense(damping=args.proximal)
    params_if, first, steady = methods.run_timed(
        lambda s, l, f: metaif.influence(s.problem, l, s.train, solver=solver), setup, lam, None
    )
    out["influence_params_seconds"] = steady

    # LOO oracle and the cost of retraining every task (steady state of the second pass)
    start = time.perf_counter()
    if args.no_oracle:
        changes, norms = np.full(n, np.nan), np.full(n, np.nan)
    else:
        changes, norms = jax.block_until_ready(
            evaluation.leave_one_out(
                problem, lam, tasks, "tasks", None, val_loss, steps=args.loo_steps, tol=args.tol, proximal=args.proximal
            )
        )
    loo_first = time.perf_counter() - start
    start = time.perf_counter()
    _, timing_norms = jax.block_until_ready(
        evaluation.leave_one_out(
            problem,
            lam,
            tasks,
            "tasks",
            np.arange(8),
            val_loss,
            steps=args.loo_steps,
            tol=args.tol,
            proximal=args.proximal,
        )
    )
    loo_all = (time.perf_counter() - start) * n / 8
    out["loo"] = {
        "changes": changes,
        "grad_norms": norms,
        "seconds_all": loo_all,
        "seconds_first": loo_first,
        "oracle": not args.no_oracle,
        "timing_grad_norms": np.asarray(timing_norms),
    }
    log(
        f"  LOO oracle: {'not run' if args.no_oracle else f'{loo_first:.0f}s, max grad norm {float(np.max(norms)):.2e}'}, "
        f"all-task LOO steady ≈ {loo_all:.1f}s (from 8 retrainings, max grad norm {float(np.max(timing_norms)):.2e})"
    )

    rankings = {} if args.no_oracle else {"LOO oracle": (methods.Scores(-np.asarray(changes), None, None, {}), loo_all)}
    all_methods = {**methods.influence_methods(args.proximal), **methods.baseline_methods(args.proximal)}
    for label in RANKERS:
        scores, _, seconds = methods.run_timed(all_methods[label], setup, lam, val_loss)
        rankings[label] = (scores, seconds)

    for level in ("tasks", "support", "query"):
        for label, (scores, seconds) in rankings.items():
            level_scores = getattr(scores, level)
            if level_scores is None:
                continue
            removed = {level: top_mask(level_scores, args.fraction)}
            start = time.perf_counter()
            retrained = retrain_removal(
                problem, lam, tasks, removed, steps=args.retrain_steps, tol=args.tol, proximal=args.proximal
            )
            retrain_seconds = time.perf_counter() - start
            lam_r = retrained.meta_params
            edited = evaluation.edit(lam, params_if, removed, problem=problem, tasks=tasks, proximal=args.proximal)
            polished = evaluation.edit(
                lam, params_if, removed, problem=problem, tasks=tasks, steps=2, proximal=args.proximal
            )
            unlearned = evaluation.unlearn(problem, lam, tasks, removed, steps=5, lr=0.5)
            row = {
                "level": level,
                "method": label,
                "score_seconds": seconds,
                "retrain_seconds": retrain_seconds,
                "retrain_grad_norm": float(retrained.grad_norm),
                "retrain_iterations": int(retrained.iterations),
                "retrain_moved": float(np.linalg.norm(common.flat(lam_r) - common.flat(lam))),
                "edit_grad_norm": float(edited.grad_norm),
                "retrained": evaluate(setup, lam_r, test_loss, val_loss),
                "edited": evaluate(setup, edited.meta_params, test_loss, val_loss),
                "edited+2 Newton": evaluate(setup, polished.meta_params, test_loss, val_loss),
                "unlearned": evaluate(setup, unlearned.meta_params, test_loss, val_loss),
            }
            edit_gaps(row, base)
            row["speedup_vs_loo_all"] = loo_all / seconds if label != "LOO oracle" else 1.0
            out["rows"].append(row)
            log(
                f"  {level:7s} {label:20s} retrain acc {row['retrained']['test_accuracy']:.4f} (grad {row['retrain_grad_norm']:.1e}) | "
                f"edit {row['edited']['test_accuracy']:.4f} | edit+2 {row['edited+2 Newton']['test_accuracy']:.4f} | "
                f"unlearn {row['unlearned']['test_accuracy']:.4f} | recovery {row['edit_recovery']:.2f} (+2 Newton "
                f"{row['edit2_recovery']:.2f}) | {seconds:.3f}s"
            )
    return out


def table(results: dict) -> str:
    text = ""
    for name, res in results.items():
        s, b, loo = res["setup"], res["base"], res["loo"]
        tol = res.get("tol", 1e-10)
        loo_all = loo.get("seconds_all_corrected", loo["seconds_all"])
        kind = f"exact trust-region Newton{', proximal ρ = ' + str(res['proximal']) if res.get('proximal') else ''}"
        if loo.get("oracle", True):
            oracle = f"LOO oracle: {common.converged_count(loo['grad_norms'], tol)} task retrainings converged to ‖∇F‖ ≤ {fmt(tol)}"
        else:
            oracle = "LOO oracle not run (--no-oracle)"
        timing = (
            f", timed on 8 task retrainings, {common.converged_count(loo['timing_grad_norms'], tol)} converged"
            if "timing_grad_norms" in loo
            else ""
        )
        removal_norms = [
            r["retrain_grad_norm"] for r in res["rows"] if r["method"] != "LOO oracle" or loo.get("oracle", True)
        ]
        text += (
            heading(name, s)
            + f"Before removal: test accuracy {fmt(b['test_accuracy'], 4)}, test loss {fmt(b['test_loss'], 4)}"
            f"{', validation loss ' + fmt(b['val_loss'], 4) if 'val_loss' in b else ''}. "
            f"All-task LOO retraining ≈ {fmt(loo_all, 1)} s ({kind}{timing}); {oracle}. "
            f"Removal retrainings converged to ‖∇F‖ ≤ {fmt(tol)}: {common.converged_count(removal_norms, tol)}. "
            f"I_λ of every datum {fmt(res['influence_params_seconds'])} s.\n\n"
        )
        header = [
            "level",
            "ranking",
            "acc retrained",
            "retrained ‖∇F‖",
            "retrained ‖λ − λ*‖",
            "acc edited",
            "acc edited+2 Newton",
            "acc unlearned",
            "edit − retrain (points)",
            "edit+2 Newton − retrain (points)",
            "Δ test loss retrained",
            "Δ test loss edited",
            "Δ test loss edited+2 Newton",
            "edit recovery of Δ test loss",
            "edit+2 Newton recovery of Δ test loss",
            "Δ val loss retrained",
            "Δ val loss edited",
            "Δ val loss edited+2 Newton",
            "score s",
            "× faster than all-task LOO",
        ]
        rows = []
        for r in res["rows"]:
            rows.append(
                [
                    r["level"],
                    r["method"],
                    r["retrained"]["test_accuracy"],
                    r["retrain_grad_norm"],
                    r.get("retrain_moved"),
                    r["edited"]["test_accuracy"],
                    r["edited+2 Newton"]["test_accuracy"],
                    r["unlearned"]["test_accuracy"],
                    r["edit_gap_points"],
                    r["edit2_gap_points"],
                    *(r[k]["test_loss"] - b["test_loss"] for k in ("retrained", "edited", "edited+2 Newton")),
                    r["edit_recovery"],
                    r["edit2_recovery"],
                    *(
                        r[k]["val_loss"] - b["val_loss"] if "val_loss" in b else None
                        for k in ("retrained", "edited", "edited+2 Newton")
                    ),
                    r["score_seconds"] if r["method"] != "LOO oracle" else loo_all,
                    loo_all / r["score_seconds"] if r["method"] != "LOO oracle" else 1.0,
                ]
            )
        text += common.markdown_table(header, rows)
    return text


def figure(results: dict, folder) -> None:
    plt = common.figure()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        rows = [r for r in res["rows"] if r["level"] == "tasks"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["retrained"]["test_accuracy"] for r in rows], 0.4, label="retrained")
        ax.bar(x + 0.2, [r["edited"]["test_accuracy"] for r in rows], 0.4, label="edited (no retraining)")
        ax.axhline(res["base"]["test_accuracy"], color="k", ls="--", lw=0.8, label="all tasks")
        ax.set_xticks(x, [r["method"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: remove 40% most harmful tasks", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Test accuracy after removal — {common.device_caption()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "removal.png", dpi=80)
    plt.close(fig)


def main():
    args, base = common.parse("Removal and editing: the paper's table.", extra)
    folder = common.out_dir(args, "removal")
    log = lambda *a: print(*a, flush=True)
    results = common.run_datasets(args, base, run_dataset, write, folder, "removal", log)
    print(table(results))


def write(results: dict, folder) -> None:
    """The markdown table and the figure of the datasets done so far."""
    (folder / "removal.md").write_text(
        f"# Removal and editing (command: `{' '.join(['.venv/bin/python'] + sys.argv)}`)\n" + table(results)
    )
    figure(results, folder)


if __name__ == "__main__":
    main()
