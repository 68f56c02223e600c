"""Newton refinement of cone-program solutions.

A solution of the cone program is a zero of

    F(x, v) = (A'Pi(v) + c,  -A x + b - Pi(v) + v),   Pi = Pi_{K*},

with y = Pi(v) and s = y - v (see ``optlayer.reduced``); a quadratic
objective (1/2) x'Px adds Px to the first part. From a moderately
accurate solver point, or from the solution of nearby parameters (warm
starts), semismooth Newton steps on F converge quadratically once the
active set is identified; for many programs (not LPs) they also converge
from the origin, after a first step that overshoots. Each step solves the reduced system of
``optlayer.reduced`` (about n + number of active constraints unknowns);
where that system is singular, the step is taken on the homogeneous
residual map of ``optlayer.adjoint`` with its bordered matrix instead (with
a quadratic objective, which that map does not have, on the full Jacobian
regularized).

The iterate takes full steps even where one raises the residual (a step
that changes the active set often does, once, before converging); each
element's best point so far is what is returned, so refinement never makes
a solution worse. The batch is processed with stacked dense arrays; this
is for small programs.
"""

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from optlayer import adjoint as _adjoint
from optlayer import cones
from optlayer import reduced as _reduced


def residual(Av, rows, cols, Bv, C, X, Y, S, Ad=None, shared=False,
             Pq=None, P=None):
    """The KKT residuals of each element, relative to the data's scale.

    Returns the largest of the primal residual ||Ax + s - b||, the dual
    residual ||Px + A'y + c|| and the duality gap |x'Px + c'x + b'y|,
    each divided by 1 + the size of the data it involves (infinity
    norms). ``Ad``, the (B, m, n) dense A if the caller has it, makes the
    products cheaper (``shared``: it is the same for every element);
    ``Pq``: the (B, n, n) quadratic term of the objective, if any, or
    ``P``: the same as a ``reduced.Quadratic`` (for large n).
    """
    if Ad is not None:
        Ax = _reduced.matvec(Ad, X, shared)
        ATy = _reduced.rmatvec(Ad, Y, shared)
    else:
        Ax = np.zeros_like(Y)
        np.add.at(Ax.T, rows, (Av * X[:, cols]).T)
        ATy = np.zeros_like(X)
        np.add.at(ATy.T, cols, (Av * Y[:, rows]).T)
    if Pq is None and P is not None:
        Px = np.zeros_like(X)
        np.add.at(Px.T, P.rows, (P.values * X[:, P.cols]).T)
        F1, xPx = ATy + C + Px, np.einsum("bi,bi->b", X, Px)
    else:
        F1, xPx = _with_quadratic(ATy + C, X, Pq)
    return _relative(F1, Bv - Ax - S, Bv, C, X, Y, xPx)


def _with_quadratic(F1, X, Pq):
    """(F1 + P x, x'Px) for the objective's quadratic term Pq, or (F1,
    None) without one."""
    if Pq is None:
        return F1, None
    Px = _reduced.bmv(Pq, X)
    return F1 + Px, np.einsum("bi,bi->b", X, Px)


def _relative(F1, F2, Bv, C, X, Y, xPx=None):
    """The relative KKT residual from F1 = Px + A'y + c and F2 = b - Ax - s
    (``xPx``: x'Px, None without a quadratic term)."""
    scale_b = 1.0 + np.abs(Bv).max(axis=1, initial=0.0)
    scale_c = 1.0 + np.abs(C).max(axis=1, initial=0.0)
    primal = np.abs(F2).max(axis=1, initial=0.0) / scale_b
    dual = np.abs(F1).max(axis=1, initial=0.0) / scale_c
    cx = np.einsum("bi,bi->b", C, X)
    by = np.einsum("bi,bi->b", Bv, Y)
    if xPx is None:
        gap = np.abs(cx + by) / (1.0 + np.abs(cx) + np.abs(by))
    else:
        gap = np.abs(xPx + cx + by) / (1.0 + np.abs(xPx) + np.abs(cx)
                                       + np.abs(by))
    return np.maximum(np.maximum(primal, dual), gap)


def _cone_residual(Y, S, dims):
    """How far y is from K* and s from K (infinity norm)."""
    Yp = cones.project_batch(Y, dims, dual=True)
    Sp = cones.project_batch(S, dims, dual=False)
    return np.maximum(np.abs(Y - Yp).max(axis=1, initial=0.0),
                      np.abs(S - Sp).max(axis=1, initial=0.0))


