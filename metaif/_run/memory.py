"""Peak-memory estimate of a run before it starts, from d, n, m, q, the model's widths and the
dtype (float64), and the error with a suggested batch_size when it would not fit.

The estimate is a model, not a measurement: per example, the activations of every layer of the
MLP (forward + backward, through the inner adaptation steps) are kept once per meta-gradient; the
exact Newton steps and the dense Hessian build d such gradients at once (forward-mode over d
directions), `influence.batch_size` tasks at a time; leave-one-out retraining runs
`check.batch_size` Newton solves at once. The constant `SLACK` was calibrated on the demo (see
the report's measured peak RSS next to the estimate).
"""

from __future__ import annotations

import dataclasses
import os

from .config import Config, ConfigError

BYTES = 8  # float64
SLACK = 3.0  # intermediate copies per stored activation (calibrated on the demo)
GiB = 1024**3


def _per_gradient(config: Config, n_inputs: int, tasks: int, m: int, q: int) -> float:
    """Bytes of one meta-gradient over `tasks` tasks."""
    widths = n_inputs + sum(config.model.hidden) + config.tasks.ways
    steps = config.model.inner_steps
    per_example = widths * BYTES * SLACK
    return tasks * (2 * m * (steps + 1) + 2 * q) * per_example


def estimate(config: Config, n_inputs: int, d: int, n: int, m: int, q: int) -> dict[str, float]:
    """Estimated peak bytes of each heavy stage and of the whole run ("peak")."""
    chunk = min(config.influence.batch_size or n, n)
    grad_all = _per_gradient(config, n_inputs, n, m, q)
    grad_chunk = _per_gradient(config, n_inputs, chunk, m, q)
    dense = 3 * d * d * BYTES
    data = (config.tasks.train + config.tasks.target + config.tasks.test) * (m + q) * n_inputs * BYTES
    stages = {
        "adam": 2 * grad_all + 4 * d * BYTES,
        "newton": (d * grad_all + dense) if config.train.newton_steps else 0.0,
        "solve": (d * grad_chunk + dense) if config.influence.solver == "dense" else 4 * grad_chunk,
        "scores": (1 + m + q) * grad_chunk,
        "edit": n * (1 + m + q) * d * BYTES * 2 + (m + q) * grad_chunk + (d * grad_chunk + dense),
        "check": min(config.check.batch_size, max(config.check.tasks, config.check.support, config.check.query))
        * (d * grad_all + dense),
    }
    stages = {k: v + data for k, v in stages.items()}
    stages["peak"] = max(stages.values())
    return stages


def available_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux), else physical memory, else +inf."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def check(
    config: Config, n_inputs: int, d: int, n: int, m: int, q: int, limit: float | None = None
) -> dict[str, float]:
    """The estimate (see `estimate`); raises a ConfigError (one paragraph, with a suggested batch_size) when the estimate exceeds
    the limit: `limit` bytes, else [run] memory_limit_gb, else the memory available now."""
    stages = estimate(config, n_inputs, d, n, m, q)
    if limit is None:
        limit = config.run.memory_limit_gb * GiB if config.run.memory_limit_gb else available_bytes()
    if stages["peak"] <= limit:
        return stages
    worst = max((k for k in stages if k != "peak"), key=lambda k: stages[k])
    advice = []
    if worst in ("solve", "scores", "edit"):
        fits = lambda b: estimate(
            dataclasses.replace(config, influence=dataclasses.replace(config.influence, batch_size=b)),
            n_inputs,
            d,
            n,
            m,
            q,
        )
        batch = next(
            (
                b
                for b in (64, 32, 16, 8, 4, 2, 1)
                if b < n and max(fits(b)[k] for k in ("solve", "scores", "edit")) <= limit
            ),
            None,
        )
        advice.append(
            f"set [influence] batch_size = {batch}"
            if batch
            else 'use [influence] solver = "cg" and fewer [model] features or hidden units'
        )
    if worst == "check":
        advice.append("set [check] batch_size = 1 (retrainings one at a time) or [check] chunk smaller")
    if worst in ("newton", "check", "adam"):
        advice.append(
            "reduce [tasks] train or the model size ([model] features, hidden), or skip the exact polish with "
            "[train] newton_steps = 0 (then influence assumes a less stationary point)"
        )
    raise ConfigError(
        f"this run would not fit in memory: the estimated peak is {stages['peak'] / GiB:.2f} GiB (in the {worst} stage) "
        f"but {limit / GiB:.2f} GiB is available{' ([run] memory_limit_gb)' if config.run.memory_limit_gb else ''}. "
        f"To fit, {'; or '.join(advice)}. The estimate counts float64 activations of every task's support and query "
        "examples through adaptation, d at a time for exact Hessians; raise [run] memory_limit_gb if you know it fits."
    )
