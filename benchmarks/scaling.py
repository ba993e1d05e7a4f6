"""Scaling of influence: time and peak memory against n_tasks, parameter count and device count.

Every point runs in a fresh subprocess, so its memory high-water mark is its own:

* n_tasks from 100 to 10,000, unchunked and with `chunk_size` (chunks of tasks): warm time,
  compile time (first call − warm call) and peak memory of one `metaif.influence` call (all task,
  support and query scores for one target, `Neumann(iterations=10)`: a fixed amount of work,
  30 Hessian-vector products, whatever the curvature);
* parameter count d (MLP hidden widths) at fixed n;
* device count: fake CPU devices (`--xla_force_host_platform_device_count=N`, a correctness
  check: the tasks are sharded over a 'tasks' mesh with `metaif.parallel`, and the sharded scores
  must equal the single-device scores), plus the real devices when more than one accelerator is
  present.

Peak memory. CPU: the process's resident-set high-water mark during one warm call (Linux
/proc/self/status VmHWM, reset through /proc/self/clear_refs just before the call; where that is
unavailable, resource.getrusage ru_maxrss over the whole process), minus the resident set just
before the call: data and compiled code are excluded, what the computation itself holds is not.
Workers run with MALLOC_MMAP_THRESHOLD_=131072 so that large buffers are mapped and unmapped
per call rather than recycled inside glibc's heap (which would hide them from the mark).
GPU/TPU: `device.memory_stats()['peak_bytes_in_use']` minus `bytes_in_use` before the call (the
peak is since process start, so it covers the first call too). CPU also records
`first_calls_peak_bytes`: the high-water mark over compilation, the first call and the warm calls
minus the resident set before them; the first call allocates fresh memory, which no allocator
reuse can hide, and compilation adds a part that does not depend on n.

Tasks: Omniglot 5-way 1-shot tasks with 3 queries per class (../shared/data), images pooled to
7×7 (MLP 49 → hidden → 5, tanh, MAML with one inner step) for the n_tasks and device sweeps, full
28×28 for the width sweep. λ is the initialisation (timing does not need a trained λ).

Usage (from the repository root):
    .venv/bin/python benchmarks/scaling.py            # full run (≲ 20 min on a 2-core CPU)
    .venv/bin/python benchmarks/scaling.py --quick    # < 3 min
Writes benchmarks/results/scaling.json (scaling_quick.json) and scaling.png (scaling_quick.png).
Runs unchanged on GPU/TPU: only the fake-device sweep forces the CPU platform.
"""

from __future__ import annotations

import os
import sys
import time

_SCRIPT_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DATA_ROOT = Path(os.environ.get("METAIF_DATA") or ROOT.parent / "shared" / "data")
WAYS, SHOTS, QUERIES, N_TEST = 5, 1, 3, 20
NEUMANN_ITERATIONS = 10

FULL = dict(
    n_tasks=(100, 300, 1000, 3000, 10000),
    chunk=100,
    widths=(8, 64, 512),
    width_n=100,
    width_pool=1,
    devices=(1, 2, 8),
    device_n=800,
)
QUICK = dict(n_tasks=(100, 1000), chunk=100, widths=(8,), width_n=100, width_pool=1, devices=(1, 2), device_n=200)


# ----------------------------------------------------------------------------- worker (subprocess)


