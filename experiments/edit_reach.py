"""Experiment 2b (what limits editing): how much of a removal a first-order edit can follow.

For the removal of the top f of training tasks by exact task-IF on the validation loss (f = 5% …
40%, the ranking of experiments/removal.py), compare exact retraining (warm-started trust-region
Newton to ‖∇F‖ ≤ tol) with the edit λ* − Σ I_λ and the edit + 2 Newton steps, and report
`metaif.evaluation.removal_reach` t*: the share of the removal after which λ* stops being a
minimum of the reduced objective.

Then trace the minimiser path λ(t) of the largest removal: the removed tasks keep weight 1 − t,
t = 0 … 1, each point retrained warm-started from the previous one (continuation), next to the
edit's straight line λ* + t·Δ_edit. A jump of λ(t) is a fold: the branch of minima through λ*
ends and retraining falls into another basin, which no local prediction from λ* can follow.

    .venv/bin/python experiments/edit_reach.py                    # omniglot, mnist (CPU)
    .venv/bin/python experiments/edit_reach.py --datasets digits --config smoke
"""

from __future__ import annotations

import sys

import common
from common import fmt

import jax
import numpy as np

import metaif
from metaif import evaluation

import methods
from removal import edit_gaps, evaluate, heading, retrain_removal, top_mask


def extra(parser):
    parser.add_argument("--datasets", default="omniglot,mnist")
    parser.add_argument("--fractions", default="0.05,0.1,0.2,0.3,0.4", help="shares of tasks removed (IF ranking)")
    parser.add_argument(
        "--path-points", type=int, default=21, help="points t = 0 … 1 on the minimiser path of the largest removal"
    )
    parser.add_argument("--steps", type=int, default=80, help="most trust-region Newton steps per retraining")
    parser.add_argument("--tol", type=float, default=1e-10, help="retraining stops at this ‖∇F(λ; w)‖")
    parser.add_argument(
        "--jump", type=float, default=4.0, help="a path step this many times the median step is a jump (fold)"
    )
    parser.add_argument(
        "--proximal",
        type=float,
        default=0.0,
        help="ρ > 0: proximal ground truth (F + ρ/2‖λ − λ*‖²) with influence, edits and reach damped by δ = ρ",
    )


def retrain_one(problem, start, tasks, removed, args, center):
    """Exact retraining from `start` (proximal toward `center` with --proximal): (λ, ‖∇‖, steps)."""
    result = retrain_removal(
        problem, start, tasks, removed, steps=args.steps, tol=args.tol, proximal=args.proximal, center=center
    )
    return result.meta_params, float(result.grad_norm), int(result.iterations)


