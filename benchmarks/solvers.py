"""Accuracy against cost of every inverse-Hessian solver and curvature option (issue 3, section 5).

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

Runs unchanged on GPU/TPU (float64 everywhere).
"""

from __future__ import annotations

import os
import time

_SCRIPT_START = time.perf_counter()
# XLA's multi-threaded Eigen pool on CPU can deadlock on vmapped LAPACK calls (jaxlib 0.10.2).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402

jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
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
DATA_ROOT = ROOT.parent / "shared" / "data"
WAYS, SHOTS = 5, 1
LEVELS = ("tasks", "support", "query")
MLP_REG = 1e-2
# Damping δ of every solve, and the proximal weight of the leave-one-out retraining (the retraining
# that damped influence estimates, README "Stationarity"). At the trained λ the total Hessian's
# smallest eigenvalues are within ~1e-3 of 0 (sometimes slightly negative: see min_eigenvalue), so
# undamped influence and plain retraining are ill-posed there; δ = 1e-2 makes H + δI positive definite.
DELTA = 1e-2

# Problems. Sizes keep d (meta-parameters) small enough for the Dense reference and for exact
# Newton retraining (both materialise the d×d total Hessian) on a loaded 2-core CPU: the MLP sees
# 28×28 images average-pooled to 7×7 (hidden 4, d = 225; with 8 hidden units training ends at
# saddle points, min eigenvalue of H < 0); the Conv4 sees the 28×28 images themselves, with 4 filters
# (d = 509). `grid` selects the configurations (see `configurations`); `loo` the levels retrained.
PROBLEMS = {
    "mlp-maml": dict(model="mlp", pool=4, hidden=4, adapt=("unrolled", 1, 0.5), n=40, queries=3, n_test=20,
                     meta_reg=MLP_REG, train_steps=5000, train_lr=2e-2, newton_steps=6, grid="full",
                     loo=("tasks", "support", "query")),
    "mlp-imaml": dict(model="mlp", pool=4, hidden=4, adapt=("proximal", 2.0, 25, 0.3), n=30, queries=3, n_test=20,
                      meta_reg=MLP_REG, train_steps=2000, train_lr=2e-2, newton_steps=4, grid="small", loo=("tasks",)),
    "conv-maml": dict(model="conv", pool=1, filters=4, adapt=("unrolled", 1, 0.5), n=20, queries=1, n_test=10,
                      meta_reg=MLP_REG, train_steps=1500, train_lr=2e-2, newton_steps=4, grid="small", loo=("tasks",)),
}
QUICK_PROBLEMS = ("mlp-maml",)
QUICK_SPEC = dict(newton_steps=2, grid="quick", loo=("tasks",))  # the full run's λ* (Adam is kept), short grid
LOO_SAMPLE = 6          # retrained data per level in the full run
QUICK_LOO_SAMPLE = 4
LOO_STEPS = 3           # warm-started Newton steps per retraining (converges in 2-3 from a minimum)

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
    return dict(backend=jax.default_backend(), device_kind=devices[0].device_kind, device_count=len(devices),
                dtype="float64", jax=jax.__version__, python=platform.python_version(), machine=platform.machine(),
                command=" ".join([Path(sys.executable).name, *sys.argv]))


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
        module = models.MLP(images.shape[1:], [spec["hidden"]], WAYS, activation=jnp.tanh, param_dtype=jnp.float64, rngs=rngs)
    else:
        module = models.Conv4(images.shape[1:], WAYS, filters=spec["filters"], activation=jnp.tanh,
                              param_dtype=jnp.float64, rngs=rngs)
    pure = models.from_nnx(module)
    loss = pure.cross_entropy
    kind, *args = spec["adapt"]
    adapt = metaif.Unrolled(*args) if kind == "unrolled" else metaif.Proximal(*args)
    problem = metaif.BilevelProblem(loss, loss, adapt, spec["meta_reg"])
    return problem, pure, loss, train, test


