"""Adjoint of the solution map of a cone program.

For the cone program in SCS form

    minimize c'x  subject to  Ax + s = b,  s in K      (dual: y in K*)

let N = n + m + 1, Q = [[0, A', c], [-A, 0, b], [-c', -b', 0]] (skew),
z = (x, y - s, 1) and Pi the projection onto R^n x K* x R_+. A solution is
a zero of the residual map R(z) = ((Q - I) Pi + I) z; its derivative in z is

    M = (Q - I) D + I,   D = DPi(z) = blockdiag(I_n, DPi_{K*}(y - s), 1),

and in Q it is dQ Pi(z), with Pi(z) = (x, y, 1). So dz = -M^{-1} dQ Pi(z), and
from z: dx = du - x dw, dy = DPi_{K*} dv - y dw, ds = dy - dv + y dw - s dw.

The adjoint runs this backwards. For the cotangents (gx, gy, gs):

    g = (gx, DPi_{K*} (gy + gs) - gs, -(x'gx + y'gy + s'gs)),
    solve M' r = g,  r = (r_x, r_y, r_w),
    dA = r_y x' - y r_x',   db = r_w y - r_y,   dc = r_w x - r_x.

M is singular: M z = 0 and M' (x, y, 1) = 0 for every problem, since R is
positively homogeneous. A component of r along (x, y, 1) leaves dA, db, dc
unchanged, so the system is solved with the bordered matrix

    [[M', z], [Pi(z)', 0]],

which is nonsingular when those are the only null directions. When the
problem is degenerate (more null directions) the bordered solve fails its
residual check and a least-squares solve (minimum norm) is used instead.

A quadratic objective (1/2) x'Px (``quadratic_objective=True``) has no
such homogeneous form. The adjoint then solves the Jacobian system of
``optlayer.reduced`` directly, J' (r1, r2) = (gx, D (gy + gs) - gs) with
J' = [[P, -A'], [D A, I - D]] (dense: full or reduced; sparse: an LU of
J'; where J is singular, the minimum-norm least-squares solution), and

    dA = r2 x' - y r1',   db = -r2,   dc = -r1,   dP = -r1 x'.

Without P, these are the formulas above with r_w = 0.
"""

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import structural_rank

from optlayer import cones
from optlayer import reduced as _reduced

# Below this size (N = n + m + 1) the adjoint system is solved with stacked
# dense arrays; above it, by a sparse LU per element.
DENSE_LIMIT = 400
# Newton refinement costs a dense N^3 solve per step and element; above
# this size SCS alone (at tight tolerance) is cheaper.
REFINE_LIMIT = 400
# Where the sparse bordered system of a larger program is singular, the
# dense adjoint takes over up to this n + m + 1 (about 0.1 s per element
# at the limit).
DENSE_FALLBACK_LIMIT = 2000
# Smallest LU pivot, relative to the largest, of a bordered system taken
# as nonsingular.
_SINGULAR_PIVOT = 1e-11
# Structurally singular matrices reach SuperLU as M + LU_SHIFT (1 + max
# |M|) I (see shifted_lu): well below _SINGULAR_PIVOT, so they are still
# told apart by their pivots.
LU_SHIFT = 1e-14
# Relative residual above which a solve is not trusted.
RESIDUAL_TOL = 1e-7
# The search for a null direction of a singular J' (null_direction_gradients):
# inverse iteration with J' + delta I, delta = NULL_SHIFT (1 + max |J|),
# gives a vector z of J''s null space where J' z is at most NULL_TOL
# (1 + max |J|); callers take the gradient as not unique if it moves by
# more than NULL_TOL (1 + max(|x|, |y|)) along z.
NULL_SHIFT = 1e-10
NULL_TOL = 1e-6


