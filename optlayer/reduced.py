"""Reduced linear systems for Newton steps and adjoints of small programs.

At a point z = (x, v), with y = Pi_{K*}(v) and s = y - v, the optimality
conditions of the cone program (SCS form, see ``optlayer.adjoint``) with the
homogenizing variable fixed at 1 are

    F(x, v) = (A'y + c,  -A x + b - s) = 0,

(the duality gap vanishes at any zero of F, since y's = 0). Its Jacobian is

    J = [[0, A'P], [-A, I - P]],   P = DPi_{K*}(v),

n + m square; the full residual-map systems of ``optlayer.adjoint`` and
``optlayer.refine`` are one larger and bordered. Both J and J' shrink to
about n + (number of active constraints) unknowns:

P is symmetric with eigenvalues in [0, 1] and block diagonal over the cones.
In its eigenbasis R (the identity on the zero and nonnegative cones, the
eigenvectors of each dense block elsewhere), P = R diag(lam) R'. Write
A~ = R'A and, for a Newton step J (dx, dv) = -(F1, F2), dv = R t. Then

    A~' diag(lam) t = -F1,     (1 - lam) t = A~ dx - R'F2.

Where 1 - lam is not small ("soft" directions, including lam = 0), t is
eliminated: t_k = ((A~ dx)_k - f_k) / (1 - lam_k), f = R'F2. The rest
("hard" directions, lam near 1: equality constraints, active inequalities,
the normal direction of a cone at a boundary point) keep their t, giving

    K = [[A~' G A~,  A_h' diag(lam_h)],    G = diag(lam / (1 - lam)) on soft
         [A_h,       -diag(1 - lam_h)]],   A_h = hard rows of A~,

with K [dx; t_h] = [-F1 + A~' G f;  f_h]. The adjoint system J' r = g is
solved with K' (same blocks, derivation in :func:`adjoint`). The elimination
is exact for any split; the split only bounds 1 / (1 - lam) by
1 / HARD_GAP. Elements have different numbers of hard directions; a chunk is
padded to its largest with rows that read p = 0.

When J is singular (non-unique solutions, degenerate programs) K is too;
callers check the result against J and fall back to the bordered systems.
"""

import numpy as np

from optlayer import cones

# Directions with 1 - lam below this are kept as unknowns ("hard").
HARD_GAP = 1e-3


def dense_A(Av, rows, cols, m, n):
    """(B, m, n) dense copies of A from values on a fixed pattern."""
    Ad = np.zeros((Av.shape[0], m, n))
    Ad[:, rows, cols] = Av
    return Ad


def _dense_blocks(dims):
    """Row ranges of the cones whose DPi is a dense block."""
    return [(i, j) for _, i, j, _ in cones._blocks(dims)]


class Eigen:
    """Eigen-decomposition of P = DPi_{K*}(v) for a stack of points.

    Attributes:
        lam: (B, m) eigenvalues, in [0, 1].
        blocks: [(i, j, U)] eigenvectors (B, k, k) of each dense block;
            the zero and nonnegative cones have R = I there.
        zl: number of leading rows with a diagonal P (zero and nonneg).
    """

    def __init__(self, V, dims):
        B, m = V.shape
        z, nonneg = dims.zero, dims.nonneg
        self.zl = z + nonneg
        lam = np.empty((B, m))
        lam[:, :z] = 1.0
        lam[:, z:self.zl] = V[:, z:self.zl] > 0
        self.blocks = []
        for kind, i, j, param in cones._blocks(dims):
            Vb = V[:, i:j]
            if kind == "soc":
                w, U = _soc_eigen(Vb)
            else:
                if kind == "psd":
                    D = cones._dproj_psd_stack(Vb)
                elif kind == "exp":
                    D = np.stack([np.eye(3) - cones.dproj_exp(-v)
                                  for v in Vb])
                else:
                    D = np.stack([np.eye(3) - cones.dproj_pow(-v, param)
                                  for v in Vb])
                w, U = np.linalg.eigh(0.5 * (D + np.swapaxes(D, 1, 2)))
            lam[:, i:j] = np.clip(w, 0.0, 1.0)
            self.blocks.append((i, j, U))
        self.lam = lam

    def rot_t(self, Z):
        """R' Z for Z of shape (B, m) or (B, m, k)."""
        out = Z.copy()
        for i, j, U in self.blocks:
            Ut = np.swapaxes(U, 1, 2)
            if Z.ndim == 2:
                out[:, i:j] = np.einsum("bij,bj->bi", Ut, Z[:, i:j])
            else:
                out[:, i:j] = Ut @ Z[:, i:j]
        return out

    def rot(self, Z):
        """R Z for Z of shape (B, m)."""
        out = Z.copy()
        for i, j, U in self.blocks:
            out[:, i:j] = np.einsum("bij,bj->bi", U, Z[:, i:j])
        return out


