"""Core benchmark: time to compute every task, support and query score for one target.

For logistic-regression and MLP meta-learning problems with n = 50 to 1,000 training tasks, this
script measures, side by side in one run:

* influence: `metaif.influence(problem, λ*, tasks, target=meta-test loss, solver=...)`, which
  returns all n task scores, n·m support scores and n·q query scores in one call, with the
  `Dense` and the `CG` solver (warm time; compile time reported separately);
* (a) one evaluation of the meta-gradient ∇_λ F (jitted, warm): the unit of cost;
* (b) leave-one-task-out retraining, what a user would otherwise run to get the exact effect of
  removing a task: warm-started at λ*, F re-solved with that task's weight set to 0,
    - "newton": `metaif.evaluation.retrain` (exact Newton steps on the dense total Hessian, the
      library's ground-truth retraining), in rounds of 3 steps until ‖∇F‖ <= 1e-10, a round that
      raises F being retried with damping (`newton_resolve`);
    - "adam": `metaif.meta_train` with `task_weights` and the optimiser and number of steps used
      to train λ* (what most users would do; it does not reach the same precision);
  timed on a sample of tasks (compile excluded: both are warmed up before timing) and
  extrapolated to all n tasks (per-task time × n). Only task removal is retrained; retraining
  every support or query example too would cost another n·(m + q) re-solves.

Goals: all scores within 30 meta-gradient evaluations (influence_s / gradient_s ≤ 30); at least
100× faster than retraining every task (retrain_all_extrapolated_s / influence_s ≥ 100).

Usage (from the repository root):
    .venv/bin/python benchmarks/core.py                 # full run, writes benchmarks/results/core.json
    .venv/bin/python benchmarks/core.py --quick         # small subset, prints only (unless --out)
    .venv/bin/python benchmarks/core.py --sizes 50 200 --problems logistic-proximal

Runs unchanged on CPU or GPU (float64 everywhere).
"""

from __future__ import annotations

import os
import time

_SCRIPT_START = time.perf_counter()
import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import metaif  # noqa: E402
import _timing  # noqa: E402  (benchmarks/_timing.py)
from metaif import problems  # noqa: E402
from metaif.core import Weights, objective  # noqa: E402
from metaif.evaluation import removal_weights, retrain  # noqa: E402

DIM, WAYS = 10, 5  # input dimension and classes of the generated tasks
M, Q = 10, 10  # support / query examples per task
N_TEST = 100  # held-out tasks that define the target (meta-test loss)
SIZES = (50, 100, 200, 500, 1000)
QUICK_SIZES = (50,)
QUICK_PROBLEMS = ("logistic-proximal", "mlp-unrolled")
POOL = 1000  # training tasks are drawn from one fixed pool, so a given n means the same
# tasks whatever sizes are run (larger --sizes enlarge the pool)

# Each problem: model, adaptation, meta_reg, how λ* is trained, and default sizes.
# Inner settings are chosen so adaptation is well posed: Proximal converges (adaptation_residual
# is reported), Unrolled is stable. The MLP is small (d = 133) because the Dense solver and the
# Newton retraining materialise the d×d total Hessian (cost ∝ d·n); with 16 hidden units, training
# on these tasks often ended near saddle points (indefinite H, where influence is not defined).
# MLP sizes are fewer, and iMAML-MLP (inner loop of 60 steps) is run at n = 50 only, to keep the
# full run near 10 minutes on a 2-core CPU; `--sizes` overrides.
PROBLEMS = {
    "logistic-proximal": dict(
        model="logistic", adapt=("proximal", 2.0, 40, 0.25), meta_reg=1e-2, train_steps=300, train_lr=1e-2, sizes=SIZES
    ),
    "logistic-unrolled": dict(
        model="logistic", adapt=("unrolled", 5, 0.3), meta_reg=1e-2, train_steps=300, train_lr=1e-2, sizes=SIZES
    ),
    "mlp-unrolled": dict(
        model="mlp",
        hidden=8,
        adapt=("unrolled", 3, 0.5),
        meta_reg=1e-2,
        train_steps=1000,
        train_lr=1e-2,
        sizes=(50, 200, 1000),
    ),
    "mlp-proximal": dict(
        model="mlp",
        hidden=8,
        adapt=("proximal", 4.0, 60, 0.1),
        meta_reg=1e-2,
        train_steps=1000,
        train_lr=1e-2,
        sizes=(50,),
    ),
}
DEFAULT_PROBLEMS = tuple(PROBLEMS)

