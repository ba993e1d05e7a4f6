"""Accuracy against cost of every inverse-Hessian solver and curvature option.

On Omniglot 5-way 1-shot tasks (the real data in ../shared/data), for an MLP and a small Conv4,
with MAML (`Unrolled`) and iMAML (`Proximal`) adaptation, this script:

1. trains λ* (Adam, then `metaif.newton_refine`) and reports ‖∇F(λ*)‖ and the smallest eigenvalue
   of the total Hessian H (from the exact reference);
2. computes the exact reference: `metaif.influence(..., solver=Dense(damping=δ))` on the exact H,
   all task, support and query scores for one target (the meta-test loss on held-out tasks), with
   δ = 1e-2 (H has eigenvalues near 0 at λ*; the undamped Dense answer is recorded too);
3. for every solver (CG ± diagonal / low-rank preconditioner over maxiter, Neumann over depths J,
   LiSSA over iterations and minibatch, LowRank over ranks, Identity) and curvature option (Exact,
   Truncated, Gamma, GaussNewton, each with its dense twin and with CG; the paper's Direct-IF via
   `metaif.FirstOrder`) measures, against the exact scores, the Spearman correlation and the
   relative error ‖s − s*‖ / ‖s*‖ of task, support and query scores; its warm time and its compile
   time (first call − warm call); its cost in meta-gradient evaluations (warm time / warm time of
   one jitted ∇F, measured side by side) and its nominal count of Hessian-vector products;
4. retrains leave-one-out (exact Newton, `metaif.evaluation.leave_one_out` with proximal = δ, the
   retraining that damped influence estimates) for a sample of tasks,
   support and query examples and reports, per configuration, Spearman and Pearson of the
   predicted change (−influence) against the actual change.

Results: benchmarks/results/solvers.json (solvers_quick.json with --quick) and one PNG per problem
(accuracy against cost). Every figure records backend, device kind, device count and dtype.

Usage (from the repository root):
    .venv/bin/python benchmarks/solvers.py            # full run (≲ 20 min on a loaded 2-core CPU)
    .venv/bin/python benchmarks/solvers.py --quick    # one problem, short grids (< 3 min)
    .venv/bin/python benchmarks/solvers.py --problems mlp-maml --out /tmp/x.json
    .venv/bin/python benchmarks/solvers.py --defaults   # the solvers' no-argument defaults (mlp-maml)
    .venv/bin/python benchmarks/solvers.py --ekfac      # Proximal's inner solves: CG, EK-FAC (mlp-imaml)

Runs unchanged on GPU/TPU (float64 everywhere).
"""

from __future__ import annotations

import os
import time

_SCRIPT_START = time.perf_counter()
import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import metaif  # noqa: E402
import _timing  # noqa: E402  (benchmarks/_timing.py)
from metaif import curvature as C  # noqa: E402
from metaif import data, models  # noqa: E402
from metaif import solvers as S  # noqa: E402
from metaif.evaluation import leave_one_out, metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA_ROOT = Path(os.environ.get("METAIF_DATA") or ROOT.parent / "shared" / "data")
WAYS, SHOTS = 5, 1
LEVELS = ("tasks", "support", "query")
MLP_REG = 1e-2
# Damping δ of every solve, and the proximal weight of the leave-one-out retraining (the retraining
# that damped influence estimates, docs/nonstationary.md). At the trained λ the total Hessian's
# smallest eigenvalues are within ~1e-3 of 0 (sometimes slightly negative: see min_eigenvalue), so
# undamped influence and plain retraining are ill-posed there; δ = 1e-2 makes H + δI positive definite.
DELTA = 1e-2

# Problems. Sizes keep d (meta-parameters) small enough for the Dense reference and for exact
# Newton retraining (both materialise the d×d total Hessian) on a loaded 2-core CPU: the MLP sees
# 28×28 images average-pooled to 7×7 (hidden 4, d = 225; with 8 hidden units training ends at
# saddle points, min eigenvalue of H < 0); the Conv4 sees 14×14 images (average-pooled by 2), 3 blocks
# of 4 filters (d = 361): at 28×28 with 4 blocks (d = 509) its MAML training did not finish within
# 25 minutes on the loaded CPU. `grid` selects the configurations (see `configurations`); `loo` the
# levels retrained.
PROBLEMS = {
    "mlp-maml": dict(
        model="mlp",
        pool=4,
        hidden=4,
        adapt=("unrolled", 1, 0.5),
        n=40,
        queries=3,
        n_test=20,
        meta_reg=MLP_REG,
        train_steps=5000,
        train_lr=2e-2,
        newton_steps=6,
        grid="full",
        loo=("tasks", "support", "query"),
    ),
    "mlp-imaml": dict(
        model="mlp",
        pool=4,
        hidden=4,
        adapt=("proximal", 2.0, 25, 0.3),
        n=30,
        queries=3,
        n_test=20,
        meta_reg=MLP_REG,
        train_steps=2000,
        train_lr=2e-2,
        newton_steps=4,
        grid="small",
        loo=("tasks",),
    ),
    "conv-maml": dict(
        model="conv",
        pool=2,
        filters=4,
        blocks=3,
        adapt=("unrolled", 1, 0.5),
        n=20,
        queries=1,
        n_test=10,
        meta_reg=MLP_REG,
        train_steps=1500,
        train_lr=2e-2,
        newton_steps=4,
        grid="small",
        loo=("tasks",),
    ),
}
QUICK_PROBLEMS = ("mlp-maml",)
QUICK_SPEC = dict(newton_steps=2, grid="quick", loo=("tasks",))  # the full run's λ* (Adam is kept), short grid
LOO_SAMPLE = 6  # retrained data per level in the full run
QUICK_LOO_SAMPLE = 4
LOO_STEPS = 3  # warm-started Newton steps per retraining (converges in 2-3 from a minimum)

