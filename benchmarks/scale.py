"""Influence for Conv4 meta-learners on raw Omniglot: accuracy, cost and memory against the
meta-gradient, the default solve against a converged reference, and proximal leave-one-out
retraining as ground truth where the dense Hessian is out of reach.

    .venv/bin/python benchmarks/scale.py                    # CPU size: 16 filters, n = 256, 5-way 1-shot
    .venv/bin/python benchmarks/scale.py --size truth       # CPU ground truth: proximal leave-one-out, 8 filters, n = 16 (smooth Conv4)
    .venv/bin/python benchmarks/scale.py --size gpu         # 64 filters, n = 2,000, 20-way 1-shot (one GPU)
    .venv/bin/python benchmarks/scale.py --size tiny        # a smoke run of every stage (the tests run it)

The network is Conv4 with group norm, ReLU and max-pooling, except where the size says `smooth`
(or --smooth is given): softplus and average pooling. With ReLU or max-pooling the MAML
meta-gradient jumps (the inner step differentiates through the switches), so ‖∇F‖ -> 0
retraining, the ground truth of the truth stage, need not exist; the smooth network is C².

Needs Omniglot's official zips under $METAIF_DATA (default ../shared/data from the repository
root). Writes results/scale-<size>/scale.json after every stage; the trained λ and Adam state are
checkpointed every `log_every` steps, so a rerun resumes where it stopped (--fresh starts over).

Stages (each a ratio measured in this one process, never a timed assertion; `scaling` and
`accuracy` train or analyse other networks, 30–40 min each at the CPU size, so they run only when
named in --stages):
  train      Adam on n fixed training tasks (task minibatches, per-task gradient chunks), then
             query accuracy on `test` held-out tasks (evaluation alphabets) with a 95% interval.
  influence  the default `metaif.influence` call (CG, curvature-aware damping) for one target
             (mean query loss of `target` held-out tasks): compile and warm seconds beside one
             meta-gradient's, as a ratio, and the extra peak memory of each call.
  reference  the same curvature and damping solved to tol 1e-6 (or `reference_maxiter`): the
             Spearman of the default's task, support and query scores against it.
  budget     CG with fewer products (BUDGETS) than the default's 16: cost, δ and Spearman
             against the default.
  scaling    the default influence's cost and memory against n and width (the size's `scaling`
             points, at the initial λ), as ratios to one meta-gradient; resumes point by point.
  accuracy   what limits held-out accuracy: the train stage again (same steps, optimiser and
             initialisation) at each (n, queries per class) of the size's `accuracy` points, beside
             the train stage's own; resumes point by point.
  chunk      the automatic chunk size (`chunk_size="auto"`) on this network: one task's
             working-memory estimate against what XLA assigns to the compiled score pass of 1 and
             8 tasks, and the chunk it picks on this device.
  truth      proximal leave-one-out retraining (minimise F(λ; w) + (ρ/2)‖λ − λ*‖², ρ = the
             default's δ, Newton–CG to a gradient tolerance) for `removals` tasks, support and
             query examples; repeated from a perturbed start for the noise ceiling; every
             method's Spearman against it (sizes with removals > 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import metaif

metaif.configure_cpu()

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from metaif import core, evaluation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": dict(filters=4, n=8, ways=5, queries=1, steps=20, minibatch=4, log_every=10, test=20, target=8,
                 chunk=1, reference_maxiter=40, removals=3, retrain_maxiter=60, smooth=False,
                 scaling=((8, 4), (16, 4), (8, 8)), accuracy=((16, 1), (8, 2))),
    "cpu": dict(filters=16, n=256, ways=5, queries=1, steps=1500, minibatch=16, log_every=250, test=600,
                target=64, chunk=1, reference_maxiter=60, removals=0, retrain_maxiter=0, smooth=False,
                scaling=((256, 16), (512, 16), (1024, 16), (256, 32)), accuracy=((1024, 1), (4096, 1), (16384, 1), (256, 5))),
    "truth": dict(filters=8, n=16, ways=5, queries=1, steps=1000, minibatch=8, log_every=250, test=600,
                  target=64, chunk=1, reference_maxiter=60, removals=16, retrain_maxiter=100, smooth=True,
                  scaling=(), accuracy=()),
    "gpu": dict(filters=64, n=2000, ways=20, queries=1, steps=2000, minibatch=32, log_every=500, test=600,
                target=64, chunk=100, reference_maxiter=60, removals=0, retrain_maxiter=0, smooth=False,
                scaling=((256, 16), (512, 16), (1024, 16), (256, 32), (256, 64)), accuracy=()),
}  # fmt: skip
SHOTS, INNER_STEPS, INNER_LR, ADAM_LR, META_REG = 1, 1, 0.4, 3e-3, 0.0
BUDGETS = (8, 12)  # the budget stage: CG(maxiter=k) for these k beside the default's 16
STAGES = ("train", "influence", "reference", "budget", "truth", "scaling", "accuracy", "chunk")
DEFAULT_STAGES = ("train", "influence", "reference", "budget", "truth", "chunk")  # scaling, accuracy: ask by name


# ----------------------------------------------------------------------------- set-up


def data_root(given: str | None) -> str:
    root = given or os.environ.get("METAIF_DATA") or str(ROOT.parent / "shared" / "data")
    if not Path(root).exists():
        sys.exit(f"scale.py: Omniglot not found: --data {root!r} does not exist. Pass --data or set METAIF_DATA.")
    return root


def build(size: dict, root: str):
    """(model, problem, train tasks, target tasks, test tasks) for one size."""
    omniglot = metaif.data.load_omniglot(root)
    split = metaif.data.omniglot_split()
    sample = lambda n, queries, seed, classes: metaif.data.few_shot_tasks(
        omniglot.images, omniglot.labels, n, size["ways"], SHOTS, queries, seed=seed, classes=classes
    )
    tasks = sample(size["n"], size["queries"], 0, split.train)
    target = sample(size["target"], 5, 1, split.test)
    test = sample(size["test"], 5, 2, split.test)
    module = metaif.models.Conv4(
        (28, 28), size["ways"], filters=size["filters"], norm="group", rngs=nnx.Rngs(0),
        activation=jax.nn.softplus if size["smooth"] else jax.nn.relu, pool="avg" if size["smooth"] else "max",
    )  # fmt: skip
    model = metaif.models.from_nnx(module)
    problem = metaif.BilevelProblem(
        model.cross_entropy, model.cross_entropy, metaif.Unrolled(INNER_STEPS, INNER_LR), meta_reg=META_REG
    )
    to_device = lambda t: jax.tree.map(jnp.asarray, t)
    return model, problem, to_device(tasks), to_device(target), to_device(test)


def target_fn(problem, target_tasks, chunk):
    """f(λ) = mean query loss of the held-out target tasks after adaptation, `chunk` tasks at a
    time (a vmap over every task would make grouped convolutions and hold all their activations).
    Each task's loss is rematerialised (`jax.checkpoint`), so ∇f holds one task's activations at a
    time rather than every task's."""

    def f(lam):
        one = jax.checkpoint(lambda task: core.task_losses(problem, lam, jax.tree.map(lambda x: x[None], task))[0])
        return jnp.mean(jax.lax.map(one, target_tasks, batch_size=chunk))

    return f