NEWTON_STEPS = 3  # Newton steps per leave-one-out retraining (warm start: converges in 2-3)
CG_MAXITER, CG_TOL = 500, 1e-6
CONVERGED = 1e-8  # a retraining counts as converged when its final ||grad F|| is below this


# ----------------------------------------------------------------------------- helpers


def now() -> float:
    return time.perf_counter()


def timed(fn, min_repeats: int = 3, max_repeats: int = 10, min_total_s: float = 1.0):
    """(first-call seconds, median warm seconds, output); a single warm call over 5 s is taken as
    is (the slow dense paths)."""
    return _timing.timed(
        fn,
        max_repeats=max_repeats,
        min_total_s=min_total_s,
        min_repeats=min_repeats,
        single_over_s=5.0,
        statistic=statistics.median,
    )


# One jitted meta-gradient for every problem (problem is static, so one compile per problem/shape).
_meta_gradient = jax.jit(jax.grad(objective, argnums=1))
_objective = jax.jit(objective)


def _tree_norm(tree):
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def make_problem(spec):
    if spec["model"] == "logistic":
        loss = problems.linear_cross_entropy
        init = problems.linear_init(jax.random.key(0), DIM, WAYS)
    else:
        loss = problems.mlp_cross_entropy
        init = problems.mlp_init(jax.random.key(0), (DIM, spec["hidden"], WAYS))
    kind, *args = spec["adapt"]
    adapt = metaif.Proximal(*args) if kind == "proximal" else metaif.Unrolled(*args)
    return metaif.BilevelProblem(loss, loss, adapt, spec["meta_reg"]), init


def flat_size(tree) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(tree)))


def fnum(x, width=9):
    if x is None:
        return "-".rjust(width)
    if isinstance(x, (int, np.integer)):
        return str(x).rjust(width)
    if x == 0 or 1e-2 <= abs(x) < 1e5:
        return f"{x:.3g}".rjust(width)
    return f"{x:.2e}".rjust(width)


# ----------------------------------------------------------------------------- one problem / size


def newton_resolve(problem, start, tasks, weights, tol=1e-10, max_rounds=8):
    """Re-solve F(λ; w) from `start` by exact Newton steps (`metaif.evaluation.retrain`, rounds of
    NEWTON_STEPS steps, one weight setting w, leaves with a leading axis of 1).

    Plain Newton converges quadratically near a minimum but heads for saddle points or runs off
    when the Hessian is indefinite (seen for the MLP). So a round that raises F is rejected and
    retried with damping (1e-3, ×10 per rejection; damped steps descend and leave saddles), and
    damping is relaxed ÷10 (to 0 below 1e-3) after each accepted round. Stops at ‖∇F‖ <= tol
    with damping 0. Returns (λ, ‖∇F‖, Newton steps run, rejected rounds)."""
    w = jax.tree.map(lambda x: x[0], weights)
    lam, value = start, float(_objective(problem, start, tasks, w))
    grad_norm, steps, rejected, damping = np.inf, 0, 0, 0.0
    for _ in range(max_rounds):
        if grad_norm <= tol and damping == 0.0:
            break
        out = retrain(problem, lam, tasks, weights, steps=NEWTON_STEPS, shift=damping, chunk_size=None)
        new_lam = jax.tree.map(lambda x: x[0], out.meta_params)
        new_value, new_norm = float(_objective(problem, new_lam, tasks, w)), float(out.grad_norm[0])
        steps += NEWTON_STEPS
        if np.isfinite(new_norm) and new_value <= value + 1e-12 * abs(value):
            lam, value, grad_norm = new_lam, new_value, new_norm
            damping = 0.0 if damping <= 1e-3 else damping / 10
        else:
            rejected += 1
            damping = max(1e-3, 10 * damping)
    if not np.isfinite(grad_norm):  # every round rejected: report the gradient at the start
        grad_norm = float(_tree_norm(_meta_gradient(problem, lam, tasks, w)))
    return lam, grad_norm, steps, rejected


