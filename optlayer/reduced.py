"""Reduced linear systems for Newton steps and adjoints of small programs.

At a point z = (x, v), with y = Pi_{K*}(v) and s = y - v, the optimality
conditions of the cone program (SCS form, see ``optlayer.adjoint``) with the
homogenizing variable fixed at 1 are

    F(x, v) = (A'y + c,  -A x + b - s) = 0,

(the duality gap vanishes at any zero of F, since y's = 0). Its Jacobian is

    J = [[0, A'P], [-A, I - P]],   P = DPi_{K*}(v),

n + m square; the full residual-map systems of ``optlayer.adjoint`` and
``optlayer.refine`` are one larger and bordered. Both J and J' shrink to
about n + (number of active constraints) unknowns.

P is symmetric, block diagonal over the cones, with eigenvalues in [0, 1].
Let P = R diag(lam) R' (R orthogonal), A~ = R'A, and write a Newton step
J (dx, dv) = -(F1, F2) in the eigenbasis, dv = R t, f = R'F2:

    A~' diag(lam) t = -F1,     (1 - lam) t = A~ dx - f.

Where 1 - lam is not small ("soft" directions, including lam = 0), t is
eliminated: t_k = ((A~ dx)_k - f_k) / (1 - lam_k). The "hard" directions
(lam near 1: equality constraints, active inequalities, the normal of a
second-order cone at a boundary point) keep their t, giving

    K = [[A~' G A~,  A_h' diag(lam_h)],    G = diag(lam / (1 - lam)) on soft
         [A_h,       -diag(1 - lam_h)]],   A_h = hard rows of A~,

with K [dx; t_h] = [-F1 + A~' G f;  f_h]. The adjoint J' r = g is solved
with K' (see :meth:`System.adjoint`). The elimination is exact for any
split; the split only bounds 1 / (1 - lam). A chunk is padded to the
largest number of hard directions of its elements with rows that read 0.

The eigenbasis is explicit only where it must be. Zero and nonnegative
cones have lam in {0, 1} and R = I. A second-order cone has, at a point
v = (t, x) with ||x|| > |t|, u = x / ||x||: eigenvalue 1 along
e1 = (1, u)/sqrt 2, 0 along e0 = (-1, u)/sqrt 2, and mu = (1 + t/||x||)/2
on every (0, w), w orthogonal to u; its one hard direction is e1 and its
middle directions enter only through the projector Pm = diag(0, I - uu')
(inside the cone P = I, all hard; in the polar P = 0). The middle is always
treated as soft: 1 - mu is small only without strict complementarity,
where callers' checks send the element to the bordered systems. PSD,
exponential and power cones use a numerical eigendecomposition.

A hard row of the zero or nonnegative cone with a single nonzero a_k in
column j (a bound such as x_j >= 0, or x_j = const) reads a_k dx_j = f_k:
it fixes dx_j, and its multiplier t_k follows from row j of the first
block once the rest is solved. Such rows and their columns leave K (the
column becomes an identity row), so that K has n + (other hard
directions) unknowns; a column with two such rows keeps them as ordinary
hard rows. The adjoint system is treated alike.

A quadratic objective (1/2) x'Px (SCS's P; to avoid a clash of names,
``Pq`` in the code) adds Px to F's first block and Pq to J's top-left
block, and so to K's: K11 = Pq + A~' G A~, still positive semidefinite.
CVXPY writes sum_squares(A x - b) as r = A x - b with P = 2I on r; such
defining pairs (an equality row and a column that appears only there and
only on P's diagonal) leave K by a Schur complement (see ``_Pairs``), so
that K has the size it has in cone form.

When J is singular (non-unique solutions, degenerate programs) K is too;
it is then solved with a small quasi-definite regularization, and callers
check the result against J and fall back to the bordered systems.
"""

import typing

import numpy as np
import scipy.sparse as sp
from scipy.linalg.lapack import dgesv as _dgesv

from optlayer import cones

# Directions with 1 - lam below this are kept as unknowns ("hard").
HARD_GAP = 1e-3
_C = 1.0 / np.sqrt(2.0)


def dense_A(Av, rows, cols, m, n):
    """(B, m, n) dense copies of A from values on a fixed pattern."""
    Ad = np.zeros((Av.shape[0], m, n))
    Ad[:, rows, cols] = Av
    return Ad


class Quadratic(typing.NamedTuple):
    """The objective's quadratic term for a stack of programs.

    Attributes:
        values: (B, nnz) values of P at (rows, cols), both triangles.
        rows, cols: the pattern.
        pairs: candidate defining pairs (columns, rows) found from the
            patterns of A and P (:func:`pair_candidates`), or None.
    """

    values: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    pairs: tuple = None

    def take(self, idx):
        """The term of the elements ``idx``."""
        return self._replace(values=self.values[idx])


def dense_P(P, n):
    """(B, n, n) dense copies of the objective's P from a
    :class:`Quadratic`; None for None."""
    if P is None:
        return None
    Pd = np.zeros((P.values.shape[0], n, n))
    Pd[:, P.rows, P.cols] = P.values
    return Pd