def compiled(fn, *args):
    """(compiled executable, compile seconds, bytes XLA assigns beyond the arguments: temporaries
    and outputs, the call's peak working memory)."""
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    memory = executable.memory_analysis()
    working = None if memory is None else int(memory.temp_size_in_bytes + memory.output_size_in_bytes)
    return executable, seconds, working


def warm_seconds(executable, *args, repeats: int = 1) -> tuple[float, Any]:
    """(fastest of `repeats` calls, output)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(executable(*args))
        best = min(best, time.perf_counter() - start)
    return best, out


# ----------------------------------------------------------------------------- stages


def stage_train(size, model, problem, tasks, test, folder: Path, log, *, full: bool = True) -> dict:
    """Adam on the fixed tasks, checkpointed every `log_every` steps; accuracy with a 95% interval.
    `full=False` skips F and ‖∇F‖ over all n tasks and scores train accuracy on the first 600."""
    optimizer = optax.adam(ADAM_LR)
    step = jax.jit(core.train_steps, static_argnames=("optimizer", "steps", "minibatch", "chunk_size"))
    checkpoint = folder / "train_state.npz"
    lam = model.params
    with jax.numpy_dtype_promotion("standard"):
        state = optimizer.init(lam)
    flat_lam, unravel = jax.flatten_util.ravel_pytree((lam, state))
    done, seconds, chunk_seconds, values = 0, 0.0, [], []
    if checkpoint.exists():
        saved = np.load(checkpoint)
        flat_lam, done, seconds = jnp.asarray(saved["state"]), int(saved["done"]), float(saved["seconds"])
        values = list(saved["values"])
        log(f"train: resumed at step {done}/{size['steps']}")
    lam, state = unravel(flat_lam)
    key = jax.random.key(0)
    while done < size["steps"]:
        length = min(size["log_every"], size["steps"] - done)
        start = time.perf_counter()
        lam, state, v, g = step(
            problem, optimizer, lam, state, tasks, steps=length, key=jax.random.fold_in(key, done),
            minibatch=size["minibatch"], chunk_size=size["chunk"],
        )  # fmt: skip
        jax.block_until_ready(lam)
        elapsed = time.perf_counter() - start
        chunk_seconds.append(elapsed)
        seconds += elapsed
        done += length
        values.extend(np.asarray(v).tolist())
        np.savez(checkpoint, state=np.asarray(jax.flatten_util.ravel_pytree((lam, state))[0]), done=done,
                 seconds=seconds, values=np.asarray(values))  # fmt: skip
        log(f"train: step {done}/{size['steps']}, minibatch F = {float(np.mean(np.asarray(v))):.4f}, {elapsed:.1f} s")
    objective, grad_norm = None, None
    if full:
        grad = jax.jit(lambda p, l, t: core.value_and_grad(p, l, t, chunk_size=size["chunk"]))
        objective, gradient = grad(problem, lam, tasks)
        objective, grad_norm = float(objective), float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(gradient))))
    accuracy = accuracies(problem, model, lam, test)
    train_accuracy = accuracies(problem, model, lam, tasks if full else jax.tree.map(lambda x: x[:600], tasks))
    half = 1.96 * float(np.std(accuracy, ddof=1)) / np.sqrt(accuracy.size)
    per_step = (chunk_seconds[-1] / size["log_every"]) if len(chunk_seconds) > 1 else None
    return {
        "steps": size["steps"],
        "seconds": seconds,
        "seconds_per_step_warm": per_step,
        "compile_s": (chunk_seconds[0] - per_step * size["log_every"]) if per_step and done == size["steps"] else None,
        "objective": objective,
        "grad_norm": grad_norm,
        "test_accuracy": float(np.mean(accuracy)),
        "test_accuracy_ci95": [float(np.mean(accuracy)) - half, float(np.mean(accuracy)) + half],
        "test_tasks": int(accuracy.size),
        "train_accuracy": float(np.mean(train_accuracy)),
        "meta_params": _save_params(folder, lam),
    }


def accuracies(problem, model, lam, tasks, rows=50) -> np.ndarray:
    """[n] query accuracies, `rows` tasks per call (one compiled shape, padded at the end)."""
    n = tasks.n_tasks
    out = []
    for start in range(0, n, rows):
        index = np.minimum(np.arange(start, start + rows), n - 1)
        part = jax.tree.map(lambda x: x[index], tasks)
        out.append(np.asarray(metaif.task_accuracies(problem, lam, part, model.predict))[: n - start])
    return np.concatenate(out)


def _save_params(folder: Path, lam) -> str:
    path = folder / "meta_params.npz"
    np.savez(path, flat=np.asarray(jax.flatten_util.ravel_pytree(lam)[0]))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _load_params(folder: Path, like):
    flat = jnp.asarray(np.load(folder / "meta_params.npz")["flat"])
    return jax.flatten_util.ravel_pytree(like)[1](flat)


def stage_influence(size, problem, lam, tasks, target, log, solver=None) -> tuple[dict, metaif.Influence]:
    """The default influence computation (what `metaif.influence(problem, λ, tasks, target)` runs:
    CG with the curvature-aware damping, or `solver`) beside one meta-gradient, compiled ahead of
    time: compile seconds, warm seconds and working memory, each as a ratio."""
    chunk = size["chunk"]
    gradient, g_compile, g_memory = compiled(lambda l: core.value_and_grad(problem, l, tasks, chunk_size=chunk), lam)
    g_warm, _ = warm_seconds(gradient, lam)
    log(f"influence: meta-gradient {g_warm:.2f} s warm, {g_compile:.1f} s compile, {g_memory / 2**20:.0f} MiB")
    call = lambda l: core.influence_on_target(problem, l, tasks, target, solver=solver, chunk_size=chunk)
    executable, i_compile, i_memory = compiled(call, lam)
    i_warm, result = warm_seconds(executable, lam)
    solve, diag = result.diagnostics.solve, result.diagnostics
    log(
        f"influence: {i_warm:.2f} s warm ({i_warm / g_warm:.1f} meta-gradients), {i_compile:.1f} s compile, "
        f"{i_memory / 2**20:.0f} MiB, δ = {float(solve.damping):.4g}"
    )
    row = {
        "meta_gradient": {"compile_s": g_compile, "warm_s": g_warm, "working_memory_bytes": g_memory},
        "influence": {"compile_s": i_compile, "warm_s": i_warm, "working_memory_bytes": i_memory},
        "warm_ratio": i_warm / g_warm,
        "compile_ratio": i_compile / g_compile,
        "memory_ratio": i_memory / g_memory if g_memory else None,
        "chunk_size": chunk,
        "damping": float(solve.damping),
        "min_curvature_seen": float(solve.min_eigenvalue),
        "cg_iterations": int(solve.iterations),
        "cg_converged": bool(solve.converged),
        "cg_relative_residual": float(solve.relative_residual),
        "indefinite": bool(solve.indefinite),
        "grad_norm": float(diag.grad_norm),
        "nonstationary_change": float(diag.nonstationary_change),
        "largest_task_score": float(jnp.max(jnp.abs(result.tasks))),
    }
    return row, result


def spearmans(a: metaif.Influence | metaif.Scores, b) -> dict:
    s = evaluation.metrics.spearman
    return {
        "tasks": s(np.ravel(a.tasks), np.ravel(b.tasks)),
        "support": s(np.ravel(a.support), np.ravel(b.support)),
        "query": s(np.ravel(a.query), np.ravel(b.query)),
    }


def stage_reference(size, problem, lam, tasks, target, default, log) -> dict:
    """The default's scores against CG with the same δ run to tol 1e-6 (or reference_maxiter)."""
    solver = metaif.solvers.CG(damping=float(default.solve.damping), tol=1e-6, maxiter=size["reference_maxiter"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metaif.NonStationaryWarning)
        reference = metaif.influence(problem, lam, tasks, target=target, solver=solver, chunk_size=size["chunk"])
    seconds = time.perf_counter() - start
    info = reference.solve
    row = {
        "spearman": spearmans(default, reference),
        "seconds": seconds,
        "damping": float(info.damping),
        "iterations": int(info.iterations),
        "relative_residual": float(info.relative_residual),
        "converged": bool(info.converged),
    }
    log(f"reference: {row['spearman']}, relative residual {row['relative_residual']:.2g}")
    return row


def stage_budget(size, problem, lam, tasks, target, default, log) -> dict:
    """Fewer products than the default's 16: `CG(maxiter=k)` (default damping, so δ is raised
    where k products cannot solve to 1e-2) for k in BUDGETS, each measured by `stage_influence`
    (a warm-time ratio to one meta-gradient) with its δ, residual and Spearman against the default."""
    rows = {}
    for k in BUDGETS:
        row, result = stage_influence(size, problem, lam, tasks, target, log, metaif.solvers.CG(maxiter=k))
        rows[str(k)] = {
            "warm_ratio": row["warm_ratio"],
            "compile_s": row["influence"]["compile_s"],
            "damping": row["damping"],
            "min_curvature_seen": row["min_curvature_seen"],
            "relative_residual": row["cg_relative_residual"],
            "spearman_vs_default": spearmans(result, default),
        }
        log(f"budget: {k} products: {rows[str(k)]}")
    return rows


def new_points(points: dict, rows: dict, save, measure) -> None:
    """rows[key] = measure(**point) for each key of `points` not yet in `rows` (finished points
    of an earlier run), calling save() after each."""
    for key, point in points.items():
        if key not in rows:
            rows[key] = measure(**point)
            save()


def stage_scaling(size, root: str, rows: dict, save, log) -> None:
    """Cost and memory of the default influence against n and width: for each (n, filters) in the
    size's `scaling` points, one meta-gradient and the default influence at the initial λ, with
    all 16 products spent (`CG(tol=1e-30)`: at a trained λ the default does not converge early,
    at the initial one it can), compile and warm seconds and working memory, each as a ratio.
    Fills `rows` (finished points are kept)."""

    def measure(n, filters):
        point = dict(size, n=n, filters=filters)
        model, problem, tasks, target_tasks, _ = build(point, root)
        target = target_fn(problem, target_tasks, point["chunk"])
        row, _ = stage_influence(point, problem, model.params, tasks, target, log, metaif.solvers.CG(tol=1e-30))
        d = int(sum(x.size for x in jax.tree.leaves(model.params)))
        log(f"scaling: n={n},filters={filters}, d = {d:,}: {row['warm_ratio']:.1f} meta-gradients")
        return {
            "n": n,
            "filters": filters,
            "d": d,
            **{k: row[k] for k in ("meta_gradient", "influence", "warm_ratio", "compile_ratio", "memory_ratio")},
            "products": row["cg_iterations"],
        }

    points = {f"n={n},filters={filters}": dict(n=n, filters=filters) for n, filters in size["scaling"]}
    new_points(points, rows, save, measure)


def stage_accuracy(size, root: str, folder: Path, rows: dict, save, log) -> None:
    """Held-out accuracy against the number of training tasks and queries per class: the train
    stage at each (n, queries) of the size's `accuracy` points (train accuracy on the first 600
    tasks), each in its own checkpoint folder (folder/accuracy/<point>). Fills `rows` (finished
    points are kept)."""

    def measure(n, queries):
        point = dict(size, n=n, queries=queries)
        model, problem, tasks, _, test = build(point, root)
        checkpoints = folder / "accuracy" / f"n={n},queries={queries}"
        checkpoints.mkdir(parents=True, exist_ok=True)
        row = stage_train(point, model, problem, tasks, test, checkpoints, log, full=False)
        log(
            f"accuracy: n={n},queries={queries}: held-out {row['test_accuracy']:.3f}, train {row['train_accuracy']:.3f}"
        )
        keep = ("train_accuracy", "steps", "seconds", "seconds_per_step_warm", "test_accuracy", "test_accuracy_ci95")
        return {"n": n, "queries": queries, **{k: row[k] for k in keep}}

    points = {f"n={n},queries={queries}": dict(n=n, queries=queries) for n, queries in size["accuracy"]}
    new_points(points, rows, save, measure)


def stage_chunk(problem, lam, tasks, log) -> dict:
    """`core.task_bytes` (the estimate `chunk_size="auto"` divides free memory by) against XLA's
    working memory for the score pass over 1 and 8 tasks, and `core.auto_chunk_size` here."""
    estimate, convolves = core.task_bytes(problem, lam, tasks)
    scores = lambda lam, some: core.target_scores(problem, lam, some, lam)
    xla = {k: compiled(scores, lam, jax.tree.map(lambda x: x[:k], tasks))[2] for k in (1, 8)}
    row = {
        "estimate_bytes_per_task": estimate,
        "convolves": convolves,
        "xla_bytes_1_task": xla[1],
        "xla_bytes_8_tasks": xla[8],
        "estimate_over_xla": estimate / xla[1] if xla[1] else None,
        "auto_chunk_size": core.auto_chunk_size(problem, lam, tasks),
    }
    log(f"chunk: estimate {estimate / 2**20:.1f} MiB per task, XLA {xla[1] / 2**20:.1f} MiB (1 task), "
        f"{xla[8] / 2**20:.1f} MiB (8); auto chunk {row['auto_chunk_size']}")  # fmt: skip
    return row


def stage_truth(size, model, problem, lam, tasks, target, default, folder: Path, log) -> dict:
    """Proximal leave-one-out retraining at ρ = δ (Newton–CG to a tolerance) and every method's
    Spearman against it. Each finished level is kept in truth_levels.json, so a rerun with the
    same ρ and removals resumes after it."""
    rho = float(default.solve.damping)
    n, m, q = tasks.n_tasks, tasks.n_support, tasks.n_query
    count = size["removals"]
    rng = np.random.default_rng(0)
    picks = {  # flat indices into scores [n], [n, m], [n, q]
        "tasks": rng.choice(n, min(count, n), replace=False),
        "support": rng.choice(n * m, min(count, n * m), replace=False),
        "query": rng.choice(n * q, min(count, n * q), replace=False),
    }
    columns = {"tasks": 1, "support": m, "query": q}
    removal_index = lambda level, flat: flat if level == "tasks" else np.stack(np.divmod(flat, columns[level]), axis=1)
    solver = metaif.solvers.CG(tol=1e-6, maxiter=size["retrain_maxiter"])
    retrain = lambda start, weights, tol: evaluation.retrain(
        problem, start, tasks, weights, steps=20, proximal=rho, center=lam, tol=tol, chunk_size=1,
        solver=solver, task_chunk_size=size["chunk"],
    )  # fmt: skip
    f = target_fn(problem, target, size["chunk"])
    ones = core.Weights(jnp.ones((1, n)), jnp.ones((1, n, m)), jnp.ones((1, n, q)))
    start = time.perf_counter()
    floor = 1e-4 * float(default.diagnostics.grad_norm)  # the full retraining's tolerance
    base = retrain(lam, ones, floor)
    hat = jax.tree.map(lambda x: x[0], base.meta_params)
    log(f"truth: full proximal retraining ‖∇‖ = {float(base.grad_norm[0]):.2e} in {int(base.iterations[0])} steps")
    truth, converged, ceiling, tolerance, products, level_seconds = {}, {}, {}, {}, {}, {}
    perturbation = jax.flatten_util.ravel_pytree(hat)[1](
        1e-3 * jax.random.normal(jax.random.key(1), jax.flatten_util.ravel_pytree(hat)[0].shape, jnp.float32)
    )
    base_value = float(f(hat))
    saved_path = folder / "truth_levels.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    if saved.get("rho") != rho or saved.get("removals") != count:
        saved = {"rho": rho, "removals": count, "levels": {}}
    for level, index in picks.items():
        if level in saved["levels"]:
            row = saved["levels"][level]
            log(f"truth: {level}: kept from {saved_path.name}")
        else:
            level_start = time.perf_counter()
            weights = evaluation.removal_weights(n, m, q, level, removal_index(level, index), dtype=jnp.float32)  # type: ignore[arg-type]
            # each removal's tolerance: 1e-3 of the smallest starting gradient (≈ ‖∂ removal‖ at λ̂),
            # but not below the full retraining's (float32 stalls there)
            start_norms = proximal_gradient_norms(problem, hat, lam, rho, tasks, weights, size["chunk"])
            tol = max(1e-3 * float(jnp.min(start_norms)), floor)
            first = retrain(hat, weights, tol)
            again = retrain(jax.tree.map(jnp.add, hat, perturbation), weights, tol)
            row = {
                "values": (np.asarray(jax.lax.map(f, first.meta_params)) - base_value).tolist(),
                "repeat": (np.asarray(jax.lax.map(f, again.meta_params)) - base_value).tolist(),
                "converged": int(np.sum(np.asarray(first.grad_norm) <= tol)),
                "products": float(np.mean(np.asarray(first.products))),
                "tolerance": tol,
                "smallest_start_gradient": float(jnp.min(start_norms)),
                "seconds": time.perf_counter() - level_start,
            }
            saved["levels"][level] = row
            saved_path.write_text(json.dumps(saved) + "\n")
        truth[level] = np.asarray(row["values"])
        converged[level], products[level], tolerance[level] = row["converged"], row["products"], row["tolerance"]
        ceiling[level] = evaluation.metrics.spearman(truth[level], np.asarray(row["repeat"]))
        level_seconds[level] = row["seconds"]
        log(
            f"truth: {level}: {converged[level]}/{len(index)} converged, ceiling {ceiling[level]:.3f}, "
            f"{products[level]:.0f} products per retraining, {level_seconds[level]:.0f} s for {2 * len(index)} retrainings"
        )
    seconds = time.perf_counter() - start

    def against(scores) -> dict:
        out = {}
        for level, index in picks.items():
            flat = np.ravel(np.asarray(getattr(scores, level)))[index]
            out[level] = evaluation.metrics.spearman(-flat, truth[level])  # removal changes f by about −score
        return out

    chunk = size["chunk"]
    methods = {  # computed one by one below, each timed (compile included)
        "task-IF (default CG)": lambda: default,
        "task-IF (CG, δ = 1e-4·λ_max)": lambda: metaif.influence(
            problem, lam, tasks, target=f, chunk_size=chunk,
            solver=metaif.solvers.CG(damping=1e-4 * largest_eigenvalue(problem, lam, tasks, chunk)),
        ),
        "task-IF (Gauss-Newton, same δ)": lambda: metaif.influence(
            problem, lam, tasks, target=f, chunk_size=chunk, solver=metaif.solvers.CG(damping=rho),
            curvature=model.cross_entropy.gauss_newton(),
        ),
        # the exact derivative of the proximal ground truth: λ̂ minimises F(λ) + (ρ/2)‖λ − λ*‖², so
        # influence at λ̂ with δ = ρ is d(argmin)/dω there (the default linearises at λ* instead)
        "task-IF at the retrained λ̂ (CG, δ = ρ)": lambda: metaif.influence(
            problem, hat, tasks, target=f, chunk_size=chunk,
            solver=metaif.solvers.CG(damping=rho, tol=1e-6, maxiter=size["reference_maxiter"]),
        ),
        "Direct-IF": lambda: evaluation.baselines.direct_if(problem, lam, tasks, f, solver=metaif.solvers.CG(damping=rho), chunk_size=chunk),
        "TracIn (gradient dot)": lambda: evaluation.baselines.grad_dot(problem, lam, tasks, f, chunk_size=chunk),
        "TRAK": lambda: evaluation.baselines.trak(problem, lam, tasks, f, chunk_size=chunk),
        "single-level IF": lambda: evaluation.baselines.single_level(problem, lam, tasks, f, solver=metaif.solvers.CG(damping=rho), chunk_size=chunk),
        "raw loss": lambda: evaluation.baselines.raw_loss(problem, lam, tasks),
        "random": lambda: evaluation.baselines.random_scores(tasks, seed=0),
    }  # fmt: skip
    spearman, method_seconds = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metaif.NonStationaryWarning)
        warnings.simplefilter("ignore", metaif.solvers.IndefiniteCurvatureWarning)
        for name, method in methods.items():
            method_start = time.perf_counter()
            spearman[name] = against(jax.block_until_ready(method()))
            method_seconds[name] = time.perf_counter() - method_start
            log(f"truth: {name}: {spearman[name]} ({method_seconds[name]:.0f} s with compile)")
    return {
        "rho": rho,
        "removals": {level: len(index) for level, index in picks.items()},
        "converged": converged,
        "tolerance": tolerance,
        "tolerance_floor": floor,
        "mean_products_per_retraining": products,
        "full_retraining": {"grad_norm": float(base.grad_norm[0]), "products": int(base.products[0])},
        "noise_ceiling": ceiling,
        "seconds": seconds,
        "level_seconds": level_seconds,
        "spearman": spearman,
        "method_seconds": method_seconds,
    }