# Grids: full, small (iMAML and Conv4), quick.
NEUMANN_J = dict(full=(10, 30, 100, 300), small=(30, 100), quick=(30,))
CG_MAXITER = dict(full=(2, 4, 8, 16), small=(4,), quick=(4,))
PCG_MAXITER = dict(full=(4,), small=(), quick=())
LOWRANK_RANKS = dict(full=(10, 30, 100), small=(20,), quick=(20,))
LISSA = dict(full=((100, 4, 1), (100, 16, 4)), small=(), quick=())  # (iterations, batch, repeats)
CURVATURE_CG = dict(full=True, small=False, quick=False)
DAMPINGS = dict(full=(1e-3, 1e-1), small=(), quick=())  # CG with another damping: its bias against δ = DELTA


# ----------------------------------------------------------------------------- helpers


def now() -> float:
    return time.perf_counter()


def timed(fn, max_repeats: int = 20, min_total_s: float = 0.3):
    """(first-call s, warm s = minimum of the warm calls, the least disturbed by other processes)."""
    return _timing.timed(fn, max_repeats=max_repeats, min_total_s=min_total_s)


def environment() -> dict:
    devices = jax.devices()
    return dict(
        backend=jax.default_backend(),
        device_kind=devices[0].device_kind,
        device_count=len(devices),
        dtype="float64",
        jax=jax.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )


