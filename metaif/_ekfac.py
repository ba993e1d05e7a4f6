"""EK-FAC: an eigenvalue-corrected Kronecker-factored approximation of a Gauss–Newton matrix,
and its inverse with a ridge, for the inner linear solves of implicit adaptation (`Proximal`).

The inner objective's curvature is approximated by its Gauss–Newton part
G = Σ_j w_j J_jᵀ ∇²ℓ_j J_j (J_j: the Jacobian of example j's outputs in θ, ∇²ℓ_j: the output
loss's Hessian), written exactly as a sum of outer products of pseudo-gradients
g_jk = J_jᵀ c_jk with ∇²ℓ_j = Σ_k c_jk c_jkᵀ (George et al., 2018, with the exact expectation over
outputs). Per parameter leaf, reshaped to a matrix P [r, c] (a dense kernel [in, out]; a conv
kernel [kh·kw·in, out]; a vector [k, 1]), and block-diagonal across leaves:

    A = Σ_jk w_j P_jk P_jkᵀ [r, r],  B = Σ_jk w_j P_jkᵀ P_jk [c, c]  (P_jk: g_jk's part for the leaf)
    Q = Q_A ⊗ Q_B (their eigenvectors),  Λ = Σ_jk w_j (Q_Aᵀ P_jk Q_B)²  (the eigenvalue correction)
    G ≈ Q diag(Λ) Qᵀ,   (G + ρI)⁻¹ v = Q ((Qᵀ v) / (Λ + ρ)).

Λ is the diagonal of the exact block in the Kronecker eigenbasis: the best approximation with that
basis. For a dense layer the factors are the classic K-FAC ones up to per-example weights
(P = a gᵀ gives P Pᵀ = ‖g‖² a aᵀ); the eigenvalue correction makes the scale irrelevant. Exact
when each leaf's block is diagonal in Q_A ⊗ Q_B and the cross-leaf blocks vanish, for example a
linear model without bias under squared error (G = Σ w x xᵀ ⊗ I). Not an approximation of the
network's own second derivatives: G is the Gauss–Newton part of the inner Hessian.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import _linalg

PyTree = Any


class Factors(NamedTuple):
    """Per parameter leaf (lists in leaf order): left [r, r] and right [c, c] orthonormal
    eigenvectors, values [r, c] the corrected eigenvalues; `treedef` and `shapes` of the leaves."""

    left: list
    right: list
    values: list
    treedef: Any
    shapes: tuple


def _matrix_shape(shape: tuple) -> tuple[int, int]:
    """The matrix [r, c] a leaf of this shape is factored as: [prod(shape[:-1]), shape[-1]], or
    [size, 1] for scalars and vectors."""
    if len(shape) <= 1:
        return math.prod(shape), 1
    return math.prod(shape[:-1]), shape[-1]


def pseudo_gradients(
    predict: Callable, output_loss: Callable, params: PyTree, meta_params: PyTree, example: PyTree
) -> PyTree:
    """g_k = J_θᵀ c_k for one example, with ∇²_z output_loss = Σ_k c_k c_kᵀ (symmetric square root,
    negative eigenvalues clipped to 0): a pytree like params with a leading axis K (outputs)."""
    outputs, pullback = jax.vjp(lambda p: predict(p, meta_params, example), params)
    flat = outputs.reshape(-1)
    hessian = jax.hessian(lambda z: output_loss(z.reshape(outputs.shape), example))(flat)
    values, vectors = _linalg.eigh(hessian)
    roots = vectors * jnp.sqrt(jnp.maximum(values, 0.0))[None, :]  # columns c_k
    return jax.vmap(lambda c: pullback(c.reshape(outputs.shape))[0])(roots.T)


def factor(
    predict: Callable, output_loss: Callable, params: PyTree, meta_params: PyTree, examples: PyTree, weights: jax.Array
) -> Factors:
    """EK-FAC factors of G = Σ_j weights_j J_jᵀ ∇²ℓ_j J_j over examples (leaves [m, ...], weights [m])."""
    grads = jax.vmap(pseudo_gradients, in_axes=(None, None, None, None, 0))(
        predict, output_loss, params, meta_params, examples
    )  # leaves [m, K, ...]
    leaves, treedef = jax.tree.flatten(grads)
    shapes = tuple(leaf.shape for leaf in jax.tree.leaves(params))
    left, right, values = [], [], []
    for leaf, shape in zip(leaves, shapes):
        p = leaf.reshape(leaf.shape[:2] + _matrix_shape(shape))  # [m, K, r, c]
        a = jnp.einsum("j,jkrc,jksc->rs", weights, p, p)
        b = jnp.einsum("j,jkrc,jkrd->cd", weights, p, p)
        qa = _linalg.eigh(a).vectors
        qb = _linalg.eigh(b).vectors
        rotated = jnp.einsum("rs,jkrc,cd->jksd", qa, p, qb)
        left.append(qa)
        right.append(qb)
        values.append(jnp.einsum("j,jkrc->rc", weights, rotated**2))
    return Factors(left, right, values, jax.tree.structure(params), shapes)


def _map(factors: Factors, v: PyTree, scale: Callable[[jax.Array, jax.Array], jax.Array]) -> PyTree:
    out = []
    for qa, qb, lam, leaf, shape in zip(
        factors.left, factors.right, factors.values, jax.tree.leaves(v), factors.shapes
    ):
        rotated = qa.T @ leaf.reshape(_matrix_shape(shape)) @ qb
        out.append((qa @ scale(rotated, lam) @ qb.T).reshape(shape))
    return jax.tree.unflatten(factors.treedef, out)


def matvec(factors: Factors, shift, v: PyTree) -> PyTree:
    """(G_EKFAC + shift·I) v."""
    return _map(factors, v, lambda x, lam: x * (lam + shift))


def inverse(factors: Factors, shift, v: PyTree) -> PyTree:
    """(G_EKFAC + shift·I)⁻¹ v; shift > 0 keeps it defined where Λ = 0."""
    return _map(factors, v, lambda x, lam: x / (lam + shift))


def dense_matrix(factors: Factors) -> jax.Array:
    """The d×d matrix G_EKFAC (block-diagonal over leaves, in ravel order): the dense twin."""
    blocks = []
    for qa, qb, lam in zip(factors.left, factors.right, factors.values):
        q = jnp.kron(qa, qb)  # row-major vec: vec(Q_A X Q_Bᵀ) = (Q_A ⊗ Q_B) vec(X)
        blocks.append(q @ jnp.diag(lam.reshape(-1)) @ q.T)
    return jax.scipy.linalg.block_diag(*blocks)