def refine(Av, rows, cols, Bv, C, X, Y, S, dims, tol=1e-12, max_steps=6,
           give_up=None, P=None):
    """Refine solutions in place by Newton steps on the residual map.

    Args:
        Av: (B, nnz) values of A at (rows, cols).
        Bv, C: (B, m), (B, n) data.
        X, Y, S: (B, n), (B, m), (B, m) starting points (e.g. from SCS).
        dims: the cone.
        tol: stop an element when its relative KKT residual is below tol.
        max_steps: at most this many Newton steps.
        give_up: optional (steps, level): after that many steps, elements
            whose current residual is above ``level`` stop (for starts
            from which Newton steps may not converge at all).
        P: the objective's quadratic term (a ``reduced.Quadratic``), or
            None.

    Returns:
        (X, Y, S, res): refined points and their relative KKT residuals.
    """
    X, Y, S = X.copy(), Y.copy(), S.copy()
    n, m = X.shape[1], Y.shape[1]
    Pq = _reduced.dense_P(P, n)
    pairs = None if P is None else P.pairs
    # Without constraints, a quadratic objective still takes the full
    # Jacobian (J = P); the bordered step has no quadratic term.
    only_full = Pq is not None and m == 0
    Ad = (_reduced.dense_A(Av, rows, cols, m, n)
          if n and (m or only_full) else None)
    shared = _reduced.is_shared(Av)
    # The iterate (Xc, Vc) moves by full Newton steps even where a step
    # does not lower the residual (a semismooth step that changes the
    # active set often raises it once, then converges); (X, Y, S, res)
    # keep each element's best point.
    Xc, Vc = X.copy(), Y - S
    if Ad is not None:
        # F at the iterate, carried from step to step. The start point
        # itself is taken in the form the steps produce, y = Pi_{K*}(v)
        # and s = y - v, which lie in their cones by construction (for a
        # start point that is a solution, they are y and s).
        Yc = cones.project_batch(Vc, dims, dual=True)
        F1c, xPx = _with_quadratic(_reduced.rmatvec(Ad, Yc, shared) + C,
                                   Xc, Pq)
        F2c = Bv - _reduced.matvec(Ad, Xc, shared) - (Yc - Vc)
        Y, S = Yc.copy(), Yc - Vc
        res = _relative(F1c, F2c, Bv, C, X, Y, xPx)
    else:
        res = np.maximum(residual(Av, rows, cols, Bv, C, X, Y, S),
                         _cone_residual(Y, S, dims))
    alive = np.ones(X.shape[0], dtype=bool)
    current = res.copy()
    full = only_full or _reduced.use_full(X.shape[0], n, m)
    for step in range(max_steps):
        if give_up is not None and step == give_up[0]:
            alive &= ~(current > give_up[1])
        a = np.flatnonzero((res > tol) & alive)
        if a.size == 0:
            break
        Xn = Vn = None
        every = a.size == X.shape[0]
        Ad_a = None if Ad is None else (Ad if every else Ad[a])
        Pq_a = None if Pq is None else (Pq if every else Pq[a])
        if Ad is not None:
            F = (F1c[a], F2c[a])
            if full:
                Xn, Vn = _full_step(Ad_a, Xc[a], Vc[a], dims, F, Pq_a)
                ok = _finite(Xn, Vn)
                if not ok.all() and not only_full:
                    # Singular J: the reduced system's regularized step.
                    sub = np.flatnonzero(~ok)
                    Xn[sub], Vn[sub] = _reduced_step(
                        Ad_a[sub], Bv[a[sub]], C[a[sub]], Xc[a[sub]],
                        Vc[a[sub]], dims, (F[0][sub], F[1][sub]), shared,
                        None if Pq is None else Pq_a[sub], pairs)
                    ok = _finite(Xn, Vn)
            else:
                Xn, Vn = _reduced_step(Ad_a, Bv[a], C[a], Xc[a], Vc[a],
                                       dims, F, shared, Pq_a, pairs)
                ok = _finite(Xn, Vn)
                if not ok.all() and Pq is not None:
                    # The bordered step below has no quadratic term: the
                    # full Jacobian's regularized step instead.
                    sub = np.flatnonzero(~ok)
                    Xn[sub], Vn[sub] = _full_step(
                        Ad_a[sub], Xc[a[sub]], Vc[a[sub]], dims,
                        (F[0][sub], F[1][sub]), Pq_a[sub])
                    ok = _finite(Xn, Vn)
        else:
            ok = np.zeros(a.size, dtype=bool)
        if not ok.all() and Pq is None:
            # Singular reduced system: the bordered homogeneous step.
            sub = np.flatnonzero(~ok)
            Xb, Vb = _bordered_step(Av[a[sub]], rows, cols, Bv[a[sub]],
                                    C[a[sub]], Xc[a[sub]], Vc[a[sub]], dims)
            if Xn is None:
                Xn, Vn = np.empty_like(Xc[a]), np.empty_like(Vc[a])
            Xn[sub], Vn[sub] = Xb, Vb
            ok[sub] = np.isfinite(Xb).all(axis=1) & np.isfinite(Vb).all(axis=1)
        alive[a[~ok]] = False
        a, Xn, Vn = a[ok], Xn[ok], Vn[ok]
        Xc[a], Vc[a] = Xn, Vn
        # y = Pi_{K*}(v) and s = y - v = Pi_K(-v) (Moreau) lie in their
        # cones by construction: only the KKT residual is checked.
        Yn = cones.project_batch(Vn, dims, dual=True)
        Sn = Yn - Vn
        if Ad_a is None:
            new_res = residual(Av[a], rows, cols, Bv[a], C[a], Xn, Yn, Sn)
        else:
            if not ok.all():
                Ad_a = Ad_a[ok]
                Pq_a = None if Pq is None else Pq_a[ok]
            F1n, xPx = _with_quadratic(
                _reduced.rmatvec(Ad_a, Yn, shared) + C[a], Xn, Pq_a)
            F2n = Bv[a] - _reduced.matvec(Ad_a, Xn, shared) - Sn
            F1c[a], F2c[a] = F1n, F2n
            new_res = _relative(F1n, F2n, Bv[a], C[a], Xn, Yn, xPx)
        current[a] = new_res
        better = new_res < res[a]
        keep = a[better]
        X[keep], Y[keep], S[keep] = Xn[better], Yn[better], Sn[better]
        res[keep] = new_res[better]
    return X, Y, S, res


