"""Influence over tasks spread across several processes (machines), with jax.distributed.

Each process loads only its own block of training tasks, all processes form one global 'tasks'
mesh, and `metaif.meta_train` then `metaif.influence` run unchanged: every device adapts and scores
its own tasks, sums over tasks (F, its gradient, Hessian-vector products) are reduced across
processes. The scores come back as global task-sharded arrays;
`multihost_utils.process_allgather` collects them on every process.

On a real cluster run one copy per host, all with the same coordinator (host 0's address):

    python benchmarks/distributed_example.py --coordinator host0:12345 --num-processes 4 --process-id $RANK

(on Cloud TPU or under SLURM, `jax.distributed.initialize()` can detect these itself). Here, on
one machine, CPU processes talk over loopback with gloo collectives; without --process-id the
script starts --num-processes local copies of itself and waits for them:

    .venv/bin/python benchmarks/distributed_example.py                 # 2 processes x 2 CPU devices
    .venv/bin/python benchmarks/distributed_example.py --check         # also compare with one device

With --check process 0 also trains and computes influence on one of its devices with the whole
task set, and process 0 prints a JSON line {"max_diff": ..., ...}: the largest difference
in trained meta-parameters and scores (tests/test_sharding.py runs this).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--process-id", type=int, default=None, help="this process's rank; omit to launch all processes locally"
    )
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (default: a free local port)")
    parser.add_argument("--local-devices", type=int, default=2, help="CPU devices per process (CPU only)")
    parser.add_argument("--tasks", type=int, default=16, help="training tasks (divisible by the total device count)")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps of meta-training before influence")
    parser.add_argument("--check", action="store_true", help="compare with the single-device answer")
    parser.add_argument("--platform", default="cpu", help="'cpu' (fake devices, gloo collectives) or 'gpu'/'tpu'")
    return parser.parse_args(argv)


def launch(args) -> int:
    """Start every process on this machine and relay process 0's output."""
    coordinator = args.coordinator
    if coordinator is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    base = [
        sys.executable,
        os.path.abspath(__file__),
        "--coordinator",
        coordinator,
        "--num-processes",
        str(args.num_processes),
        "--local-devices",
        str(args.local_devices),
        "--tasks",
        str(args.tasks),
        "--platform",
        args.platform,
        "--train-steps",
        str(args.train_steps),
    ]
    base += ["--check"] if args.check else []
    procs = [subprocess.Popen(base + ["--process-id", str(i)]) for i in range(args.num_processes)]
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return max(codes, key=abs)


def run(args) -> None:
    if args.platform == "cpu":
        os.environ["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={args.local_devices} --xla_cpu_multi_thread_eigen=false"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )

    import numpy as np
    from jax.experimental import multihost_utils

    import metaif
    from metaif import parallel, problems

    rank, count = jax.process_index(), jax.process_count()
    problem = metaif.BilevelProblem(
        problems.linear_cross_entropy, problems.linear_cross_entropy, metaif.Unrolled(steps=2, lr=0.2), meta_reg=0.1
    )
    all_tasks = problems.classification_tasks(args.tasks, 4, 4, 3, 3, seed=0)  # the same on every process
    test_tasks = problems.classification_tasks(4, 4, 4, 3, 3, seed=100)
    meta = problems.linear_init(jax.random.key(0), 3, 3)
    target = lambda lam: metaif.task_losses(problem, lam, test_tasks).mean()

    per_process = args.tasks // count
    own = all_tasks[rank * per_process : (rank + 1) * per_process]  # what this host would load from disk

    mesh = parallel.task_mesh()  # every device of every process (Auto axis)
    tic = time.perf_counter()
    with jax.set_mesh(mesh):
        tasks = parallel.shard_tasks(own, mesh, process_local=True)
        trained = metaif.meta_train(problem, parallel.replicate(meta, mesh), tasks, steps=args.train_steps)
        result = metaif.influence(problem, trained.meta_params, tasks, target)
        task_scores = multihost_utils.process_allgather(result.tasks, tiled=True)
        support_scores = multihost_utils.process_allgather(result.support, tiled=True)
        query_scores = multihost_utils.process_allgather(result.query, tiled=True)
    seconds = time.perf_counter() - tic

    if rank == 0:
        order = np.argsort(-task_scores)
        print(
            f"{count} processes, {jax.device_count()} devices ({jax.local_device_count()} per process), "
            f"{args.tasks} tasks, {seconds:.2f} s including compilation"
        )
        print(f"meta-training: {trained.summary()}")
        print("most harmful tasks for the meta-test loss (removal lowers it by about the score):")
        for k in order[:3]:
            print(f"  task {k}: {task_scores[k]:+.3e}")
    if args.check and rank == 0:
        # The same on one device of process 0: training, then influence.
        reference_meta = metaif.meta_train(problem, meta, all_tasks, steps=args.train_steps).meta_params
        reference = metaif.influence(problem, reference_meta, all_tasks, target)
        pairs = [
            *zip(jax.tree.leaves(trained.meta_params), jax.tree.leaves(reference_meta)),
            *zip((task_scores, support_scores, query_scores), (reference.tasks, reference.support, reference.query)),
        ]
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
        print(
            json.dumps(
                {
                    "max_diff": diff,
                    "processes": count,
                    "devices": jax.device_count(),
                    "local_devices": jax.local_device_count(),
                    "spec": str(result.tasks.sharding.spec),
                    "shape": list(task_scores.shape),
                    "seconds": seconds,
                }
            ),
            flush=True,
        )
    jax.distributed.shutdown()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.process_id is None:
        return launch(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
