"""Compile time beside warm time: the meta-gradient, `metaif.influence`, a meta-training step and
a retraining, for an MLP and Conv4 on 28×28 images, and JAX's persistent compilation cache.

    .venv/bin/python benchmarks/compile_time.py                # CPU sizes: mlp, conv4-16, conv4-32 (results/compile_time.json)
    .venv/bin/python benchmarks/compile_time.py --quick        # mlp and conv4-8 only, prints
    .venv/bin/python benchmarks/compile_time.py --size gpu     # conv4-64, 20-way, n = 64: for an accelerator

Per model: `compile_s` = first call − warm call of the same jitted function (one process, side by
side), `warm_s` the warm call, and each ratio to the meta-gradient's. `influence` is the default
call users make (`metaif.influence(problem, λ, tasks, target)`, CG() beyond d = 256), counted in
backend compiles per call; `sweep_compiles` is the number of compilations when the same call is
repeated with a new damping, tol, adaptation lr and meta_reg (0: numeric options are pytree
leaves). The `cache` entry runs the influence call in two fresh processes sharing an empty
persistent cache (`metaif.enable_compilation_cache`): the second loads what the first compiled.

Compile time does not depend on the values, so the images are random (28×28, 5-way 1-shot, 5
queries per class); it does depend on the machine's load: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import metaif

metaif.configure_cpu()
# λ is the initialisation: compile time does not depend on where it is, so the warning is noise here
warnings.simplefilter("ignore", metaif.NonStationaryWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from metaif import core  # noqa: E402

HERE = Path(__file__).resolve().parent
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
SIZES = {
    "quick": [("mlp", None), ("conv4", 8)],
    "cpu": [("mlp", None), ("conv4", 16), ("conv4", 32)],
    "gpu": [("conv4", 64)],
}


class CompileCounter:
    """Counts XLA backend compilations (a public monitoring event) while active."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            self.count += 1

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def random_tasks(rng, n, ways, shots, queries, size=28):
    def part(k):
        x = jnp.asarray(rng.random((n, ways * k, size, size)), jnp.float32)
        y = jnp.asarray(np.tile(np.repeat(np.arange(ways), k), (n, 1)), jnp.int32)
        return {"x": x, "y": y}

    return metaif.TaskSet(part(shots), part(queries))


def build(kind, filters, ways, n):
    rngs = nnx.Rngs(0)
    if kind == "mlp":
        module = metaif.models.MLP(28 * 28, [64, 64], ways, rngs=rngs)
        model = metaif.models.from_nnx(module)
        flat = lambda data: {"x": data["x"].reshape(data["x"].shape[:2] + (-1,)), "y": data["y"]}
    else:
        model = metaif.models.from_nnx(metaif.models.Conv4((28, 28), ways, filters=filters, rngs=rngs))
        flat = lambda data: data
    rng = np.random.default_rng(0)
    tasks, test = (random_tasks(rng, count, ways, 1, 5) for count in (n, 16))
    tasks = metaif.TaskSet(flat(tasks.support), flat(tasks.query))
    test = metaif.TaskSet(flat(test.support), flat(test.query))
    problem = metaif.BilevelProblem(model.cross_entropy, model.cross_entropy, metaif.Unrolled(1, 0.4), meta_reg=1e-4)
    return model, problem, tasks, test


