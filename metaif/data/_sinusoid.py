"""MAML's sinusoid regression tasks (Finn et al. 2017, section 5.1): y = A·sin(x − φ)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import _validate
from .._problem import TaskSet
from . import _args


class SinusoidParameters(NamedTuple):
    """Per-task amplitude A [n] and phase φ [n] (float64)."""

    amplitude: np.ndarray
    phase: np.ndarray


def _streams(seed: int, caller: str) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for task parameters and inputs, so both functions agree."""
    params, inputs = np.random.SeedSequence(_args.seed(f"{caller}(seed)", seed)).spawn(2)
    return np.random.default_rng(params), np.random.default_rng(inputs)


def _parameters(rng, n_tasks, amplitude, phase, caller) -> SinusoidParameters:
    low_a, high_a = _args.interval(f"{caller}(amplitude)", amplitude)
    low_p, high_p = _args.interval(f"{caller}(phase)", phase)
    return SinusoidParameters(rng.uniform(low_a, high_a, n_tasks), rng.uniform(low_p, high_p, n_tasks))


def sinusoid_parameters(n_tasks: int, seed: int, *, amplitude=(0.1, 5.0), phase=(0.0, np.pi)) -> SinusoidParameters:
    """The amplitudes and phases `sinusoid_tasks` draws for the same n_tasks, seed and ranges."""
    n_tasks = _validate.positive_int("sinusoid_parameters(n_tasks)", n_tasks)
    return _parameters(_streams(seed, "sinusoid_parameters")[0], n_tasks, amplitude, phase, "sinusoid_parameters")


def sinusoid_tasks(
    n_tasks: int,
    shots: int,
    queries: int,
    seed: int,
    *,
    amplitude=(0.1, 5.0),
    phase=(0.0, np.pi),
    x_range=(-5.0, 5.0),
    dtype=np.float32,
) -> TaskSet:
    """n_tasks sinusoid regression tasks: A ~ U(amplitude), φ ~ U(phase), x ~ U(x_range), y = A·sin(x − φ).

    Defaults are MAML's (A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [−5, 5], noiseless). Returns a TaskSet with
    support {"x": [n, shots, 1], "y": [n, shots, 1]} and query {"x": [n, queries, 1], "y": [n,
    queries, 1]} of `dtype`; `sinusoid_parameters(n_tasks, seed)` gives each task's A and φ.
    """
    caller = "sinusoid_tasks"
    n_tasks = _validate.positive_int(f"{caller}(n_tasks)", n_tasks)
    shots = _validate.positive_int(f"{caller}(shots)", shots)
    queries = _validate.positive_int(f"{caller}(queries)", queries)
    low, high = _args.interval(f"{caller}(x_range)", x_range)
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(f"{caller}(dtype) must be a floating dtype such as np.float32; received {dtype!r}.")
    params_rng, input_rng = _streams(seed, caller)
    params = _parameters(params_rng, n_tasks, amplitude, phase, caller)
    x = input_rng.uniform(low, high, (n_tasks, shots + queries, 1))
    y = params.amplitude[:, None, None] * np.sin(x - params.phase[:, None, None])
    x, y = x.astype(dtype), y.astype(dtype)
    return TaskSet(support={"x": x[:, :shots], "y": y[:, :shots]}, query={"x": x[:, shots:], "y": y[:, shots:]})