def _q_matrix(A, b, c):
    """The skew-symmetric embedding matrix Q as a sparse CSC matrix."""
    m, n = A.shape
    b = b.reshape(-1, 1)
    c = c.reshape(-1, 1)
    return sp.bmat(
        [
            [None, A.T, c],
            [-A, None, b],
            [-c.T, -b.T, None],
        ],
        format="csc",
    ) if n and m else _q_small(A, b, c)


def _q_small(A, b, c):
    """Q for degenerate sizes (no variables or no constraints)."""
    m, n = A.shape
    Q = np.zeros((n + m + 1, n + m + 1))
    Q[:n, n:n + m] = A.T.toarray() if sp.issparse(A) else A.T
    Q[n:n + m, :n] = -Q[:n, n:n + m].T
    Q[:n, -1] = c.ravel()
    Q[-1, :n] = -c.ravel()
    Q[n:n + m, -1] = b.ravel()
    Q[-1, n:n + m] = -b.ravel()
    return sp.csc_matrix(Q)


def adjoint_one(A, b, c, x, y, s, gx, gy, gs, dims, P=None):
    """Gradients (dA values on A's pattern, db, dc, dP) for one cone
    program.

    Args:
        A: the constraint matrix, CSC, with the pattern the values refer to.
        b, c: the data vectors.
        x, y, s: the primal-dual solution.
        gx, gy, gs: cotangents of x, y and s.
        dims: the cone K as a ``cones.ConeDims``.
        P: the objective's quadratic term (a ``reduced.Quadratic``), or
            None.

    Returns:
        (dA_values, db, dc, dP, singular): dA_values[k] is the gradient
        for A.data[k], dP[k] for P's values[k] (empty without P);
        ``singular``: whether the system was singular (solved by the
        dense fallback or LSQR), so that the gradient may not be unique
        (see :func:`null_direction_gradients_sparse`).
    """
    m, n = A.shape
    N = n + m + 1
    v = y - s
    Dk = cones.dproject(v, dims, dual=True)
    if P is not None:
        return _adjoint_one_quadratic(A, b, c, x, y, s, gx, gy, gs, dims,
                                      P, Dk)

    # Cotangent of z.
    g = np.concatenate([
        gx,
        Dk @ (gy + gs) - gs,
        [-(x @ gx + y @ gy + s @ gs)],
    ])
    if not np.any(g):
        return np.zeros(A.nnz), np.zeros(m), np.zeros(n), np.zeros(0), False

    D = sp.block_diag([sp.identity(n), Dk, sp.identity(1)], format="csc")
    Q = _q_matrix(A, b, c)
    # M' = D (Q' - I) + I = I - D (Q + I), as Q is skew-symmetric.
    MT = sp.identity(N, format="csc") - D @ (Q + sp.identity(N))
    z = np.concatenate([x, v, [1.0]])
    pi = np.concatenate([x, y, [1.0]])
    r = _solve_bordered(MT, z, pi, g)
    singular = r is None
    if r is None:
        if N <= DENSE_FALLBACK_LIMIT:
            # Singular bordered system (degenerate program, non-unique
            # auxiliary variables): the dense adjoint, whose reduced
            # system is solved regularized and checked against J'.
            rows = A.indices
            cols = np.repeat(np.arange(n), np.diff(A.indptr))
            out = adjoint_dense(A.data[None], rows, cols, b[None], c[None],
                                x[None], y[None], s[None], gx[None],
                                gy[None], gs[None], dims)
            return tuple(a[0] for a in out) + (True,)
        r = _lsqr_checked(MT, g)

    rx, ry, rw = r[:n], r[n:n + m], r[-1]
    rows = A.indices
    cols = np.repeat(np.arange(n), np.diff(A.indptr))
    dA = ry[rows] * x[cols] - y[rows] * rx[cols]
    db = rw * y - ry
    dc = rw * x - rx
    return dA, db, dc, np.zeros(0), singular