def pair_candidates(A_rows, A_cols, P_rows, P_cols, n, zero):
    """Candidate defining pairs (columns, rows) from the patterns of A
    (one entry per nonzero) and P: a column with a single entry of A, in
    a zero-cone row with at least one other entry, and only a diagonal
    entry in P; one column per row."""
    col_count = np.bincount(A_cols, minlength=n)
    row_count = np.bincount(A_rows, minlength=max(zero, 1))
    row_of = np.full(n, -1)
    single = np.flatnonzero(col_count[A_cols] == 1)
    row_of[A_cols[single]] = A_rows[single]
    p_count = np.bincount(P_rows, minlength=n)
    diag = np.zeros(n, dtype=bool)
    diag[P_rows[P_rows == P_cols]] = True
    cols = np.flatnonzero((col_count == 1) & (p_count == 1) & diag
                          & (row_of >= 0) & (row_of < zero))
    rows = row_of[cols]
    ok = row_count[rows] >= 2
    cols, rows = cols[ok], rows[ok]
    rows, first = np.unique(rows, return_index=True)
    cols = cols[first]
    return (cols, rows) if cols.size else None


def is_shared(Av):
    """True when every element of the stack has the same A (values Av)."""
    return Av.shape[0] > 1 and not np.any(Av[1:] != Av[:1])


def bmv(M, x):
    """M x for each element of a stack: M (..., k, l), x (..., l)."""
    return np.matmul(M, x[..., None])[..., 0]


def bmtv(M, y):
    """M'y for each element of a stack: M (..., k, l), y (..., k)."""
    return np.matmul(y[..., None, :], M)[..., 0, :]


def matvec(Ad, X, shared=False):
    """A x for each element; ``shared``: all elements have Ad[0] (one
    matrix product instead of a stack of them)."""
    if shared and Ad.shape[0]:
        return X @ Ad[0].T
    return bmv(Ad, X)


def rmatvec(Ad, Y, shared=False):
    """A'y for each element; ``shared`` as for :func:`matvec`."""
    if shared and Ad.shape[0]:
        return Y @ Ad[0]
    return bmtv(Ad, Y)


class _SocGroup:
    """The second-order cone blocks of one size q, for a stack of points:
    every array carries the cones on an axis of its own, (B, c, ...), so
    that each operation is one NumPy call for all c cones of the group.

    Args:
        starts: (c,) first rows of the cones.
        q: their size.
        V: (B, m) points; the group reads V[:, idx], idx = starts + 0..q-1.
        first: index of the group's first cone among all second-order
            cones (for the candidate hard directions, see System).
    """

    def __init__(self, starts, q, V, first):
        self.starts, self.q, self.first = starts, q, first
        self.c = starts.size
        self.idx = starts[:, None] + np.arange(q)
        Vb = V[:, self.idx]
        t, X = Vb[..., 0], Vb[..., 1:]
        r = np.sqrt(np.einsum("bci,bci->bc", X, X))
        self.inside = r <= t
        polar = (r <= -t) & ~self.inside
        self.general = ~(self.inside | polar)
        safe = np.where(self.general, r, 1.0)
        self.u = np.where(self.general[..., None], X / safe[..., None], 0.0)
        self.mu = np.where(self.general, 0.5 * (1.0 + t / safe), 0.0)
        # 1 - mu; NaN where it vanishes to rounding (no strict
        # complementarity), so that such elements fail the callers' checks
        # and take the bordered systems.
        gap = np.where(self.general, 1.0 - self.mu, 1.0)
        self.gap = np.where(gap > 1e-13, gap, np.nan)

    @property
    def cands(self):
        """The slice of the group's e1 directions among the candidates
        that follow the m rows."""
        return slice(self.first, self.first + self.c)

    def take(self, Z):
        """The group's rows of Z (B, m) as (B, c, q)."""
        return Z[:, self.idx]

    def _dot_u(self, Z):
        return np.einsum("bci,bci->bc", self.u, Z[..., 1:])

    def e1(self, Z):
        """e1'Z per cone for Z (B, c, q): (B, c); 0 if not general."""
        return _C * (Z[..., 0] + self._dot_u(Z))

    def e0(self, Z):
        """e0'Z per cone for Z (B, c, q) (0 where not general)."""
        return _C * (-Z[..., 0] + self._dot_u(Z))

    def mid(self, Z):
        """Pm Z per cone for Z (B, c, q): the x part minus its u
        component."""
        out = Z.copy()
        out[..., 0] = 0.0
        out[..., 1:] -= self.u * self._dot_u(Z)[..., None]
        return out

    def vec(self, coef, which):
        """coef * e1 (which=1) or coef * e0 (which=0) per cone, as
        (B, c, q)."""
        out = np.empty(coef.shape + (self.q,))
        out[..., 0] = _C * coef if which else -_C * coef
        out[..., 1:] = (_C * coef)[..., None] * self.u
        return out

    def apply_P(self, Z):
        """P Z per cone for Z (B, c, q)."""
        g = self.general[..., None]
        general = self.vec(self.e1(Z), 1) + self.mu[..., None] * self.mid(Z)
        return np.where(self.inside[..., None], Z,
                        np.where(g, general, 0.0))


