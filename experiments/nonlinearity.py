"""What limits fidelity: first-order influence against one exact Newton step on the reduced objective.

Reads a fidelity run (results/<run>/fidelity.json: its config, λ*'s training, ρ, the removed tasks,
the 50%-subset masks and the converged retraining changes), rebuilds the same λ* (deterministic),
and predicts each retraining's change of the validation loss three ways:

* first order (influence): −Σ_removed I_f, the linear prediction the fidelity tables score;
* first order in λ, exact target: f(λ* − Σ I_λ) − f(λ*) (is the target's curvature the gap?);
* one Newton step on the reduced objective: f(λ* − (H_w + ρI)⁻¹ ∇F(λ*; w)) − f(λ*), with the Hessian
  H_w of the objective *without* the removed data (second order in the removal; one dense Hessian
  per retraining).

If the Newton step tracks the retraining much better than influence, the gap is the nonlinearity
of removing the data (the Hessian changes when 1/n of the data goes), not the solver or noise.

    .venv/bin/python experiments/nonlinearity.py --run results/fidelity-proximal
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import common

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import metaif
from metaif.evaluation import metrics


@functools.partial(jax.jit, static_argnames=("target",))
def _newton_changes(problem, target, lam, tasks, weights, rho):
    flat, unravel = jax.flatten_util.ravel_pytree(lam)

    def one(w):
        grad = lambda x: jax.flatten_util.ravel_pytree(
            jax.grad(metaif.meta_objective, argnums=1)(problem, unravel(x), tasks, w.tasks, w.support, w.query)
        )[0]
        g = grad(flat)
        h = jax.jacfwd(grad)(flat) + rho * jnp.eye(flat.size, dtype=flat.dtype)
        # one decomposition for the solve and the lowest eigenvalue (no batched LU: vmapped LU hung
        # the XLA CPU runtime here at n = 256)
        values, vectors = jnp.linalg.eigh(h)
        delta = -vectors @ ((vectors.T @ g) / values)
        return target(unravel(flat + delta)), jnp.linalg.norm(delta), values[0]

    values, norms, lowest = jax.lax.map(one, weights, batch_size=8)
    return values - target(lam), norms, lowest


def newton_changes(setup, lam, weights, rho, target):
    """target(λ* + Δ) − target(λ*) with Δ = −(H_w + ρI)⁻¹∇F(λ*; w) for each weight setting [B], ‖Δ‖ [B]
    and the smallest eigenvalue of H_w + ρI [B] (one compiled function per problem and target)."""
    rho = jnp.asarray(rho, jax.flatten_util.ravel_pytree(lam)[0].dtype)
    return tuple(np.asarray(x) for x in _newton_changes(setup.problem, target, lam, setup.train, weights, rho))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="results/fidelity-proximal", help="folder of a fidelity run")
    parser.add_argument("--variant", default="cpu")
    args = parser.parse_args()
    folder = Path(args.run)
    res = json.loads((folder / "fidelity.json").read_text())[args.variant]
    cfg = res["setup"]["config"]
    config = common.Config(**cfg)
    rho = float(res.get("proximal") or 0.0)
    setup = common.build(config)
    trained = common.meta_train(setup, log=lambda *a: None)
    lam = trained.meta_params
    target = common.mean_loss(setup, setup.val)
    n, m, q = setup.train.n_tasks, setup.train.n_support, setup.train.n_query
    gt = res["ground_truth"]
    influence = metaif.influence(setup.problem, lam, setup.train, target, solver=metaif.solvers.Dense(damping=rho))
    params_if = metaif.influence(setup.problem, lam, setup.train, solver=metaif.solvers.Dense(damping=rho)).tasks
    flat_if = np.asarray(jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params_if))  # [n, d]
    flat, unravel = jax.flatten_util.ravel_pytree(lam)
    out = {"run": str(folder), "rho": rho, "grad_norm": trained.grad_norm}
    text = (
        f"# What limits fidelity ({cfg['dataset']} {cfg['adapt']}, ρ = {rho}; command: "
        f"`{' '.join(['.venv/bin/python'] + sys.argv)}`)\n\n"
    )
    rows = []
    for key in ("tasks", "lds"):
        if key == "tasks":
            index = np.asarray(gt["tasks"]["index"])
            removal = np.zeros((index.size, n), bool)
            removal[np.arange(index.size), index] = True
        else:
            removal = ~np.asarray(gt["lds"]["masks"], bool)  # masks mark the kept tasks
        actual = np.asarray(gt[key]["changes"][0])
        ok = np.all(np.asarray(gt[key]["grad_norms"]) < 1e-8, axis=0)
        if ok.sum() < 3:  # too few converged retrainings: use all (flagged in the table)
            ok = np.ones_like(ok)
            out.setdefault("unconverged_used", []).append(key)
        ones = metaif.Weights.ones(n, m, q, jnp.float64)
        weights = metaif.Weights(
            jnp.asarray(1.0 - removal, jnp.float64),
            *(jnp.broadcast_to(w, (removal.shape[0], *w.shape)) for w in ones[1:]),
        )
        first = -(removal @ np.asarray(influence.tasks))
        steps = -(removal.astype(float) @ flat_if)
        exact_target = np.asarray(jax.vmap(lambda d: target(unravel(flat + d)))(jnp.asarray(steps))) - float(
            target(lam)
        )
        newton, newton_norm, lowest = newton_changes(setup, lam, weights, rho, target)
        moved = np.asarray(gt[key]["moved"][0])
        entry = {
            "actual": actual,
            "converged": ok,
            "first_order": first,
            "first_order_exact_target": exact_target,
            "newton_step": newton,
            "moved": moved,
            "first_order_moved": np.linalg.norm(steps, axis=1),
            "newton_moved": newton_norm,
            "reduced_hessian_min_eigenvalue": lowest,
        }
        names = ["first_order", "first_order_exact_target", "newton_step"]
        if key == "tasks":  # the library's second-order removal (preconditioned CG) must equal the dense Newton step
            removal_result = metaif.task_removal(setup.problem, lam, setup.train, target, damping=rho)
            entry["task_removal"] = np.asarray(removal_result.change)[index]
            entry["task_removal_max_difference"] = float(np.max(np.abs(entry["task_removal"] - newton)))
            entry["task_removal_cg_iterations"] = np.asarray(removal_result.solve.iterations)
            names.append("task_removal")
            print(
                f"metaif.task_removal against the dense Newton step: max |difference| {entry['task_removal_max_difference']:.2e}, "
                f"CG iterations median {np.median(entry['task_removal_cg_iterations']):.0f}",
                flush=True,
            )
        for name in names:
            entry[name + "_spearman"] = metrics.spearman(entry[name][ok], actual[ok])
            entry[name + "_pearson"] = metrics.pearson(entry[name][ok], actual[ok])
            entry[name + "_relative_error"] = common.relative_error(entry[name][ok], actual[ok])
        out[key] = entry
        label = "leave-one-task-out" if key == "tasks" else "50% task subsets"
        if key in out.get("unconverged_used", []):
            label += " (not converged)"
        titles = {
            "first_order": "influence (first order)",
            "first_order_exact_target": "f(λ* − Σ I_λ) (first order in λ)",
            "newton_step": "one Newton step on the reduced objective (dense)",
            "task_removal": "metaif.task_removal (CG)",
        }
        for name in names:
            title = titles[name]
            moved_pred = {
                "first_order": entry["first_order_moved"],
                "first_order_exact_target": entry["first_order_moved"],
                "newton_step": newton_norm,
                "task_removal": newton_norm,
            }[name]
            rows.append(
                [
                    label,
                    title,
                    entry[name + "_pearson"],
                    entry[name + "_spearman"],
                    entry[name + "_relative_error"],
                    np.median(moved_pred),
                    np.median(moved[ok]),
                ]
            )
        print(
            f"{label}: min eigenvalue of H_w + ρI: median {np.median(lowest):.2e}, min {lowest.min():.2e}", flush=True
        )
        out[key]["converged_count"] = int(ok.sum())
    text += (
        f"λ*: ‖∇F‖ = {common.fmt(trained.grad_norm)}. Actual changes: the converged first-pass retrainings of the run "
        f"(tasks {out['tasks']['converged_count']}, subsets {out['lds']['converged_count']}). Smallest eigenvalue of H_w + ρI "
        f"over the removals: {common.fmt(float(np.min(out['tasks']['reduced_hessian_min_eigenvalue'])))} (tasks), "
        f"{common.fmt(float(np.min(out['lds']['reduced_hessian_min_eigenvalue'])))} (subsets).\n\n"
    )
    text += common.markdown_table(
        [
            "retraining",
            "prediction",
            "Pearson",
            "Spearman",
            "relative error",
            "predicted ‖Δλ‖ (median)",
            "actual ‖Δλ‖ (median)",
        ],
        rows,
    )
    common.save_json(folder / "nonlinearity.json", out)
    (folder / "nonlinearity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