def _adjoint_one_quadratic(A, b, c, x, y, s, gx, gy, gs, dims, P, Dk):
    """:func:`adjoint_one` for a program with a quadratic objective: a
    sparse LU of J' = [[Pq, -A'], [D A, I - D]] (no homogenizing
    variable, so no known null directions to border), checked; where J is
    singular, the dense adjoint up to DENSE_FALLBACK_LIMIT, else LSQR."""
    m, n = A.shape
    Pv, prows, pcols = P.values, P.rows, P.cols
    rows = A.indices
    cols = np.repeat(np.arange(n), np.diff(A.indptr))
    g = np.concatenate([gx, Dk @ (gy + gs) - gs])
    if not np.any(g):
        return (np.zeros(A.nnz), np.zeros(m), np.zeros(n), np.zeros(Pv.size),
                False)
    Pq = sp.csc_matrix((Pv, (prows, pcols)), shape=(n, n))
    JT = sp.bmat([[Pq, -A.T], [Dk @ A, sp.identity(m) - Dk]], format="csc")
    r = None
    solve, singular_lu = shifted_lu(JT)
    if not singular_lu:
        r = solve(g)
        if not (np.all(np.isfinite(r)) and np.linalg.norm(JT @ r - g)
                <= RESIDUAL_TOL * np.linalg.norm(g)):
            r = None
    singular = r is None
    if r is None:
        if n + m + 1 <= DENSE_FALLBACK_LIMIT:
            out = adjoint_dense(A.data[None], rows, cols, b[None], c[None],
                                x[None], y[None], s[None], gx[None],
                                gy[None], gs[None], dims,
                                P=P._replace(values=Pv[None]))
            return tuple(a[0] for a in out) + (True,)
        r = _lsqr_checked(JT, g)
    out = _gradients(rows, cols, x[None], y[None], r[None, :n], r[None, n:],
                     P._replace(values=Pv[None]))
    return tuple(a[0] for a in out) + (singular,)


def shifted_lu(M):
    """(solve, singular): a solver of M d = rhs by SuperLU, and whether M
    is singular (an LU pivot below _SINGULAR_PIVOT times the largest, or
    SuperLU's own report; solve is None then if there is no LU).

    On structurally singular matrices (the Jacobian of a quadratic program
    with a face of optima has empty columns) SuperLU did not raise but
    aborted or crashed the process, now and then. Those are factored as
    M + delta I, delta = LU_SHIFT (1 + max |M|), and their solves refined
    against M; other matrices as they are (the shift changes SuperLU's
    ordering: a 5,000-row LP Jacobian's LU took 1.4 s instead of 0.6 s).
    """
    M = sp.csc_matrix(M)
    shifted = structural_rank(M) < M.shape[0]
    factor = M
    if shifted:
        delta = LU_SHIFT * (1.0 + np.abs(M.data).max(initial=0.0))
        factor = sp.csc_matrix(
            M + delta * sp.identity(M.shape[0], format="csc"))
    try:
        lu = spla.splu(factor)
    except RuntimeError:  # exactly singular
        return None, True
    pivots = np.abs(lu.U.diagonal())
    singular = pivots.size > 0 and not (
        pivots.min() > _SINGULAR_PIVOT * pivots.max())
    if not shifted:
        return lu.solve, singular

    def solve(rhs):
        # Each round shrinks the error by about delta over M's smallest
        # singular value.
        d = lu.solve(rhs)
        for _ in range(2):
            d = d + lu.solve(rhs - M @ d)
        return d

    return solve, singular


def _lsqr_checked(M, g):
    """LSQR's least-squares solution of M r = g, with a warning when its
    residual is not small. Known limit: for large degenerate programs
    only LSQR remains; its answer is checked but may be inaccurate."""
    r = spla.lsqr(M, g, atol=1e-14, btol=1e-14,
                  iter_lim=20 * M.shape[0])[0]
    residual = np.linalg.norm(M @ r - g)
    if not residual <= RESIDUAL_TOL * np.linalg.norm(g):
        warnings.warn(
            "The backward pass of a large degenerate program did not "
            f"converge (relative residual "
            f"{residual / np.linalg.norm(g):.1e}); its gradient may be "
            "inaccurate.", RuntimeWarning, stacklevel=4)
    return r