def configurations(problem, loss, grid: str):
    """(name, family, x, solver, curvature, problem) for every point of the grid."""
    fo = metaif.BilevelProblem(problem.inner_loss, problem.outer_loss, metaif.FirstOrder(problem.adapt), problem.meta_reg)
    gn = loss.gauss_newton()
    out = []
    add = lambda *row: out.append(row)
    add("CG() default (undamped)", "default", None, S.CG(), None, problem)
    add(f"CG(damping={DELTA:g})", "default", None, S.CG(damping=DELTA), None, problem)
    for it in CG_MAXITER[grid]:
        add(f"CG maxiter={it}", "CG", it, S.CG(maxiter=it, tol=1e-12, damping=DELTA), None, problem)
    for it in PCG_MAXITER[grid]:
        add(f"CG diagonal maxiter={it}", "CG+diagonal", it,
            S.CG(maxiter=it, tol=1e-12, preconditioner="diagonal", damping=DELTA), None, problem)
        add(f"CG lowrank(16) maxiter={it}", "CG+lowrank", it,
            S.CG(maxiter=it, tol=1e-12, preconditioner="lowrank", damping=DELTA), None, problem)
    for j in NEUMANN_J[grid]:
        add(f"Neumann J={j}", "Neumann", j, S.Neumann(iterations=j, damping=DELTA), None, problem)
    for it, batch, repeats in LISSA[grid]:
        add(f"LiSSA J={it} batch={batch} repeats={repeats}", "LiSSA", [it, batch, repeats],
            S.LiSSA(iterations=it, batch=batch, repeats=repeats, damping=DELTA), None, problem)
    for r in LOWRANK_RANKS[grid]:
        add(f"LowRank rank={r}", "LowRank", r, S.LowRank(rank=r, damping=DELTA), None, problem)
    add("Identity", "Identity", None, S.Identity(damping=DELTA), None, problem)
    for delta in DAMPINGS[grid]:
        add(f"CG(damping={delta:g})", "damping", delta, S.CG(damping=delta), None, problem)
    # Curvature options: dense twin (the option's own error) and with CG (errors added).
    for name, curv in (("Truncated", C.Truncated()), ("Gamma", C.Gamma()), ("GaussNewton", gn)):
        add(f"{name} + Dense", "curvature-dense", name, S.Dense(damping=DELTA), curv, problem)
        if CURVATURE_CG[grid] or name == "GaussNewton":
            add(f"{name} + CG", "curvature-cg", name, S.CG(damping=DELTA), curv, problem)
    add("Direct-IF (FirstOrder) + Dense", "curvature-dense", "Direct-IF", S.Dense(damping=DELTA), None, fo)
    if CURVATURE_CG[grid]:
        add("Direct-IF (FirstOrder) + CG", "curvature-cg", "Direct-IF", S.CG(damping=DELTA), None, fo)
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
    record.update(adam_grad_norm=float(trained.grad_norm), newton_grad_norm=float(refined.grad_norm),
                  grad_norm=float(best.grad_norm), kept="newton" if best is refined else "adam",
                  objective=float(best.objective), adam_s=adam_s, newton_s=now() - start)
    return record, problem, pure, loss, train, test, best.meta_params


def spectrum(name, spec, log):
    """The whole eigenvalue spectrum of the total Hessian H at λ* (dense, d×d), with the
    condition number of H + DELTA·I and the Neumann depth it implies."""
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    flat, unravel = jax.flatten_util.ravel_pytree(lam)
    grad = jax.grad(lambda x: metaif.meta_objective(problem, unravel(x), train))
    values = np.linalg.eigvalsh(np.asarray(jax.jit(jax.jacfwd(grad))(flat)))
    kappa = (values[-1] + DELTA) / (values[0] + DELTA)
    record.update(eigenvalues=values.tolist(), max_eigenvalue=float(values[-1]), min_eigenvalue=float(values[0]),
                  damping=DELTA, condition_number=float(kappa),
                  neumann_terms_for_percent=float(1.1 * kappa * np.log(100.0)) if kappa > 0 else float("nan"),
                  eigenvalues_below={str(t): int(np.sum(values < t)) for t in (1e-3, 1e-2, 1e-1, 1.0)})
    log(f"  eigenvalues of H: min {values[0]:.3e}, max {values[-1]:.4g}; κ(H + {DELTA:g} I) = {kappa:.3g}; "
        f"below 1e-2: {record['eigenvalues_below']['0.01']}, below 1: {record['eigenvalues_below']['1.0']} of {len(values)}")
    return record