def run_dataset(config, args, log) -> dict:
    setup = common.build(config)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    problem, tasks = setup.problem, setup.train
    val_loss, test_loss = common.mean_loss(setup, setup.val), common.mean_loss(setup, setup.test)
    base = evaluate(setup, lam, test_loss, val_loss)
    rho = args.proximal
    params_if = metaif.influence(problem, lam, tasks, solver=metaif.solvers.Dense(damping=rho))
    ranking = methods.influence_methods(rho)["IF Dense (exact)"](setup, lam, val_loss).tasks
    x0 = common.flat(lam)
    out = {
        "setup": common.describe_setup(setup, trained),
        "base": base,
        "tol": args.tol,
        "proximal": rho,
        "fractions": [],
    }

    for fraction in (float(f) for f in args.fractions.split(",")):
        removed = {"tasks": top_mask(ranking, fraction)}
        reach = evaluation.removal_reach(problem, lam, tasks, removed, damping=rho)
        lam_r, grad_norm, iterations = retrain_one(problem, lam, tasks, removed, args, lam)
        edited = evaluation.edit(lam, params_if, removed, problem=problem, tasks=tasks, proximal=rho)
        polished = evaluation.edit(lam, params_if, removed, problem=problem, tasks=tasks, steps=2, proximal=rho)
        row = {
            "fraction": fraction,
            "removed": int(removed["tasks"].sum()),
            "reach": float(reach.reach),
            "reduced_min_eigenvalue": float(reach.reduced_min_eigenvalue),
            "retrain_grad_norm": grad_norm,
            "retrain_iterations": iterations,
            "retrained_moved": float(np.linalg.norm(common.flat(lam_r) - x0)),
            "edit_moved": float(np.linalg.norm(common.flat(edited.meta_params) - x0)),
            "edit_relative_error": common.relative_error(common.flat(edited.meta_params) - x0, common.flat(lam_r) - x0),
            "retrained": evaluate(setup, lam_r, test_loss, val_loss),
            "edited": evaluate(setup, edited.meta_params, test_loss, val_loss),
            "edited+2 Newton": evaluate(setup, polished.meta_params, test_loss, val_loss),
        }
        edit_gaps(row, base)
        out["fractions"].append(row)
        largest_removal = (removed["tasks"], lam_r, common.flat(edited.meta_params) - x0)  # the last (largest) fraction
        log(
            f"  f = {fraction:.2f}: reach t* {row['reach']:.3f}, retrained moved {row['retrained_moved']:.3f} "
            f"(grad {grad_norm:.1e}, {iterations} steps), edit error {row['edit_relative_error']:.3f}, "
            f"gap {row['edit_gap_points']:+.2f} points (+2 Newton {row['edit2_gap_points']:+.2f}), "
            f"recovery {row['edit_recovery']:.2f} (+2 Newton {row['edit2_recovery']:.2f})"
        )

    # the minimiser path of the largest removal, by continuation
    largest = out["fractions"][-1]
    mask, direct_lam, direction = largest_removal
    unravel = jax.flatten_util.ravel_pytree(lam)[1]
    path, current, previous = [], lam, x0
    for t in np.linspace(0.0, 1.0, args.path_points):
        removed = {"tasks": t * mask.astype(float)}
        current, grad_norm, iterations = retrain_one(problem, current, tasks, removed, args, lam)
        x = common.flat(current)
        line = unravel(x0 + t * direction)
        path.append(
            {
                "t": float(t),
                "moved": float(np.linalg.norm(x - x0)),
                "step": float(np.linalg.norm(x - previous)),
                "grad_norm": grad_norm,
                "iterations": iterations,
                "min_eigenvalue": float(
                    evaluation.removal_reach(problem, current, tasks, removed, damping=rho).reduced_min_eigenvalue
                ),
                "edit_line_error": float(np.linalg.norm(x0 + t * direction - x)),
                "test_accuracy": common.accuracy(setup, current),
                "edit_line_test_accuracy": common.accuracy(setup, line),
                "val_loss": float(val_loss(current)),
            }
        )
        previous = x
        log(
            f"  path t = {t:.2f}: moved {path[-1]['moved']:.3f}, step {path[-1]['step']:.3f}, "
            f"min eig {path[-1]['min_eigenvalue']:.2e}, grad {grad_norm:.1e}"
        )
    steps = np.array([p["step"] for p in path[1:]])
    jumps = [path[i + 1]["t"] for i in np.flatnonzero(steps > args.jump * np.median(steps))]
    # two exact retrainings of the same removal: direct (from λ*) and along the path
    end = evaluate(setup, current, test_loss, val_loss)
    direct = largest["retrained"]
    out["path"] = {
        "fraction": largest["fraction"],
        "reach": largest["reach"],
        "points": path,
        "jumps": jumps,
        "end": end,
        "end_to_direct": float(np.linalg.norm(common.flat(current) - common.flat(direct_lam))),
        "end_minus_direct_points": 100 * (end["test_accuracy"] - direct["test_accuracy"]),
        "end_minus_direct_test_loss": end["test_loss"] - direct["test_loss"],
    }
    log(
        f"  path jumps at t = {jumps}; reach from λ* t* = {largest['reach']:.3f}; path end vs direct retraining: "
        f"‖Δλ‖ {out['path']['end_to_direct']:.3f}, {out['path']['end_minus_direct_points']:+.2f} points"
    )
    return out