def timed(fn):
    """(first-call seconds, warm seconds): the first call includes compilation."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return first, time.perf_counter() - start


def measure(kind, filters, ways, n, train_steps=1):
    model, problem, tasks, test = build(kind, filters, ways, n)
    lam = model.params
    d = sum(int(x.size) for x in jax.tree.leaves(lam))
    target = lambda l: metaif.task_losses(problem, l, test).mean()
    rows = {}

    gradient = jax.jit(lambda p, l: core.value_and_grad(p, l, tasks))
    rows["meta_gradient"] = timed(lambda: gradient(problem, lam))

    counter = CompileCounter()
    rows["influence"] = timed(lambda: metaif.influence(problem, lam, tasks, target=target).tasks)
    compiles = counter.count
    counter.count = 0
    # a sweep of numeric options: new damping, tol, lr and meta_reg, the same program
    swept = metaif.BilevelProblem(problem.inner_loss, problem.outer_loss, metaif.Unrolled(1, 0.3), meta_reg=2e-4)
    metaif.influence(
        swept, lam, tasks, target=target, solver=metaif.solvers.CG(damping=None, tol=1e-6)
    ).tasks.block_until_ready()
    default_sweep = counter.count
    counter.close()

    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(lam)
    step = jax.jit(core.train_steps, static_argnames=("optimizer", "steps", "minibatch"))
    rows["train_step"] = timed(lambda: step(problem, optimizer, lam, opt_state, tasks, steps=train_steps)[2])

    weights = metaif.Weights.ones(tasks.n_tasks, tasks.n_support, tasks.n_query, jnp.float32)
    weights = weights._replace(tasks=weights.tasks.at[0].set(0.0))
    retrain = jax.jit(lambda p, l, s, w: core.train_steps(p, optimizer, l, s, tasks, w, steps=20)[0])
    rows["retrain_20_steps"] = timed(lambda: retrain(problem, lam, opt_state, weights))

    base_compile = rows["meta_gradient"][0] - rows["meta_gradient"][1]
    base_warm = rows["meta_gradient"][1]
    out = {
        "model": kind if filters is None else f"{kind}-{filters}",
        "d": d,
        "n": n,
        "ways": ways,
        "influence_backend_compiles": compiles,
        "sweep_compiles": default_sweep,
    }
    for name, (first, warm) in rows.items():
        out[name] = {
            "compile_s": first - warm,
            "warm_s": warm,
            "compile_ratio": (first - warm) / base_compile,
            "warm_ratio": warm / base_warm,
        }
    return out


def cache_check(kind, filters, ways, n):
    """Influence compile time in two fresh processes sharing one new persistent cache."""
    folder = tempfile.mkdtemp(prefix="metaif-compile-cache-")
    runs = []
    for _ in range(2):
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import compile_time as c, metaif, jax, time;"
            "import warnings; warnings.simplefilter('ignore', metaif.NonStationaryWarning);"
            f"metaif.enable_compilation_cache({folder!r});"
            f"model, problem, tasks, test = c.build({kind!r}, {filters!r}, {ways}, {n});"
            "target = lambda l: metaif.task_losses(problem, l, test).mean();"
            "first, warm = c.timed(lambda: metaif.influence(problem, model.params, tasks, target=target).tasks);"
            "print('RESULT', first - warm, warm)"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")][-1]
        runs.append(float(line.split()[1]))
    return {
        "model": kind if filters is None else f"{kind}-{filters}",
        "first_process_compile_s": runs[0],
        "second_process_compile_s": runs[1],
        "second_over_first": runs[1] / runs[0],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="mlp and conv4-8 only; prints, writes nothing")
    parser.add_argument(
        "--tasks", type=int, default=None, help="training tasks n (default 8 on CPU, 64 for --size gpu)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.size
    ways = 20 if size == "gpu" else 5
    n = args.tasks or (64 if size == "gpu" else 8)
    start = time.perf_counter()
    results = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "metaif": metaif.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "models": [],
        "cache": [],
    }
    for kind, filters in SIZES[size]:
        row = measure(kind, filters, ways, n)
        results["models"].append(row)
        print(
            f"{row['model']:>9} d={row['d']:>7}  "
            + "  ".join(
                f"{name} compile {row[name]['compile_s']:6.1f}s ({row[name]['compile_ratio']:.2f}x) warm {row[name]['warm_s']:7.3f}s "
                f"({row[name]['warm_ratio']:.1f}x)"
                for name in ("meta_gradient", "influence", "train_step", "retrain_20_steps")
            ),
            f" backend compiles per influence call {row['influence_backend_compiles']}, after a numeric sweep {row['sweep_compiles']}",
            flush=True,
        )
    kind, filters = SIZES[size][-1]
    results["cache"].append(cache_check(kind, filters, ways, n))
    c = results["cache"][-1]
    print(
        f"persistent cache ({c['model']}): influence compile {c['first_process_compile_s']:.1f}s in a fresh process, "
        f"{c['second_process_compile_s']:.1f}s in the next ({100 * c['second_over_first']:.0f}%)",
        flush=True,
    )
    results["wall_s"] = time.perf_counter() - start
    out = args.out or (None if args.quick else HERE / "results" / f"compile_time{'_gpu' if size == 'gpu' else ''}.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
