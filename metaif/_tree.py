"""Small pytree helpers shared by the core (no raveling outside dense solvers and oracles)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any


def sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, x, y)


def scale(alpha: Any, x: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: alpha * leaf, x)


def axpy(alpha: Any, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y."""
    return jax.tree.map(lambda a, b: alpha * a + b, x, y)


def vdot(x: PyTree, y: PyTree) -> jax.Array:
    leaves = [jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
    return sum(leaves[1:], leaves[0])


def norm(x: PyTree) -> jax.Array:
    return jnp.sqrt(vdot(x, x))


def sq_norm(x: PyTree) -> jax.Array:
    return vdot(x, x)


def zeros_like(x: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, x)


def size(x: PyTree) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(x))


def float_dtype(x: PyTree) -> jnp.dtype:
    """The common floating dtype of a pytree's leaves."""
    return jnp.result_type(*jax.tree.leaves(x))


def ravel(x: PyTree):
    """(flat vector, unravel function); only for dense solvers and test oracles."""
    return ravel_pytree(x)
