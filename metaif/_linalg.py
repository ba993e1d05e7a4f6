"""Linear-algebra kernels on pytrees: (preconditioned) conjugate gradients, the Neumann series,
Lanczos with full reorthogonalisation, and a dense symmetric eigen-solve.

Every solve reports a `SolveInfo`, so failure is visible in the result and never silent. Vectors
are pytrees shaped like the meta-parameters; a basis of k vectors is one pytree whose leaves carry
a leading axis k (no raveling).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from . import _tree

PyTree = Any


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve (H + damping·I) x = b.

    Attributes:
      iterations: Hessian-vector products the solver spent on this right-hand side (CG, Neumann:
        one per iteration; LiSSA: minibatch products, iterations × repeats; 0 for solves that only
        reuse what `prepare` computed: Dense, LowRank, Identity). The one extra product that
        recomputes the residual, and products spent once in `prepare`, are not counted.
      residual_norm: ‖(H + damping·I) x − b‖, recomputed from x (not the solver's recursion).
      relative_residual: residual_norm / ‖b‖ (0 when b = 0).
      converged: CG: the tolerance was met before `maxiter` and before any non-positive
        curvature; dense: H + damping·I was invertible and the solution is finite; approximate
        solvers (Neumann, LiSSA, LowRank, Identity): relative_residual <= their `tol`.
      indefinite: whether H + damping·I showed a non-positive curvature direction
        (dense: its smallest eigenvalue is <= 0; CG: some search direction had pᵀ(H + δI)p <= 0;
        Neumann: a Lanczos estimate or a series term did; LowRank: the smallest Ritz value).
        False means none was detected, not that none exists.
      min_eigenvalue: smallest eigenvalue of H (without damping) for dense solves; for LowRank the
        smallest Ritz value of its Lanczos run (an upper bound, exact when the run spans the whole
        space); for CG with the default damping the smallest Ritz value of its Lanczos run (an
        upper bound on λ_min(H)); NaN otherwise.
      damping: the δ the solve used (the default relative one resolved to a number).

    Batched solves (one per right-hand side) carry a leading batch axis on every field.
    """

    iterations: jax.Array
    residual_norm: jax.Array
    relative_residual: jax.Array
    converged: jax.Array
    indefinite: jax.Array
    min_eigenvalue: jax.Array
    damping: jax.Array


def _relative(residual: jax.Array, b_norm: jax.Array) -> jax.Array:
    return jnp.where(b_norm > 0, residual / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


def solve_info(
    matvec: Callable[[PyTree], PyTree],
    x: PyTree,
    b: PyTree,
    *,
    iterations: Any,
    tol: float,
    damping: Any,
    indefinite: Any = False,
    min_eigenvalue: Any = None,
) -> SolveInfo:
    """Diagnostics of an approximate solve A x ≈ b, with the residual recomputed by one product.

    `converged` is relative_residual <= tol (False for a non-finite x).
    """
    dtype = _tree.float_dtype(b)
    residual = _tree.norm(_tree.sub(matvec(x), b))
    relative = _relative(residual, _tree.norm(b))
    nan = jnp.full((), jnp.nan, dtype)
    return SolveInfo(
        iterations=jnp.asarray(iterations, jnp.int32),
        residual_norm=residual,
        relative_residual=relative,
        converged=jnp.isfinite(residual) & (relative <= tol),
        indefinite=jnp.asarray(indefinite, bool),
        min_eigenvalue=nan if min_eigenvalue is None else jnp.asarray(min_eigenvalue, dtype),
        damping=jnp.asarray(damping, dtype),
    )


# ----------------------------------------------------------------------------- conjugate gradients


def preconditioned_conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    tol: float,
    maxiter: int,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    damping: Any = 0.0,
) -> tuple[PyTree, SolveInfo]:
    """Solve A x = b for symmetric positive-definite A given only x ↦ A x.

    `preconditioner` is r ↦ P⁻¹ r for a symmetric positive-definite P ≈ A (None: the identity,
    plain CG). Stops when the recursive residual ‖r‖ is at most tol·‖b‖, after `maxiter`
    products, or at the first direction of non-positive curvature pᵀAp <= 0 (then `indefinite`
    is True and `converged` False). `iterations` counts products with A; the final residual is
    recomputed with one more. `damping` is only recorded in the SolveInfo (A already includes it).
    """
    identity = preconditioner is None
    b_norm = _tree.norm(b)
    threshold = tol * b_norm

    def precondition(r, rs):
        """(z, rᵀz) with z = P⁻¹ r; rᵀz = ‖r‖² for the identity."""
        if identity:
            return r, rs
        z = preconditioner(r)
        return z, _tree.vdot(r, z)

    def cond(state):
        return _cg_running(state, threshold, maxiter)

    def body(state):
        return _cg_update(state, matvec(state[3]), precondition)

    state = jax.lax.while_loop(cond, body, _cg_init(b, precondition))
    x = state[1]
    residual = _tree.norm(_tree.sub(matvec(x), b))
    return x, _cg_info(state, residual, b_norm, threshold, damping)