def size(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def relative_error(x, ref) -> float:
    x, ref = np.ravel(np.asarray(x)), np.ravel(np.asarray(ref))
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


# ----------------------------------------------------------------------------- problem set-up


def load_images(pool: int):
    om = data.load_omniglot(DATA_ROOT)
    ink = 1.0 - om.images  # 1 for ink, 0 for background
    if pool > 1:
        s = ink.shape[1] // pool
        ink = ink.reshape(-1, s, pool, s, pool).mean((2, 4))
    return ink.astype(np.float32), om.labels


def make_problem(spec):
    images, labels = load_images(spec["pool"])
    split = data.omniglot_split()
    train = data.few_shot_tasks(images, labels, spec["n"], WAYS, SHOTS, spec["queries"], seed=0, classes=split.train)
    test = data.few_shot_tasks(images, labels, spec["n_test"], WAYS, SHOTS, spec["queries"], seed=1, classes=split.test)
    rngs = nnx.Rngs(0)
    if spec["model"] == "mlp":
        module = models.MLP(
            images.shape[1:], [spec["hidden"]], WAYS, activation=jnp.tanh, param_dtype=jnp.float64, rngs=rngs
        )
    else:
        module = models.Conv4(
            images.shape[1:],
            WAYS,
            filters=spec["filters"],
            blocks=spec["blocks"],
            activation=jnp.tanh,
            param_dtype=jnp.float64,
            rngs=rngs,
        )
    pure = models.from_nnx(module)
    loss = pure.cross_entropy
    kind, *args = spec["adapt"]
    adapt = metaif.Unrolled(*args) if kind == "unrolled" else metaif.Proximal(*args)
    problem = metaif.BilevelProblem(loss, loss, adapt, spec["meta_reg"])
    return problem, pure, loss, train, test


def configurations(problem, loss, grid: str):
    """(name, family, x, solver, curvature, problem) for every point of the grid."""
    fo = metaif.BilevelProblem(
        problem.inner_loss, problem.outer_loss, metaif.FirstOrder(problem.adapt), problem.meta_reg
    )
    gn = loss.gauss_newton()
    out = []
    add = lambda *row: out.append(row)
    add(
        "CG(damping=0) (the default until 2026-11; undamped)",
        "default",
        None,
        S.CG(damping=0.0, maxiter=100),
        None,
        problem,
    )
    add(f"CG(damping={DELTA:g})", "default", None, S.CG(damping=DELTA, maxiter=100), None, problem)
    for it in CG_MAXITER[grid]:
        add(f"CG maxiter={it}", "CG", it, S.CG(maxiter=it, tol=1e-12, damping=DELTA), None, problem)
    for it in PCG_MAXITER[grid]:
        add(
            f"CG diagonal maxiter={it}",
            "CG+diagonal",
            it,
            S.CG(maxiter=it, tol=1e-12, preconditioner="diagonal", damping=DELTA),
            None,
            problem,
        )
        add(
            f"CG lowrank(16) maxiter={it}",
            "CG+lowrank",
            it,
            S.CG(maxiter=it, tol=1e-12, preconditioner="lowrank", damping=DELTA),
            None,
            problem,
        )
    for j in NEUMANN_J[grid]:
        add(f"Neumann J={j}", "Neumann", j, S.Neumann(iterations=j, damping=DELTA), None, problem)
    for it, batch, repeats in LISSA[grid]:
        add(
            f"LiSSA J={it} batch={batch} repeats={repeats}",
            "LiSSA",
            [it, batch, repeats],
            S.LiSSA(iterations=it, batch=batch, repeats=repeats, damping=DELTA),
            None,
            problem,
        )
    for r in LOWRANK_RANKS[grid]:
        add(f"LowRank rank={r}", "LowRank", r, S.LowRank(rank=r, damping=DELTA), None, problem)
    add("Identity", "Identity", None, S.Identity(damping=DELTA), None, problem)
    for delta in DAMPINGS[grid]:
        add(f"CG(damping={delta:g})", "damping", delta, S.CG(damping=delta, maxiter=100), None, problem)
    # Curvature options: dense twin (the option's own error) and with CG (errors added).
    for name, curv in (("Truncated", C.Truncated()), ("Gamma", C.Gamma()), ("GaussNewton", gn)):
        add(f"{name} + Dense", "curvature-dense", name, S.Dense(damping=DELTA), curv, problem)
        if CURVATURE_CG[grid] or name == "GaussNewton":
            add(f"{name} + CG", "curvature-cg", name, S.CG(damping=DELTA, maxiter=100), curv, problem)
    add("Direct-IF (FirstOrder) + Dense", "curvature-dense", "Direct-IF", S.Dense(damping=DELTA), None, fo)
    if CURVATURE_CG[grid]:
        add("Direct-IF (FirstOrder) + CG", "curvature-cg", "Direct-IF", S.CG(damping=DELTA, maxiter=100), None, fo)
    return out


def nominal_products(family, x, solver, d, n, iterations):
    """Hessian-vector products a solve costs (prepare + solve; LiSSA in full-product units)."""
    if family in ("CG", "default", "curvature-cg", "damping"):
        return int(iterations)
    if family in ("CG+diagonal", "CG+lowrank"):
        extra = solver.probes if solver.preconditioner == "diagonal" else min(d, 2 * min(16, d) + 20)
        return int(iterations) + extra
    if family == "Neumann":
        return solver.iterations + min(solver.estimate_steps, d)
    if family == "LiSSA":
        return min(solver.estimate_steps, d) + solver.iterations * solver.repeats * solver.batch / n
    if family == "LowRank":
        return min(d, 2 * solver.rank + 20)
    if family == "Identity":
        return 0
    return d  # dense


# ----------------------------------------------------------------------------- one problem


def trained_problem(name, spec, log):
    """The problem of `spec` and its λ* (Adam with a cosine schedule, then `newton_refine`; the
    more stationary of the two is kept), with a record of both."""
    record = dict(name=name, spec={k: v for k, v in spec.items()})
    problem, pure, loss, train, test = make_problem(spec)
    d, n, m, q = size(pure.params), train.n_tasks, train.n_support, train.n_query
    record.update(d=d, n_tasks=n, n_support=m, n_query=q, n_test=test.n_tasks)
    log(f"\n== {name}: d = {d}, n = {n}, m = {m}, q = {q}")

    start = now()
    schedule = optax.cosine_decay_schedule(spec["train_lr"], spec["train_steps"], 1e-3)
    trained = metaif.meta_train(problem, pure.params, train, optax.adam(schedule), steps=spec["train_steps"])
    log(f"  adam (cosine schedule): {trained.summary()} ({now() - start:.1f}s)")
    adam_s, start = now() - start, now()
    refined = metaif.newton_refine(problem, trained.meta_params, train, steps=spec["newton_steps"])
    log(f"  newton_refine: {refined.summary()} ({now() - start:.1f}s)")
    # The safeguarded Newton only guarantees F does not rise; keep whichever point is more stationary.
    best = refined if float(refined.grad_norm) <= float(trained.grad_norm) else trained
    record.update(
        adam_grad_norm=float(trained.grad_norm),
        newton_grad_norm=float(refined.grad_norm),
        grad_norm=float(best.grad_norm),
        kept="newton" if best is refined else "adam",
        objective=float(best.objective),
        adam_s=adam_s,
        newton_s=now() - start,
    )
    return record, problem, pure, loss, train, test, best.meta_params


def spectrum(name, spec, log):
    """The whole eigenvalue spectrum of the total Hessian H at λ* (dense, d×d), with the
    condition number of H + DELTA·I and the Neumann depth it implies."""
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    flat, unravel = jax.flatten_util.ravel_pytree(lam)
    grad = jax.grad(lambda x: metaif.meta_objective(problem, unravel(x), train))
    values = np.linalg.eigvalsh(np.asarray(jax.jit(jax.jacfwd(grad))(flat)))
    kappa = (values[-1] + DELTA) / (values[0] + DELTA)
    record.update(
        eigenvalues=values.tolist(),
        max_eigenvalue=float(values[-1]),
        min_eigenvalue=float(values[0]),
        damping=DELTA,
        condition_number=float(kappa),
        neumann_terms_for_percent=float(1.1 * kappa * np.log(100.0)) if kappa > 0 else float("nan"),
        eigenvalues_below={str(t): int(np.sum(values < t)) for t in (1e-3, 1e-2, 1e-1, 1.0)},
    )
    log(
        f"  eigenvalues of H: min {values[0]:.3e}, max {values[-1]:.4g}; κ(H + {DELTA:g} I) = {kappa:.3g}; "
        f"below 1e-2: {record['eigenvalues_below']['0.01']}, below 1: {record['eigenvalues_below']['1.0']} of {len(values)}"
    )
    return record


def cost_units(record, problem, lam, train, log):
    """Records the warm time of one jitted ∇F (`gradient_s`), one Hessian-vector product in
    gradients (`hvp_over_gradient`) and λ_max(H) (`max_eigenvalue`); returns gradient_s."""
    grad_fn = jax.jit(jax.grad(lambda lam: metaif.meta_objective(problem, lam, train)))
    _, grad_s, _ = timed(lambda: grad_fn(lam), max_repeats=200, min_total_s=0.3)
    record["gradient_s"] = grad_s
    # One Hessian-vector product (forward-over-reverse) against one gradient, interleaved so that
    # load from other processes hits both alike: converts counts of products into gradient units.
    meta_grad = jax.grad(lambda lam: metaif.meta_objective(problem, lam, train))
    hvp_fn = jax.jit(lambda v: jax.jvp(meta_grad, (lam,), (v,))[1])
    jax.block_until_ready(hvp_fn(lam))
    pairs = []
    for _ in range(30):
        t0 = now()
        jax.block_until_ready(grad_fn(lam))
        t1 = now()
        jax.block_until_ready(hvp_fn(lam))
        pairs.append((t1 - t0, now() - t1))
    record["hvp_over_gradient"] = min(h for _, h in pairs) / min(g for g, _ in pairs)
    log(f"  one Hessian-vector product = {record['hvp_over_gradient']:.2f} gradients (interleaved minimum of 30)")
    top = S.lanczos_eigenvalues(hvp_fn, lam, k=1, which="largest", iterations=min(record["d"], 40)).values
    record["max_eigenvalue"] = float(top[0])
    log(f"  largest eigenvalue of H: {record['max_eigenvalue']:.4g}")
    return grad_s


def run_problem(name, spec, quick, log):
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    d, n, m, q = record["d"], record["n_tasks"], record["n_support"], record["n_query"]

    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    grad_s = cost_units(record, problem, lam, train, log)

    first, warm, ref = timed(
        lambda: metaif.influence(problem, lam, train, target=target, solver=S.Dense(damping=DELTA))
    )
    min_eig = float(ref.solve.min_eigenvalue)
    undamped = metaif.influence(problem, lam, train, target=target, solver=S.Dense())
    record["condition_number"] = (record["max_eigenvalue"] + DELTA) / (min_eig + DELTA)
    record.update(
        reference=dict(
            solver=f"Dense(damping={DELTA:g})",
            damping=DELTA,
            compile_s=first - warm,
            time_s=warm,
            x_grad=warm / grad_s,
            min_eigenvalue=min_eig,
            adaptation_residual=float(ref.adaptation_residual),
        )
    )
    exact0 = {level: np.asarray(getattr(undamped, level)) for level in LEVELS}
    log(
        f"  exact: ||grad F|| = {float(ref.grad_norm):.2e}, min eig H = {min_eig:.3e}, dense {warm:.2f}s "
        f"(compile {first - warm:.1f}s), one grad {grad_s * 1e3:.2f} ms, adaptation residual "
        f"{float(ref.adaptation_residual):.1e}"
    )
    exact = {level: np.asarray(getattr(ref, level)) for level in LEVELS}

    # Leave-one-out ground truth on a sample of each level.
    k = QUICK_LOO_SAMPLE if quick else LOO_SAMPLE
    rng = np.random.default_rng(0)
    samples = {
        "tasks": rng.choice(n, k, replace=False),
        "support": np.stack([rng.choice(n, k, replace=False), rng.integers(0, m, k)], 1),
        "query": np.stack([rng.choice(n, k, replace=False), rng.integers(0, q, k)], 1),
    }
    loo_levels = spec["loo"]
    loo, start = {}, now()
    for level in loo_levels:
        change, norms = leave_one_out(
            problem, lam, train, level, samples[level], target, steps=LOO_STEPS, chunk_size=None, proximal=DELTA
        )
        loo[level] = np.asarray(change)
        record.setdefault("loo_grad_norm_max", {})[level] = float(np.max(norms))
    record["loo_s"] = now() - start
    record["loo_sample"] = {level: samples[level].tolist() for level in loo_levels}
    record["loo_change"] = {level: loo[level].tolist() for level in loo_levels}
    log(
        f"  leave-one-out ({k} per level, {', '.join(loo_levels)}): {record['loo_s']:.1f}s, max final ||grad|| "
        f"{max(record['loo_grad_norm_max'].values()):.1e}"
    )

    def pick(level, scores):
        s = samples[level]
        return scores[s] if level == "tasks" else scores[s[:, 0], s[:, 1]]

    def agreement(scores):
        pred = np.concatenate([-pick(level, scores[level]) for level in loo_levels])
        true = np.concatenate([loo[level] for level in loo_levels])
        per = {level: metrics.spearman(-pick(level, scores[level]), loo[level]) for level in loo_levels}
        return dict(
            spearman=metrics.spearman(pred, true),
            pearson=metrics.pearson(pred, true),
            rel_error=relative_error(pred, true),
            spearman_by_level=per,
        )

    record["reference"]["loo"] = agreement(exact)
    record["reference"]["undamped"] = dict(
        spearman_vs_damped={level: metrics.spearman(exact0[level], exact[level]) for level in LEVELS},
        loo=agreement(exact0),
    )
    log(
        f"  undamped exact vs damped exact: task spearman {record['reference']['undamped']['spearman_vs_damped']['tasks']:.3f}; "
        f"undamped vs proximal leave-one-out: spearman {record['reference']['undamped']['loo']['spearman']:.3f}"
    )
    log(
        f"  exact (δ = {DELTA:g}) vs proximal leave-one-out: spearman {record['reference']['loo']['spearman']:.3f}, pearson "
        f"{record['reference']['loo']['pearson']:.3f}, rel err {record['reference']['loo']['rel_error']:.3f}"
    )

    rows = []
    header = (
        f"  {'configuration':38s} {'sp_task':>7s} {'sp_sup':>7s} {'sp_qry':>7s} {'re_task':>8s} {'re_ex':>8s} "
        f"{'loo_sp':>6s} {'hvps':>6s} {'x_grad':>7s} {'time_s':>7s} {'comp_s':>6s} conv"
    )
    log(header)
    for cname, family, x, solver, curv, prob in configurations(problem, loss, spec["grid"]):
        try:
            first, warm, out = timed(
                lambda: metaif.influence(prob, lam, train, target=target, solver=solver, curvature=curv)
            )
        except Exception as error:  # report and go on (e.g. an option a model does not support)
            log(f"  {cname:38s} failed: {type(error).__name__}: {error}")
            rows.append(dict(name=cname, family=family, x=x, error=f"{type(error).__name__}: {error}"))
            continue
        scores = {level: np.asarray(getattr(out, level)) for level in LEVELS}
        finite = all(np.all(np.isfinite(s)) for s in scores.values())
        iterations = int(out.solve.iterations)
        row = dict(
            name=cname,
            family=family,
            x=x,
            solver=repr(solver),
            curvature=repr(curv) if curv is not None else "Exact()",
            first_order=prob is not problem,
            spearman={
                level: metrics.spearman(scores[level], exact[level]) if finite else float("nan") for level in LEVELS
            },
            pearson={
                level: metrics.pearson(scores[level], exact[level]) if finite else float("nan") for level in LEVELS
            },
            rel_error={level: relative_error(scores[level], exact[level]) for level in LEVELS},
            loo=agreement(scores) if finite else None,
            spearman_vs_undamped={
                level: metrics.spearman(scores[level], exact0[level]) if finite else float("nan") for level in LEVELS
            },
            time_s=warm,
            compile_s=first - warm,
            x_grad=warm / grad_s,
            iterations=iterations,
            hvps=d if isinstance(solver, S.Dense) else nominal_products(family, x, solver, d, n, iterations),
            relative_residual=float(out.solve.relative_residual),
            converged=bool(out.solve.converged),
            indefinite=bool(out.solve.indefinite),
        )
        row["rel_error"]["examples"] = relative_error(
            np.concatenate([scores["support"].ravel(), scores["query"].ravel()]),
            np.concatenate([exact["support"].ravel(), exact["query"].ravel()]),
        )
        rows.append(row)
        sp, re = row["spearman"], row["rel_error"]
        loo_sp = row["loo"]["spearman"] if row["loo"] else float("nan")
        log(
            f"  {cname:38s} {sp['tasks']:7.3f} {sp['support']:7.3f} {sp['query']:7.3f} {re['tasks']:8.1e} "
            f"{re['examples']:8.1e} {loo_sp:6.3f} {row['hvps']:6.0f} {row['x_grad']:7.1f} {warm:7.3f} "
            f"{first - warm:6.1f} {'y' if row['converged'] else 'n'}{'!' if row['indefinite'] else ''}"
        )
    record["configurations"] = rows
    return record


# ----------------------------------------------------------------------------- library defaults


def default_rows(problem):
    """(name, solver, products): the solvers as constructed with no arguments (δ = 1e-4·λ_max),
    variants around them, and the former undamped default. `products`: Hessian-vector products per
    target given the iterations it reports (prepare + solve; the residual check not counted)."""
    lanczos = S._damping.ESTIMATE_STEPS
    return [
        ("CG()", S.CG(), lambda d, it: lanczos + it),
        ("CG(maxiter=24)", S.CG(maxiter=24), lambda d, it: lanczos + it),
        ("CG(maxiter=32)", S.CG(maxiter=32), lambda d, it: lanczos + it),
        (
            "CG(preconditioner='lowrank', maxiter=4)",
            S.CG(preconditioner="lowrank", maxiter=4),
            lambda d, it: lanczos + min(d, 2 * min(16, d) + 20) + it,
        ),
        ("Neumann()", S.Neumann(), lambda d, it: min(20, d) + it),
        ("LiSSA()", S.LiSSA(), lambda d, it: min(20, d) + it * 8 / problem["n"]),
        ("LowRank()", S.LowRank(), lambda d, it: min(d, 2 * 20 + 20)),
        ("LowRank(rank=100)", S.LowRank(rank=100), lambda d, it: min(d, 2 * 100 + 20)),
        ("Identity()", S.Identity(), lambda d, it: 0),
        ("CG(damping=0, maxiter=100) (former default)", S.CG(damping=0.0, maxiter=100), lambda d, it: it),
        ("Dense() (exact, undamped)", S.Dense(), lambda d, it: d),
    ]


def run_defaults(name, spec, log):
    """Every solver constructed with no arguments against its exact dense twin
    `Dense(damping=None)` (the same δ = 1e-4·λ_max(H)) and against the study's reference
    `Dense(damping=DELTA)`: Spearman and relative error of task, support and query scores, the
    damping used, Hessian-vector products, and meta-gradient evaluations per target."""
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    d = record["d"]
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    grad_s = cost_units(record, problem, lam, train, log)
    ratio = record["hvp_over_gradient"]
    refs = {}
    for key, solver in (("twin", S.Dense(damping=None)), ("study", S.Dense(damping=DELTA))):
        out = metaif.influence(problem, lam, train, target=target, solver=solver)
        refs[key] = {level: np.asarray(getattr(out, level)) for level in LEVELS}
        record[f"reference_{key}"] = dict(
            solver=repr(solver), damping=float(out.solve.damping), min_eigenvalue=float(out.solve.min_eigenvalue)
        )
    twin_delta = record["reference_twin"]["damping"]
    record["twin_vs_study"] = {level: metrics.spearman(refs["twin"][level], refs["study"][level]) for level in LEVELS}
    log(
        f"  Dense(damping=None): δ = {twin_delta:.3g} (1e-4·λ_max); its scores vs Dense(damping={DELTA:g}): task "
        f"Spearman {record['twin_vs_study']['tasks']:.3f}; λ_min(H) = {record['reference_twin']['min_eigenvalue']:.3g}"
    )
    # the evidence for RELATIVE_DAMPING: the exact solve at δ = ρ·λ_max against the study's δ, and
    # 16 and 24 CG products against that exact solve
    largest = record["max_eigenvalue"]
    record["relative_damping_sweep"] = []
    for rho in (1e-5, 1e-4, 1e-3):
        exact = metaif.influence(problem, lam, train, target=target, solver=S.Dense(damping=rho * largest))
        entry = dict(
            rho=rho,
            damping=rho * largest,
            exact_vs_study={
                level: metrics.spearman(np.asarray(getattr(exact, level)), refs["study"][level]) for level in LEVELS
            },
        )
        for it in (16, 24):
            cg = metaif.influence(problem, lam, train, target=target, solver=S.CG(damping=rho * largest, maxiter=it))
            entry[f"cg{it}_vs_exact"] = {
                level: metrics.spearman(np.asarray(getattr(cg, level)), np.asarray(getattr(exact, level)))
                for level in LEVELS
            }
        record["relative_damping_sweep"].append(entry)
        log(
            f"  ρ = {rho:g} (δ = {rho * largest:.3g}): exact vs δ = {DELTA:g}: task Spearman "
            f"{entry['exact_vs_study']['tasks']:.3f}; CG 16 / 24 products vs exact: {entry['cg16_vs_exact']['tasks']:.3f} / "
            f"{entry['cg24_vs_exact']['tasks']:.3f}"
        )
    log(
        f"  {'configuration':44s} {'δ':>9s} {'twin t/s/q':>20s} {'δ=1e-2 t/s/q':>20s} {'re_task':>8s} {'hvps':>6s} "
        f"{'grads':>6s} {'x_grad':>7s} {'time_s':>7s} conv"
    )
    rows = []
    for cname, solver, products in default_rows(dict(n=record["n_tasks"])):
        first, warm, out = timed(lambda: metaif.influence(problem, lam, train, target=target, solver=solver))
        scores = {level: np.asarray(getattr(out, level)) for level in LEVELS}
        hvps = float(products(d, int(out.solve.iterations)))
        row = dict(
            name=cname,
            solver=repr(solver),
            damping=float(out.solve.damping),
            spearman_vs_twin={level: metrics.spearman(scores[level], refs["twin"][level]) for level in LEVELS},
            spearman_vs_study={level: metrics.spearman(scores[level], refs["study"][level]) for level in LEVELS},
            rel_error_vs_twin={level: relative_error(scores[level], refs["twin"][level]) for level in LEVELS},
            iterations=int(out.solve.iterations),
            hvps=hvps,
            # products + the residual check + the score pass (about one product), plus ∇f
            gradient_evaluations=(hvps + 2) * ratio + 1,
            time_s=warm,
            compile_s=first - warm,
            x_grad=warm / grad_s,
            relative_residual=float(out.solve.relative_residual),
            converged=bool(out.solve.converged),
            indefinite=bool(out.solve.indefinite),
        )
        rows.append(row)
        tw, st = row["spearman_vs_twin"], row["spearman_vs_study"]
        log(
            f"  {cname:44s} {row['damping']:9.2e} {tw['tasks']:6.3f}/{tw['support']:.3f}/{tw['query']:.3f} "
            f"{st['tasks']:6.3f}/{st['support']:.3f}/{st['query']:.3f} {row['rel_error_vs_twin']['tasks']:8.1e} "
            f"{hvps:6.0f} {row['gradient_evaluations']:6.1f} {row['x_grad']:7.1f} {warm:7.3f} "
            f"{'y' if row['converged'] else 'n'}{'!' if row['indefinite'] else ''}"
        )
    record["configurations"] = rows
    return record


# ----------------------------------------------------------------------------- EK-FAC inner solves


def run_ekfac(name, spec, log):
    """Implicit adaptation (`Proximal`) with its inner solves by "cg" (the default, tolerance
    1e-10: exact to that level, the reference; "dense" costs d inner products per solve, too slow
    inside d outer products) and by "ekfac", at the same λ and with the same outer solve
    `Dense(damping=δ)`, δ = max(DELTA, 2|λ_min(H)|) so that H + δI is positive definite; plus the
    error of the EK-FAC inner solve itself against the exact inner Hessian on random vectors."""
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    adapt = problem.adapt
    variants = {
        inner: metaif.BilevelProblem(
            problem.inner_loss, problem.outer_loss, dataclasses.replace(adapt, inner_solve=inner), problem.meta_reg
        )
        for inner in ("cg", "ekfac")
    }
    probe = metaif.influence(variants["cg"], lam, train, target=target, solver=S.Dense(damping=10.0))
    smallest = float(probe.solve.min_eigenvalue)
    delta = max(DELTA, 2 * abs(min(smallest, 0.0)))
    record.update(min_eigenvalue=smallest, damping=delta)
    log(f"  λ_min(H) = {smallest:.3g}: outer damping δ = {delta:.3g}")
    results, rows = {}, []
    for inner, prob in variants.items():
        first, warm, out = timed(
            lambda: metaif.influence(prob, lam, train, target=target, solver=S.Dense(damping=delta))
        )
        results[inner] = {level: np.asarray(getattr(out, level)) for level in LEVELS}
        rows.append(dict(inner_solve=inner, time_s=warm, compile_s=first - warm, converged=bool(out.solve.converged)))
    for row in rows:
        scores = results[row["inner_solve"]]
        row["spearman"] = {level: metrics.spearman(scores[level], results["cg"][level]) for level in LEVELS}
        row["rel_error"] = {level: relative_error(scores[level], results["cg"][level]) for level in LEVELS}
        sp, re = row["spearman"], row["rel_error"]
        log(
            f"  inner_solve={row['inner_solve']!r:8s} Spearman t/s/q {sp['tasks']:.3f} / {sp['support']:.3f} / "
            f"{sp['query']:.3f}, rel. error {re['tasks']:.2e} / {re['support']:.2e} / {re['query']:.2e}; "
            f"warm {row['time_s']:.2f} s, compile {row['compile_s']:.1f} s"
        )
    record["configurations"] = rows
    # the inner solve alone: (G_EKFAC + reg·I)⁻¹u against (∇²_θθ L_I)⁻¹u on 8 tasks × 4 random u
    from metaif import _ekfac

    flat, unravel = jax.flatten_util.ravel_pytree(lam)
    errors = []
    for k in range(8):
        support = jax.tree.map(lambda x: x[k], train.support)
        weights = jnp.ones(train.n_support, flat.dtype)
        theta = metaif.adapt(problem, lam, support)
        objective = lambda x: adapt.objective(problem.inner_loss, unravel(x), lam, support, weights)
        hessian = np.asarray(jax.hessian(objective)(jax.flatten_util.ravel_pytree(theta)[0]))
        factors = _ekfac.factor(
            problem.inner_loss.predict, problem.inner_loss.output_loss, theta, lam, support, weights / train.n_support
        )
        for seed in range(4):
            u = np.random.default_rng(seed).normal(size=flat.size)
            approx = np.asarray(
                jax.flatten_util.ravel_pytree(_ekfac.inverse(factors, adapt.reg, unravel(jnp.asarray(u))))[0]
            )
            exact = np.linalg.solve(hessian, u)
            errors.append(float(np.linalg.norm(approx - exact) / np.linalg.norm(exact)))
    record["inner_solve_rel_error"] = dict(median=float(np.median(errors)), max=float(np.max(errors)), n=len(errors))
    log(
        f"  EK-FAC inner solve vs exact inner Hessian: relative error median {np.median(errors):.3f}, "
        f"max {np.max(errors):.3f} ({len(errors)} vectors)"
    )
    return record


# ----------------------------------------------------------------------------- plots


def plot(record, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["configurations"] if "error" not in r]
    cost = lambda r: r["hvps"] + 1  # deterministic; measured times (x_grad in the JSON) are load-sensitive
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = (
        ("task Spearman vs exact", lambda r: r["spearman"]["tasks"], False),
        (
            "example Spearman vs exact (min of support, query)",
            lambda r: min(r["spearman"]["support"], r["spearman"]["query"]),
            False,
        ),
        ("relative error of task scores", lambda r: r["rel_error"]["tasks"], True),
    )
    series = ("CG", "CG+diagonal", "CG+lowrank", "Neumann", "LiSSA", "LowRank", "damping")
    markers = dict(zip(series, "os^vDxP"))
    for ax, (title, value, logy) in zip(axes, panels):
        for family in series:
            pts = sorted((cost(r), value(r)) for r in rows if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), marker=markers[family], label=family)
        for r in rows:
            if r["family"] in ("curvature-dense", "curvature-cg", "Identity", "default"):
                style = {"curvature-dense": "k*", "curvature-cg": "r*"}.get(r["family"], "ms")
                ax.plot(cost(r), value(r), style, markersize=9)
                ax.annotate(
                    r["name"].replace(" (FirstOrder)", ""),
                    (cost(r), value(r)),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.axvline(record["d"] + 1, color="grey", ls=":", lw=1)
        if "hvp_over_gradient" in record:  # 30 meta-gradient evaluations in products
            ax.axvline(30 / record["hvp_over_gradient"], color="green", ls="--", lw=1)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        else:
            ax.axhline(0.95, color="green", ls="--", lw=1)
            ax.set_ylim(-0.2, 1.02)
        ax.set_xlabel("cost: Hessian-vector products per target + 1 (log; Dense = d)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"{record['name']}: d={record['d']}, n={record['n_tasks']}, m={record['n_support']}, q={record['n_query']}; "
        f"‖∇F‖={record['grad_norm']:.1e}, λmin(H)={record['reference']['min_eigenvalue']:.2e}, δ={record['reference']['damping']:g}; "
        f"dotted: Dense (d products), dashed: 30 meta-gradients / Spearman 0.95\n"
        f"backend={env['backend']}, device={env['device_kind']} ×{env['device_count']}, dtype={env['dtype']}, "
        f"jax {env['jax']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one problem, short grids (< 3 min)")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), help="problems to run")
    parser.add_argument("--out", type=Path, help="JSON path (default results/solvers.json or solvers_quick.json)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--replot", type=Path, help="redraw the PNGs of a saved JSON and exit")
    parser.add_argument(
        "--spectrum",
        action="store_true",
        help="only train and save the dense eigenvalue spectrum of H (results/solvers_spectrum.json)",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="only the solvers' no-argument defaults on mlp-maml (results/solvers_defaults.json)",
    )
    parser.add_argument(
        "--ekfac",
        action="store_true",
        help="only the inner solves of mlp-imaml: CG and EK-FAC (results/solvers_ekfac.json)",
    )
    args = parser.parse_args(argv)
    for flag, problem_name, default_out, run in (
        ("defaults", "mlp-maml", "solvers_defaults.json", run_defaults),
        ("ekfac", "mlp-imaml", "solvers_ekfac.json", run_ekfac),
    ):
        if getattr(args, flag):
            names = args.problems or (problem_name,)
            out = args.out or RESULTS / default_out
            log = lambda s: print(s, flush=True)
            saved = dict(environment=environment(), problems={})
            for name in names:
                saved["problems"][name] = run(name, dict(PROBLEMS[name], newton_steps=1), log)
                saved["wall_s"] = now() - _SCRIPT_START
                out.write_text(json.dumps(saved, indent=1, default=float))
            log(f"wrote {out} ({now() - _SCRIPT_START:.0f}s)")
            return
    if args.spectrum:
        names = args.problems or QUICK_PROBLEMS
        out = args.out or RESULTS / "solvers_spectrum.json"
        log = lambda s: print(s, flush=True)
        saved = dict(environment=environment(), problems={name: spectrum(name, PROBLEMS[name], log) for name in names})
        out.write_text(json.dumps(saved, indent=1, default=float))
        log(f"wrote {out}")
        return
    if args.replot:
        saved = json.loads(args.replot.read_text())
        for name, record in saved["problems"].items():
            plot(record, saved["environment"], args.replot.with_name(f"{args.replot.stem}_{name}.png"))
        return
    names = args.problems or (QUICK_PROBLEMS if args.quick else tuple(PROBLEMS))
    out = args.out or RESULTS / ("solvers_quick.json" if args.quick else "solvers.json")
    env = environment()
    log = lambda s: print(s, flush=True)
    log(f"backend {env['backend']} ({env['device_kind']} x{env['device_count']}), {env['dtype']}, jax {env['jax']}")
    result = dict(environment=env, quick=args.quick, problems={})
    for name in names:
        spec = dict(PROBLEMS[name], **(QUICK_SPEC if args.quick else {}))
        result["problems"][name] = run_problem(name, spec, args.quick, log)
        result["wall_s"] = now() - _SCRIPT_START
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float))  # after every problem: partial results survive
        if not args.no_plot:
            png = out.with_name(f"{out.stem}_{name}.png")
            plot(result["problems"][name], env, png)
            log(f"  plot: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}")
    log(f"\nwrote {out} ({now() - _SCRIPT_START:.0f}s)")


if __name__ == "__main__":
    main()
