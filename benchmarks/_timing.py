"""Warm-timing shared by the benchmark scripts: first call (with compilation) then warm repeats."""

from __future__ import annotations

import time
from typing import Callable

import jax


def timed(
    fn: Callable,
    *,
    max_repeats: int,
    min_total_s: float,
    min_repeats: int = 1,
    single_over_s: float = 2.0,
    statistic: Callable = min,
):
    """(first-call seconds, warm seconds, output). The first call includes compilation. Warm calls
    repeat until at least `min_repeats` and `min_total_s` seconds (at most `max_repeats`), except
    that one warm call over `single_over_s` is taken as is; the warm time is `statistic` of them."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    warm: list[float] = []
    while len(warm) < max_repeats:
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        warm.append(time.perf_counter() - start)
        if warm[0] > single_over_s or (len(warm) >= min_repeats and sum(warm) >= min_total_s):
            break
    return first, float(statistic(warm)), out