def _finite(X, V):
    return np.isfinite(X).all(axis=1) & np.isfinite(V).all(axis=1)


# Relative residual of the linear solve above which a full-Jacobian step is
# not taken (the reduced system's regularized step is, instead).
_FULL_SOLVE_TOL = 1e-9


def _full_step(Ad, X, V, dims, F, Pq=None):
    """One Newton step on F(x, v) = 0 with the full Jacobian J, for small
    programs (see ``reduced.use_full``); NaN where J is singular. ``Pq``:
    the objective's quadratic term, if any."""
    n = X.shape[1]
    P = cones.dproject_batch_dense(V, dims, dual=True)
    J = _reduced.full_jacobian(Ad, P, Pq)
    d = _reduced.solve_checked(J, -np.concatenate(F, axis=1),
                               _FULL_SOLVE_TOL)
    return X + d[:, :n], V + d[:, n:]


def _reduced_step(Ad, Bv, C, X, V, dims, F=None, shared=False, Pq=None,
                  pairs=None):
    """One Newton step on F(x, v) = 0 by the reduced system.

    ``F``, the pair (F1, F2) at (X, V) if the caller has it, saves its
    evaluation; ``shared``: every element has the same A; ``Pq``: the
    objective's quadratic term, if any, and ``pairs`` its candidate
    defining pairs (``reduced.pair_candidates``).
    """
    if F is None:
        Y = cones.project_batch(V, dims, dual=True)
        F1, _ = _with_quadratic(_reduced.rmatvec(Ad, Y, shared) + C, X, Pq)
        F2 = Bv - _reduced.matvec(Ad, X, shared) - (Y - V)
    else:
        F1, F2 = F
    st = _reduced.Structure(V, dims)
    dx, dv = _reduced.System(Ad, st, shared, Pq, pairs).newton(F1, F2)
    return X + dx, V + dv


def _bordered_step(Av, rows, cols, Bv, C, X, V, dims):
    """One Newton step on the homogeneous residual map (bordered system)."""
    B, n = X.shape
    m = V.shape[1]
    N = n + m + 1
    Z = np.concatenate([X, V, np.ones((B, 1))], axis=1)
    Pv = cones.project_batch(V, dims, dual=True)
    Pi = np.concatenate([X, Pv, np.ones((B, 1))], axis=1)
    QI = _adjoint.stack_q_plus_i(Av, rows, cols, Bv, C, n, m)
    # R(z) = (Q - I) Pi + z = (Q + I) Pi - 2 Pi + z.
    R = _reduced.bmv(QI, Pi) - 2.0 * Pi + Z
    diag, blocks = _adjoint._dual_jacobian_stack(V, dims)
    # M = (Q - I) D + I; D is the identity on the x and last entries.
    QmI = QI.copy()
    idx = np.arange(N)
    QmI[:, idx, idx] -= 2.0
    M = np.empty_like(QmI)
    M[:, :, :n] = QmI[:, :, :n]
    M[:, :, N - 1] = QmI[:, :, N - 1]
    # Columns of the middle block: (Q - I)[:, mid] @ Dk = (Dk (Q-I)[:, mid]')'
    mid = np.swapaxes(QmI[:, :, n:n + m], 1, 2)
    M[:, :, n:n + m] = np.swapaxes(
        _adjoint._apply_stack(diag, blocks, mid), 1, 2)
    M[:, idx, idx] += 1.0
    K = np.zeros((B, N + 1, N + 1))
    K[:, :N, :N] = M
    K[:, :N, N] = Pi
    K[:, N, :N] = Z
    rhs = np.zeros((B, N + 1))
    rhs[:, :N] = -R
    try:
        dz = np.linalg.solve(K, rhs[..., None])[:, :N, 0]
    except np.linalg.LinAlgError:
        dz = np.stack([np.linalg.lstsq(K[i], rhs[i], rcond=1e-13)[0][:N]
                       for i in range(B)])
    Zn = Z + dz
    w = Zn[:, -1]
    good = np.isfinite(Zn).all(axis=1) & (w > 0)
    Zn = Zn / np.where(good, w, 1.0)[:, None]
    Zn[~good] = np.nan
    return Zn[:, :n], Zn[:, n:n + m]