def _solve_bordered(MT, z, pi, g):
    """Solve M' r = g, removing the known null directions: a sparse LU of
    the bordered matrix; None when it is singular or its solution fails
    the residual check (a degenerate program)."""
    N = MT.shape[0]
    norm_g = np.linalg.norm(g)
    K = sp.bmat(
        [[MT, sp.csc_matrix(z.reshape(-1, 1))],
         [sp.csc_matrix(pi.reshape(1, -1)), None]],
        format="csc",
    )
    solve, singular = shifted_lu(K)
    if singular:
        # Numerically singular (seen: 1e-16 on degenerate programs, 4e-3
        # or more on the test problems): LU's answer then carries an
        # arbitrary component that changes the gradient, even when it
        # passes the residual check.
        return None
    r = solve(np.append(g, 0.0))[:N]
    if np.all(np.isfinite(r)) and (
        np.linalg.norm(MT @ r - g) <= RESIDUAL_TOL * norm_g
    ):
        return r
    return None


# -- batched dense path ------------------------------------------------------
#
# For small programs (N up to a few hundred) the per-element sparse
# machinery costs more than the arithmetic. The same formulas are then
# evaluated for a whole chunk of the batch with stacked dense arrays.


def _dual_jacobian_stack(V, dims):
    """DPi_{K*} for each row of V: (diagonal part, [(start, stop, blocks)]).

    The zero and nonnegative cones give a diagonal; every other cone a dense
    (B, k, k) block.
    """
    B = V.shape[0]
    z, l = dims.zero, dims.nonneg
    diag = np.concatenate(
        [np.ones((B, z)), (V[:, z:z + l] > 0).astype(float)], axis=1
    )
    blocks = []
    for kind, i, j, param in cones._blocks(dims):
        blocks.append((i, j, cones.dproj_dual_stack(kind, V[:, i:j], param)))
    return diag, blocks


def _apply_stack(diag, blocks, Z):
    """Apply the stacked block-diagonal Jacobian to Z (B, m) or (B, m, k)."""
    out = np.empty_like(Z)
    zl = diag.shape[1]
    if Z.ndim == 2:
        out[:, :zl] = diag * Z[:, :zl]
        for i, j, D in blocks:
            out[:, i:j] = _reduced.bmv(D, Z[:, i:j])
    else:
        out[:, :zl] = diag[:, :, None] * Z[:, :zl]
        for i, j, D in blocks:
            out[:, i:j] = D @ Z[:, i:j]
    return out


def stack_q_plus_i(Av, rows, cols, Bv, C, n, m):
    """Q + I for each element of a batch, as a (B, N, N) array."""
    B = Av.shape[0]
    N = n + m + 1
    QI = np.zeros((B, N, N))
    QI[:, n + rows, cols] = -Av
    QI[:, cols, n + rows] = Av
    QI[:, :n, -1] = C
    QI[:, -1, :n] = -C
    QI[:, n:n + m, -1] = Bv
    QI[:, -1, n:n + m] = -Bv
    idx = np.arange(N)
    QI[:, idx, idx] += 1.0
    return QI


