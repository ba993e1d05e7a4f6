"""Peak-memory estimate of a run before it starts, from d, n, m, q, the model's layer sizes and
the dtype (float64; float32 for conv4), and the error with a suggested batch_size when it would
not fit.

The estimate is a model, not a measurement: per example, the activations of every layer (the
MLP's widths; conv4's feature maps, block by block: convolution, normalisation, activation and
pooling) are kept once per meta-gradient (forward + backward, through the inner adaptation
steps), for the tasks computed at once (`train.minibatch` and `train.chunk` in meta-training,
`influence.batch_size` in influence), with each such task's adapted parameters; the exact Newton
steps and the dense Hessian build d such gradients at once (forward-mode over d directions);
leave-one-out retraining runs `check.batch_size` Newton solves at once. A kind = "python" model is
counted as an MLP without hidden layers. The constant `SLACK` was calibrated on the demo (see the
report's measured peak RSS next to the estimate).
"""

from __future__ import annotations

import dataclasses
import math

from .._memory import available_bytes
from .config import Config, ConfigError

SLACK = 3.0  # intermediate copies per stored activation (calibrated on the demo)
GiB = 1024**3
CONV4_BLOCKS = 4


def _bytes(config: Config) -> int:
    return 4 if config.model.kind == "conv4" else 8  # float32 | float64


def _activations(config: Config, input_shape: tuple[int, ...]) -> int:
    """Numbers stored per example by one forward pass (input, every layer's output, logits)."""
    pixels = math.prod(input_shape)
    if config.model.kind != "conv4":
        hidden = sum(config.model.hidden) if config.model.kind == "mlp" else 0
        return pixels + hidden + config.tasks.ways
    height, width = input_shape[:2]
    large = min(height, width) >= 16  # pooling as in pipeline._conv4: VALID (floor), else SAME (ceil)
    total = pixels
    for _ in range(CONV4_BLOCKS):
        maps = height * width * config.model.filters
        height, width = (height // 2, width // 2) if large else (-(-height // 2), -(-width // 2))
        total += 3 * maps + height * width * config.model.filters  # conv, norm, activation; pooled
    return total + config.tasks.ways


def _per_gradient(config: Config, input_shape: tuple[int, ...], d: int, tasks: int, m: int, q: int) -> float:
    """Bytes of one meta-gradient over `tasks` tasks computed at once."""
    steps = config.model.inner_steps
    per_example = _activations(config, input_shape) * _bytes(config) * SLACK
    adapted = 2 * (steps + 1) * d * _bytes(config)  # each task's adapted parameters and their cotangents
    return tasks * ((2 * m * (steps + 1) + 2 * q) * per_example + adapted)


def estimate(config: Config, input_shape: int | tuple[int, ...], d: int, n: int, m: int, q: int) -> dict[str, float]:
    """Estimated peak bytes of each heavy stage and of the whole run ("peak"), for examples of
    `input_shape` (an int: flat vectors)."""
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    word = _bytes(config)
    chunk = min(config.influence.batch_size or n, n)
    train_tasks = min(config.train.minibatch or n, config.train.chunk or n, n)
    grad_all = _per_gradient(config, shape, d, n, m, q)
    grad_train = _per_gradient(config, shape, d, train_tasks, m, q)
    grad_chunk = _per_gradient(config, shape, d, chunk, m, q)
    dense = 3 * d * d * word
    data = (config.tasks.train + config.tasks.target + config.tasks.test) * (m + q) * math.prod(shape) * word
    stages = {
        "adam": 2 * grad_train + 4 * d * word,
        "newton": (d * grad_all + dense) if config.train.newton_steps else 0.0,
        "solve": (d * grad_chunk + dense) if config.influence.solver == "dense" else 4 * grad_chunk,
        "scores": (1 + m + q) * grad_chunk,
        "edit": (n * (1 + m + q) * d * word * 2 + (m + q) * grad_chunk + (d * grad_chunk + dense))
        if config.edit.tasks or config.edit.support
        else 0.0,
        "check": min(config.check.batch_size, max(config.check.tasks, config.check.support, config.check.query))
        * (d * grad_all + dense),
    }
    stages = {k: v + data for k, v in stages.items()}
    stages["peak"] = max(stages.values())
    return stages


def check(
    config: Config, input_shape: int | tuple[int, ...], d: int, n: int, m: int, q: int, limit: float | None = None
) -> dict[str, float]:
    """The estimate (see `estimate`); raises a ConfigError (one paragraph, with a suggested batch_size) when the estimate exceeds
    the limit: `limit` bytes, else [run] memory_limit_gb, else the memory available now."""
    stages = estimate(config, input_shape, d, n, m, q)
    if limit is None:
        limit = config.run.memory_limit_gb * GiB if config.run.memory_limit_gb else available_bytes()
    if stages["peak"] <= limit:
        return stages
    worst = max((k for k in stages if k != "peak"), key=lambda k: stages[k])
    advice = []
    if worst in ("solve", "scores", "edit"):
        fits = lambda b: estimate(
            dataclasses.replace(config, influence=dataclasses.replace(config.influence, batch_size=b)),
            input_shape,
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
        f"To fit, {'; or '.join(advice)}. The estimate counts the activations ({'float32' if _bytes(config) == 4 else 'float64'}) "
        "of every task's support and query examples through adaptation, d at a time for exact Hessians; raise "
        "[run] memory_limit_gb if you know it fits."
    )