def train(problem, init, tasks, optimizer, spec, log):
    """λ*: Adam, then an exact Newton polish (`newton_resolve` with all-ones weights: the same
    `newton_core` as `metaif.newton_refine`, so it also compiles the leave-one-out retraining
    timed later)."""
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    start = now()
    adam = metaif.meta_train(problem, init, tasks, optimizer, steps=spec["train_steps"])
    jax.block_until_ready(adam.meta_params)
    adam_s = now() - start
    log(f"  adam: {adam.summary()} ({adam_s:.1f}s incl. compile)")
    ones = jax.tree.map(lambda w: w[None], Weights.ones(n, m, q, jnp.float64))
    start = now()
    lam, grad_norm, steps, rejected = newton_resolve(problem, adam.meta_params, tasks, ones, max_rounds=16)
    newton_s = now() - start
    log(
        f"  newton polish: ||grad F|| = {grad_norm:.2e} after {steps} steps, {rejected} rounds rejected "
        f"({newton_s:.1f}s incl. compile)"
    )
    return lam, dict(
        adam_steps=spec["train_steps"],
        adam_lr=spec["train_lr"],
        adam_grad_norm=float(adam.grad_norm),
        adam_s_incl_compile=adam_s,
        newton_steps=steps,
        newton_rounds_rejected=rejected,
        grad_norm=grad_norm,
        newton_s_incl_compile=newton_s,
    )


def time_retraining(problem, lam, tasks, optimizer, spec, sample, budget_s, log):
    """Per-task leave-one-task-out retraining times (both methods already compiled)."""
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    results = {}
    for method in ("newton", "adam"):
        times, grads, steps = [], [], []
        for k in sample:
            if times and sum(times) > budget_s:
                break
            start = now()
            if method == "newton":
                _, grad, used, _ = newton_resolve(
                    problem, lam, tasks, removal_weights(n, m, q, "tasks", [k], jnp.float64), max_rounds=8
                )
            else:
                weights = jnp.ones((n,), jnp.float64).at[k].set(0.0)
                out = metaif.meta_train(problem, lam, tasks, optimizer, steps=spec["train_steps"], task_weights=weights)
                jax.block_until_ready(out.meta_params)
                grad, used = float(out.grad_norm), spec["train_steps"]
            times.append(now() - start)
            grads.append(grad)
            steps.append(used)
        per_task = statistics.median(times)
        converged = sum(g <= CONVERGED for g in grads)
        results[method] = dict(
            per_task_s=per_task,
            tasks_timed=len(times),
            all_extrapolated_s=per_task * n,
            tasks=sample[: len(times)],
            times_s=times,
            final_grad_norms=grads,
            tasks_converged=converged,
            steps=steps,
        )
        log(
            f"  retrain[{method}]: {per_task:.3g}s/task over {len(times)} tasks, steps {steps}, "
            f"final ||grad F|| {', '.join(f'{g:.1e}' for g in grads)} ({converged} below {CONVERGED:g})"
        )
    return results