def _cg_running(state, threshold, maxiter):
    k, _, _, _, _, rs, bad = state
    return (k < maxiter) & (jnp.sqrt(rs) > threshold) & ~bad


def _cg_update(state, ap, precondition):
    """One CG iteration given ap = A p for the state's search direction p."""
    k, x, r, p, rz, _, _ = state
    pap = _tree.vdot(p, ap)
    bad = ~(pap > 0)
    alpha = jnp.where(bad, 0.0, rz / jnp.where(bad, 1.0, pap))
    x = _tree.axpy(alpha, p, x)
    r = _tree.axpy(-alpha, ap, r)
    rs = _tree.sq_norm(r)
    z, rz_new = precondition(r, rs)
    beta = rz_new / jnp.where(rz > 0, rz, 1.0)
    p = _tree.axpy(beta, p, z)
    return k + 1, x, r, p, rz_new, rs, bad


def _cg_init(b, precondition):
    b_norm = _tree.norm(b)
    rs0 = _tree.sq_norm(b)
    z0, rz0 = precondition(b, rs0)
    return (
        jnp.zeros_like(b_norm, dtype=jnp.int32),
        _tree.zeros_like(b),
        b,
        z0,
        rz0,
        rs0,
        jnp.zeros_like(b_norm, dtype=bool),
    )


def _cg_info(state, residual, b_norm, threshold, damping, min_eigenvalue=None) -> SolveInfo:
    k, _, _, _, _, rs, bad = state
    return SolveInfo(
        iterations=k,
        residual_norm=residual,
        relative_residual=_relative(residual, b_norm),
        converged=(jnp.sqrt(rs) <= threshold) & ~bad,
        indefinite=bad,
        min_eigenvalue=jnp.full((), jnp.nan, b_norm.dtype) if min_eigenvalue is None else min_eigenvalue,
        damping=jnp.asarray(damping, b_norm.dtype),
    )


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree], b: PyTree, *, tol: float, maxiter: int
) -> tuple[PyTree, SolveInfo]:
    """Plain conjugate gradients: `preconditioned_conjugate_gradient` with the identity."""
    return preconditioned_conjugate_gradient(matvec, b, tol=tol, maxiter=maxiter)


# ----------------------------------------------------------------------------- Neumann series


def neumann_series(
    matvec: Callable[[jax.Array, PyTree], PyTree], b: PyTree, scale: Any, steps: int
) -> tuple[PyTree, jax.Array]:
    """x = η Σ_{j=0..J} r_j with r_0 = b, r_{j+1} = (I − η A_j) r_j, η = `scale`, J = `steps`.

    `matvec(j, v)` = A_j v may change with the step j (LiSSA's minibatch estimates); with one A it
    is the truncated Neumann series η Σ_{j=0..J} (I − ηA)^j b of A⁻¹ b (Richardson iteration
    from 0), at the cost of J products. Also returns whether some term had r_jᵀ A_j r_j <= 0
    while ‖r_j‖ was above rounding level (non-positive curvature: the series diverges there).
    """
    dtype = _tree.float_dtype(b)
    scale = jnp.asarray(scale, dtype)
    floor = 100 * jnp.finfo(dtype).eps * _tree.norm(b)

    def body(j, state):
        x, r, bad = state
        x = _tree.axpy(scale, r, x)
        ar = matvec(j, r)
        bad = bad | ((_tree.vdot(r, ar) <= 0) & (_tree.norm(r) > floor))
        return x, _tree.axpy(-scale, ar, r), bad

    x, r, bad = jax.lax.fori_loop(0, steps, body, (_tree.zeros_like(b), b, jnp.zeros((), bool)))
    return _tree.axpy(scale, r, x), bad