def _soc_eigen(V):
    """Eigenvalues and eigenvectors of DPi_SOC at each row of V (B, k).

    Inside the cone DPi = I, in its polar 0. Elsewhere, with v = (t, x),
    r = ||x|| > |t| and u = x / r, (1, u) / sqrt 2 has eigenvalue 1,
    (-1, u) / sqrt 2 eigenvalue 0, and every (0, w) with w orthogonal to u
    eigenvalue (1 + t / r) / 2; a Householder reflection that maps the
    first unit vector to +-u gives an orthonormal basis of those w.
    """
    B, k = V.shape
    t, X = V[:, 0], V[:, 1:]
    r = np.linalg.norm(X, axis=1)
    inside = r <= t
    polar = (r <= -t) & ~inside
    general = ~(inside | polar)
    lam = np.where(inside, 1.0, 0.0)[:, None] * np.ones((1, k))
    U = np.broadcast_to(np.eye(k), (B, k, k)).copy()
    if k == 1 or not general.any():
        return lam, U
    g = np.flatnonzero(general)
    u = X[g] / r[g, None]
    c = 1.0 / np.sqrt(2.0)
    Ug = np.zeros((g.size, k, k))
    Ug[:, 0, 0], Ug[:, 0, 1] = c, -c
    Ug[:, 1:, 0] = c * u
    Ug[:, 1:, 1] = c * u
    if k > 2:
        # Householder vector w = u + sign(u_1) e_1 (never near zero).
        sign = np.where(u[:, 0] >= 0, 1.0, -1.0)
        w = u.copy()
        w[:, 0] += sign
        H = -2.0 * w[:, :, None] * w[:, None, :] / (w * w).sum(1)[:, None,
                                                                  None]
        H[:, np.arange(k - 1), np.arange(k - 1)] += 1.0
        Ug[:, 1:, 2:] = H[:, :, 1:]
    U[g] = Ug
    lg = np.empty((g.size, k))
    lg[:, 0], lg[:, 1] = 1.0, 0.0
    lg[:, 2:] = (0.5 * (1.0 + t[g] / r[g]))[:, None]
    lam[g] = lg
    return lam, U