def run_problem(name, spec, sizes, args, log):
    problem, init = make_problem(spec)
    optimizer = optax.adam(spec["train_lr"])  # one object: meta_train reuses its compiled loop
    pool = problems.classification_tasks(N_TEST + max(POOL, *sizes), M, Q, DIM, WAYS, seed=0)
    test_tasks = pool[:N_TEST]
    # Defined once per problem, reused for every size and solver, so compiled code is reused.
    target = lambda lam: metaif.task_losses(problem, lam, test_tasks).mean()  # noqa: E731
    solvers = {"dense": metaif.solvers.Dense(), "cg": metaif.solvers.CG(damping=0.0, maxiter=CG_MAXITER, tol=CG_TOL)}
    rows = []
    for n in sizes:
        log(f"\n[{name}] n = {n}")
        t_size = now()
        tasks = pool[N_TEST : N_TEST + n]
        lam, training = train(problem, init, tasks, optimizer, spec, log)
        d = flat_size(lam)
        residual = float(metaif.adaptation_residual(problem, lam, tasks).max())
        training["adaptation_residual_max"] = residual
        log(
            f"  d = {d}, max adaptation residual {residual:.1e}"
            + (" (informative only for Unrolled)" if spec["adapt"][0] == "unrolled" else "")
        )

        weights = Weights.ones(n, M, Q, jnp.float64)
        g_first, g_warm, _ = timed(lambda: _meta_gradient(problem, lam, tasks, weights), min_repeats=5)
        log(f"  meta-gradient: {g_warm * 1e3:.3g} ms (first call {g_first:.2f}s)")

        per_solver = {}
        for sname, solver in solvers.items():
            first, warm, out = timed(lambda: metaif.influence(problem, lam, tasks, target=target, solver=solver))
            info = out.solve
            per_solver[sname] = dict(first_s=first, warm_s=warm, info=info, grad_norm=float(out.grad_norm))
            log(
                f"  influence[{sname}]: {warm:.3g}s warm, {first - warm:.3g}s compile, "
                f"iterations {int(info.iterations)}, converged {bool(info.converged)}, "
                f"relative residual {float(info.relative_residual):.1e}, indefinite {bool(info.indefinite)}"
                + (f", min eigenvalue of H {float(info.min_eigenvalue):.2e}" if sname == "dense" else "")
            )

        rng = np.random.default_rng(n)
        sample = [int(k) for k in rng.choice(n, size=min(args.retrain_tasks, n), replace=False)]
        retrained = time_retraining(problem, lam, tasks, optimizer, spec, sample, args.retrain_budget, log)

        for sname, r in per_solver.items():
            info, warm = r["info"], r["warm_s"]
            row = dict(
                problem=name,
                model=spec["model"],
                adaptation=str(problem.adapt),
                meta_reg=spec["meta_reg"],
                n=n,
                m=M,
                q=Q,
                d=d,
                n_scores=n * (1 + M + Q),
                solver=sname,
                solver_repr=str(solvers[sname]),
                grad_norm=training["grad_norm"],
                training=training,
                compile_s=max(r["first_s"] - warm, 0.0),
                first_call_s=r["first_s"],
                influence_s=warm,
                gradient_s=g_warm,
                gradient_compile_s=max(g_first - g_warm, 0.0),
                ratio_to_gradient=warm / g_warm,
                cg_iterations=int(info.iterations) if sname == "cg" else None,
                solve_converged=bool(info.converged),
                solve_relative_residual=float(info.relative_residual),
                solve_indefinite=bool(info.indefinite),
                min_eigenvalue=float(info.min_eigenvalue) if sname == "dense" else None,
                retrain_per_task_s={k: v["per_task_s"] for k, v in retrained.items()},
                retrain_all_extrapolated_s={k: v["all_extrapolated_s"] for k, v in retrained.items()},
                speedup_vs_retrain={k: v["all_extrapolated_s"] / warm for k, v in retrained.items()},
                retrain=retrained,
            )
            row["goal_within_30_gradients"] = row["ratio_to_gradient"] <= 30.0
            row["goal_100x_vs_retrain"] = {k: s >= 100.0 for k, s in row["speedup_vs_retrain"].items()}
            rows.append(row)
        log(f"  ({now() - t_size:.1f}s for this size)")
    return rows


# ----------------------------------------------------------------------------- report


HEADER = [
    "problem",
    "n",
    "d",
    "gradF",
    "solver",
    "cg_it",
    "compile_s",
    "infl_s",
    "grad_ms",
    "x_grad",
    "newton/task",
    "adam/task",
    "newton_all",
    "adam_all",
    "vs_newton",
    "vs_adam",
    "goals",
]