@functools.partial(jax.jit, static_argnames=("chunk",))
def proximal_gradient_norms(problem, lam, center, rho, tasks, weights, chunk) -> jax.Array:
    """[B] ‖∇F(λ; w_b) + ρ(λ − center)‖ for a batch of weight settings (one at a time); jitted
    once, so every removal level reuses the compiled program."""
    offset = rho * (jax.flatten_util.ravel_pytree(lam)[0] - jax.flatten_util.ravel_pytree(center)[0])

    def norm(w):
        grad = core.value_and_grad(problem, lam, tasks, w, chunk_size=chunk)[1]
        return jnp.linalg.norm(jax.flatten_util.ravel_pytree(grad)[0] + offset)

    return jax.lax.map(norm, weights)


def largest_eigenvalue(problem, lam, tasks, chunk) -> float:
    """λ_max(H) from 5 Lanczos products (the scale of the former default δ = 1e-4·λ_max)."""
    top = lambda l: metaif.solvers.lanczos_eigenvalues(
        core.operator(problem, l, tasks, chunk_size=chunk)[2], k=1, which="largest", iterations=5
    ).values[0]
    return float(jax.jit(top)(lam))


# ----------------------------------------------------------------------------- driver


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)})",
    )
    parser.add_argument(
        "--data", default=None, help="folder with Omniglot's zips (default $METAIF_DATA, ../shared/data)"
    )
    parser.add_argument("--out", default=None, help="result folder (default results/scale-<size>)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished stages and checkpoints")
    parser.add_argument(
        "--redo", action="store_true", help="rerun the --stages named even where finished (keeps the trained λ)"
    )
    parser.add_argument("--smooth", action="store_true", help="softplus and average pooling (a C² network)")
    parser.add_argument("--removals", type=int, default=None, help="removals per level in the truth stage")
    args = parser.parse_args(argv)
    size = dict(SIZES[args.size])
    name = args.size + ("-smooth" if args.smooth and not size["smooth"] else "")
    size["smooth"] = size["smooth"] or args.smooth
    if args.removals is not None:
        size["removals"] = args.removals
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    folder = Path(args.out) if args.out else ROOT / "results" / f"scale-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "scale.json"
    if args.fresh:
        for name in ("scale.json", "train_state.npz", "meta_params.npz"):
            (folder / name).unlink(missing_ok=True)
    results = json.loads(result_path.read_text()) if result_path.exists() else {}
    if args.redo:
        for stage in stages:
            results.pop(stage, None)
    results.update(
        size=args.size, config=size, backend=jax.default_backend(), device=str(jax.devices()[0]),
        jax=jax.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
        command="python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )  # fmt: skip
    log = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def save():
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
        tmp.replace(result_path)

    model, problem, tasks, target_tasks, test = build(size, data_root(args.data))
    results["d"] = int(sum(x.size for x in jax.tree.leaves(model.params)))
    log(f"size {args.size}: d = {results['d']:,}, n = {tasks.n_tasks}, {size['ways']}-way {SHOTS}-shot")
    if "train" in stages and "train" not in results:
        results["train"] = stage_train(size, model, problem, tasks, test, folder, log)
        save()
        log(f"train: test accuracy {results['train']['test_accuracy']:.3f}")
    pending = [
        stage
        for stage in ("influence", "reference", "budget", "truth")
        if stage in stages and stage not in results and (stage != "truth" or size["removals"])
    ]
    if pending:  # every later stage compares with the default influence: computed once here
        if not (folder / "meta_params.npz").exists():
            sys.exit(f"scale.py: no trained meta_params in {folder}: run the train stage first.")
        lam = _load_params(folder, model.params)
        target = target_fn(problem, target_tasks, size["chunk"])
        row, default = stage_influence(size, problem, lam, tasks, target, log)
        results["influence"] = row
        save()
        if "reference" in pending:
            results["reference"] = stage_reference(size, problem, lam, tasks, target, default, log)
            save()
        if "budget" in pending:
            results["budget"] = stage_budget(size, problem, lam, tasks, target, default, log)
            save()
        if "truth" in pending:
            results["truth"] = stage_truth(size, model, problem, lam, tasks, target_tasks, default, folder, log)
            save()

    if "chunk" in stages and "chunk" not in results:
        results["chunk"] = stage_chunk(problem, model.params, tasks, log)
        save()
    # point stages fill results[stage] in place, saved after each point: a rerun measures only
    # the size's points not yet there (after --redo, all)
    root = data_root(args.data)
    if "scaling" in stages and size["scaling"]:
        stage_scaling(size, root, results.setdefault("scaling", {}), save, log)
    if "accuracy" in stages and size["accuracy"]:
        stage_accuracy(size, root, folder, results.setdefault("accuracy", {}), save, log)
    log(f"wrote {result_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