# ----------------------------------------------------------------------------- random vectors, bases


def random_like(key: jax.Array, like: PyTree, kind: str = "normal", batch: int | None = None) -> PyTree:
    """A random pytree shaped like `like` (with a leading axis `batch` if given): standard normal
    or Rademacher (±1) entries in each leaf's dtype. One draw of the total size, split into leaves
    (one random-number kernel, whatever the number of leaves)."""
    leaves, treedef = jax.tree.flatten(like)
    dtype = _tree.float_dtype(like)
    rows = () if batch is None else (batch,)
    total = sum(leaf.size for leaf in leaves)
    if kind == "normal":
        draw = jax.random.normal(key, (*rows, total), dtype)
    else:
        draw = jax.random.rademacher(key, (*rows, total), jnp.int32).astype(dtype)
    out, start = [], 0
    for leaf in leaves:
        piece = jax.lax.slice_in_dim(draw, start, start + leaf.size, axis=-1)
        out.append(piece.reshape(*rows, *leaf.shape).astype(leaf.dtype))
        start += leaf.size
    return jax.tree.unflatten(treedef, out)


def basis_dot(basis: PyTree, v: PyTree) -> jax.Array:
    """[Vᵢᵀ v]ᵢ for a basis pytree with leading axis k: shape [k]."""
    parts = [jnp.tensordot(B, x, axes=x.ndim) for B, x in zip(jax.tree.leaves(basis), jax.tree.leaves(v))]
    return sum(parts[1:], parts[0])


def basis_combine(basis: PyTree, coefficients: jax.Array) -> PyTree:
    """Σᵢ cᵢ Vᵢ for a basis pytree with leading axis k and coefficients [k]."""
    return jax.tree.map(lambda B: jnp.tensordot(coefficients, B, axes=1), basis)


# ----------------------------------------------------------------------------- Lanczos


class Lanczos(NamedTuple):
    """Ritz pairs of a symmetric operator A from a Lanczos run of `steps` products.

    Attributes:
      values: [steps] Ritz values θ, ascending; they lie in [λ_min(A), λ_max(A)] and the extreme
        ones converge first.
      vectors: pytree with leading axis [steps]: the orthonormal Ritz vectors yᵢ.
      residuals: [steps] ‖A yᵢ − θᵢ yᵢ‖ (from the Lanczos relation): some eigenvalue of A lies
        within residualᵢ of θᵢ.
    """

    values: jax.Array
    vectors: PyTree
    residuals: jax.Array


def least_represented(basis: PyTree) -> PyTree:
    """The coordinate vector eᵢ (a pytree, one entry 1) with the smallest Σ_k basis_k[i]²; the
    first such i in leaf order."""
    weights = [jnp.sum(B**2, axis=0).reshape(-1) for B in jax.tree.leaves(basis)]
    index = jnp.argmin(jnp.concatenate(weights))
    out, start = [], 0
    for B, w in zip(jax.tree.leaves(basis), weights):
        out.append((jnp.arange(start, start + w.size) == index).astype(B.dtype).reshape(B.shape[1:]))
        start += w.size
    return jax.tree.unflatten(jax.tree.structure(basis), out)


def lanczos(matvec: Callable[[PyTree], PyTree], like: PyTree, steps: int, key: jax.Array) -> Lanczos:
    """`steps` Lanczos iterations on x ↦ A x (A symmetric) from a random start, with full
    reorthogonalisation (classical Gram–Schmidt, twice) against the stored basis.

    On breakdown (an invariant subspace: the new direction vanishes to rounding level) it restarts
    from the coordinate vector eᵢ least represented in the basis (smallest Σ_k Q_ki², so
    ‖(I − QQᵀ)eᵢ‖² >= 1 − steps/d > 0), orthogonalised against it: repeated eigenvalues are found
    too. `steps` must not exceed the dimension d. Memory: steps vectors; time: steps products +
    O(steps²·d).
    """
    state = jax.lax.fori_loop(
        0, steps, lambda j, state: _lanczos_update(j, state, matvec(state[3])), _lanczos_init(like, steps, key)
    )
    return _lanczos_result(state)


def _normalise(v):
    n = _tree.norm(v)
    return _tree.scale(1.0 / jnp.where(n > 0, n, 1.0), v)