def adjoint_dense(Av, rows, cols, Bv, C, X, Y, S, GX, GY, GS, dims,
                  full=True, P=None, flags=None):
    """The adjoint for a chunk of the batch, with stacked dense arrays.

    Solves the reduced system of ``optlayer.reduced`` (about n + number of
    active constraints unknowns instead of n + m + 2) and checks each
    element's answer against the unreduced Jacobian; elements that fail
    the check (singular, degenerate programs) take the bordered system,
    with a minimum-norm fallback (:func:`adjoint_bordered`). Small stacks
    (``reduced.use_full``; unless ``full`` is False) solve with the full
    Jacobian J' instead, and only the elements where it is singular take
    the reduced system.

    Args:
        Av: (B, nnz) values of A at positions (rows, cols).
        Bv, C: (B, m) and (B, n) data.
        X, Y, S: (B, n), (B, m), (B, m) solutions.
        GX, GY, GS: cotangents shaped like X, Y, S.
        dims: the cone.
        P: the objective's quadratic term (a ``reduced.Quadratic``), or
            None.
        flags: optional boolean array (B,), set for the elements whose
            system was singular (solved regularized, or by the bordered
            fallback): their solution r is not unique.

    Returns:
        (dA (B, nnz), db (B, m), dc (B, n), dP (B, nnz_P); nnz_P = 0
        without P).
    """
    B, n = X.shape
    m = Y.shape[1]
    V = Y - S
    Ad = _reduced.dense_A(Av, rows, cols, m, n)
    Pq = _reduced.dense_P(P, n)
    if n and ((full and m and _reduced.use_full(B, n, m))
              or (Pq is not None and m == 0)):
        return _adjoint_full(Av, rows, cols, Bv, C, X, Y, S, GX, GY, GS,
                             dims, Ad, P, Pq, flags)
    # Known limit: points without strict complementarity are only partly
    # detected (Layer warns for y = s = 0 on a nonnegative entry or a
    # second-order cone); their gradient can depend on which optimal dual
    # the solve found.
    st = _reduced.Structure(V, dims)
    g2 = st.apply_P(GY + GS) - GS
    r1 = np.full((B, n), np.nan)
    r2 = np.full((B, m), np.nan)
    if n and m:
        shared = _reduced.is_shared(Av)
        r1, r2 = _reduced.System(Ad, st, shared, Pq,
                                 None if P is None else P.pairs).adjoint(
                                     GX, g2, flags)
        t1, t2 = _reduced.apply_JT(Ad, st, r1, r2, shared, Pq)
        res = np.sqrt(((t1 - GX) ** 2).sum(1) + ((t2 - g2) ** 2).sum(1))
        scale = np.sqrt((GX ** 2).sum(1) + (g2 ** 2).sum(1))
        bad = ~(res <= RESIDUAL_TOL * scale)
    else:
        bad = np.ones(B, dtype=bool)
    out = _gradients(rows, cols, X, Y, r1, r2, P)
    if np.any(bad):
        sub = np.flatnonzero(bad)
        if flags is not None:
            flags[sub] = True
        fallback = adjoint_bordered(
            Av[sub], rows, cols, Bv[sub], C[sub], X[sub], Y[sub], S[sub],
            GX[sub], GY[sub], GS[sub], dims, P=_take(P, sub))
        for a, f in zip(out, fallback):
            a[sub] = f
    return out


def _take(P, idx):
    """The quadratic term ``P`` of the elements idx (None stays None)."""
    return None if P is None else P.take(idx)


def _gradients(rows, cols, X, Y, r1, r2, P):
    """(dA, db, dc, dP) from the solution r of J' r = g: the data enter F
    as F1 = Px + A'y + c and F2 = b - Ax - s, so dA = r2 x' - y r1',
    db = -r2, dc = -r1 and dP = -r1 x' (on each stored entry of P, both
    triangles)."""
    dA = r2[:, rows] * X[:, cols] - Y[:, rows] * r1[:, cols]
    if P is None:
        dP = np.zeros((X.shape[0], 0))
    else:
        dP = -r1[:, P.rows] * X[:, P.cols]
    return dA, -r2, -r1, dP


