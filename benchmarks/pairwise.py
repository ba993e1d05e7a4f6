"""Pairwise benchmark: scores of every training task and example on T targets at once, against T
separate single-target calls, as a ratio measured in one run.

Problem: 5-way 1-shot few-shot tasks from scikit-learn's bundled digits (no download), a tanh MLP
64-16-5 (d = 1,125 meta-parameters), MAML (`Unrolled`, 1 step), n training tasks; the T targets are
the query losses of T held-out test tasks (a scalar target mapped over `target_data`). λ is
meta-trained with Adam (timing does not need an exact optimum; fidelity is tested in
tests/test_explain.py); both solvers use damping max(0.05, 2·|smallest Hessian eigenvalue|).

For each solver (Dense: one factorisation reused by every target; CG: one batched solve per target)
and T in 1, 10, 100, 1000 it records:
* `pairwise_s`: `metaif.pairwise_influence(problem, λ, tasks, targets)` warm ([T, n], [T, n, m],
  [T, n, q] scores), and `compile_s` (first call − warm call);
* `single_s`: the warm cost of one single-target call (`metaif.influence` core with that target's
  gradient precomputed, averaged over 5 targets); `singles_s` = T × single_s (extrapolated for
  large T);
* `speedup` = singles_s / pairwise_s. Sub-linear cost in T shows as a speedup growing with T.

Usage (from the repository root):
    .venv/bin/python benchmarks/pairwise.py            # writes benchmarks/results/pairwise.json
    .venv/bin/python benchmarks/pairwise.py --quick    # T up to 100, n = 50, prints only
"""

from __future__ import annotations


import metaif  # noqa: E402

metaif.configure_cpu()  # before the first JAX computation: single-threaded Eigen kernels on CPU

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import metaif  # noqa: E402
from _timing import timed as _timed  # noqa: E402  (benchmarks/_timing.py)
from metaif import problems  # noqa: E402
from metaif import core  # noqa: E402

# One target's scores from its gradient: the single-call core that pairwise_influence is compared with.
_single_target = jax.jit(core.influence_from_gradient)

WAYS, SHOTS, QUERIES, HIDDEN = 5, 1, 5, 16
DAMPING = 0.05  # at least; raised to 2·|smallest eigenvalue| when H is indefinite (λ is Adam-trained)


def flat_mlp_loss(params, meta_params, example):
    return problems.mlp_cross_entropy(params, meta_params, {"x": example["x"].reshape(-1), "y": example["y"]})


def test_task_loss(problem, lam, task):
    """One test task's query loss after adaptation: a scalar target mapped over the test tasks."""
    theta = metaif.adapt(problem, lam, task.support)
    return jnp.mean(jax.vmap(flat_mlp_loss, in_axes=(None, None, 0))(theta, lam, task.query))


def setup(n_tasks: int, n_test: int):
    digits = metaif.data.load_digits()
    images = digits.images.astype(np.float64)
    train_classes, test_classes = np.arange(0, 10), np.arange(0, 10)
    tasks = metaif.data.few_shot_tasks(
        images, digits.labels, n_tasks, WAYS, SHOTS, QUERIES, seed=0, classes=train_classes
    )
    test = metaif.data.few_shot_tasks(images, digits.labels, n_test, WAYS, SHOTS, QUERIES, seed=1, classes=test_classes)
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype.kind == "f" else jnp.asarray(x), t)
    tasks, test = cast(tasks), cast(test)
    problem = metaif.BilevelProblem(flat_mlp_loss, flat_mlp_loss, metaif.Unrolled(steps=1, lr=0.5), meta_reg=1e-3)
    init = problems.mlp_init(jax.random.key(0), (64, HIDDEN, WAYS))
    lam = metaif.meta_train(problem, init, tasks, optax.adam(3e-3), steps=300).meta_params
    return problem, lam, tasks, test


def timed(fn):
    """(first-call s, one warm call s, output)."""
    return _timed(fn, max_repeats=1, min_total_s=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 50, T up to 100; prints only unless --out")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n_tasks, counts = (50, (1, 10, 100)) if args.quick else (200, (1, 10, 100, 1000))
    out = args.out or (None if args.quick else Path(__file__).parent / "results" / "pairwise.json")
    problem, lam, tasks, test = setup(n_tasks, max(counts))
    d = sum(x.size for x in jax.tree.leaves(lam))
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} d={d} n={n_tasks} m={SHOTS * WAYS} q={QUERIES * WAYS}"
    )
    rows = []
    target = functools.partial(test_task_loss, problem)
    smallest = float(
        metaif.solvers.lanczos_eigenvalues(metaif.hessian_operator(problem, lam, tasks), k=1, iterations=60).values[0]
    )
    damping = max(DAMPING, -2.0 * smallest)  # H + δI positive definite, so CG converges
    print(f"smallest Hessian eigenvalue (Lanczos, 60 steps) {smallest:.3g}; damping {damping:.3g}")
    for solver_name, solver in (
        ("dense", metaif.solvers.Dense(damping=damping)),
        ("cg", metaif.solvers.CG(damping=damping, maxiter=300, tol=1e-6)),
    ):
        for count in counts:
            subset = test[:count]
            first, warm, result = timed(
                lambda: metaif.pairwise_influence(problem, lam, tasks, target, solver=solver, target_data=subset)
            )
            jacobian = jax.vmap(jax.grad(target), in_axes=(None, 0))(lam, subset)
            singles = []
            for t in range(min(count, 5)):
                row = jax.tree.map(lambda x: x[t], jacobian)
                _, single, _ = timed(lambda: _single_target(problem, lam, tasks, row, solver=solver))
                singles.append(single)
            single = float(np.mean(singles))
            rows.append(
                dict(
                    solver=solver_name,
                    targets=count,
                    pairwise_s=warm,
                    compile_s=first - warm,
                    single_s=single,
                    singles_s=single * count,
                    speedup=single * count / warm,
                    converged=bool(result.solve.converged),
                    max_iterations=int(result.solve.iterations),
                )
            )
            r = rows[-1]
            print(
                f"{solver_name:>5} T={count:>5}  pairwise {warm:8.3f}s (compile {first - warm:6.2f}s)  "
                f"T singles {r['singles_s']:9.3f}s  speedup {r['speedup']:8.1f}x  converged={r['converged']}"
            )
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        record = dict(
            backend=jax.default_backend(),
            device_kind=jax.devices()[0].device_kind,
            device_count=jax.device_count(),
            dtype="float64",
            machine=platform.machine(),
            d=d,
            n_tasks=n_tasks,
            smallest_eigenvalue=smallest,
            damping=damping,
            rows=rows,
            command="python benchmarks/pairwise.py",
        )
        out.write_text(json.dumps(record, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