def _orthogonalise(basis, w):
    for _ in range(2):
        w = _tree.sub(w, basis_combine(basis, basis_dot(basis, w)))
    return w


def _lanczos_init(like, steps, key=None, start=None):
    """(basis [steps, ...], alphas, betas, q, q_prev, beta_prev) before the first product, from
    the unit vector `start` or else a random one drawn with `key`."""
    dtype = _tree.float_dtype(like)
    basis = jax.tree.map(lambda leaf: jnp.zeros((steps, *leaf.shape), leaf.dtype), like)
    vector = jnp.zeros((steps,), dtype)
    start = _normalise(random_like(key, like)) if start is None else start
    return basis, vector, vector, start, _tree.zeros_like(like), jnp.zeros((), dtype)


def _lanczos_update(j, state, w):
    """Lanczos step j given w = A q for the state's current vector q."""
    basis, alphas, betas, q, q_prev, beta_prev = state
    eps = jnp.finfo(alphas.dtype).eps
    basis = jax.tree.map(lambda B, v: B.at[j].set(v), basis, q)
    w_norm = _tree.norm(w)
    alpha = _tree.vdot(q, w)
    w = _orthogonalise(basis, _tree.axpy(-alpha, q, _tree.axpy(-beta_prev, q_prev, w)))
    beta = _tree.norm(w)
    breakdown = beta <= 100 * eps * w_norm

    def restart(_):
        return _normalise(_orthogonalise(basis, least_represented(basis)))

    q_next = jax.lax.cond(breakdown, restart, lambda _: _normalise(w), None)
    beta = jnp.where(breakdown, jnp.zeros((), alphas.dtype), beta)
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), q_next, q, beta


def _ritz_values(state) -> jax.Array:
    """Ascending Ritz values of the tridiagonal built so far (all steps of the state)."""
    _, alphas, betas, *_ = state
    return eigh(jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)).values


def _lanczos_result(state) -> Lanczos:
    basis, alphas, betas, *_ = state
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    values, s = eigh(tridiagonal)
    vectors = jax.tree.map(lambda B: jnp.tensordot(s.T, B, axes=1), basis)
    return Lanczos(values, vectors, jnp.abs(betas[-1] * s[-1, :]))


def fused_conjugate_gradient(
    hvp: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    tol: float,
    maxiter: int,
    damping: Any,
) -> tuple[PyTree, SolveInfo]:
    """CG on (H + δI) x = b, δ = `damping`, in one `lax.while_loop` whose body holds the only
    call of `hvp`: the CG steps and the residual check share one compiled product (XLA's compile
    time grows with the number of call sites of a costly `hvp`; an HVP through unrolled
    adaptation compiles about as long as a meta-gradient). Same numbers as `conjugate_gradient`
    on v ↦ H v + δ v with its residual check."""
    b_norm = _tree.norm(b)
    dtype = b_norm.dtype
    threshold = tol * b_norm
    no_precondition = lambda r, rs: (r, rs)
    delta = jnp.asarray(damping, dtype)

    def body(state):
        cg, residual, _ = state
        solving = _cg_running(cg, threshold, maxiter)
        vector = jax.tree.map(lambda p, x: jnp.where(solving, p, x), cg[3], cg[1])
        applied = _tree.axpy(delta, vector, hvp(vector))  # (H + δI) vector, as `_damping.damped` forms it
        cg = jax.lax.cond(solving, lambda c: _cg_update(c, applied, no_precondition), lambda c: c, cg)
        residual = jnp.where(solving, residual, _tree.norm(_tree.sub(applied, b)))
        return cg, residual, ~solving

    init = (_cg_init(b, no_precondition), jnp.full((), jnp.nan, dtype), jnp.zeros((), bool))
    cg, residual, _ = jax.lax.while_loop(lambda state: ~state[-1], body, init)
    return cg[1], _cg_info(cg, residual, b_norm, threshold, delta)