def table(results: dict) -> str:
    text = ""
    for name, res in results.items():
        s, b, tol = res["setup"], res["base"], res["tol"]
        rows = res["fractions"]
        text += (
            heading(name, s)
            + f"Before removal: test accuracy {fmt(b['test_accuracy'], 4)}, test loss {fmt(b['test_loss'], 4)}. "
            f"Tasks ranked by exact task-IF on the validation loss. Ground truth: exact retraining"
            f"{', proximal ρ = ' + fmt(res['proximal']) + ' (influence, edits and reach damped by δ = ρ)' if res.get('proximal') else ''}. "
            f"Retrainings converged to ‖∇F‖ ≤ {fmt(tol)}: "
            f"{common.converged_count([r['retrain_grad_norm'] for r in rows], tol)}.\n\n"
        )
        header = [
            "removed share",
            "tasks removed",
            "reach t* (from λ*)",
            "min eig H(λ*; removed)",
            "‖λ_retrained − λ*‖",
            "‖λ_edit − λ*‖",
            "edit relative error",
            "acc retrained",
            "acc edited",
            "edit − retrain (points)",
            "edit+2 Newton − retrain (points)",
            "Δ test loss retrained",
            "edit recovery",
            "edit+2 Newton recovery",
        ]
        text += common.markdown_table(
            header,
            [
                [
                    r["fraction"],
                    r["removed"],
                    r["reach"],
                    r["reduced_min_eigenvalue"],
                    r["retrained_moved"],
                    r["edit_moved"],
                    r["edit_relative_error"],
                    r["retrained"]["test_accuracy"],
                    r["edited"]["test_accuracy"],
                    r["edit_gap_points"],
                    r["edit2_gap_points"],
                    r["retrained"]["test_loss"] - b["test_loss"],
                    r["edit_recovery"],
                    r["edit2_recovery"],
                ]
                for r in rows
            ],
        )
        p = res["path"]
        text += (
            f"\nMinimiser path of the {fmt(p['fraction'], 2)} removal (weights 1 − t, continuation retraining; "
            f"{common.converged_count([q['grad_norm'] for q in p['points']], tol)} points converged): jumps at t = "
            f"{', '.join(fmt(t, 2) for t in p['jumps']) or 'none'}; reach from λ* t* = {fmt(p['reach'])}. "
            f"Its end and the direct retraining from λ* are two exact retrainings of the same removal: "
            f"‖Δλ‖ = {fmt(p['end_to_direct'])}, accuracy {fmt(p['end_minus_direct_points'], 2)} points, "
            f"test loss {fmt(p['end_minus_direct_test_loss'], 4)} apart.\n\n"
        )
        header = [
            "t",
            "‖λ(t) − λ*‖",
            "step",
            "min eig H(λ(t); 1 − t)",
            "‖λ* + tΔ_edit − λ(t)‖",
            "acc λ(t)",
            "acc λ* + tΔ_edit",
            "val loss λ(t)",
        ]
        text += common.markdown_table(
            header,
            [
                [
                    q["t"],
                    q["moved"],
                    q["step"],
                    q["min_eigenvalue"],
                    q["edit_line_error"],
                    q["test_accuracy"],
                    q["edit_line_test_accuracy"],
                    q["val_loss"],
                ]
                for q in p["points"]
            ],
        )
    return text


def figure(results: dict, folder) -> None:
    plt = common.figure()
    fig, axes = plt.subplots(3, len(results), figsize=(5 * len(results), 9), squeeze=False)
    for column, (name, res) in enumerate(results.items()):
        p = res["path"]
        t = [q["t"] for q in p["points"]]
        top, middle, bottom = axes[:, column]
        top.plot(t, [q["moved"] for q in p["points"]], "o-", label="retrained λ(t)")
        top.plot(t, [q["t"] * res["fractions"][-1]["edit_moved"] for q in p["points"]], "--", label="edit λ* + tΔ")
        middle.plot(t, [q["min_eigenvalue"] for q in p["points"]], "o-")
        bottom.plot(t, [q["test_accuracy"] for q in p["points"]], "o-", label="retrained λ(t)")
        bottom.plot(t, [q["edit_line_test_accuracy"] for q in p["points"]], "--", label="edit λ* + tΔ")
        for ax in (top, middle, bottom):
            if p["reach"] is not None and p["reach"] <= 1:
                ax.axvline(p["reach"], color="r", lw=0.8, ls=":", label="reach t* from λ*")
            for jump in p["jumps"]:
                ax.axvline(jump, color="k", lw=0.6, alpha=0.5)
        top.set_title(f"{name}: remove {fmt(p['fraction'], 2)} of tasks by weight 1 − t", fontsize=9)
        top.set_ylabel("‖λ − λ*‖")
        middle.set_ylabel("min eigenvalue of H(λ(t); 1 − t)")
        bottom.set_ylabel("test accuracy")
        bottom.set_xlabel("t (share of the removal done)")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(f"Minimiser path and edit line — {common.device_caption()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "edit_reach.png", dpi=80)
    plt.close(fig)


def write(results: dict, folder) -> None:
    (folder / "edit_reach.md").write_text(
        f"# What limits editing (command: `{' '.join(['.venv/bin/python'] + sys.argv)}`)\n" + table(results)
    )
    figure(results, folder)


def main(argv: list[str] | None = None) -> dict:
    args, base = common.parse("What limits editing: removal reach and the minimiser path.", extra, argv)
    folder = common.out_dir(args, "edit-reach")
    log = lambda *a: print(*a, flush=True)
    results = common.run_datasets(args, base, run_dataset, write, folder, "edit_reach", log)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