def _adjoint_full(Av, rows, cols, Bv, C, X, Y, S, GX, GY, GS, dims, Ad,
                  P=None, Pq=None, flags=None):
    """:func:`adjoint_dense` by the full Jacobian: J' r = (gx, g2), with
    J' = [[Pq, -A'], [P A, I - P]] and g2 = P (gy + gs) - gs (P the cone
    projection's derivative, Pq the objective's quadratic term)."""
    n = X.shape[1]
    m = Y.shape[1]
    D = cones.dproject_batch_dense(Y - S, dims, dual=True)
    J = _reduced.full_jacobian(Ad, D, Pq)
    g = np.concatenate([GX, _reduced.bmv(D, GY + GS) - GS], axis=1)
    r = _reduced.solve_checked(np.swapaxes(J, 1, 2), g, RESIDUAL_TOL,
                               flags, _reduced._REG_ROUNDS)
    bad = np.flatnonzero(~np.isfinite(r).all(axis=1))
    out = _gradients(rows, cols, X, Y, r[:, :n], r[:, n:], P)
    if bad.size:
        # Singular J: the reduced system, and the bordered one after it
        # (without constraints, singular P: the minimum-norm solution).
        args = (Av[bad], rows, cols, Bv[bad], C[bad], X[bad], Y[bad],
                S[bad], GX[bad], GY[bad], GS[bad], dims)
        if flags is not None:
            flags[bad] = True
        if m == 0:
            fallback = adjoint_bordered(*args, P=_take(P, bad))
        else:
            fallback = adjoint_dense(*args, full=False, P=_take(P, bad))
        for a, f in zip(out, fallback):
            a[bad] = f
    return out


def adjoint_bordered(Av, rows, cols, Bv, C, X, Y, S, GX, GY, GS, dims,
                     P=None, flags=None):
    """The adjoint from the bordered residual-map system, stacked dense;
    arguments and result as for :func:`adjoint_dense` (``flags`` is
    accepted and left as it is: this solve does not tell singular systems
    apart).

    The homogeneous residual map has no quadratic term: with one, the
    minimum-norm least-squares solution of the full J' r = g is taken
    instead (for nonsingular J, the exact solution).
    """
    if P is not None:
        return _adjoint_least_squares(Av, rows, cols, X, Y, S, GX, GY, GS,
                                      dims, P)
    B, n = X.shape
    m = Y.shape[1]
    N = n + m + 1
    diag, blocks = _dual_jacobian_stack(Y - S, dims)

    g = np.empty((B, N))
    g[:, :n] = GX
    g[:, n:n + m] = _apply_stack(diag, blocks, GY + GS) - GS
    g[:, -1] = -(np.einsum("bi,bi->b", X, GX) + np.einsum("bi,bi->b", Y, GY)
                 + np.einsum("bi,bi->b", S, GS))

    QI = stack_q_plus_i(Av, rows, cols, Bv, C, n, m)
    idx = np.arange(N)
    # M' = I - D (Q + I): D is the identity on the x rows and the last row.
    MT = -QI
    MT[:, n:n + m] = -_apply_stack(diag, blocks, QI[:, n:n + m])
    MT[:, idx, idx] += 1.0

    # Bordered system [[M', z], [Pi(z)', 0]] removes the known null
    # directions z and Pi(z) = (x, y, 1).
    K = np.zeros((B, N + 1, N + 1))
    K[:, :N, :N] = MT
    K[:, :n, N] = X
    K[:, n:n + m, N] = Y - S
    K[:, N - 1, N] = 1.0
    K[:, N, :n] = X
    K[:, N, n:n + m] = Y
    K[:, N, N - 1] = 1.0
    rhs = np.zeros((B, N + 1))
    rhs[:, :N] = g
    r = np.full((B, N), np.nan)
    try:
        r = np.linalg.solve(K, rhs[..., None])[:, :N, 0]
    except np.linalg.LinAlgError:
        pass  # at least one is exactly singular: all are checked below
    residual = np.linalg.norm(_reduced.bmv(MT, r) - g, axis=1)
    scale = np.linalg.norm(g, axis=1)
    bad = ~(residual <= RESIDUAL_TOL * scale)
    for b in np.flatnonzero(bad):
        # Degenerate program: minimum-norm least squares.
        r[b], *_ = np.linalg.lstsq(MT[b], g[b], rcond=1e-12)

    rx, ry, rw = r[:, :n], r[:, n:n + m], r[:, -1:]
    dA = ry[:, rows] * X[:, cols] - Y[:, rows] * rx[:, cols]
    db = rw * Y - ry
    dc = rw * X - rx
    return dA, db, dc, np.zeros((B, 0))