def damped_lanczos_solve(
    hvp: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    tol: float,
    maxiter: int,
    damping_of: Callable[[jax.Array], jax.Array],
    budget_residual: float | None = None,
) -> tuple[PyTree, SolveInfo]:
    """Solve (H + δI) x = b with δ chosen from the curvature the solve itself sees.

    Krylov spaces are shift-invariant, K_k(H + δI, b) = K_k(H, b), so one Lanczos run on H from
    b (full reorthogonalisation) serves every δ: with H Q_k = Q_k T_k + β_k q_{k+1} e_kᵀ,
    x_k = Q_k (T_k + δI)⁻¹ ‖b‖ e₁ is the Galerkin solution, what CG on H + δI computes after k
    products when that matrix is positive definite. δ = damping_of(ascending Ritz values of T_k)
    is chosen after each product; T_k + δI stays positive definite when δ > −θ_min, so an
    indefinite H gives the damped solve, never an early stop. Stops when the Lanczos residual
    β_k |e_kᵀ y| <= tol·‖b‖ or after `maxiter` products, then recomputes the residual with one
    more product at the same call site. Memory: maxiter vectors like b.

    `budget_residual`: where the last product leaves the Lanczos residual above
    max(tol, budget_residual)·‖b‖, δ is raised to the smallest value (on a geometric grid) at
    which it is not: that residual is exact for every shift, so the answer is an accurate solve at
    a larger, reported δ rather than an inaccurate one at the smaller δ (None: never raised).

    SolveInfo: `iterations` the Lanczos products, `damping` the final δ, `min_eigenvalue` the
    smallest Ritz value (an upper bound of λ_min(H)), `indefinite` whether θ_min + δ <= 0.
    """
    b_norm = _tree.norm(b)
    dtype = b_norm.dtype
    steps = maxiter
    threshold = tol * b_norm
    start = _tree.scale(1.0 / jnp.where(b_norm > 0, b_norm, 1.0), b)
    lanczos = _lanczos_init(b, steps, start=start)

    def projected(state, k):
        """(y [steps], δ, θ_min, Lanczos residual) of the solve in the first k + 1 vectors."""
        _, alphas, betas, *_ = state
        index = jnp.arange(steps, dtype=jnp.int32)
        valid = index <= k
        # padding: decoupled diagonal entries equal to α₀ (inside the valid block's Ritz range),
        # so the extreme Ritz values are the valid block's own
        diagonal = jnp.where(valid, alphas, alphas[0])
        off = jnp.where(index[:-1] < k, betas[:-1], 0.0)
        factor = eigh(jnp.diag(diagonal) + jnp.diag(off, 1) + jnp.diag(off, -1))
        delta = damping_of(factor.values)
        if budget_residual is not None:
            accurate = _accurate_shift(factor, betas[k], k, delta, jnp.maximum(tol, budget_residual))
            delta = jnp.where(k == steps - 1, accurate, delta)
        shifted = factor.values + delta
        safe = jnp.where(shifted > 0, shifted, 1.0)
        y = factor.vectors @ (factor.vectors[0] * b_norm / safe)
        y = jnp.where(valid, y, 0.0)
        return y, delta, factor.values[0], jnp.abs(betas[k] * y[k]), jnp.any(shifted <= 0)

    def body(state):
        k, used, lanczos, x, delta, smallest, bad, residual, _ = state
        solving = k < steps
        vector = jax.tree.map(lambda q, v: jnp.where(solving, q, v), lanczos[3], x)
        w = hvp(vector)
        lanczos = jax.lax.cond(
            solving, lambda s: _lanczos_update(jnp.minimum(k, steps - 1), s, w), lambda s: s, lanczos
        )
        y, new_delta, new_smallest, estimate, new_bad = projected(lanczos, jnp.minimum(k, steps - 1))
        new_x = basis_combine(lanczos[0], y)
        x = jax.tree.map(lambda a, c: jnp.where(solving, a, c), new_x, x)
        delta = jnp.where(solving, new_delta, delta)
        smallest = jnp.where(solving, new_smallest, smallest)
        bad = jnp.where(solving, new_bad, bad)
        checked = ~solving
        residual = jnp.where(checked, _tree.norm(_tree.sub(_tree.axpy(delta, vector, w), b)), residual)
        # done after this product's solve meets tol: the next pass only checks the residual
        used = used + solving.astype(jnp.int32)
        k = jnp.where(solving & (estimate <= threshold), steps, k + 1)
        return k, used, lanczos, x, delta, smallest, bad, residual, checked

    zero, count = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
    init = (count, count, lanczos, _tree.zeros_like(b), zero, zero, jnp.zeros((), bool), zero, jnp.zeros((), bool))
    _, used, _, x, delta, smallest, bad, residual, _ = jax.lax.while_loop(lambda state: ~state[-1], body, init)
    relative = _relative(residual, b_norm)
    return x, SolveInfo(
        iterations=used,
        residual_norm=residual,
        relative_residual=relative,
        converged=jnp.isfinite(residual) & (residual <= threshold) & ~bad,
        indefinite=bad,
        min_eigenvalue=smallest,
        damping=delta,
    )