# Relative residual of a sparse Newton solve above which the step is not
# taken (J numerically singular: a degenerate program).
_SPARSE_SOLVE_TOL = 1e-9


def _sparse_step(J, rhs):
    """J d = rhs by a sparse LU (``adjoint.shifted_lu``); where J is
    singular (non-unique auxiliary variables, say), by the LU of J +
    delta I (nonsingular, see ``reduced._solve_regularized``) and rounds
    of iterative refinement against J. None if the result misses the
    residual check (an inconsistent system)."""
    target = _SPARSE_SOLVE_TOL * np.linalg.norm(rhs)

    def good(d):
        return (d is not None and np.all(np.isfinite(d))
                and np.linalg.norm(J @ d - rhs) <= target)

    solve, singular = _adjoint.shifted_lu(J)
    if not singular:
        d = solve(rhs)
        if good(d):
            return d
    delta = _reduced._REG * (1.0 + np.abs(J.data).max(initial=0.0))
    try:
        lu = spla.splu(sp.csc_matrix(
            J + delta * sp.identity(J.shape[0], format="csc")))
    except RuntimeError:  # pragma: no cover - J + delta I is nonsingular
        return None
    d = lu.solve(rhs)
    for _ in range(3):
        if good(d):
            return d
        d = d + lu.solve(rhs - J @ d)
    return d if good(d) else None


def refine_sparse(A, b, c, x, y, s, dims, tol=1e-12, max_steps=6,
                  give_up=None, P=None):
    """Newton refinement of one program's solution with a sparse LU of J.

    For programs too large for the stacked dense steps of :func:`refine`:
    the same iteration (full steps on F(x, v) = 0, the best point kept),
    each step a sparse LU of J = [[P, A'D], [-A, I - D]]. Where J is
    singular (a degenerate program) the iteration stops; the caller
    solves such elements otherwise.

    Args:
        A: (m, n) CSC constraint matrix.
        b, c: the data vectors.
        x, y, s: the starting point.
        dims: the cone.
        tol, max_steps, give_up: as for :func:`refine`.
        P: the objective's quadratic term for this program (a
            ``reduced.Quadratic`` whose values are one-dimensional), or
            None.

    Returns:
        (x, y, s, res): the best point and its relative KKT residual.
    """
    m, n = A.shape
    Pq = None if P is None else sp.csc_matrix(
        (P.values, (P.rows, P.cols)), shape=(n, n))
    AT = sp.csc_matrix(A.T)

    def at(x, v):
        yv = cones.project(v, dims, dual=True)
        F1 = AT @ yv + c
        xPx = None
        if Pq is not None:
            Px = Pq @ x
            F1 = F1 + Px
            xPx = np.array([x @ Px])
        F2 = b - A @ x - (yv - v)
        res = _relative(F1[None], F2[None], b[None], c[None], x[None],
                        yv[None], xPx)[0]
        return yv, F1, F2, res

    v = y - s
    yv, F1, F2, res = at(x, v)
    best = (x, yv, yv - v, res)
    for step in range(max_steps):
        if best[3] <= tol or (give_up is not None and step == give_up[0]
                              and not res <= give_up[1]):
            break
        D = cones.dproject(v, dims, dual=True)
        J = _reduced.sparse_jacobian(A, D, Pq, AT)
        rhs = -np.concatenate([F1, F2])
        d = _sparse_step(J, rhs)
        if d is None:
            break
        x, v = x + d[:n], v + d[n:]
        yv, F1, F2, res = at(x, v)
        if res < best[3]:
            best = (x, yv, yv - v, res)
    return best