def run_problem(name, spec, quick, log):
    record, problem, pure, loss, train, test, lam = trained_problem(name, spec, log)
    d, n, m, q = record["d"], record["n_tasks"], record["n_support"], record["n_query"]

    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
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
    top = S.lanczos_eigenvalues(hvp_fn, lam, k=1, which="largest", iterations=min(d, 40)).values
    record["max_eigenvalue"] = float(top[0])
    log(f"  largest eigenvalue of H: {record['max_eigenvalue']:.4g}")

    first, warm, ref = timed(lambda: metaif.influence(problem, lam, train, target=target, solver=S.Dense(damping=DELTA)))
    min_eig = float(ref.solve.min_eigenvalue)
    undamped = metaif.influence(problem, lam, train, target=target, solver=S.Dense())
    record["condition_number"] = (record["max_eigenvalue"] + DELTA) / (min_eig + DELTA)
    record.update(reference=dict(solver=f"Dense(damping={DELTA:g})", damping=DELTA, compile_s=first - warm, time_s=warm,
                                 x_grad=warm / grad_s, min_eigenvalue=min_eig,
                                 adaptation_residual=float(ref.adaptation_residual)))
    exact0 = {level: np.asarray(getattr(undamped, level)) for level in LEVELS}
    log(f"  exact: ||grad F|| = {float(ref.grad_norm):.2e}, min eig H = {min_eig:.3e}, dense {warm:.2f}s "
        f"(compile {first - warm:.1f}s), one grad {grad_s * 1e3:.2f} ms, adaptation residual "
        f"{float(ref.adaptation_residual):.1e}")
    exact = {level: np.asarray(getattr(ref, level)) for level in LEVELS}

    # Leave-one-out ground truth on a sample of each level.
    k = QUICK_LOO_SAMPLE if quick else LOO_SAMPLE
    rng = np.random.default_rng(0)
    samples = {"tasks": rng.choice(n, k, replace=False),
               "support": np.stack([rng.choice(n, k, replace=False), rng.integers(0, m, k)], 1),
               "query": np.stack([rng.choice(n, k, replace=False), rng.integers(0, q, k)], 1)}
    loo_levels = spec["loo"]
    loo, start = {}, now()
    for level in loo_levels:
        change, norms = leave_one_out(problem, lam, train, level, samples[level], target, steps=LOO_STEPS, batch_size=None,
                                      proximal=DELTA)
        loo[level] = np.asarray(change)
        record.setdefault("loo_grad_norm_max", {})[level] = float(np.max(norms))
    record["loo_s"] = now() - start
    record["loo_sample"] = {level: samples[level].tolist() for level in loo_levels}
    record["loo_change"] = {level: loo[level].tolist() for level in loo_levels}
    log(f"  leave-one-out ({k} per level, {', '.join(loo_levels)}): {record['loo_s']:.1f}s, max final ||grad|| "
        f"{max(record['loo_grad_norm_max'].values()):.1e}")

    def pick(level, scores):
        s = samples[level]
        return scores[s] if level == "tasks" else scores[s[:, 0], s[:, 1]]

    def agreement(scores):
        pred = np.concatenate([-pick(level, scores[level]) for level in loo_levels])
        true = np.concatenate([loo[level] for level in loo_levels])
        per = {level: metrics.spearman(-pick(level, scores[level]), loo[level]) for level in loo_levels}
        return dict(spearman=metrics.spearman(pred, true), pearson=metrics.pearson(pred, true),
                    rel_error=relative_error(pred, true), spearman_by_level=per)

    record["reference"]["loo"] = agreement(exact)
    record["reference"]["undamped"] = dict(
        spearman_vs_damped={level: metrics.spearman(exact0[level], exact[level]) for level in LEVELS},
        loo=agreement(exact0))
    log(f"  undamped exact vs damped exact: task spearman {record['reference']['undamped']['spearman_vs_damped']['tasks']:.3f}; "
        f"undamped vs proximal leave-one-out: spearman {record['reference']['undamped']['loo']['spearman']:.3f}")
    log(f"  exact (δ = {DELTA:g}) vs proximal leave-one-out: spearman {record['reference']['loo']['spearman']:.3f}, pearson "
        f"{record['reference']['loo']['pearson']:.3f}, rel err {record['reference']['loo']['rel_error']:.3f}")

    rows = []
    header = f"  {'configuration':38s} {'sp_task':>7s} {'sp_sup':>7s} {'sp_qry':>7s} {'re_task':>8s} {'re_ex':>8s} " \
             f"{'loo_sp':>6s} {'hvps':>6s} {'x_grad':>7s} {'time_s':>7s} {'comp_s':>6s} conv"
    log(header)
    for cname, family, x, solver, curv, prob in configurations(problem, loss, spec["grid"]):
        try:
            first, warm, out = timed(lambda: metaif.influence(prob, lam, train, target=target, solver=solver, curvature=curv))
        except Exception as error:  # report and go on (e.g. an option a model does not support)
            log(f"  {cname:38s} failed: {type(error).__name__}: {error}")
            rows.append(dict(name=cname, family=family, x=x, error=f"{type(error).__name__}: {error}"))
            continue
        scores = {level: np.asarray(getattr(out, level)) for level in LEVELS}
        finite = all(np.all(np.isfinite(s)) for s in scores.values())
        iterations = int(out.solve.iterations)
        row = dict(
            name=cname, family=family, x=x, solver=repr(solver), curvature=repr(curv) if curv is not None else "Exact()",
            first_order=prob is not problem,
            spearman={level: metrics.spearman(scores[level], exact[level]) if finite else float("nan") for level in LEVELS},
            pearson={level: metrics.pearson(scores[level], exact[level]) if finite else float("nan") for level in LEVELS},
            rel_error={level: relative_error(scores[level], exact[level]) for level in LEVELS},
            loo=agreement(scores) if finite else None,
            spearman_vs_undamped={level: metrics.spearman(scores[level], exact0[level]) if finite else float("nan")
                                  for level in LEVELS},
            time_s=warm, compile_s=first - warm, x_grad=warm / grad_s,
            iterations=iterations,
            hvps=d if isinstance(solver, S.Dense) else nominal_products(family, x, solver, d, n, iterations),
            relative_residual=float(out.solve.relative_residual), converged=bool(out.solve.converged),
            indefinite=bool(out.solve.indefinite),
        )
        row["rel_error"]["examples"] = relative_error(np.concatenate([scores["support"].ravel(), scores["query"].ravel()]),
                                                      np.concatenate([exact["support"].ravel(), exact["query"].ravel()]))
        rows.append(row)
        sp, re = row["spearman"], row["rel_error"]
        loo_sp = row["loo"]["spearman"] if row["loo"] else float("nan")
        log(f"  {cname:38s} {sp['tasks']:7.3f} {sp['support']:7.3f} {sp['query']:7.3f} {re['tasks']:8.1e} "
            f"{re['examples']:8.1e} {loo_sp:6.3f} {row['hvps']:6.0f} {row['x_grad']:7.1f} {warm:7.3f} "
            f"{first - warm:6.1f} {'y' if row['converged'] else 'n'}{'!' if row['indefinite'] else ''}")
    record["configurations"] = rows
    return record


# ----------------------------------------------------------------------------- plots


def plot(record, env, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["configurations"] if "error" not in r]
    cost = lambda r: r["hvps"] + 1  # deterministic; measured times (x_grad in the JSON) are load-sensitive
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = (("task Spearman vs exact", lambda r: r["spearman"]["tasks"], False),
              ("example Spearman vs exact (min of support, query)",
               lambda r: min(r["spearman"]["support"], r["spearman"]["query"]), False),
              ("relative error of task scores", lambda r: r["rel_error"]["tasks"], True))
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
                ax.annotate(r["name"].replace(" (FirstOrder)", ""), (cost(r), value(r)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
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
        f"jax {env['jax']}", fontsize=9)
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
    parser.add_argument("--spectrum", action="store_true",
                        help="only train and save the dense eigenvalue spectrum of H (results/solvers_spectrum.json)")
    args = parser.parse_args(argv)
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