def table(rows) -> str:
    lines = ["  ".join(h.rjust(9) if i else h.ljust(18) for i, h in enumerate(HEADER))]
    for r in rows:
        per, alls, sp = r["retrain_per_task_s"], r["retrain_all_extrapolated_s"], r["speedup_vs_retrain"]
        goals = ("G" if r["goal_within_30_gradients"] else "-") + (
            "R" if all(r["goal_100x_vs_retrain"].values()) else "r" if any(r["goal_100x_vs_retrain"].values()) else "-"
        )
        cells = [
            r["n"],
            r["d"],
            r["grad_norm"],
            r["solver"],
            r["cg_iterations"],
            r["compile_s"],
            r["influence_s"],
            r["gradient_s"] * 1e3,
            r["ratio_to_gradient"],
            per["newton"],
            per["adam"],
            alls["newton"],
            alls["adam"],
            sp["newton"],
            sp["adam"],
        ]
        text = (
            [r["problem"].ljust(18)] + [c.rjust(9) if isinstance(c, str) else fnum(c) for c in cells] + [goals.rjust(9)]
        )
        if not r["solve_converged"]:
            text[-1] = (goals + "!").rjust(9)
        lines.append("  ".join(text))
    lines.append(
        "gradF = ||grad F|| at the lambda used; x_grad = influence_s / gradient_s (goal <= 30: G); "
        "*/task = median leave-one-task-out retraining time, *_all = that x n;\nvs_* = retrain_all / influence_s "
        "(goal >= 100 for both retrainings: R, one: r); ! = solve not converged. Times in s unless noted."
    )
    return "\n".join(lines)


def machine_info() -> dict:
    return dict(
        devices=[str(d) for d in jax.devices()],
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        jaxlib_version=getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        metaif_version=metaif.__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        x64=bool(jax.config.read("jax_enable_x64")),
    )


def _jaxlib_version():
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes {QUICK_SIZES} of {QUICK_PROBLEMS} only; prints, saves only with --out",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", help="numbers of training tasks (overrides each problem's default)"
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=sorted(PROBLEMS),
        default=None,
        help=f"default: all ({', '.join(DEFAULT_PROBLEMS)})",
    )
    parser.add_argument("--retrain-tasks", type=int, default=3, help="tasks sampled for leave-one-out retraining")
    parser.add_argument(
        "--retrain-budget",
        type=float,
        default=6.0,
        help="seconds per method and size after which no further sampled task is retrained (>= 1 task)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/core.json, none with --quick)"
    )
    args = parser.parse_args(argv)
    out_path = (
        args.out if args.out is not None else (None if args.quick else Path(__file__).parent / "results" / "core.json")
    )

    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info()
    log(f"metaif core benchmark on {info['devices']} (jax {info['jax_version']}, {info['platform']})")
    start = now()
    rows = []
    args.problems = args.problems or list(QUICK_PROBLEMS if args.quick else DEFAULT_PROBLEMS)
    for name in args.problems:
        spec = PROBLEMS[name]
        sizes = args.sizes or (QUICK_SIZES if args.quick else spec["sizes"])
        rows += run_problem(name, spec, sorted(sizes), args, log)
    total = now() - start
    log("\n" + table(rows))
    log(f"\ntotal runtime {total:.0f}s ({now() - _SCRIPT_START:.0f}s including imports)")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        result = dict(
            benchmark="core",
            command=" ".join([Path(sys.executable).name, *sys.argv]),
            machine=info,
            settings=dict(
                dim=DIM,
                ways=WAYS,
                m=M,
                q=Q,
                n_test=N_TEST,
                newton_steps_per_retrain=NEWTON_STEPS,
                cg_maxiter=CG_MAXITER,
                cg_tol=CG_TOL,
                retrain_tasks=args.retrain_tasks,
                retrain_budget_s=args.retrain_budget,
                problems={
                    k: {kk: (list(vv) if isinstance(vv, tuple) else vv) for kk, vv in PROBLEMS[k].items()}
                    for k in args.problems
                },
                target="mean meta-test loss over n_test held-out tasks (metaif.task_losses)",
            ),
            total_runtime_s=total,
            total_runtime_with_imports_s=now() - _SCRIPT_START,
            results=rows,
        )
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        log(f"saved {out_path}")


if __name__ == "__main__":
    main()