def _adjoint_least_squares(Av, rows, cols, X, Y, S, GX, GY, GS, dims, P):
    """Minimum-norm least-squares solutions of the full J' r = g for each
    element (a program with a quadratic objective whose J is singular)."""
    B, n = X.shape
    m = Y.shape[1]
    Ad = _reduced.dense_A(Av, rows, cols, m, n)
    D = cones.dproject_batch_dense(Y - S, dims, dual=True)
    JT = np.swapaxes(_reduced.full_jacobian(Ad, D, _reduced.dense_P(P, n)),
                     1, 2)
    g = np.concatenate([GX, _reduced.bmv(D, GY + GS) - GS], axis=1)
    r = np.stack([np.linalg.lstsq(JT[b], g[b], rcond=1e-12)[0]
                  for b in range(B)]) if B else np.zeros((0, n + m))
    return _gradients(rows, cols, X, Y, r[:, :n], r[:, n:], P)


def adjoint_other_side(Av, rows, cols, Bv, C, X, Y, S, GX, GY, GS, dims,
                       P=None):
    """:func:`adjoint_dense` at the other one-sided derivative of every
    degenerate part of (Y, S) (``cones.flip_degenerate``): where the
    result equals the adjoint at (Y, S), the degeneracy does not reach
    the gradient."""
    Y2, S2 = cones.flip_degenerate(Y, S, dims)
    return adjoint_dense(Av, rows, cols, Bv, C, X, Y2, S2, GX, GY, GS, dims,
                         P=P)


def null_direction_gradients(Av, rows, cols, X, Y, S, dims, P=None,
                             rng=None, GX=None, GY=None, GS=None):
    """How the data gradients move along a null direction of J'.

    Where J is singular, J' r = g has the solutions r + null(J'), and the
    gradients (dA, db, dc, dP) of :func:`_gradients` move with r. For each
    element, a vector z of null(J') comes from two steps of inverse
    iteration with J' + delta I (delta: see NULL_SHIFT) from a random
    start, which has a component along every null direction; each step
    shrinks the rest of z by delta / sigma, sigma J's smallest nonzero
    singular value.

    With the cotangents ``GX, GY, GS`` also: whether g (the right-hand
    side of J' r = g, see :func:`_adjoint_full`) has a component along a
    null direction of J itself, found the same way. Then J' r = g has no
    solution: the cotangent weighs outputs that differ between optimal
    points (a face of optimal solutions, or multipliers shared by
    redundant constraints), and no gradient of them exists.

    Returns:
        (dA, db, dc, dP, in_null): the data gradients of r = z, and a
        boolean (B,): whether J' z is at most NULL_TOL (1 + max |J|) (False
        where J is not singular after all); with the cotangents, also a
        boolean (B,): whether g has a component of more than NULL_TOL |g|
        along a null direction of J.
    """
    B, n = X.shape
    m = Y.shape[1]
    rng = np.random.default_rng(0) if rng is None else rng
    Ad = _reduced.dense_A(Av, rows, cols, m, n)
    D = cones.dproject_batch_dense(Y - S, dims, dual=True)
    J = _reduced.full_jacobian(Ad, D, _reduced.dense_P(P, n))
    Jt = np.swapaxes(J, 1, 2)
    size = 1.0 + np.abs(J).max(axis=(1, 2))
    z, in_null = _null_vector(Jt, size, rng)
    dA, db, dc, dP = _gradients(rows, cols, X, Y, z[:, :n], z[:, n:], P)
    if GX is None:
        return dA, db, dc, dP, in_null
    g = np.concatenate([GX, _reduced.bmv(D, GY + GS) - GS], axis=1)
    u, u_null = _null_vector(J, size, rng)
    along = np.abs(np.einsum("bi,bi->b", u, g))
    return dA, db, dc, dP, in_null, u_null & (
        along > NULL_TOL * np.linalg.norm(g, axis=1))