SHIFT_GRID = 128  # shifts tried by `_accurate_shift`, geometric from δ to 1e2 · max(|θ|, δ)


def _accurate_shift(factor: Eigh, beta: jax.Array, k: jax.Array, delta: jax.Array, relative: jax.Array) -> jax.Array:
    """The smallest shift s >= δ on a geometric grid at which the Galerkin solve in the first
    k + 1 Lanczos vectors has residual β_k |e_kᵀ (T + sI)⁻¹ e₁| <= `relative` (× ‖b‖), from the
    eigenpairs of T (padded entries are decoupled from e₁ and add nothing)."""
    top = 1e2 * jnp.maximum(jnp.max(jnp.abs(factor.values)), delta)
    shifts = delta * (top / delta) ** jnp.linspace(0.0, 1.0, SHIFT_GRID, dtype=delta.dtype)
    weights = factor.vectors[k] * factor.vectors[0]
    shifted = factor.values[None, :] + shifts[:, None]
    safe = jnp.where(shifted > 0, shifted, 1.0)
    residual = jnp.abs(beta) * jnp.abs(jnp.sum(weights[None, :] / safe, axis=1))
    ok = (residual <= relative) & jnp.all(shifted > 0, axis=1)
    return jnp.where(jnp.any(ok), shifts[jnp.argmax(ok)], shifts[-1])


# ----------------------------------------------------------------------------- dense


class Eigh(NamedTuple):
    """Eigen-decomposition of a symmetric matrix: matrix = vectors · diag(values) · vectorsᵀ."""

    values: jax.Array
    vectors: jax.Array


