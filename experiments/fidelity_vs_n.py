"""Fidelity against the number of training tasks n: is leave-one-task-out fidelity limited by the
nonlinearity of removing 1/n of the data?

For each n in --ns (MAML, the --config setting with n_train = n):
1. meta-train to a stationary point (`common.meta_train`: ‖∇F‖, total-Hessian eigenvalues) and
   record train / test accuracy and test loss (how much the meta-learner overfits);
2. exact task influence on the validation loss (`metaif.task_influence`, `solvers.Dense(damping=ρ)`)
   and the predicted displacement ‖I_λ‖;
3. leave-one-task-out ground truth on --task-sample random tasks, plain (ρ = 0) and proximal
   (ρ = --proximal, solver damping δ = ρ), each retrained twice (`fidelity.retrain_twice`: from λ*
   and from a perturbed start; the noise ceiling) to ‖∇F(λ; w)‖ <= --tol; the same tasks
   down-weighted by ε (the derivative check) and one exact Newton step on each reduced objective
   (`nonlinearity.newton_changes`, second order in the removal).

If the first-order score approaches the Newton step and the noise ceiling as n grows, the gap at
small n is the nonlinearity of removing a whole task. Results after every n (resumable) in
results/fidelity-vs-n/: fidelity_vs_n.json, fidelity_vs_n.md, fidelity_vs_n.png.

    .venv/bin/python experiments/fidelity_vs_n.py                          # n = 32, 64, 128, 256, 512
    .venv/bin/python experiments/fidelity_vs_n.py --ns 32,64 --task-sample 16
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import common
from common import fmt

import jax
import jax.flatten_util
import numpy as np

import metaif
from metaif import evaluation
from metaif.evaluation import metrics

from fidelity import agreement, retrain_twice
from nonlinearity import newton_changes

EXPERIMENT = "fidelity_vs_n"


def extra(parser):
    parser.add_argument("--ns", default="32,64,128,256,512", help="comma-separated numbers of training tasks")
    parser.add_argument(
        "--task-sample",
        type=int,
        default=32,
        help="leave-one-task-out on this many random tasks (all when n is smaller)",
    )
    parser.add_argument(
        "--proximal",
        type=float,
        default=1e-2,
        help="ρ of the proximal ground truth (solver damping δ = ρ); plain ρ = 0 always runs",
    )
    parser.add_argument("--gt-steps", type=int, default=60, help="most trust-region Newton steps per retraining")
    parser.add_argument(
        "--tol", type=float, default=1e-10, help="retraining stops at, and counts as converged below, this ‖∇F(λ; w)‖"
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=0.1,
        help="derivative check: down-weight each sampled task by ε (plain retraining)",
    )
    parser.add_argument(
        "--perturb", type=float, default=1e-3, help="relative size of the noise-ceiling start perturbation"
    )
    parser.add_argument("--fresh", action="store_true", help="discard saved results and recompute every n")


SETTINGS = ("config", "task_sample", "proximal", "gt_steps", "tol", "epsilon", "perturb")


def parse_ns(text: str) -> list[int]:
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ns = []
    if not ns or any(n < 4 for n in ns):
        raise SystemExit(f"--ns must be comma-separated integers >= 4 (numbers of training tasks); received {text!r}.")
    return ns


def _median(x, ok=None) -> float | None:
    x = np.asarray(x)
    x = x if ok is None else x[ok]
    return float(np.median(x)) if x.size else None


def ground_truth(setup, lam, target, task_index, rho, args, log) -> dict:
    """Leave-one-task-out of `task_index` (retrained twice, ρ-proximal), scored against exact
    task-IF (damping δ = ρ) and one Newton step on each reduced objective."""
    problem, tasks = setup.problem, setup.train
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    solver = metaif.solvers.Dense(damping=rho)
    start = time.perf_counter()
    params_if = metaif.task_influence(problem, lam, tasks, solver=solver)  # I_λ: [n] × λ's shape
    flat_if = np.asarray(jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params_if))[task_index]  # [B, d]
    grad_target = np.asarray(jax.flatten_util.ravel_pytree(jax.grad(target)(lam))[0])  # [d]
    scores = flat_if @ grad_target  # task-IF of the target, I_f = ∇f(λ*)ᵀ I_λ  [B]
    predicted_moved = np.linalg.norm(flat_if, axis=1)
    seconds_if = time.perf_counter() - start

    start = time.perf_counter()
    weights = evaluation.removal_weights(n, m, q, "tasks", task_index)
    res, _ = retrain_twice(setup, lam, weights, target, args.gt_steps, args.perturb, proximal=rho, tol=args.tol)
    seconds_retrain = time.perf_counter() - start
    ok = np.all(res["grad_norms"] < args.tol, axis=0)
    actual = res["changes"][0]
    out = {
        "rho": rho,
        "scores": scores,
        "predicted_moved": predicted_moved,
        **res,
        "converged": ok,
        "n_converged": int(ok.sum()),
        "n_sampled": int(ok.size),
        "seconds_influence": seconds_if,
        "seconds_retrain": seconds_retrain,
    }
    out["influence"] = agreement(-scores, actual, ok)
    out["influence_relative_error"] = common.relative_error(-scores[ok], actual[ok])
    if ok.sum() > 2:
        ceiling = metrics.noise_ceiling(res["changes"][:, ok])
        out["ceiling"] = {"pearson": ceiling.pearson, "spearman": ceiling.spearman}
    out["moved_median"] = _median(res["moved"][0], ok)
    out["predicted_moved_median"] = _median(predicted_moved, ok)
    log(
        f"    ρ = {rho}: LOO {seconds_retrain:.0f}s, converged {ok.sum()}/{ok.size}, Newton steps median "
        f"{np.median(res['iterations']):.0f} max {res['iterations'].max()}, IF Spearman "
        f"{fmt(out['influence'].get('spearman_converged'))}, ceiling {fmt(out.get('ceiling', {}).get('spearman'))}, "
        f"‖Δλ‖ {fmt(out['moved_median'])} vs ‖I_λ‖ {fmt(out['predicted_moved_median'])}"
    )

    start = time.perf_counter()
    newton, newton_moved, lowest = newton_changes(setup, lam, weights, rho, target)
    out.update(
        newton_step=newton,
        newton_moved=newton_moved,
        reduced_hessian_min_eigenvalue=lowest,
        newton=agreement(newton, actual, ok),
        newton_relative_error=common.relative_error(newton[ok], actual[ok]),
        newton_moved_median=_median(newton_moved, ok),
        seconds_newton=time.perf_counter() - start,
    )
    log(
        f"    ρ = {rho}: one Newton step Spearman {fmt(out['newton'].get('spearman_converged'))}, min eigenvalue of "
        f"H_w + ρI {fmt(float(lowest.min()))} ({out['seconds_newton']:.0f}s)"
    )

    if rho == 0.0 and args.epsilon > 0:  # derivative check: lower the weight by ε instead of removing
        start = time.perf_counter()
        w_eps = weights._replace(tasks=1.0 - args.epsilon * (1.0 - weights.tasks))
        eps, _ = retrain_twice(
            setup, lam, w_eps, target, args.gt_steps, args.perturb, proximal=rho, tol=args.tol, passes=1
        )
        eps_ok = eps["grad_norms"][0] < args.tol
        out["epsilon"] = {
            "epsilon": args.epsilon,
            "changes": eps["changes"][0],
            "grad_norms": eps["grad_norms"][0],
            "moved": eps["moved"][0],
            "n_converged": int(eps_ok.sum()),
            **agreement(-args.epsilon * scores, eps["changes"][0], eps_ok),
            "relative_error": common.relative_error(-args.epsilon * scores[eps_ok], eps["changes"][0][eps_ok]),
            "seconds": time.perf_counter() - start,
        }
        log(
            f"    ε = {args.epsilon}: Spearman {fmt(out['epsilon'].get('spearman_converged'))}, converged "
            f"{eps_ok.sum()}/{eps_ok.size} ({out['epsilon']['seconds']:.0f}s)"
        )
    return out


def run_n(config: common.Config, args, log=print) -> dict:
    """Everything measured at one n (config.n_train)."""
    start = time.perf_counter()
    setup = common.build(config)
    trained = common.meta_train(setup, log)
    lam = trained.meta_params
    target = common.mean_loss(setup, setup.val)
    out = {
        "setup": common.describe_setup(setup, trained),
        "test_loss": float(common.mean_loss(setup, setup.test)(lam)),
        "train_loss": float(common.mean_loss(setup, setup.train)(lam)),
        "val_loss": float(target(lam)),
        "lambda_norm": float(np.linalg.norm(jax.flatten_util.ravel_pytree(lam)[0])),
    }
    s = out["setup"]
    log(
        f"  d = {s['d']}, ‖∇F‖ {s['grad_norm']:.2e}, λ_min(H) {s['hessian_min_eigenvalues'][0]:.3g}, train acc "
        f"{s['train_accuracy']:.3f}, test acc {s['test_accuracy']:.3f}, test loss {out['test_loss']:.3f}"
    )
    n = config.n_train
    rng = np.random.default_rng(config.seed)
    task_index = np.sort(rng.choice(n, min(args.task_sample, n), replace=False))
    out["task_index"] = task_index
    out["plain"] = ground_truth(setup, lam, target, task_index, 0.0, args, log)
    out["proximal"] = ground_truth(setup, lam, target, task_index, float(args.proximal), args, log)
    out["seconds"] = time.perf_counter() - start
    return out


def _rows(results: dict) -> tuple[list, list]:
    setup_rows, rows = [], []
    for key in sorted(results, key=int):
        res = results[key]
        s = res["setup"]
        setup_rows.append(
            [
                int(key),
                s["train_accuracy"],
                s["test_accuracy"],
                res["train_loss"],
                res["test_loss"],
                s["grad_norm"],
                s["hessian_min_eigenvalues"][0],
                s["hessian_max_eigenvalue"],
                res["lambda_norm"],
                res["seconds"],
            ]
        )
        for kind in ("plain", "proximal"):
            g = res[kind]
            eps = g.get("epsilon", {})
            rows.append(
                [
                    int(key),
                    f"{kind} (ρ = {g['rho']})",
                    f"{g['n_converged']}/{g['n_sampled']}",
                    g.get("ceiling", {}).get("spearman"),
                    g["influence"].get("pearson_converged"),
                    g["influence"].get("spearman_converged"),
                    eps.get("spearman_converged"),
                    eps.get("relative_error"),
                    float(np.max(eps["moved"])) if eps else None,
                    g["newton"].get("spearman_converged"),
                    g["moved_median"],
                    g["predicted_moved_median"],
                    g["newton_moved_median"],
                    g["influence_relative_error"],
                    g["newton_relative_error"],
                    float(np.min(g["reduced_hessian_min_eigenvalue"])),
                    g["seconds_retrain"],
                ]
            )
    return setup_rows, rows


def table(results: dict, command: str) -> str:
    setup_rows, rows = _rows(results)
    text = f"# Fidelity against the number of training tasks n\n\nCommand: `{command}`\n\n"
    if results:
        any_res = next(iter(results.values()))
        cfg = any_res["setup"]["config"]
        text += (
            f"{cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot, {cfg['adapt']}, d = {any_res['setup']['d']}, "
            f"{any_res['setup']['device']}. Leave-one-task-out on {any_res['plain']['n_sampled']} random tasks per n "
            "(all when n is smaller); correlations over retrainings converged in both passes.\n\n"
        )
    text += common.markdown_table(
        [
            "n",
            "train acc",
            "test acc",
            "train loss",
            "test loss",
            "‖∇F‖",
            "λ_min(H)",
            "λ_max(H)",
            "‖λ*‖",
            "seconds (all of n)",
        ],
        setup_rows,
    )
    text += "\n"
    text += common.markdown_table(
        [
            "n",
            "retraining",
            "converged",
            "noise ceiling Spearman",
            "task-IF Pearson",
            "task-IF Spearman",
            "ε-check Spearman",
            "ε-check relative error",
            "ε-retraining ‖Δλ‖ (max)",
            "Newton-step Spearman",
            "actual ‖Δλ‖ (median)",
            "‖I_λ‖ (median)",
            "Newton ‖Δλ‖ (median)",
            "IF relative error",
            "Newton relative error",
            "min λ(H_w + ρI)",
            "LOO seconds (2 passes)",
        ],
        rows,
    )
    return text


def figure(results: dict, path) -> None:
    plt = common.figure()
    keys = sorted(results, key=int)
    ns = [int(k) for k in keys]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    get = lambda kind, f: [f(results[k][kind]) for k in keys]
    val = lambda x: np.nan if x is None else x
    for kind, color in (("plain", "C0"), ("proximal", "C1")):
        rho = results[keys[0]][kind]["rho"]
        axes[0].plot(
            ns,
            get(kind, lambda g: val(g["influence"].get("spearman_converged"))),
            "o-",
            color=color,
            label=f"task-IF, {kind} (ρ = {rho})",
        )
        axes[0].plot(
            ns,
            get(kind, lambda g: val(g["newton"].get("spearman_converged"))),
            "s:",
            color=color,
            label=f"one Newton step, {kind}",
        )
        axes[0].plot(
            ns,
            get(kind, lambda g: val(g.get("ceiling", {}).get("spearman"))),
            "--",
            color=color,
            lw=0.8,
            label=f"noise ceiling, {kind}",
        )
        axes[1].plot(ns, get(kind, lambda g: val(g["moved_median"])), "o-", color=color, label=f"actual ‖Δλ‖, {kind}")
        axes[1].plot(
            ns, get(kind, lambda g: val(g["predicted_moved_median"])), "^--", color=color, label=f"‖I_λ‖, {kind}"
        )
    axes[0].plot(
        ns,
        get("plain", lambda g: val(g.get("epsilon", {}).get("spearman_converged"))),
        "d-.",
        color="C2",
        label="task-IF vs ε-down-weighting (plain)",
    )
    axes[0].axhline(0.8, color="gray", lw=0.6)
    axes[0].set_ylabel("Spearman with leave-one-task-out change")
    axes[1].set_ylabel("median distance from λ*")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("training tasks n")
        ax.legend(fontsize=6)
    cfg = results[keys[0]]["setup"]["config"]
    fig.suptitle(
        f"Fidelity vs n, {cfg['dataset']} {cfg['adapt']} (exact task-IF) — {common.device_caption()}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    args, base = common.parse("Task-IF leave-one-out fidelity against the number of training tasks n.", extra, argv)
    ns = parse_ns(args.ns)
    folder = common.out_dir(args, "fidelity-vs-n")
    log = lambda *a: print(*a, flush=True)
    command = " ".join(
        [".venv/bin/python", "experiments/fidelity_vs_n.py"] + list(sys.argv[1:] if argv is None else argv)
    )
    settings = {
        "config": common.config_dict(dataclasses.replace(base, n_train=0)),
        **{k: getattr(args, k) for k in SETTINGS if k != "config"},
    }
    path = folder / f"{EXPERIMENT}.json"
    saved = json.loads(path.read_text()) if path.exists() and not args.fresh else {"settings": settings, "results": {}}
    if saved["settings"] != common.to_json(settings):
        raise SystemExit(
            f"{path} holds results for other settings ({saved['settings']}); rerun with --fresh to replace them "
            f"(these settings: {common.to_json(settings)})."
        )
    results = saved["results"]
    for n in ns:
        if str(n) in results:
            log(f"== n = {n}: done already ({path}); skipped")
            continue
        config = dataclasses.replace(base, n_train=n)
        log(f"== n = {n}: {config}")
        results[str(n)] = common.to_json(run_n(config, args, log))
        log(f"== n = {n}: {results[str(n)]['seconds']:.0f}s")
        common.save_json(path, {"settings": settings, "command": command, "results": results})
        (folder / f"{EXPERIMENT}.md").write_text(table(results, command))
        figure(results, folder / f"{EXPERIMENT}.png")
    text = table(results, command)
    (folder / f"{EXPERIMENT}.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