class _Pairs:
    """Defining pairs of a quadratic objective: a zero-cone row k and a
    column j that appears in no other row, with P's row j only P_jj > 0
    (CVXPY's r = A x - b for sum_squares(A x - b) is the typical case).
    In J (and K), row j of the first block reads p dx_j + a t_k = rhs1_j
    and row k reads a dx_j + A_k,rest dx = f_k, so dx_j and t_k leave the
    system: K11 gains (p / a^2) A_k,rest' A_k,rest and rhs1 gains
    A_k,rest (p f_k / a^2 - rhs1_j / a); afterwards
    dx_j = (f_k - A_k,rest dx) / a and t_k = (rhs1_j - p dx_j) / a. The
    transposed (adjoint) system is alike, the pair's lam being 1.

    Attributes:
        cols, rows: (q,) the pairs' columns j and rows k.
        a, p: (B, q) the coefficients A[k, j] and P[j, j].
        weight: (B, q) p / a^2.
        Araw: (B, q, n) the rows k of A.
        Am: (B, q, n) the rows k without column j and pinned columns.
        keep: the other columns; index: a column's position among them.
    """

    def __init__(self, Ad, Pq, cols, rows, pinned):
        n = Ad.shape[2]
        self.cols, self.rows = cols, rows
        self.a = Ad[:, rows, cols]
        self.p = Pq[:, cols, cols]
        self.weight = self.p / self.a ** 2
        self.Araw = Ad[:, rows, :]
        Am = self.Araw.copy()
        Am[:, np.arange(cols.size), cols] = 0.0
        if pinned is not None:
            Am = Am * ~pinned[:, None, :]
        self.Am = Am
        mask = np.ones(n, dtype=bool)
        mask[cols] = False
        self.keep = np.flatnonzero(mask)
        self.index = np.cumsum(mask) - 1

    def row_values(self, Z, system):
        """The pairs' right-hand sides from Z (B, m) (F2 or g2), less the
        pinned columns' known part."""
        f = Z[:, self.rows]
        if system.any_pin:
            f = f - bmv(self.Araw, system._pinned_values(Z))
        return f

    def reduce_rhs(self, rhs1, f):
        """rhs1 for K (and rhs1 at the pairs' columns, for recovery)."""
        r1j = rhs1[:, self.cols]
        coef = self.weight * f - r1j / self.a
        return rhs1 + np.einsum("bp,bpi->bi", coef, self.Am), r1j

    def recover(self, x, f, r1j):
        """Set x at the pairs' columns in place; return the rows'
        multipliers."""
        xj = (f - np.einsum("bpi,bi->bp", self.Am, x)) / self.a
        x[:, self.cols] = xj
        return (r1j - self.p * xj) / self.a


def _defining_pairs(Ad, Pq, pinned, candidates):
    """The :class:`_Pairs` of a stack: the ``candidates`` (columns, rows;
    see :func:`pair_candidates`) whose coefficients a and p are usable in
    every element and whose column is not pinned; None without any."""
    if candidates is None:
        return None
    cand, rows = candidates
    ok = ((Ad[:, rows, cand] != 0).all(axis=0)
          & (np.einsum("bjj->bj", Pq)[:, cand] > 0).all(axis=0))
    if pinned is not None:
        ok &= ~pinned[:, cand].any(axis=0)
    if not ok.any():
        return None
    return _Pairs(Ad, Pq, cand[ok], rows[ok], pinned)


def _soc_groups(dims, V):
    """The second-order cones of ``dims`` at the points V, grouped by size
    (in order of first appearance); a group's cones take consecutive
    indices among the candidate e1 directions."""
    by_size = {}
    for kind, i, j, _ in cones._blocks(dims):
        if kind == "soc":
            by_size.setdefault(j - i, []).append(i)
    groups = []
    first = 0
    for q, starts in by_size.items():
        groups.append(_SocGroup(np.array(starts, dtype=np.intp), q, V,
                                first))
        first += len(starts)
    return groups


class Structure:
    """P = DPi_{K*}(v) for a stack of points, in the form the systems use.

    Args:
        V: (B, m) points v = y - s.
        dims: the cone.
    """

    def __init__(self, V, dims):
        B, m = V.shape
        z, nonneg = dims.zero, dims.nonneg
        self.m = m
        self.zl = z + nonneg
        self.lam_diag = np.concatenate(
            [np.ones((B, z)), (V[:, z:self.zl] > 0).astype(float)], axis=1)
        self.generic = []          # (i, j, lam (B, k), U (B, k, k))
        self.soc = _soc_groups(dims, V)
        self.nsoc = sum(grp.c for grp in self.soc)
        for kind, i, j, param in cones._blocks(dims):
            if kind == "soc":
                continue
            Vb = V[:, i:j]
            D = cones.dproj_dual_stack(kind, Vb, param)
            w, U = np.linalg.eigh(0.5 * (D + np.swapaxes(D, 1, 2)))
            self.generic.append((i, j, np.clip(w, 0.0, 1.0), U))

    def apply_P(self, Z):
        """P Z for Z (B, m)."""
        out = np.empty_like(Z)
        out[:, :self.zl] = self.lam_diag * Z[:, :self.zl]
        for i, j, lam, U in self.generic:
            Ut_z = bmtv(U, Z[:, i:j])
            out[:, i:j] = bmv(U, lam * Ut_z)
        for grp in self.soc:
            out[:, grp.idx] = grp.apply_P(grp.take(Z))
        return out