def _symmetric_eigh(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    values, vectors = jnp.linalg.eigh(matrix)
    return values, vectors


# On CPU, vmap of LAPACK kernels becomes a loop of single-matrix calls. jaxlib 0.10's batched CPU
# LAPACK kernels split a batch over XLA's intra-op thread pool and block a pool thread until the
# pieces finish; when as many batched calls run concurrently as the pool has threads (2 on a
# 2-core machine: e.g. the per-task solves of iMAML's dense implicit derivative inside a Newton
# step), every thread waits and the process hangs with no CPU use. Single-matrix calls never
# wait on the pool. Other platforms keep their batched kernels. The loop has no reverse-mode rule
# of its own, so the eigenpairs get theirs from the explicit JVP below (linear in the tangent).
# Under an Explicit mesh that shards the batch axis (metaif.parallel), lax.map cannot scan a
# sharded axis; there each device keeps the batched kernel on its own shard.


def _sharded_batch(x: jax.Array) -> bool:
    """Whether x's leading (batch) axis is sharded over an Explicit mesh axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and len(spec) > 0 and spec[0] is not None


_cpu_sequential_eigh = jax.custom_batching.custom_vmap(_symmetric_eigh)


@_cpu_sequential_eigh.def_vmap
def _eigh_batched(axis_size, in_batched, matrix):
    if _sharded_batch(matrix):
        return jax.vmap(_symmetric_eigh)(matrix), (True, True)
    return jax.lax.map(_cpu_sequential_eigh, matrix), (True, True)


def _eigh_any_platform(symmetric: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.lax.platform_dependent(symmetric, cpu=_cpu_sequential_eigh, default=_symmetric_eigh)


@jax.custom_jvp
def _differentiable_eigh(symmetric: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _eigh_any_platform(symmetric)


@_differentiable_eigh.defjvp
def _eigh_jvp(primals, tangents):
    """dw = diag(Vᵀ dA V), dV = V (F ∘ Vᵀ dA V) with F_ij = 1/(w_j − w_i) off the diagonal."""
    (symmetric,), (direction,) = primals, tangents
    values, vectors = _differentiable_eigh(symmetric)
    rotated = vectors.T @ direction @ vectors
    eye = jnp.eye(values.shape[-1], dtype=values.dtype)
    gaps = 1.0 / (eye + values[None, :] - values[:, None]) - eye
    return (values, vectors), (jnp.diagonal(rotated), vectors @ (gaps * rotated))


def eigh(matrix: jax.Array) -> Eigh:
    """Eigen-decomposition of the symmetric part of `matrix` ([d, d]; vmappable and differentiable,
    see above)."""
    values, vectors = _differentiable_eigh(0.5 * (matrix + matrix.T))
    return Eigh(values, vectors)


def _lu_solve_columns(matrix: jax.Array, rhs: jax.Array) -> jax.Array:
    """matrix⁻¹ rhs for one [p, p] matrix and rhs [p, k] by LU."""
    return jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(matrix), rhs)


_cpu_solve_columns = jax.custom_batching.custom_vmap(_lu_solve_columns)


@_cpu_solve_columns.def_vmap
def _solve_columns_batched(axis_size, in_batched, matrix, rhs):
    """A batch of matrices: one LU after another (lax.map). One matrix with a batch of right-hand
    sides: one LU, the batch folded into rhs's columns. LAPACK thus only ever sees one matrix,
    under any nesting of vmaps (each level calls back into this rule, never into batched LAPACK)."""
    matrix_batched, rhs_batched = in_batched
    if matrix_batched:
        rhs = rhs if rhs_batched else jnp.broadcast_to(rhs, (axis_size, *rhs.shape))
        if _sharded_batch(matrix):
            return jax.vmap(_lu_solve_columns)(matrix, rhs), True
        return jax.lax.map(lambda pair: _cpu_solve_columns(*pair), (matrix, rhs)), True
    p, k = rhs.shape[1:]
    folded = _cpu_solve_columns(matrix, jnp.moveaxis(rhs, 0, 1).reshape(p, axis_size * k))
    return jnp.moveaxis(folded.reshape(p, axis_size, k), 1, 0), True


def dense_solve(matrix: jax.Array, b: jax.Array) -> jax.Array:
    """x = matrix⁻¹ b for an invertible [p, p] matrix and b [p], vmappable without the CPU
    deadlock above (LU one matrix at a time on CPU; the batched `jnp.linalg.solve` elsewhere).
    Not differentiable on CPU: meant as the `solve` of `lax.custom_linear_solve`, which never
    differentiates its solve."""
    cpu = lambda m, v: _cpu_solve_columns(m, v[:, None])[:, 0]
    return jax.lax.platform_dependent(matrix, b, cpu=cpu, default=jnp.linalg.solve)


def eigh_solve(factor: Eigh, b: jax.Array, damping: float) -> tuple[jax.Array, SolveInfo]:
    """x = (matrix + damping·I)⁻¹ b for a flat vector b, with diagnostics."""
    shifted = factor.values + damping
    x = factor.vectors @ ((factor.vectors.T @ b) / shifted)
    applied = factor.vectors @ (shifted * (factor.vectors.T @ x))
    residual = jnp.linalg.norm(applied - b)
    b_norm = jnp.linalg.norm(b)
    indefinite = ~(shifted[0] > 0)
    info = SolveInfo(
        iterations=jnp.zeros((), jnp.int32),
        residual_norm=residual,
        relative_residual=_relative(residual, b_norm),
        converged=jnp.all(jnp.isfinite(x)) & jnp.all(shifted != 0),
        indefinite=indefinite,
        min_eigenvalue=factor.values[0],
        damping=jnp.asarray(damping, x.dtype),
    )
    return x, info


def dense_matrix(matvec: Callable[[PyTree], PyTree], like: PyTree) -> jax.Array:
    """Materialise the d×d matrix of a linear map on pytrees shaped like `like`."""
    flat, unravel = _tree.ravel(like)
    basis = jnp.eye(flat.size, dtype=flat.dtype)
    columns = jax.vmap(lambda e: _tree.ravel(matvec(unravel(e)))[0])(basis)
    return columns.T


def summarize(info: SolveInfo) -> SolveInfo:
    """The worst case over a batch of solves, as scalars: max iterations and residuals, all
    converged, any indefinite, smallest eigenvalue, largest damping."""
    return SolveInfo(
        iterations=jnp.max(info.iterations),
        residual_norm=jnp.max(info.residual_norm),
        relative_residual=jnp.max(info.relative_residual),
        converged=jnp.all(info.converged),
        indefinite=jnp.any(info.indefinite),
        min_eigenvalue=jnp.min(info.min_eigenvalue),
        damping=jnp.max(info.damping),
    )