class System:
    """The reduced matrix K for a stack of points (see the module doc).

    Args:
        Ad: (B, m, n) dense A per element.
        eig: the :class:`Eigen` of P at the points.
    """

    def __init__(self, Ad, eig):
        B, _, n = Ad.shape
        lam = eig.lam
        self.eig = eig
        self.At = eig.rot_t(Ad)                       # A~ = R'A
        hard = lam > 1.0 - HARD_GAP
        self.soft = ~hard
        one_minus = np.where(hard, 1.0, 1.0 - lam)
        self.inv_gap = np.where(hard, 0.0, 1.0 / one_minus)
        self.G = np.where(hard, 0.0, lam * self.inv_gap)
        counts = hard.sum(axis=1)
        r = int(counts.max(initial=0))
        # Hard directions first, in their original order.
        order = np.argsort(~hard, axis=1, kind="stable")[:, :r]
        valid = np.arange(r)[None, :] < counts[:, None]
        self.order, self.valid, self.r = order, valid, r
        Ah = np.take_along_axis(self.At, order[:, :, None], axis=1)
        Ah *= valid[:, :, None]
        lam_h = np.take_along_axis(lam, order, axis=1) * valid
        self.Ah, self.lam_h = Ah, lam_h
        K = np.empty((B, n + r, n + r))
        # G is zero on the zero and nonnegative cones (lam is 0 or 1).
        K[:, :n, :n] = 0.0
        for i, j, _ in eig.blocks:
            Ab = self.At[:, i:j]
            K[:, :n, :n] += np.swapaxes(Ab, 1, 2) @ (self.G[:, i:j, None] * Ab)
        K[:, :n, n:] = np.swapaxes(Ah, 1, 2) * lam_h[:, None, :]
        K[:, n:, :n] = Ah
        K[:, n:, n:] = 0.0
        idx = np.arange(r)
        K[:, n + idx, n + idx] = -(1.0 - lam_h)
        self.K = K
        self.n = n

    def _hard(self, f):
        return np.take_along_axis(f, self.order, axis=1) * self.valid

    def _scatter_hard(self, vals, like):
        out = np.zeros_like(like)
        B = out.shape[0]
        rows = np.repeat(np.arange(B), self.r)
        cols = self.order.ravel()
        keep = self.valid.ravel()
        out[rows[keep], cols[keep]] = vals.ravel()[keep]
        return out

    def newton(self, F1, F2):
        """Solve J (dx, dv) = -(F1, F2); returns (dx, dv), NaN if singular."""
        n = self.n
        f = self.eig.rot_t(F2)
        rhs = np.concatenate(
            [-F1 + np.einsum("bki,bk->bi", self.At, self.G * f),
             self._hard(f)], axis=1)
        sol = _solve(self.K, rhs)
        dx, th = sol[:, :n], sol[:, n:]
        t = (np.einsum("bki,bi->bk", self.At, dx) - f) * self.inv_gap
        t = np.where(self.soft, t, self._scatter_hard(th, t))
        return dx, self.eig.rot(t)

    def adjoint(self, g1, g2):
        """Solve J' (r1, r2) = (g1, g2); returns (r1, r2), NaN if singular.

        J' = [[0, -A'], [P A, I - P]]. With q = R' r2 and h = R' g2:
        -A~' q = g1 and lam (A~ r1) + (1 - lam) q = h. Soft q are
        eliminated, q = (h - lam A~ r1) / (1 - lam); with p = -q_h on the
        hard ones, K' [r1; p] = [g1 + A~' (h / (1 - lam) on soft); h_h].
        """
        n = self.n
        h = self.eig.rot_t(g2)
        rhs = np.concatenate(
            [g1 + np.einsum("bki,bk->bi", self.At, h * self.inv_gap),
             self._hard(h)], axis=1)
        sol = _solve(np.swapaxes(self.K, 1, 2), rhs)
        r1, p = sol[:, :n], sol[:, n:]
        Ar = np.einsum("bki,bi->bk", self.At, r1)
        q = (h - self.eig.lam * Ar) * self.inv_gap
        q = np.where(self.soft, q, self._scatter_hard(-p, q))
        return r1, self.eig.rot(q)


def _solve(K, rhs):
    """Stacked solve; rows of a singular stack come back as NaN."""
    try:
        return np.linalg.solve(K, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.full(rhs.shape, np.nan)
        for b in range(K.shape[0]):
            try:
                out[b] = np.linalg.solve(K[b], rhs[b])
            except np.linalg.LinAlgError:
                pass
        return out


def apply_J(Ad, eig, dx, dv):
    """J (dx, dv) = (A' P dv, -A dx + (I - P) dv), for checks."""
    Pdv = eig.rot(eig.lam * eig.rot_t(dv))
    top = np.einsum("bki,bk->bi", Ad, Pdv)
    bottom = -np.einsum("bki,bi->bk", Ad, dx) + dv - Pdv
    return top, bottom


def apply_JT(Ad, eig, r1, r2):
    """J' (r1, r2) = (-A' r2, P A r1 + (I - P) r2), for checks."""
    Ar1 = np.einsum("bki,bi->bk", Ad, r1)
    top = -np.einsum("bki,bk->bi", Ad, r2)
    PAr = eig.rot(eig.lam * eig.rot_t(Ar1))
    Pr2 = eig.rot(eig.lam * eig.rot_t(r2))
    return top, PAr + r2 - Pr2
