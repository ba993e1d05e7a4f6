"""Preconditioners for conjugate gradients: r ↦ P⁻¹ r with P symmetric positive definite, P ≈ H + δI."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from .. import _linalg, _tree
from . import _spectrum
from ._lowrank import low_rank_inverse

PyTree = Any

DIAGONAL_FLOOR = 1e-3  # Jacobi: estimates are clipped below at this fraction of their mean |value|
PROBE_CHUNK = 8  # Hutchinson probes evaluated together (memory of PROBE_CHUNK products)


def hutchinson_diagonal(hvp: Callable[[PyTree], PyTree], like: PyTree, probes: int, key: jax.Array) -> PyTree:
    """Unbiased estimate of diag(H), (1/P) Σ_p z_p ⊙ H z_p with Rademacher z_p: P products.

    Exact for a diagonal H; otherwise the error of entry i has variance Σ_{j≠i} H_ij² / P.
    """
    z = _linalg.random_like(key, like, "rademacher", batch=probes)
    hz = jax.lax.map(hvp, z, batch_size=min(probes, PROBE_CHUNK))
    return jax.tree.map(lambda a, b: jnp.mean(a * b, axis=0), z, hz)


def jacobi(hvp, like, damping: float, probes: int, key: jax.Array) -> Callable[[PyTree], PyTree]:
    """r ↦ r / (max(d̂, floor) + δ) with d̂ the Hutchinson estimate of diag(H) and
    floor = DIAGONAL_FLOOR · mean |d̂| (positive even where the estimate is not)."""
    diagonal = hutchinson_diagonal(hvp, like, probes, key)
    leaves = jax.tree.leaves(diagonal)
    mean = sum(jnp.sum(jnp.abs(leaf)) for leaf in leaves) / _tree.size(like)
    floor = jnp.maximum(DIAGONAL_FLOOR * mean, jnp.finfo(jnp.result_type(mean)).tiny)
    inverse = jax.tree.map(lambda leaf: 1.0 / (jnp.maximum(leaf, floor) + damping), diagonal)
    return lambda r: jax.tree.map(jnp.multiply, inverse, r)


def spectral(hvp, like, damping: float, rank: int, steps: int, key_seed: int) -> Callable[[PyTree], PyTree]:
    """r ↦ V diag(1/(λᵢ + δ)) Vᵀ r + (r − V Vᵀ r)/(σ + δ) from the top-`rank` Lanczos pairs of
    H, with σ = λ_rank, the smallest retained eigenvalue: P⁻¹(H + δI) has eigenvalues ≈ 1 on
    the top subspace and (λ + δ)/(σ + δ) <= 1 below it, so CG sees a condition number of about
    (σ + δ)/(λ_min + δ) instead of (λ_max + δ)/(λ_min + δ). Shifted values are clipped below at a
    small positive fraction of the largest, so P stays positive definite."""
    pairs, _ = _spectrum.extreme_pairs(hvp, like, rank, "largest", steps, key_seed)
    shifted = pairs.values + damping
    floor = jnp.maximum(1e-6 * jnp.abs(shifted[0]), jnp.finfo(shifted.dtype).tiny)
    clipped = jnp.maximum(shifted, floor)
    pairs = pairs._replace(values=clipped)
    return lambda r: low_rank_inverse(pairs, 0.0, clipped[-1], r)