class System:
    """The reduced matrix K for a stack of points (see the module doc).

    Args:
        Ad: (B, m, n) dense A per element.
        st: the :class:`Structure` of P at the points.
        shared: True if every element has the same A (None: find out).
        Pq: (B, n, n) the objective's quadratic term, if any: it adds to
            the first block of J (and of K).
        pairs: candidate defining pairs (see :func:`pair_candidates`), or
            None for none.
    """

    def __init__(self, Ad, st, shared=None, Pq=None, pairs=None):
        B, m, n = Ad.shape
        self.Ad, self.st, self.n = Ad, st, n
        if shared is None:
            shared = B > 1 and not np.any(Ad[1:] != Ad[:1])
        self.shared = shared
        zl = st.zl
        nsoc = st.nsoc
        # Candidate hard directions: the m rows of R'A (R = I outside the
        # generic blocks), then one e1 row per second-order cone; rows
        # that differ from A's are kept in ``extra``.
        extra = {}
        hard = np.zeros((B, m + nsoc), dtype=bool)
        lam_c = np.ones((B, m + nsoc))
        hard[:, :zl] = st.lam_diag > 0.5
        K11 = np.zeros((B, n, n)) if Pq is None else Pq.copy()
        self.gen = []
        for i, j, lam, U in st.generic:
            At = np.swapaxes(U, 1, 2) @ Ad[:, i:j]
            extra[i] = At
            h = lam > 1.0 - HARD_GAP
            hard[:, i:j] = h
            lam_c[:, i:j] = lam
            inv_gap = np.where(h, 0.0, 1.0 / np.where(h, 1.0, 1.0 - lam))
            G = lam * inv_gap
            K11 += np.swapaxes(At, 1, 2) @ (G[:, :, None] * At)
            self.gen.append((At, h, inv_gap, G))
        self.soc = []
        for grp in st.soc:
            c, q = grp.c, grp.q
            # The group's rows of A: (B, c, q, n), or (c, q, n) if shared.
            Ab = Ad[0][grp.idx] if shared else Ad[:, grp.idx]
            Ax = Ab[..., 1:, :]
            hard[:, grp.idx] = grp.inside[..., None]
            hard[:, m + grp.first:m + grp.first + c] = grp.general
            # Middle directions: G = mu / (1 - mu) times the projector
            # I - uu' on the x part, so the cone adds g (Ax'Ax - w w') with
            # w = Ax'u; summed over the group's cones.
            g = grp.mu / grp.gap
            if shared:
                w = np.einsum("bci,cin->bcn", grp.u, Ax)
            else:
                w = np.einsum("bci,bcin->bcn", grp.u, Ax)
            # e1'A = (A_t + u'A_x) / sqrt 2, per cone: (B, c, n).
            extra[m + grp.first] = _C * (Ab[..., 0, :] + w)
            sg = np.sqrt(g)[:, :, None, None]
            Mg = (sg * Ax).reshape(B, c * (q - 1), n)
            K11 += np.swapaxes(Mg, 1, 2) @ Mg
            gw = g[..., None] * w
            K11 -= np.swapaxes(gw, 1, 2) @ w
            # For products with A' over the group: (B or 1, c q, n).
            Ab_flat = Ab.reshape((1 if shared else B, c * q, n))
            self.soc.append((Ab_flat, w, g))
        self.hard = hard
        self._pin(Ad, shared)
        self.pairs = None if Pq is None else _defining_pairs(
            Ad, Pq, self.pinned if self.any_pin else None, pairs)
        rest = hard.copy()
        rest[:, :zl] &= ~self.pin_row
        if self.pairs is not None:
            rest[:, self.pairs.rows] = False
        counts = rest.sum(axis=1)
        r = int(counts.max(initial=0))
        order = np.argsort(~rest, axis=1, kind="stable")[:, :r]
        valid = np.arange(r)[None, :] < counts[:, None]
        self.order, self.valid, self.r = order, valid, r
        bidx = np.arange(B)[:, None]
        Ah = self._hard_rows(Ad, extra, order, valid)
        lam_h = lam_c[bidx, order] * valid
        self.K11, self.Ah, self.lam_h = K11, Ah, lam_h
        K11k = K11
        keep = slice(None)
        if self.pairs is not None:
            # Defining pairs leave K: their Schur complement enters K11.
            pr = self.pairs
            Wm = np.sqrt(pr.weight)[:, :, None] * pr.Am
            K11k = K11 + np.swapaxes(Wm, 1, 2) @ Wm
            keep = pr.keep
        nk = n if self.pairs is None else self.pairs.keep.size
        self.nk = nk
        K = np.empty((B, nk + r, nk + r))
        K[:, :nk, :nk] = K11k[:, keep][:, :, keep]
        if self.any_pin:
            # Pinned columns leave the system: identity rows and columns.
            b, j, _ = self._pin_bj
            jk = j if self.pairs is None else self.pairs.index[j]
            K[b, jk, :nk] = 0.0
            K[b, :nk, jk] = 0.0
            K[b, jk, jk] = 1.0
            Ah = Ah * ~self.pinned[:, None, :]
        Ah = Ah[:, :, keep]
        K[:, :nk, nk:] = np.swapaxes(Ah, 1, 2) * lam_h[:, None, :]
        K[:, nk:, :nk] = Ah
        K[:, nk:, nk:] = 0.0
        idx = np.arange(r)
        K[:, nk + idx, nk + idx] = -(1.0 - lam_h)
        self.K = K

    def _hard_rows(self, Ad, extra, order, valid):
        """The (B, r, n) candidate rows ``order`` (0 where not valid): rows
        of A, or of ``extra`` (start index -> (B, k, n) rows)."""
        B, m, n = Ad.shape
        r = order.shape[1]
        bidx = np.arange(B)[:, None]
        if r == 0:
            return np.zeros((B, 0, n))
        from_A = np.minimum(order, m - 1) if m else order
        if self.shared:
            Ah = Ad[0][from_A]
        else:
            Ah = Ad[bidx, from_A]
        for start, rows in extra.items():
            k = rows.shape[1]
            inside = (order >= start) & (order < start + k)
            if np.any(inside):
                b, t = np.nonzero(inside)
                src = rows if rows.shape[0] == B else np.broadcast_to(
                    rows, (B,) + rows.shape[1:])
                Ah[b, t] = src[b, order[b, t] - start]
        return Ah * valid[:, :, None]

    def _pin(self, Ad, constant):
        """Find the hard rows of the zero and nonnegative cones with one
        nonzero (bounds such as x_j >= 0, or x_j = const). Such a row k,
        a_k x_j, fixes dx_j (and r1_j in the adjoint) directly; its
        multiplier follows from row j of the first block once the rest is
        solved. Its column and the row leave K, which shrinks to n + (other
        hard directions). A column with two such rows keeps both as
        ordinary hard rows."""
        B, m, n = Ad.shape
        zl = self.st.zl
        hard = self.hard[:, :zl]
        self.pin_row = np.zeros((B, zl), dtype=bool)
        self.any_pin = False
        if not (zl and n):
            return
        nz = (Ad[:1] if constant else Ad)[:, :zl] != 0
        single = hard & (nz.sum(axis=2) == 1)
        b, k = np.nonzero(single)
        if b.size == 0:
            return
        col = nz.argmax(axis=2)
        j = col[0, k] if constant else col[b, k]
        count = np.bincount(b * n + j, minlength=B * n)
        once = count[b * n + j] == 1
        b, k, j = b[once], k[once], j[once]
        if b.size == 0:
            return
        self.any_pin = True
        self.pin_row[b, k] = True
        self.pinned = np.zeros((B, n), dtype=bool)
        self.pinned[b, j] = True
        self.pin_k = np.zeros((B, n), dtype=np.int64)
        self.pin_k[b, j] = k
        self.pin_coef = np.ones((B, n))
        self.pin_coef[b, j] = Ad[b, k, j]
        self._pin_bj = (b, j, k)

    def _pinned_values(self, vals):
        """vals at each pinned column's row over its coefficient; 0 on the
        other columns."""
        B = vals.shape[0]
        picked = vals[np.arange(B)[:, None], self.pin_k]
        return np.where(self.pinned, picked / self.pin_coef, 0.0)

    def _pinned_multipliers(self, rhs1, x, th, lam, pair_t=None):
        """The multipliers of the pinning rows: from row j of the first
        block, (K11 x)_j + sum_h Ah[h, j] w_h t_h + a_k t_k = rhs1_j, with
        w = lam (Newton) or 1 (adjoint); ``pair_t``: the multipliers of
        the defining pairs' rows (which are not among the h)."""
        full = bmv(self.K11, x)
        if self.r:
            coef = th * lam if lam is not None else th
            full += bmtv(self.Ah, coef)
        if pair_t is not None:
            full += bmtv(self.pairs.Araw, pair_t)
        b, j, k = self._pin_bj
        return b, k, (rhs1[b, j] - full[b, j]) / self.pin_coef[b, j]

    # -- helpers ---------------------------------------------------------

    def _candidates(self, Z, rot):
        """Candidate-direction values R'Z (B, m + nsoc); ``rot`` gives each
        generic block's rotated values."""
        st = self.st
        out = np.empty((Z.shape[0], st.m + st.nsoc))
        out[:, :st.m] = Z
        for (i, j, _, _), vals in zip(st.generic, rot):
            out[:, i:j] = vals
        for grp in st.soc:
            out[:, st.m + grp.first:st.m + grp.first + grp.c] = grp.e1(
                grp.take(Z))
        return out

    def _gather(self, vals):
        return np.take_along_axis(vals, self.order, axis=1) * self.valid

    def _scatter(self, th, width):
        out = np.zeros((th.shape[0], width))
        B = th.shape[0]
        rows = np.repeat(np.arange(B), self.r)
        keep = self.valid.ravel()
        out[rows[keep], self.order.ravel()[keep]] = th.ravel()[keep]
        return out

    @property
    def nk_keep(self):
        """The columns K keeps (all without defining pairs)."""
        return slice(None) if self.pairs is None else self.pairs.keep

    def _expand(self, xk):
        """x on all n columns from its kept ones (0 on the pairs')."""
        if self.pairs is None:
            return xk
        x = np.zeros((xk.shape[0], self.n))
        x[:, self.pairs.keep] = xk
        return x

    def _rotations(self, Z):
        return [bmtv(U, Z[:, i:j])
                for i, j, _, U in self.st.generic]

    # -- solves ----------------------------------------------------------

    def newton(self, F1, F2):
        """Solve J (dx, dv) = -(F1, F2); returns (dx, dv), NaN if singular."""
        st = self.st
        rot = self._rotations(F2)
        rhs1 = -F1
        for (At, _, _, G), f in zip(self.gen, rot):
            rhs1 = rhs1 + bmtv(At, G * f)
        for grp, (Ab, _, g) in zip(st.soc, self.soc):
            pm = g[..., None] * grp.mid(grp.take(F2))
            rhs1 = rhs1 + rmatvec(Ab, pm.reshape(pm.shape[0], -1),
                                  self.shared)
        rhs2 = self._gather(self._candidates(F2, rot))
        full1 = rhs1
        if self.any_pin:
            # Pinned dx_j = f_k / a_k (lam_k = 1: A_k dx = f_k).
            u = self._pinned_values(F2)
            rhs1 = np.where(self.pinned, u,
                            rhs1 - bmv(self.K11, u))
            if self.r:
                rhs2 = rhs2 - bmv(self.Ah, u)
        pairs = self.pairs
        if pairs is not None:
            f = pairs.row_values(F2, self)
            rhs1, r1j = pairs.reduce_rhs(rhs1, f)
        sol = _solve_regularized(
            self.K, np.concatenate([rhs1[:, self.nk_keep], rhs2], axis=1),
            self.nk)
        dx, th = self._expand(sol[:, :self.nk]), sol[:, self.nk:]
        T = self._scatter(th, self.hard.shape[1])
        pair_t = None
        if pairs is not None:
            pair_t = pairs.recover(dx, f, r1j)
            T[:, pairs.rows] = pair_t
        if self.any_pin:
            b, k, t = self._pinned_multipliers(full1, dx, th, self.lam_h,
                                               pair_t)
            T[b, k] = t
        q = matvec(self.Ad, dx, self.shared) - F2       # A dx - F2
        dv = np.where(self.hard[:, :st.m], T[:, :st.m], q)
        for (i, j, _, U), (At, h, inv_gap, _), f in zip(st.generic,
                                                        self.gen, rot):
            t = (bmv(At, dx) - f) * inv_gap
            t = np.where(h, T[:, i:j], t)
            dv[:, i:j] = bmv(U, t)
        for grp in st.soc:
            qb = grp.take(q)
            Tm = T[:, st.m:][:, grp.cands]
            general = (grp.vec(grp.e0(qb), 0)
                       + grp.mid(qb) / grp.gap[..., None]
                       + grp.vec(Tm, 1))
            dv[:, grp.idx] = np.where(
                grp.inside[..., None], grp.take(T),
                np.where(grp.general[..., None], general, qb))
        return dx, dv

    def adjoint(self, g1, g2, flags=None):
        """Solve J' (r1, r2) = (g1, g2); returns (r1, r2), NaN if singular
        (``flags``: optional boolean array (B,), set where the reduced
        system was regularized).

        J' = [[0, -A'], [P A, I - P]]. With q = R' r2 and h = R' g2:
        -A~' q = g1 and lam (A~ r1) + (1 - lam) q = h. Soft q are
        eliminated, q = (h - lam A~ r1) / (1 - lam); with p = -q_h on the
        hard ones, K' [r1; p] = [g1 + A~' (h / (1 - lam) on soft); h_h].
        """
        st = self.st
        rot = self._rotations(g2)
        soft_diag = ~self.hard[:, :st.zl]
        rhs1 = g1 + rmatvec(self.Ad[:, :st.zl], g2[:, :st.zl] * soft_diag,
                            self.shared)
        for (At, _, inv_gap, _), h in zip(self.gen, rot):
            rhs1 = rhs1 + bmtv(At, h * inv_gap)
        for grp, (Ab, _, _) in zip(st.soc, self.soc):
            gb = grp.take(g2)
            # Polar: every direction soft with lam = 0; general: e0 (lam 0)
            # and the middle (mu).
            soft = (grp.vec(grp.e0(gb), 0)
                    + grp.mid(gb) / grp.gap[..., None])
            soft = np.where(grp.general[..., None], soft,
                            np.where(grp.inside[..., None], 0.0, gb))
            rhs1 = rhs1 + rmatvec(Ab, soft.reshape(soft.shape[0], -1),
                                  self.shared)
        rhs2 = self._gather(self._candidates(g2, rot))
        full1 = rhs1
        if self.any_pin:
            # Pinned r1_j = h_k / a_k (lam_k = 1: A_k r1 = h_k).
            u = self._pinned_values(g2)
            rhs1 = np.where(self.pinned, u,
                            rhs1 - bmv(self.K11, u))
            if self.r:
                rhs2 = rhs2 - self.lam_h * bmv(self.Ah, u)
        # Regularized where K is singular (non-unique solutions, e.g. the
        # epigraph variable of an inactive norm constraint): any solution
        # of J' r = g gives the same gradient there, since d F/d theta
        # maps into the range of J; callers check J' r = g.
        pairs = self.pairs
        if pairs is not None:
            h = pairs.row_values(g2, self)
            rhs1, r1j = pairs.reduce_rhs(rhs1, h)
        sol = _solve_regularized(
            np.swapaxes(self.K, 1, 2),
            np.concatenate([rhs1[:, self.nk_keep], rhs2], axis=1), self.nk,
            flags, _REG_ROUNDS)
        r1, p = self._expand(sol[:, :self.nk]), sol[:, self.nk:]
        P = -self._scatter(p, self.hard.shape[1])       # q on hard ones
        pair_t = None
        if pairs is not None:
            pair_t = pairs.recover(r1, h, r1j)
            P[:, pairs.rows] = -pair_t
        if self.any_pin:
            b, k, t = self._pinned_multipliers(full1, r1, p, None, pair_t)
            P[b, k] = -t
        Ar = matvec(self.Ad, r1, self.shared)
        r2 = np.where(self.hard[:, :st.m], P[:, :st.m], g2)
        for (i, j, lam, U), (At, h, inv_gap, _), hv in zip(
                st.generic, self.gen, rot):
            q = (hv - lam * bmv(At, r1)) * inv_gap
            q = np.where(h, P[:, i:j], q)
            r2[:, i:j] = bmv(U, q)
        for grp in st.soc:
            gb, ab = grp.take(g2), grp.take(Ar)
            Pm = P[:, st.m:][:, grp.cands]
            general = (grp.vec(grp.e0(gb), 0)
                       + grp.mid(gb - grp.mu[..., None] * ab)
                       / grp.gap[..., None]
                       + grp.vec(Pm, 1))
            r2[:, grp.idx] = np.where(
                grp.inside[..., None], grp.take(P),
                np.where(grp.general[..., None], general, gb))
        return r1, r2


