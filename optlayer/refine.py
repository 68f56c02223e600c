"""Newton refinement of cone-program solutions on the residual map.

The solution of a cone program is a zero of the residual map of the
homogeneous embedding (see ``optlayer.adjoint``),

    R(z) = (Q - I) Pi(z) + z,   z = (x, y - s, 1).

From a moderately accurate solver point, semismooth Newton steps on R
converge quadratically once the active set is identified:

    M dz = -R(z),   M = (Q - I) DPi(z) + I.

``M`` is singular along z (R is positively homogeneous), so each step solves
the bordered system [[M, Pi(z)], [z', 0]] (dz orthogonal to z) and then
rescales z to a last entry of 1. A step is kept only where it reduces the
residual, so refinement never makes a solution worse. The batch is
processed with stacked dense arrays; this is for small programs.
"""

import numpy as np

from optlayer import adjoint as _adjoint
from optlayer import cones


def residual(Av, rows, cols, Bv, C, X, Y, S):
    """The KKT residuals of each element, relative to the data's scale.

    Returns the largest of the primal residual ||Ax + s - b||, the dual
    residual ||A'y + c|| and the duality gap |c'x + b'y|, each divided by
    1 + the size of the data it involves (infinity norms).
    """
    B, n = X.shape
    Ax = np.zeros_like(Y)
    np.add.at(Ax.T, rows, (Av * X[:, cols]).T)
    ATy = np.zeros_like(X)
    np.add.at(ATy.T, cols, (Av * Y[:, rows]).T)
    scale_b = 1.0 + np.abs(Bv).max(axis=1, initial=0.0)
    scale_c = 1.0 + np.abs(C).max(axis=1, initial=0.0)
    primal = np.abs(Ax + S - Bv).max(axis=1, initial=0.0) / scale_b
    dual = np.abs(ATy + C).max(axis=1, initial=0.0) / scale_c
    gap = np.abs(np.einsum("bi,bi->b", C, X) + np.einsum("bi,bi->b", Bv, Y))
    gap = gap / (1.0 + np.abs(np.einsum("bi,bi->b", C, X))
                 + np.abs(np.einsum("bi,bi->b", Bv, Y)))
    return np.maximum(np.maximum(primal, dual), gap)


def _cone_residual(Y, S, dims):
    """How far y is from K* and s from K (infinity norm)."""
    Yp = cones.project_batch(Y, dims, dual=True)
    Sp = cones.project_batch(S, dims, dual=False)
    return np.maximum(np.abs(Y - Yp).max(axis=1, initial=0.0),
                      np.abs(S - Sp).max(axis=1, initial=0.0))


def refine(Av, rows, cols, Bv, C, X, Y, S, dims, tol=1e-12, max_steps=6):
    """Refine solutions in place by Newton steps on the residual map.

    Args:
        Av: (B, nnz) values of A at (rows, cols).
        Bv, C: (B, m), (B, n) data.
        X, Y, S: (B, n), (B, m), (B, m) starting points (e.g. from SCS).
        dims: the cone.
        tol: stop an element when its relative KKT residual is below tol.
        max_steps: at most this many Newton steps.

    Returns:
        (X, Y, S, res): refined points and their relative KKT residuals.
    """
    X, Y, S = X.copy(), Y.copy(), S.copy()
    n, m = X.shape[1], Y.shape[1]
    N = n + m + 1
    res = np.maximum(residual(Av, rows, cols, Bv, C, X, Y, S),
                     _cone_residual(Y, S, dims))
    for _ in range(max_steps):
        active = np.flatnonzero(res > tol)
        if active.size == 0:
            break
        a = active
        V = Y[a] - S[a]
        Z = np.concatenate([X[a], V, np.ones((a.size, 1))], axis=1)
        Pv = cones.project_batch(V, dims, dual=True)
        Pi = np.concatenate([X[a], Pv, np.ones((a.size, 1))], axis=1)
        QI = _adjoint.stack_q_plus_i(Av[a], rows, cols, Bv[a], C[a], n, m)
        # R(z) = (Q - I) Pi + z = (Q + I) Pi - 2 Pi + z.
        R = np.einsum("bij,bj->bi", QI, Pi) - 2.0 * Pi + Z
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
        K = np.zeros((a.size, N + 1, N + 1))
        K[:, :N, :N] = M
        K[:, :N, N] = Pi
        K[:, N, :N] = Z
        rhs = np.zeros((a.size, N + 1))
        rhs[:, :N] = -R
        try:
            dz = np.linalg.solve(K, rhs[..., None])[:, :N, 0]
        except np.linalg.LinAlgError:
            dz = np.stack([np.linalg.lstsq(K[i], rhs[i], rcond=1e-13)[0][:N]
                           for i in range(a.size)])
        Zn = Z + dz
        w = Zn[:, -1]
        ok = np.isfinite(Zn).all(axis=1) & (w > 0)
        w = np.where(ok, w, 1.0)
        Zn = Zn / w[:, None]
        Vn = Zn[:, n:n + m]
        Pn = cones.project_batch(np.where(ok[:, None], Vn, V), dims,
                                 dual=True)
        Xn, Yn, Sn = Zn[:, :n], Pn, Pn - Vn
        new_res = np.maximum(
            residual(Av[a], rows, cols, Bv[a], C[a], Xn, Yn, Sn),
            _cone_residual(Yn, Sn, dims))
        better = ok & (new_res < res[a])
        if not np.any(better):
            break
        keep = a[better]
        X[keep], Y[keep], S[keep] = Xn[better], Yn[better], Sn[better]
        res[keep] = new_res[better]
    return X, Y, S, res