def _read_status(field: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(config: dict) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    if config.get("fake_devices"):
        flags += f" --xla_force_host_platform_device_count={config['fake_devices']}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = flags.strip()
    import resource

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import _timing  # benchmarks/_timing.py
    import metaif
    from metaif import data, models, parallel, solvers

    n, hidden, pool, chunk_size = config["n"], config["hidden"], config["pool"], config.get("chunk_size")
    om = data.load_omniglot(DATA_ROOT)
    images = 1.0 - om.images
    if pool > 1:
        s = images.shape[1] // pool
        images = images.reshape(-1, s, pool, s, pool).mean((2, 4))
    split = data.omniglot_split()
    train = data.few_shot_tasks(images, om.labels, n, WAYS, SHOTS, QUERIES, seed=0, classes=split.train)
    test = data.few_shot_tasks(images, om.labels, N_TEST, WAYS, SHOTS, QUERIES, seed=1, classes=split.test)
    del om, images
    module = models.MLP(
        train.support["x"].shape[2:], [hidden], WAYS, activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    pure = models.from_nnx(module)
    problem = metaif.BilevelProblem(pure.cross_entropy, pure.cross_entropy, metaif.Unrolled(1, 0.5), 1e-2)
    lam = pure.params
    solver = solvers.Neumann(iterations=NEUMANN_ITERATIONS)
    target = lambda lam: metaif.task_losses(problem, lam, test).mean()
    devices = jax.devices()
    out = dict(
        config=config,
        backend=jax.default_backend(),
        device_kind=devices[0].device_kind,
        device_count=len(devices),
        dtype="float64",
        d=int(sum(x.size for x in jax.tree.leaves(lam))),
    )

    mesh = None
    if config.get("shard"):
        mesh = parallel.task_mesh(devices[: config["shard"]])
        out["mesh_devices"] = config["shard"]

    def call(tasks, params):
        return metaif.influence(problem, params, tasks, target=target, solver=solver, chunk_size=chunk_size)

    def timed(fn, max_repeats=10):
        """(first s, warm s = minimum over repeats, result); first includes compilation."""
        return _timing.timed(fn, max_repeats=max_repeats, min_total_s=0.5)

    def measured(fn):
        """(compile s, warm s, result, memory record) with the peak memory of one warm call."""
        stats = getattr(devices[0], "memory_stats", lambda: None)()
        gpu = bool(stats) and "peak_bytes_in_use" in stats
        reset = not gpu and _reset_peak()
        start_rss = _read_status("VmRSS")
        first, warm, result = timed(fn)
        first_high = _read_status("VmHWM") if reset else None
        memory = {}
        if gpu:
            before = devices[0].memory_stats()["bytes_in_use"]
            jax.block_until_ready(fn())
            after = devices[0].memory_stats()
            memory = dict(
                method="device.memory_stats peak_bytes_in_use (since process start) - bytes_in_use before",
                peak_bytes=after["peak_bytes_in_use"] - before,
            )
        else:
            reset = _reset_peak()
            before = _read_status("VmRSS")
            jax.block_until_ready(fn())
            high = _read_status("VmHWM") if reset else None
            if high is not None and before is not None:
                memory = dict(
                    method="VmHWM during one warm call - VmRSS before it",
                    peak_bytes=high - before,
                    rss_before_bytes=before,
                )
            else:
                memory = dict(
                    method="ru_maxrss of the whole process",
                    peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                )
        memory["process_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if first_high is not None and start_rss is not None:
            # compile + first (fresh-allocating) call + warm calls: the allocator cannot hide these.
            memory["first_calls_peak_bytes"] = first_high - start_rss
        return first - warm, warm, result, memory

    grad = jax.jit(jax.grad(lambda lam, tasks: metaif.meta_objective(problem, lam, tasks)))
    if mesh is None:
        g_first, g_warm, _ = timed(lambda: grad(lam, train), max_repeats=100)
        compile_s, warm_s, result, memory = measured(lambda: call(train, lam))
    else:
        with jax.set_mesh(mesh):
            sharded = parallel.shard_tasks(train, mesh)
            params = parallel.replicate(lam, mesh)
            g_first, g_warm, _ = timed(lambda: grad(params, sharded), max_repeats=100)
            compile_s, warm_s, result, memory = measured(lambda: call(sharded, params))
        if config.get("check"):
            single = call(train, lam)  # the same computation on one device, unsharded data
            diffs = [
                float(np.max(np.abs(np.asarray(getattr(result, k)) - np.asarray(getattr(single, k)))))
                for k in ("tasks", "support", "query")
            ]
            scale = max(float(np.max(np.abs(np.asarray(getattr(single, k))))) for k in ("tasks", "support", "query"))
            out["sharded_vs_single"] = dict(
                max_abs_diff=max(diffs),
                max_abs_score=scale,
                relative=max(diffs) / scale,
                output_sharding=str(result.tasks.sharding),
            )
    out.update(
        compile_s=compile_s,
        time_s=warm_s,
        gradient_s=g_warm,
        gradient_compile_s=g_first - g_warm,
        x_grad=warm_s / g_warm,
        memory=memory,
        solve_relative_residual=float(result.solve.relative_residual),
        finite=bool(np.all(np.isfinite(np.asarray(result.tasks)))),
    )
    return out


# ----------------------------------------------------------------------------- driver


def run_point(config: dict, log, timeout: float = 600.0) -> dict:
    start = time.perf_counter()
    env = dict(os.environ)
    # glibc keeps freed large blocks for reuse once its dynamic mmap threshold has grown, which hides
    # a warm call's allocations from the resident-set high-water mark; a fixed threshold makes
    # every large buffer a fresh mapping, returned on free.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        log(f"  {config}: timed out after {timeout:.0f}s")
        return dict(config=config, error="timeout")
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log(f"  {config}: failed (rc {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        return dict(config=config, error=proc.stderr.strip()[-3000:])
    out = json.loads(lines[-1])
    out["subprocess_wall_s"] = wall
    mem = out["memory"]["peak_bytes"] / 2**20
    first_mem = out["memory"].get("first_calls_peak_bytes", 0) / 2**20
    extra = ""
    if "sharded_vs_single" in out:
        extra = (
            f"  sharded vs single: max |diff| {out['sharded_vs_single']['max_abs_diff']:.1e} "
            f"(rel {out['sharded_vs_single']['relative']:.1e})"
        )
    log(
        f"  n={config['n']:6d} hidden={config['hidden']:4d} d={out['d']:7d} batch={str(config.get('chunk_size')):>5s} "
        f"devices={out.get('mesh_devices', 1)}: {out['time_s']:.3f}s warm ({out['x_grad']:.1f} grads), "
        f"compile {out['compile_s']:.1f}s, peak {mem:.1f} MiB (first calls {first_mem:.0f} MiB){extra}"
    )
    return out


def loglog_slope(xs, ys) -> float:
    import numpy as np

    xs, ys = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
    return float(np.polyfit(xs, ys, 1)[0])


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = result["environment"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    ok = lambda rows: [r for r in rows if "error" not in r]
    for label, rows in (
        ("unchunked", ok(result["n_tasks"]["unchunked"])),
        (f"chunk_size={result['settings']['chunk']}", ok(result["n_tasks"]["chunked"])),
    ):
        ns = [r["config"]["n"] for r in rows]
        axes[0].plot(ns, [r["time_s"] for r in rows], "o-", label=f"warm, {label}")
        axes[0].plot(ns, [r["compile_s"] for r in rows], "x--", label=f"compile, {label}")
        axes[1].plot(ns, [r["memory"]["peak_bytes"] / 2**20 for r in rows], "o-", label=label)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("n_tasks")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("seconds")
    axes[0].set_title("time of all scores for one target vs n_tasks", fontsize=10)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("MiB")
    axes[1].set_title("peak memory of one warm call vs n_tasks", fontsize=10)
    rows = ok(result["params"])
    ds = [r["d"] for r in rows]
    axes[2].plot(ds, [r["time_s"] for r in rows], "o-", label="warm s")
    axes[2].plot(ds, [r["compile_s"] for r in rows], "x--", label="compile s")
    axes[2].plot(ds, [r["memory"]["peak_bytes"] / 2**30 for r in rows], "s:", label="peak GiB")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel(f"parameters d (n = {result['settings']['width_n']})")
    axes[2].set_title("vs parameter count", fontsize=10)
    for key, marker in (("fake_cpu", "o-"), ("real", "s-")):
        rows = ok(result["devices"].get(key, []))
        if rows:
            counts = [r["config"]["shard"] for r in rows]
            axes[3].plot(counts, [r["time_s"] for r in rows], marker, label=f"{key} warm s")
            for r in rows:
                if "sharded_vs_single" in r:
                    axes[3].annotate(
                        f"Δ={r['sharded_vs_single']['max_abs_diff']:.0e}",
                        (r["config"]["shard"], r["time_s"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
    axes[3].set_xlabel(f"devices (n = {result['settings']['device_n']})")
    axes[3].set_title("vs device count (Δ: max |sharded − single|)", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"metaif.influence scaling, Neumann(iterations={NEUMANN_ITERATIONS}), MLP MAML on Omniglot 5-way 1-shot; "
        f"backend={env['backend']}, device={env['device_kind']} ×{env['device_count']}, dtype={env['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller points (< 3 min)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--sweeps",
        nargs="+",
        choices=("n_tasks", "params", "devices"),
        default=("n_tasks", "params", "devices"),
        help="which sweeps to run (default all)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker)), default=float), flush=True)
        return
    settings = QUICK if args.quick else FULL
    out = args.out or RESULTS / ("scaling_quick.json" if args.quick else "scaling.json")
    log = lambda s: print(s, flush=True)
    result = dict(
        environment={},
        quick=args.quick,
        settings=settings,
        solver=f"Neumann(iterations={NEUMANN_ITERATIONS})",
        n_tasks={},
        params=[],
        devices={},
    )

    def save():
        result["wall_s"] = time.perf_counter() - _SCRIPT_START
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float))

    log("== n_tasks (7×7 MLP, hidden 8)")
    for key, batch in (("unchunked", None), ("chunked", settings["chunk"])) if "n_tasks" in args.sweeps else ():
        result["n_tasks"][key] = [
            run_point(dict(n=n, hidden=8, pool=4, chunk_size=batch), log) for n in settings["n_tasks"]
        ]
        rows = [r for r in result["n_tasks"][key] if "error" not in r]
        if len(rows) >= 2:
            ns = [r["config"]["n"] for r in rows]
            result["n_tasks"][f"{key}_time_exponent"] = loglog_slope(ns, [r["time_s"] for r in rows])
            result["n_tasks"][f"{key}_memory_exponent"] = loglog_slope(
                ns, [max(r["memory"]["peak_bytes"], 1) for r in rows]
            )
            if all("first_calls_peak_bytes" in r["memory"] for r in rows):
                result["n_tasks"][f"{key}_first_calls_memory_exponent"] = loglog_slope(
                    ns, [max(r["memory"]["first_calls_peak_bytes"], 1) for r in rows]
                )
            log(
                f"  {key}: time ∝ n^{result['n_tasks'][f'{key}_time_exponent']:.2f}, peak memory ∝ "
                f"n^{result['n_tasks'][f'{key}_memory_exponent']:.2f}"
            )
        if not result["environment"] and rows:
            import platform

            import jax

            result["environment"] = {k: rows[0][k] for k in ("backend", "device_kind", "device_count", "dtype")}
            result["environment"].update(
                command=" ".join([Path(sys.executable).name, *sys.argv]),
                jax=jax.__version__,
                python=platform.python_version(),
            )
        save()
    log(f"== parameter count (28×28 MLP / pooled, n = {settings['width_n']})")
    result["params"] = [
        run_point(dict(n=settings["width_n"], hidden=h, pool=settings["width_pool"]), log)
        for h in settings["widths"]
        if "params" in args.sweeps
    ]
    save()
    log(f"== device count (n = {settings['device_n']})")
    result["devices"]["fake_cpu"] = [
        run_point(
            dict(n=settings["device_n"], hidden=8, pool=4, fake_devices=max(settings["devices"]), shard=k, check=True),
            log,
        )
        for k in settings["devices"]
        if "devices" in args.sweeps
    ]
    env = result["environment"]
    if "devices" in args.sweeps and env.get("backend") not in (None, "cpu") and env.get("device_count", 1) > 1:
        counts = [k for k in (1, 2, 4, 8, 16) if k <= env["device_count"]]
        result["devices"]["real"] = [
            run_point(dict(n=settings["device_n"] * 2, hidden=8, pool=4, shard=k, check=True), log) for k in counts
        ]
    save()
    if not args.no_plot:
        png = out.with_suffix(".png")
        plot(result, png)
        log(f"plot: {png}")
    log(f"wrote {out} ({time.perf_counter() - _SCRIPT_START:.0f}s)")


if __name__ == "__main__":
    main()