def null_direction_gradients_sparse(A, x, y, s, gx, gy, gs, dims, P=None,
                                    rng=None):
    """:func:`null_direction_gradients` (with cotangents) for one large
    program: the null directions of J and J' from two steps of inverse
    iteration each with one sparse LU of J + delta I. ``A``: the CSC
    constraint matrix; ``P``: the objective's quadratic term for this
    program (a ``reduced.Quadratic`` whose values are one-dimensional), or
    None. Returns the same as its dense form, each with a leading batch
    dimension of 1."""
    m, n = A.shape
    rng = np.random.default_rng(0) if rng is None else rng
    Dk = cones.dproject(y - s, dims, dual=True)
    Pq = None if P is None else sp.csc_matrix(
        (P.values, (P.rows, P.cols)), shape=(n, n))
    J = _reduced.sparse_jacobian(A, Dk, Pq)
    size = 1.0 + np.abs(J.data).max(initial=0.0)
    try:
        lu = spla.splu(sp.csc_matrix(
            J + NULL_SHIFT * size * sp.identity(n + m, format="csc")))
    except RuntimeError:  # pragma: no cover - J + delta I is nonsingular
        lu = None

    def null_vector(trans):
        K = J.T if trans == "T" else J
        z = rng.standard_normal(n + m)
        if lu is None:  # pragma: no cover
            return z, False
        for _ in range(2):
            z = lu.solve(z, trans=trans)
            z /= np.linalg.norm(z)
        return z, bool(np.all(np.isfinite(z))
                       and np.abs(K @ z).max() <= NULL_TOL * size)

    z, in_null = null_vector("T")
    u, u_null = null_vector("N")
    g = np.concatenate([gx, Dk @ (gy + gs) - gs])
    face = u_null and abs(u @ g) > NULL_TOL * np.linalg.norm(g)
    rows = A.indices
    cols = np.repeat(np.arange(n), np.diff(A.indptr))
    Pb = None if P is None else P._replace(values=P.values[None])
    dA, db, dc, dP = _gradients(rows, cols, x[None], y[None], z[None, :n],
                                z[None, n:], Pb)
    return dA, db, dc, dP, np.array([in_null]), np.array([face])


def _null_vector(K, size, rng):
    """A unit vector z (B, N) near the null space of each K (B, N, N), by
    two steps of inverse iteration with K + NULL_SHIFT size I from a
    random start, and whether K z is at most NULL_TOL size (``size``:
    (B,), 1 + max |K|)."""
    B, N = K.shape[:2]
    M = K.copy()
    diag = np.arange(N)
    M[:, diag, diag] += (NULL_SHIFT * size)[:, None]
    z = rng.standard_normal((B, N))
    try:
        for _ in range(2):
            z = np.linalg.solve(M, z[..., None])[..., 0]
            z /= np.linalg.norm(z, axis=1, keepdims=True)
    except np.linalg.LinAlgError:  # pragma: no cover - K + delta I is
        z = np.zeros((B, N))       # nonsingular; nothing to tell
    found = (np.abs(_reduced.bmv(K, z)).max(axis=1, initial=0.0)
             <= NULL_TOL * size) & (np.abs(z).max(axis=1, initial=0.0) > 0)
    return z, found