def _solve(K, rhs, singular_ok=False):
    """Stacked solve; rows of exactly singular matrices come back as NaN
    (each element solved alone), or, with ``singular_ok``, all rows as NaN
    as soon as one matrix is singular (the caller then regularizes)."""
    if K.shape[0] == 1:
        # One system: LAPACK directly (NumPy's stacked solve costs about
        # 5 microseconds more, a noticeable part of a small call).
        _, _, d, info = _dgesv(K[0], rhs[0])
        return d[None] if info == 0 else np.full(rhs.shape, np.nan)
    try:
        return np.linalg.solve(K, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.full(rhs.shape, np.nan)
        if singular_ok:
            return out
        for b in range(K.shape[0]):
            try:
                out[b] = np.linalg.solve(K[b], rhs[b])
            except np.linalg.LinAlgError:
                pass
        return out


# Relative residual above which a reduced solve is redone regularized.
_SOLVE_TOL = 1e-9
# Size of the regularization, relative to the largest entry of K.
_REG = 1e-10
# At most this many rounds of iterative refinement after a regularized
# solve in an adjoint.
_REG_ROUNDS = 10


def _solve_regularized(K, rhs, n=None, flags=None, rounds=1,
                       rejected=False):
    """Stacked solve that also gives a step where K is singular.

    Where K is (numerically) singular, e.g. a variable that only an
    inactive constraint bounds, so that the solution is not unique, the
    system is solved again with K + delta diag(I_n, -I): K's blocks are
    positive semidefinite and negative semidefinite, so the regularized
    matrix is quasi-definite and nonsingular, and its solution is close to
    the least-norm one. Rounds of iterative refinement against K follow
    while they lower the residual: they restore the exact solution of
    elements that were regularized only because another matrix of the
    stack was exactly singular (LAPACK then fails the whole stack), and
    of directions where K is nonsingular but ill-conditioned. Newton
    steps only need to reduce the residual, which the caller checks.

    With ``n`` None, K is a full Jacobian J or its transpose (see
    :func:`full_jacobian`) and the regularization is K + delta I: with
    Schur complement delta I + A'P((1 + delta) I - P)^{-1} A (positive
    definite, as P is symmetric with eigenvalues in [0, 1]), J + delta I
    is nonsingular.

    ``flags``: optional boolean array (B,), set where K was regularized.
    With flags, a stack that LAPACK fails as a whole is solved element by
    element, so that only the singular elements are flagged. ``rounds``:
    at most this many rounds of refinement (Newton steps need one, their
    residual is checked; adjoints take _REG_ROUNDS). ``rejected``: the
    caller already solved K unregularized and rejected every element.
    """
    if rejected:
        sol = np.full(rhs.shape, np.nan)
        bad = np.ones(K.shape[0], dtype=bool)
    else:
        sol = _solve(K, rhs, singular_ok=flags is None)
        scale = 1.0 + np.abs(rhs).max(axis=1)
        res = np.abs(bmv(K, np.nan_to_num(sol)) - rhs).max(axis=1)
        bad = ~(res <= _SOLVE_TOL * scale) | ~np.isfinite(sol).all(axis=1)
    if flags is not None:
        flags |= bad
    if np.any(bad):
        Kb = K[bad]
        Kr = Kb.copy()
        delta = _REG * (1.0 + np.abs(Kb).max(axis=(1, 2)))
        N = K.shape[1]
        sign = 1.0 if n is None else np.where(np.arange(N) < n, 1.0, -1.0)
        Kr[:, np.arange(N), np.arange(N)] += delta[:, None] * sign
        rb = rhs[bad]
        # With one round of refinement two solves cost less than the
        # inverse (about a third of it each, for 47 x 47 matrices); more
        # rounds reuse it.
        inverse = None
        if rounds > 1:
            try:
                inverse = np.linalg.inv(Kr)
            except np.linalg.LinAlgError:  # pragma: no cover - Kr is
                pass                       # nonsingular by construction

        def apply(v):
            if inverse is None:
                return _solve(Kr, v)
            return bmv(inverse, v)

        # Iterative refinement against K (iterated regularization): each
        # round shrinks the error along a singular direction sigma by
        # delta / (sigma + delta). One round was not enough where K is
        # also ill-conditioned (sigma = 1.7e-6 against delta = 2e-8: a
        # gradient 2.5e-4 off); rounds stop when the residual stops
        # falling, and each element keeps its best iterate.
        best = apply(rb)
        best_res = np.abs(rb - bmv(Kb, best)).max(axis=1)
        current, res_k = best, best_res
        for _ in range(rounds):
            current = current + apply(rb - bmv(Kb, current))
            new_res = np.abs(rb - bmv(Kb, current)).max(axis=1)
            better = new_res < best_res
            best = np.where(better[:, None], current, best)
            best_res = np.where(better, new_res, best_res)
            if not np.any(new_res < 0.5 * res_k):
                break
            res_k = new_res
        sol[bad] = best
    return sol


def apply_JT(Ad, st, r1, r2, shared=False, Pq=None):
    """J' (r1, r2) = (Pq r1 - A' r2, P A r1 + (I - P) r2), for checks
    (``Pq``: the objective's quadratic term, None for 0)."""
    Ar1 = matvec(Ad, r1, shared)
    top = -rmatvec(Ad, r2, shared)
    if Pq is not None:
        top = top + bmv(Pq, r1)
    return top, st.apply_P(Ar1) + r2 - st.apply_P(r2)


# The full Jacobian J (n + m square) is assembled and factored directly,
# without the reduction, for stacks where its cubic cost is below the
# reduction's fixed cost of many small array operations per step: at most
# FULL_SIZE rows, batch * (n + m)^3 at most FULL_WORK. (Measured: the full
# Jacobian is 1.3 to 2 times faster for one element of a 4-cone SOCP,
# n + m = 47, or of the seed's ReLU layer, 63; the two are even at about
# batch * (n + m)^3 = 1e6 to 2e6, e.g. one LP with n + m = 100 or four
# ReLU layers; the reduced systems win above.)
FULL_SIZE = 100
FULL_WORK = 1e6


def use_full(batch, n, m):
    """Whether a stack of ``batch`` programs takes the full Jacobian."""
    k = n + m
    return 0 < k <= FULL_SIZE and batch * k ** 3 <= FULL_WORK


def sparse_jacobian(A, D, Pq=None, AT=None):
    """:func:`full_jacobian` of one program, sparse (CSC): J = [[Pq, A'D],
    [-A, I - D]] from the CSC A (m, n), D = DPi_{K*}(v) (m, m) and the
    objective's quadratic term Pq (n, n; None for 0). ``AT``: A' if the
    caller has it."""
    m, n = A.shape
    AT = A.T if AT is None else AT
    if Pq is None:
        Pq = sp.csc_matrix((n, n))
    return sp.bmat([[Pq, AT @ D], [-A, sp.identity(m, format="csc") - D]],
                   format="csc")


def full_jacobian(Ad, P, Pq=None):
    """J = [[Pq, A'P], [-A, I - P]] for each element, (B, n + m, n + m),
    from the dense A (B, m, n), P = DPi_{K*}(v) (B, m, m) and the
    objective's quadratic term Pq (B, n, n; None for 0)."""
    B, m, n = Ad.shape
    J = np.zeros((B, n + m, n + m))
    if Pq is not None:
        J[:, :n, :n] = Pq
    J[:, :n, n:] = np.swapaxes(Ad, 1, 2) @ P
    J[:, n:, :n] = -Ad
    J[:, n:, n:] = -P
    idx = np.arange(n, n + m)
    J[:, idx, idx] += 1.0
    return J


def solve_checked(M, rhs, tol, flags=None, rounds=1):
    """Stacked solve of M d = rhs for full Jacobians M (or their
    transposes), regularized where M is singular; rows whose relative
    residual is still above ``tol`` (inconsistent systems) come back as
    NaN. ``flags``: optional boolean array (B,), set where M was
    regularized (then a stack that LAPACK fails as a whole is solved
    element by element, so that only singular elements are flagged);
    ``rounds``: see :func:`_solve_regularized`."""
    d = _solve(M, rhs, singular_ok=flags is None)
    scale = tol * np.sqrt(np.einsum("bi,bi->b", rhs, rhs))
    r = bmv(M, d) - rhs
    bad = ~(np.sqrt(np.einsum("bi,bi->b", r, r)) <= scale)
    if flags is not None:
        flags |= bad
    if bad.any():
        Mb, rb = M[bad], rhs[bad]
        db = _solve_regularized(Mb, rb, rounds=rounds, rejected=True)
        r = bmv(Mb, np.nan_to_num(db)) - rb
        db[~(np.sqrt(np.einsum("bi,bi->b", r, r)) <= scale[bad])] = np.nan
        d[bad] = db
    return d
