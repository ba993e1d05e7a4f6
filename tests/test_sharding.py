"""Sharding over tasks (testing ladder, rung 5): one device vs a 'tasks' mesh vs several processes.

* 8 fake CPU devices in a subprocess (`_sharded_scripts/sharded_check.py`): task, support and
  query influence with and without a target, Proximal and Unrolled, with and without batch_size,
  Explicit and Auto mesh axes, `task_influence`, `instance_influence`, `task_losses` and
  `meta_objective` equal the single-device answers within 1e-10 (float64) and the per-task
  outputs are sharded over 'tasks'; clear errors for an indivisible task count and for
  meta-parameters left on one device under an Explicit axis.
* 2 processes x 2 CPU devices joined by `jax.distributed` (gloo collectives over loopback), running
  `benchmarks/distributed_example.py --check`: each process loads only its own tasks; the
  meta-parameters trained across processes (`meta_train`) and the gathered influence scores
  equal those of a single-device run.
* In this process (one device): argument checks of `metaif.parallel`, and a one-device mesh
  giving the unsharded numbers.

No `jax.shard_map` is used by metaif (sharding is by placement and `jit`/`vmap`), so the
replicated-gradient trap of shard_map does not arise.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

import metaif
from metaif import _batching, parallel, problems

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-10


def _environment() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # each script sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def sharded_report() -> dict:
    script = ROOT / "tests" / "_sharded_scripts" / "sharded_check.py"
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=_environment(), cwd=ROOT
    )
    assert done.returncode == 0, f"sharded_check.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return _last_json(done.stdout)


@pytest.mark.slow
def test_sharded_scores_equal_single_device(sharded_report):
    assert sharded_report["devices"] == 8
    cases = sharded_report["cases"]
    assert len(cases) == 4
    # every (axis type x batch_size) and every (adaptation x target) pair is covered
    assert {tuple(k.split("/")[i] for i in (0, 3)) for k in cases} == {
        (mode, batch) for mode in ("explicit", "auto") for batch in ("batch=None", "batch=8")
    }
    assert {tuple(k.split("/")[1:3]) for k in cases} == {
        (adapt, kind) for adapt in ("proximal", "unrolled") for kind in ("target", "params")
    }
    for name, case in cases.items():
        for quantity, value in case.items():
            if quantity not in ("specs", "seconds"):
                assert value <= TOLERANCE, f"{name}: {quantity} differs from one device by {value:.3e}"
        assert case["specs"] == ["tasks"], f"{name}: per-task outputs sharded as {case['specs']}"


@pytest.mark.slow
def test_sharded_errors_are_clear(sharded_report):
    errors = sharded_report["errors"]
    assert "12 tasks" in errors["indivisible"] and "8 devices" in errors["indivisible"]
    assert "multiple of 8" in errors["indivisible"]


def test_unreplicated_meta_params_are_placed_on_the_mesh(sharded_report):
    """Explicit mesh, meta-parameters on one device: replicated automatically, same answers."""
    for quantity, value in sharded_report["unreplicated"].items():
        assert value <= TOLERANCE, f"{quantity} differs from one device by {value:.3e}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process():
    script = ROOT / "benchmarks" / "distributed_example.py"
    base = [
        sys.executable,
        str(script),
        "--coordinator",
        f"127.0.0.1:{_free_port()}",
        "--num-processes",
        "2",
        "--local-devices",
        "2",
        "--tasks",
        "8",
        "--train-steps",
        "20",
        "--check",
    ]
    procs = [
        subprocess.Popen(
            base + ["--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(),
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(i, p.returncode, err) for i, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode]
    if failed and any(
        "gloo" in err.lower() and "not" in err.lower() and "support" in err.lower() for *_, err in failed
    ):
        pytest.skip(f"CPU multi-process collectives unavailable in this JAX build: {failed[0][2][-1500:]}")
    assert not failed, "\n".join(f"process {i} exited with {code}:\n{err[-4000:]}" for i, code, err in failed)
    report = _last_json(outputs[0][0])
    assert (report["processes"], report["devices"], report["local_devices"]) == (2, 4, 2)
    assert report["spec"] == "P('tasks',)" and report["shape"] == [8]
    assert report["max_diff"] <= TOLERANCE


# ----------------------------------------------------------------------------- in this process


def test_task_mesh_and_placement_on_one_device():
    mesh = parallel.task_mesh()
    assert mesh.axis_names == ("tasks",) and mesh.shape["tasks"] == jax.device_count()
    assert mesh.axis_types == (AxisType.Auto,)
    assert parallel.task_mesh(jax.devices()[:1], axis_type=AxisType.Explicit).axis_types == (AxisType.Explicit,)
    tasks, _ = problems.regression_tasks(3, 2, 2, 2)
    placed = parallel.shard_tasks(tasks, mesh)
    assert isinstance(placed, metaif.TaskSet)
    leaf = placed.support["x"]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.spec == jax.P("tasks")
    np.testing.assert_array_equal(leaf, tasks.support["x"])
    meta = parallel.replicate({"w": jnp.zeros(2)}, mesh)
    assert meta["w"].sharding.spec == jax.P()
    assert parallel.task_sharding(mesh).spec == jax.P("tasks")


def test_one_device_layout_leaves_chunking_unchanged():
    """An Explicit size-1 task axis: chunking still goes through the device-major layout (lax.map
    refuses an explicitly sharded leading axis, even of one device)."""
    mesh = parallel.task_mesh(jax.devices()[:1], axis_type=AxisType.Explicit)
    data = jax.device_put(jnp.arange(10.0), parallel.task_sharding(mesh))
    assert _batching.task_layout(data).shards == 1
    assert _batching.task_layout(np.arange(10.0)) is None
    total = _batching.sum_chunks(lambda chunk: jnp.sum(chunk**2), data, 3)
    mapped = _batching.map_tasks(lambda x: 2.0 * x, data, 3)
    np.testing.assert_allclose(total, np.sum(np.arange(10.0) ** 2))
    np.testing.assert_allclose(mapped, 2.0 * np.arange(10.0))


@pytest.mark.parametrize(
    "devices, error, match",
    [
        ("cpu", TypeError, "sequence of jax.Device"),
        ([], TypeError, "non-empty sequence"),
        ([0, 1], TypeError, "received list"),
    ],
)
def test_task_mesh_bad_devices(devices, error, match):
    with pytest.raises(error, match=match):
        parallel.task_mesh(devices)


def test_task_mesh_repeated_device_and_bad_axis_type():
    with pytest.raises(ValueError, match="must not repeat"):
        parallel.task_mesh([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="AxisType.Explicit or AxisType.Auto; received str 'explicit'"):
        parallel.task_mesh(axis_type="explicit")


def test_bad_mesh_and_tasks_arguments():
    tasks, _ = problems.regression_tasks(2, 2, 2, 2)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh with an axis named 'tasks'"):
        parallel.shard_tasks(tasks, "mesh")
    other = jax.make_mesh((1,), ("data",))
    with pytest.raises(TypeError, match=r"axis named 'tasks'.*received a Mesh with axes \{'data': 1\}"):
        parallel.shard_tasks(tasks, other)
    with pytest.raises(TypeError, match="tasks must be a metaif.TaskSet"):
        parallel.shard_tasks({"x": np.zeros((2, 2))}, parallel.task_mesh())
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        parallel.replicate({"w": jnp.zeros(2)}, None)
