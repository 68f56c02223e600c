"""Eliminate variables pinned by an equality to an affine function of theta.

An equality row ``a x_j = b_i(theta)`` of the zero cone, whose only free
variable is ``x_j`` and whose coefficients do not depend on the parameters,
pins ``x_j = w_j(theta)``, an affine function. (The DPP idiom ``Wtilde == W``
creates such rows, one per entry of ``W``.) Substituting ``w`` removes the
variable and its pinning row; every other row keeps its remaining variables
and moves the eliminated terms to the right-hand side:

    A_k x_k + s = b(theta) - A_e(theta) w(theta).

``A_e(theta) w(theta)`` is bilinear in theta, so the reduced problem's ``b``
is not affine any more; the layer evaluates it per batch, and the adjoint
carries the chain rule through it:

    d vals_e[k] = -db[row_k] w[col_k],   d w[col_k] += -db[row_k] vals_e[k].

Rows are processed repeatedly, so chains of pinned variables
(``x_2 = x_1 + p`` after ``x_1 = q``) are eliminated too.
"""

import dataclasses

import numpy as np
import scipy.sparse as sp


@dataclasses.dataclass(frozen=True)
class Elimination:
    """What the presolve removed.

    Attributes:
        keep_cols: indices of the variables kept, in the original ``x``.
        elim_cols: indices of the eliminated variables.
        keep_rows: indices of the rows kept.
        W_map: sparse (n_e, p + 1): ``w = W_map @ theta``.
        T_Ae: sparse (nnz_e, p + 1): values of the eliminated columns of A
            in kept rows.
        Ae_rows: reduced row index of each of those values.
        Ae_cols: index into ``w`` of each of those values.
    """

    keep_cols: np.ndarray
    elim_cols: np.ndarray
    keep_rows: np.ndarray
    W_map: sp.csr_matrix
    T_Ae: sp.csr_matrix
    Ae_rows: np.ndarray
    Ae_cols: np.ndarray

    @property
    def size(self):
        """Number of eliminated variables."""
        return int(self.elim_cols.size)


def find_pinned(n, zero_rows, T_b, T_A, rows, cols, protected_rows=(),
                protected_cols=()):
    """Find pinned variables; return (dict col -> sparse row w, pin rows).

    Args:
        n: number of variables.
        zero_rows: number of zero-cone rows (the first rows).
        T_b: sparse (m, p + 1) map to b.
        T_A: sparse (nnz, p + 1) map to the values of A.
        rows, cols: position of each value of A.
        protected_rows: rows that must be kept (e.g. their dual is an
            output).
        protected_cols: variables that must be kept (e.g. they enter the
            quadratic objective).
    """
    T_A = sp.csr_matrix(T_A)
    T_b = sp.csr_matrix(T_b)
    p1 = T_A.shape[1]
    # A coefficient is constant when only the trailing (constant) column
    # of its map is nonzero.
    param_part = T_A[:, :p1 - 1]
    constant = np.diff(param_part.indptr) == 0
    coef = np.asarray(T_A[:, p1 - 1].todense()).ravel()
    order = np.argsort(rows, kind="stable")
    starts = np.searchsorted(rows[order], np.arange(zero_rows + 1))
    protected = set(int(r) for r in protected_rows)

    pinned = {}
    pin_rows = []
    used = np.zeros(zero_rows, dtype=bool)
    changed = True
    while changed:
        changed = False
        for i in range(zero_rows):
            if used[i] or i in protected:
                continue
            entries = order[starts[i]:starts[i + 1]]
            if entries.size == 0 or not np.all(constant[entries]):
                continue
            free = [k for k in entries if int(cols[k]) not in pinned]
            if len(free) != 1:
                continue
            k = free[0]
            if int(cols[k]) in protected_cols:
                continue
            a = coef[k]
            if abs(a) < 1e-12:
                continue
            w = T_b[i]
            for e in entries:
                if e != k:
                    w = w - coef[e] * pinned[int(cols[e])]
            pinned[int(cols[k])] = sp.csr_matrix(w / a)
            used[i] = True
            pin_rows.append(i)
            changed = True
    return pinned, pin_rows


def eliminate(n, m, T_b, T_A, rows, cols, pinned, pin_rows):
    """Split the data into kept and eliminated parts.

    Returns:
        (elimination, T_b_kept, T_A_kept, rows_kept, cols_kept) where the
        kept rows and columns are renumbered.
    """
    elim_cols = np.array(sorted(pinned), dtype=np.int64)
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[elim_cols] = False
    keep_cols = np.flatnonzero(keep_mask)
    row_mask = np.ones(m, dtype=bool)
    row_mask[np.asarray(pin_rows, dtype=np.int64)] = False
    keep_rows = np.flatnonzero(row_mask)

    new_col = np.full(n, -1, dtype=np.int64)
    new_col[keep_cols] = np.arange(keep_cols.size)
    elim_index = np.full(n, -1, dtype=np.int64)
    elim_index[elim_cols] = np.arange(elim_cols.size)
    new_row = np.full(m, -1, dtype=np.int64)
    new_row[keep_rows] = np.arange(keep_rows.size)

    T_A = sp.csr_matrix(T_A)
    in_kept_row = row_mask[rows]
    kept = in_kept_row & keep_mask[cols]
    elim = in_kept_row & ~keep_mask[cols]
    p1 = T_A.shape[1]
    if elim_cols.size:
        W_map = sp.vstack([pinned[int(j)] for j in elim_cols], format="csr")
    else:
        W_map = sp.csr_matrix((0, p1))
    elimination = Elimination(
        keep_cols=keep_cols,
        elim_cols=elim_cols,
        keep_rows=keep_rows,
        W_map=W_map,
        T_Ae=sp.csr_matrix(T_A[np.flatnonzero(elim)]),
        Ae_rows=new_row[rows[elim]],
        Ae_cols=elim_index[cols[elim]],
    )
    return (
        elimination,
        sp.csr_matrix(sp.csr_matrix(T_b)[keep_rows]),
        sp.csr_matrix(T_A[np.flatnonzero(kept)]),
        new_row[rows[kept]],
        new_col[cols[kept]],
    )


def no_elimination(n, m, p1):
    """The empty elimination (presolve off or nothing to remove)."""
    return Elimination(
        keep_cols=np.arange(n),
        elim_cols=np.zeros(0, dtype=np.int64),
        keep_rows=np.arange(m),
        W_map=sp.csr_matrix((0, p1)),
        T_Ae=sp.csr_matrix((0, p1)),
        Ae_rows=np.zeros(0, dtype=np.int64),
        Ae_cols=np.zeros(0, dtype=np.int64),
    )
