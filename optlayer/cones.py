"""Euclidean projections onto convex cones and their derivatives.

A cone vector of length m stacks blocks in the SCS / CVXPY order:

1. zero cone {0}^z (its dual is the free space R^z);
2. nonnegative orthant R_+^l;
3. second-order cones {(t, x) : ||x||_2 <= t}, one per entry of `soc`;
4. PSD cones, one per matrix order k in `psd`. A block holds the lower
   triangle of a symmetric k x k matrix, column-major, with off-diagonal
   entries scaled by sqrt(2) ("svec"), so that svec(X) . svec(Y) = tr(XY);
5. exponential cones cl{(x, y, z) : y > 0, y exp(x / y) <= z};
6. 3-d power cones {(x, y, z) : x, y >= 0, x^a y^(1-a) >= |z|}, one per
   exponent a in `power`.

Nonnegative, second-order and PSD cones are self-dual. For the others the
dual cone K* follows from Moreau's decomposition v = P_K(v) - P_K*(-v):
P_K*(v) = v + P_K(-v), and D P_K*(v) = I - D P_K(-v).

Projections are nonsmooth on a null set (where the formula changes). There
each derivative returns one fixed element of the generalized Jacobian:
nonnegative entries get 1 for v > 0 and 0 for v <= 0; second-order,
exponential and power cones get the zero map on the polar cone -K*
(origin included) and the identity on the rest of K (boundary included);
the PSD derivative takes max(., 0)'(0) = 0 in its divided differences.
The exponential cone at x, y <= 0 and the power cone at z = 0 use the
one-sided limits documented in their functions.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.sparse as sp

__all__ = [
    "ConeDims",
    "svec",
    "smat",
    "proj_soc",
    "dproj_soc",
    "proj_psd",
    "dproj_psd",
    "proj_exp",
    "dproj_exp",
    "proj_pow",
    "dproj_pow",
    "project",
    "dproject",
    "project_batch",
    "dproject_batch",
]

_SQRT2 = math.sqrt(2.0)
# Largest |rho| = |x/y| used in the exponential-cone root find.
_RHO_MAX = 1e150


# --------------------------------------------------------------------------
# Cone dimensions
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConeDims:
    """Dimensions of a product cone in SCS / CVXPY order.

    Attributes:
        zero: length of the zero cone.
        nonneg: length of the nonnegative orthant.
        soc: sizes of the second-order cones (each counts t and x).
        psd: orders k of the PSD cones; each takes k(k+1)/2 entries.
        exp: number of primal exponential cones (3 entries each).
        power: exponents a in (0, 1) of the 3-d power cones.
    """

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()
    psd: tuple[int, ...] = ()
    exp: int = 0
    power: tuple[float, ...] = ()

    def __post_init__(self):
        # Normalize to hashable builtins, then validate.
        for name in ("zero", "nonneg", "exp"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(
                    f"`{name}` must be a nonnegative integer, got {value!r}."
                )
            object.__setattr__(self, name, int(value))
        for name in ("soc", "psd"):
            sizes = tuple(int(k) for k in np.atleast_1d(getattr(self, name)))
            if any(k < 1 for k in sizes):
                raise ValueError(
                    f"`{name}` sizes must be positive integers, got {sizes}."
                )
            object.__setattr__(self, name, sizes)
        alphas = tuple(float(a) for a in np.atleast_1d(self.power))
        if any(not 0.0 < a < 1.0 for a in alphas):
            raise ValueError(
                f"`power` exponents must lie in (0, 1), got {alphas}."
            )
        object.__setattr__(self, "power", alphas)

    @property
    def size(self) -> int:
        """Total length m of a vector in the product cone."""
        return (
            self.zero
            + self.nonneg
            + sum(self.soc)
            + sum(k * (k + 1) // 2 for k in self.psd)
            + 3 * self.exp
            + 3 * len(self.power)
        )

    @classmethod
    def from_scs(cls, cone: dict) -> ConeDims:
        """Build from an SCS cone dictionary.

        Args:
            cone: SCS cone dict with keys among `z`, `l`, `q`, `s`, `ep`,
                `p`; a missing key means an empty cone. `ed` is accepted
                only with a count of 0.

        Returns:
            The matching `ConeDims`.

        Raises:
            ValueError: for dual exponential cones (`ed` > 0), dual power
                cones (negative exponents in `p`), any other key, or
                invalid sizes.
        """
        supported = {"z", "l", "q", "s", "ep", "p", "ed"}
        unknown = sorted(set(cone) - supported)
        if unknown:
            raise ValueError(
                f"Unsupported SCS cone keys {unknown}; supported keys are "
                "`z`, `l`, `q`, `s`, `ep`, `p`."
            )
        if cone.get("ed", 0):
            raise ValueError(
                f"Dual exponential cones (`ed`={cone['ed']}) are not "
                "supported; write them as primal exponential cones (`ep`)."
            )
        alphas = tuple(float(a) for a in np.atleast_1d(cone.get("p", ())))
        negative = [a for a in alphas if a < 0]
        if negative:
            raise ValueError(
                f"Dual power cones (negative exponents {negative} in `p`) "
                "are not supported; write them as primal power cones."
            )
        return cls(
            zero=cone.get("z", 0),
            nonneg=cone.get("l", 0),
            soc=tuple(np.atleast_1d(cone.get("q", ())).astype(int)),
            psd=tuple(np.atleast_1d(cone.get("s", ())).astype(int)),
            exp=cone.get("ep", 0),
            power=alphas,
        )

    def to_scs(self) -> dict:
        """The SCS cone dictionary for these dimensions."""
        return {
            "z": self.zero,
            "l": self.nonneg,
            "q": list(self.soc),
            "s": list(self.psd),
            "ep": self.exp,
            "p": list(self.power),
        }


# --------------------------------------------------------------------------
# Symmetric-matrix vectorization
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _tril_index(k: int):
    """Rows, columns and svec scales of the lower triangle, column-major."""
    rows, cols = np.tril_indices(k)
    # np.tril_indices is row-major; reorder to column-major.
    order = np.lexsort((rows, cols))
    rows, cols = rows[order], cols[order]
    scale = np.where(rows == cols, 1.0, _SQRT2)
    for arr in (rows, cols, scale):
        arr.setflags(write=False)
    return rows, cols, scale


def _psd_order(n: int) -> int:
    """Matrix order k with k(k+1)/2 = n."""
    k = int(round((math.sqrt(8 * n + 1) - 1) / 2))
    if k * (k + 1) // 2 != n:
        raise ValueError(f"Length {n} is not k(k+1)/2 for any integer k.")
    return k


def svec(X: np.ndarray) -> np.ndarray:
    """Scaled lower-triangle vectorization of symmetric matrices.

    Args:
        X: array (..., k, k), symmetric in the last two axes.

    Returns:
        Array (..., k(k+1)/2): lower triangle column-major, off-diagonal
        entries times sqrt(2).
    """
    X = np.asarray(X, dtype=np.float64)
    rows, cols, scale = _tril_index(X.shape[-1])
    return X[..., rows, cols] * scale


def smat(v: np.ndarray) -> np.ndarray:
    """Inverse of `svec`.

    Args:
        v: array (..., k(k+1)/2).

    Returns:
        Symmetric array (..., k, k).
    """
    v = np.asarray(v, dtype=np.float64)
    k = _psd_order(v.shape[-1])
    rows, cols, scale = _tril_index(k)
    X = np.zeros(v.shape[:-1] + (k, k))
    X[..., rows, cols] = v / scale
    X[..., cols, rows] = v / scale
    return X


# --------------------------------------------------------------------------
# Second-order cone
# --------------------------------------------------------------------------


def proj_soc(v: np.ndarray) -> np.ndarray:
    """Projection onto the second-order cone {(t, x) : ||x|| <= t}.

    With r = ||x||: v if r <= t; 0 if r <= -t; otherwise
    (t + r) / 2 * (1, x / r).

    Args:
        v: array (k,), k >= 1.

    Returns:
        Array (k,).
    """
    v = np.asarray(v, dtype=np.float64)
    t, x = v[0], v[1:]
    r = np.linalg.norm(x)
    if r <= -t:
        return np.zeros_like(v)
    if r <= t:
        return v.copy()
    return 0.5 * (t + r) * np.concatenate(([1.0], x / r))


def dproj_soc(v: np.ndarray) -> np.ndarray:
    """Jacobian of `proj_soc`.

    With r = ||x||, u = x / r, in the region |t| < r:
    D = 1/2 [[1, u'], [u, (1 + t/r) I - (t/r) u u']]. It is I inside the
    cone (and on its boundary t = r > 0) and 0 in the polar cone r <= -t.

    Args:
        v: array (k,).

    Returns:
        Dense symmetric array (k, k).
    """
    v = np.asarray(v, dtype=np.float64)
    k = v.size
    t, x = v[0], v[1:]
    r = np.linalg.norm(x)
    if r <= -t:
        return np.zeros((k, k))
    if r <= t:
        return np.eye(k)
    u = x / r
    D = np.empty((k, k))
    D[0, 0] = 0.5
    D[0, 1:] = D[1:, 0] = 0.5 * u
    D[1:, 1:] = 0.5 * ((1 + t / r) * np.eye(k - 1) - (t / r) * np.outer(u, u))
    return D


def _proj_soc_stack(V: np.ndarray) -> np.ndarray:
    """`proj_soc` applied to each row of V (B, k).

    With r = ||x|| and a = (t + r) / (2 r) clipped to [0, 1] (1 where r =
    0), the projection is (t, x) inside the cone (a = 1), 0 in its polar
    (a = 0) and a (r, x) between: one formula for the three cases.
    """
    t, X = V[:, 0], V[:, 1:]
    r = np.sqrt(np.einsum("ij,ij->i", X, X))
    a = np.divide(0.5 * (t + r), r, out=np.ones_like(r), where=r > 0)
    np.clip(a, 0.0, 1.0, out=a)
    P = V * a[:, None]
    P[:, 0] = np.where(r <= t, t, a * r)
    return P


def _dproj_soc_stack(V: np.ndarray) -> np.ndarray:
    """`dproj_soc` for each row of V (B, k); returns (B, k, k).

    Rows strictly between the cone and its polar (r > |t|) take the
    general formula with u = x / r and rho = t / r; the other rows' terms
    vanish there (u is set to 0) and the identity is added inside the
    cone.
    """
    B, k = V.shape
    t, X = V[:, 0], V[:, 1:]
    r = np.sqrt(np.einsum("ij,ij->i", X, X))
    general = r > np.abs(t)
    inside = r <= t
    rs = np.where(general, r, 1.0)
    h = 0.5 * general
    half_u = X * (h / rs)[:, None]
    rho = t / rs
    D = np.empty((B, k, k))
    D[:, 0, 0] = h + inside
    D[:, 0, 1:] = half_u
    D[:, 1:, 0] = half_u
    # (rho / 2) u u' = 2 rho (u / 2)(u / 2)'.
    np.multiply(half_u[:, :, None] * half_u[:, None, :],
                (-2.0 * rho)[:, None, None], out=D[:, 1:, 1:])
    idx = np.arange(1, k)
    D[:, idx, idx] += (h * (1.0 + rho) + inside)[:, None]
    return D


# --------------------------------------------------------------------------
# PSD cone
# --------------------------------------------------------------------------


def proj_psd(v: np.ndarray) -> np.ndarray:
    """Projection onto the PSD cone in svec coordinates.

    With X = smat(v) = U diag(w) U': P(v) = svec(U diag(max(w, 0)) U').

    Args:
        v: array (k(k+1)/2,).

    Returns:
        Array (k(k+1)/2,).
    """
    w, U = np.linalg.eigh(smat(v))
    return svec((U * np.maximum(w, 0.0)) @ U.T)


def _psd_divided_differences(w: np.ndarray) -> np.ndarray:
    """First divided differences of f(w) = max(w, 0), shape (..., k, k).

    G_ij = (f(w_i) - f(w_j)) / (w_i - w_j), equal to 1 when both are
    positive and 0 when both are nonpositive (f'(0) is taken as 0).
    """
    wi, wj = w[..., :, None], w[..., None, :]
    pi, pj = wi > 0, wj > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mixed = (np.maximum(wi, 0) - np.maximum(wj, 0)) / (wi - wj)
    return np.where(pi & pj, 1.0, np.where(pi ^ pj, mixed, 0.0))


def dproj_psd(v: np.ndarray) -> np.ndarray:
    """Jacobian of `proj_psd`.

    With X = U diag(w) U' and G the divided differences of max(., 0) at w,
    D P(X)[dX] = U (G o (U' dX U)) U' (o: elementwise product). In svec
    coordinates, with T the isometry svec -> vec, D = W' diag(vec G) W,
    W = (U kron U)' T. Costs O(k^6) time and O(k^4) memory.

    Args:
        v: array (k(k+1)/2,).

    Returns:
        Dense symmetric array (k(k+1)/2, k(k+1)/2).
    """
    X = smat(v)
    k = X.shape[0]
    w, U = np.linalg.eigh(X)
    G = _psd_divided_differences(w)

    # T maps svec to vec (column-major): column p of T is vec(E_p), where
    # E_p is e_i e_i' or (e_i e_j' + e_j e_i') / sqrt(2).
    rows, cols, scale = _tril_index(k)
    n = rows.size
    T = np.zeros((k * k, n))
    T[rows + k * cols, np.arange(n)] = 1.0 / scale
    T[cols + k * rows, np.arange(n)] = 1.0 / scale
    W = np.kron(U, U).T @ T
    return W.T @ (G.ravel(order="F")[:, None] * W)


def _dproj_psd_stack(V: np.ndarray, chunk_elems: int = 4_000_000):
    """`dproj_psd` for each row of V (B, n); returns (B, n, n).

    Applies D P to each svec basis matrix E_p, vectorized over the batch
    and the basis: U (G o (U' E_p U)) U', where U' E_p U has entries
    s_p (U_ia U_jc + U_ja U_ic) for E_p at (i, j), s_p = 1/2 on the
    diagonal and 1/sqrt(2) off it. Costs O(k^5) per element.
    """
    B, n = V.shape
    k = _psd_order(n)
    rows, cols, scale = _tril_index(k)
    w, U = np.linalg.eigh(smat(V))
    G = _psd_divided_differences(w)
    s = np.where(rows == cols, 0.5, 1.0 / _SQRT2)[None, :, None, None]
    out = np.empty((B, n, n))
    step = max(1, chunk_elems // (n * k * k))
    for lo in range(0, B, step):
        Uc, Gc = U[lo:lo + step], G[lo:lo + step]
        Ui, Uj = Uc[:, rows, :], Uc[:, cols, :]  # (b, n, k)
        M = s * (Ui[..., :, None] * Uj[..., None, :]
                 + Uj[..., :, None] * Ui[..., None, :])
        M *= Gc[:, None]
        Y = Uc[:, None] @ M @ np.swapaxes(Uc, -1, -2)[:, None]
        # Column p of the Jacobian is svec of the image of E_p.
        out[lo:lo + step] = np.swapaxes(svec(Y), -1, -2)
    return out


# --------------------------------------------------------------------------
# Scalar root finding
# --------------------------------------------------------------------------


def _newton_bisect(f, lo, hi, x, atol, rtol=4e-16, maxiter=500):
    """Root of an increasing-through-zero f on the bracket [lo, hi].

    Assumes f(lo) <= 0 <= f(hi) and returns x with f(x) ~ 0. Takes a
    Newton step when it stays inside the current bracket, and bisects
    otherwise or when the bracket has not halved over the last two steps
    (Newton crawls on the exponential tails), so the bracket width at
    least halves every two iterations.

    Args:
        f: callable x -> (f(x), f'(x)).
        lo, hi: finite bracket.
        x: starting point (moved to the midpoint if outside the bracket).
        atol, rtol: stop once hi - lo, or a Newton step, is at most
            atol + rtol |x|.
        maxiter: iteration cap.
    """
    if not lo < x < hi:
        x = 0.5 * (lo + hi)
    width_prev = width_old = math.inf
    for _ in range(maxiter):
        fx, dfx = f(x)
        if fx == 0.0:
            return x
        if fx < 0:
            lo = x
        else:
            hi = x
        tol = atol + rtol * abs(x)
        if hi - lo <= tol:
            break
        x_new = x - fx / dfx if dfx > 0 else math.nan
        inside = lo < x_new < hi
        if inside and abs(x_new - x) <= tol:
            return x_new
        if not inside or hi - lo > 0.5 * width_old:
            x_new = 0.5 * (lo + hi)
        width_old, width_prev = width_prev, hi - lo
        x = x_new
    return x


def _multiplier(q, grad):
    """Multiplier lam >= 0 with q = v - p = lam grad, in least squares.

    Least squares over all three components: a single component (such as
    z - v_z) can lose every digit to cancellation when lam is tiny and
    grad g is huge.
    """
    return max(float(q @ grad) / float(grad @ grad), 0.0)


def _kkt_jacobian(grad, w, gamma, ug=None):
    """Jacobian of a projection onto {p : g(p) <= 0} with g active.

    The projection p of v satisfies p - v + lam grad g(p) = 0, g(p) = 0.
    Differentiating, with H = I + lam hess g(p) and h = H^{-1} grad g:
    D p = H^{-1} - h h' / (grad g' h), which is symmetric.

    For both cones here lam hess g = gamma w w' has rank one with
    w = (w_x, w_y, 0), so H^{-1} = e_z e_z' + u u' + n n' / (1 + gamma w'w)
    with n = w / ||w|| and u = (-w_y, w_x, 0) / ||w||. Unlike the
    Sherman-Morrison form I - gamma w w' / (1 + gamma w'w), this has no
    cancellation when gamma w'w is huge (projections near an edge of the
    cone, where H^{-1} is nearly singular). `ug` is u . grad when the
    caller knows it in closed form (it may cancel to zero otherwise).
    """
    nw = math.hypot(w[0], w[1])
    if nw == 0.0:
        n, u, shrink = np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1.0
    else:
        n = np.array([w[0], w[1]]) / nw
        u = np.array([-n[1], n[0]])
        with np.errstate(over="ignore"):
            shrink = 1.0 / (1.0 + gamma * nw * nw)
    if ug is None:
        ug = u @ grad[:2]
    ng = n @ grad[:2]
    Hinv = np.zeros((3, 3))
    Hinv[:2, :2] = np.outer(u, u) + shrink * np.outer(n, n)
    Hinv[2, 2] = 1.0
    h = np.append(ug * u + shrink * ng * n, grad[2])
    return Hinv - np.outer(h, h) / (ug * ug + shrink * ng * ng + grad[2] ** 2)


# --------------------------------------------------------------------------
# Exponential cone
# --------------------------------------------------------------------------


def _exp_region(x0, y0, z0):
    """Which formula projects (x0, y0, z0) onto K_exp.

    Returns one of "polar" (-v in K*), "cone" (v in K), "y=0"
    (x0 <= 0, y0 <= 0), "general".
    The polar cone is tested first, so the origin counts as polar.
    """
    # -v in K*, K* = {(u, v, w) : u < 0, -u exp(v/u) <= e w} union
    # {(0, v, w) : v, w >= 0}; with u = -x0 < 0 the condition reads
    # x0 exp(y0/x0 - 1) <= -z0.
    if x0 > 0 and z0 < 0 and y0 <= x0 * (1.0 + math.log(-z0 / x0)):
        return "polar"
    if x0 == 0 and y0 <= 0 and z0 <= 0:
        return "polar"
    # v in K: y > 0 and y exp(x/y) <= z, or y = 0, x <= 0, z >= 0.
    if y0 > 0 and z0 > 0 and x0 <= y0 * math.log(z0 / y0):
        return "cone"
    if y0 == 0 and x0 <= 0 and z0 >= 0:
        return "cone"
    if x0 <= 0 and y0 <= 0:
        return "y=0"
    return "general"


def _exp_rho(x0, y0, z0):
    """Ratio rho = x/y of the projection of a point in the general region.

    The boundary of K with y > 0 is the family of rays s a(rho),
    a = (rho, 1, e^rho), whose outer normal is parallel to
    b(rho) = (1, 1 - rho, -e^-rho) (a . b = 0). Moreau's decomposition
    v = s a + mu b with s, mu > 0 gives, from the first two components,
        s  = ((rho - 1) x0 + y0) / (rho^2 - rho + 1),
        mu = (x0 - rho y0) / (rho^2 - rho + 1),
    and the third component is the root equation
        h(rho) = ((rho - 1) x0 + y0) e^rho - (x0 - rho y0) e^-rho
                 - (rho^2 - rho + 1) z0 = 0.
    On the interval where s > 0 and mu > 0, h runs from <= 0 to >= 0 and
    has exactly one root (the Moreau decomposition is unique). The root
    find uses h e^-|rho|, which has the same sign and cannot overflow.
    """
    scale = max(abs(x0), abs(y0), abs(z0))
    x0, y0, z0 = x0 / scale, y0 / scale, z0 / scale

    def h_scaled(rho):
        # With E = e^-2|rho|, F = e^-|rho|: value and derivative of
        # h e^-|rho| (its derivative is (h' - sign(rho) h) e^-|rho|).
        F = math.exp(-abs(rho))
        E = F * F
        quad = (rho * rho - rho + 1) * z0 * F
        dquad = (2 * rho - 1) * z0 * F
        if rho >= 0:
            val = ((rho - 1) * x0 + y0) - (x0 - rho * y0) * E - quad
            der = (rho * x0 + y0) + (x0 - (rho - 1) * y0) * E - dquad
            return val, der - val
        val = ((rho - 1) * x0 + y0) * E - (x0 - rho * y0) - quad
        der = (rho * x0 + y0) * E + (x0 - (rho - 1) * y0) - dquad
        return val, der + val

    # Bracket: s > 0 <=> rho x0 > x0 - y0; mu > 0 <=> rho y0 < x0.
    lo, hi = -math.inf, math.inf
    if x0 > 0:
        lo = 1 - y0 / x0
    elif x0 < 0:
        hi = 1 - y0 / x0
    if y0 > 0:
        hi = min(hi, x0 / y0)
    elif y0 < 0:
        lo = max(lo, x0 / y0)
    # |rho| beyond 1e150 would overflow rho^2; such ratios only arise from
    # entries 1e150 apart, where the clipped ratio gives the limit point.
    lo, hi = max(lo, -_RHO_MAX), min(hi, _RHO_MAX)
    if lo >= hi:
        return lo

    # A half-infinite bracket is closed by doubling steps away from its
    # finite end until h changes sign (h -> -inf / +inf at the far ends).
    if lo == -_RHO_MAX:
        step = 1.0
        while hi - step > -_RHO_MAX and h_scaled(hi - step)[0] > 0:
            hi, step = hi - step, 2 * step
        lo = max(hi - step, -_RHO_MAX)
    elif hi == _RHO_MAX:
        step = 1.0
        while lo + step < _RHO_MAX and h_scaled(lo + step)[0] < 0:
            lo, step = lo + step, 2 * step
        hi = min(lo + step, _RHO_MAX)
    return _newton_bisect(h_scaled, lo, hi, 0.5 * (lo + hi), atol=1e-15)


def _exp_general(x0, y0, z0):
    """Projection in the general region and its ratio rho = x/y."""
    rho = _exp_rho(x0, y0, z0)
    # The ray direction a = (rho, 1, e^rho) divided by its largest entry,
    # so that nothing overflows.
    n = max(abs(rho), 1.0)
    if rho > math.log(n):
        em = math.exp(-rho)
        b = np.array([rho * em, em, 1.0])
    else:
        b = np.array([rho, 1.0, math.exp(rho)]) / n
    # Closest point of the ray: s = <v, b> / ||b||^2 (exact at the root,
    # and second-order accurate in the distance nearby).
    s = max(x0 * b[0] + y0 * b[1] + z0 * b[2], 0.0) / (b @ b)
    return s * b, rho


def proj_exp(v: np.ndarray) -> np.ndarray:
    """Projection onto the exponential cone.

    K = cl{(x, y, z) : y > 0, y exp(x/y) <= z}. The result is v for v in
    K; 0 for v in the polar cone -K*; (x, 0, max(z, 0)) for x, y <= 0;
    otherwise s (rho, 1, e^rho) on the boundary, with rho the root of the
    univariate equation described in `_exp_rho` (safeguarded Newton,
    ~1e-15 relative accuracy in rho) and s >= 0 the best multiple of that
    ray.

    Args:
        v: array (3,).

    Returns:
        Array (3,).
    """
    x0, y0, z0 = (float(c) for c in v)
    region = _exp_region(x0, y0, z0)
    if region == "cone":
        return np.array([x0, y0, z0])
    if region == "polar":
        return np.zeros(3)
    if region == "y=0":
        return np.array([x0, 0.0, max(z0, 0.0)])
    return _exp_general(x0, y0, z0)[0]


def dproj_exp(v: np.ndarray) -> np.ndarray:
    """Jacobian of `proj_exp`.

    In the general region the projection p = (x, y, z), y > 0, lies on
    g(p) = y exp(x/y) - z = 0 with multiplier lam > 0 (v - p = lam grad g),
    so with rho = x/y: grad g = (e^rho, (1 - rho) e^rho, -1) and
    hess g = e^rho / y [[1, -rho, 0], [-rho, rho^2, 0], [0, 0, 0]], and the
    Jacobian is H^{-1} - h h' / (grad g' h), H = I + lam hess g,
    h = H^{-1} grad g (implicit differentiation of the optimality
    conditions). It is I in K, 0 in -K*, diag(1, 0, [z > 0]) for x, y <= 0.

    Args:
        v: array (3,).

    Returns:
        Dense symmetric array (3, 3).
    """
    x0, y0, z0 = (float(c) for c in v)
    region = _exp_region(x0, y0, z0)
    if region == "cone":
        return np.eye(3)
    if region == "polar":
        return np.zeros((3, 3))
    if region == "y=0":
        return np.diag([1.0, 0.0, float(z0 > 0)])
    p, rho = _exp_general(x0, y0, z0)
    y = p[1]
    # grad g = (e^rho, (1 - rho) e^rho, -1); any positive multiple g of it
    # gives the same Jacobian, so take one that cannot overflow. With
    # v - p = lam grad g = mu g, lam hess g = gamma w w', w = (1, -rho, 0),
    # and gamma = lam e^rho / y (infinite if y underflowed to 0).
    # With u = (rho, 1) / ||w||, u . (1, 1 - rho) = 1 / ||w|| exactly.
    norm_w = math.hypot(1.0, rho)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if rho >= 0:
            g = np.array([1.0, 1.0 - rho, -math.exp(-rho)])  # e^-rho grad
            mu = _multiplier(np.array([x0, y0, z0]) - p, g)
            gamma = np.float64(mu) / y
            ug = 1.0 / norm_w
        else:
            e = math.exp(rho)
            g = np.array([e, (1.0 - rho) * e, -1.0])
            mu = _multiplier(np.array([x0, y0, z0]) - p, g)
            gamma = np.float64(mu) * e / y
            ug = e / norm_w
    if not gamma >= 0:  # 0 / 0: no normal component, H = I
        gamma = 0.0
    return _kkt_jacobian(g, np.array([1.0, -rho, 0.0]), gamma, ug)


# --------------------------------------------------------------------------
# Power cone
# --------------------------------------------------------------------------


def _pow_region(x0, y0, z0, alpha):
    """One of "polar", "cone", "z=0", "general" for the power cone.

    The polar cone is tested first, so the origin counts as polar.
    """
    # Dual cone: (u/a)^a (v/(1-a))^(1-a) >= |w|, u, v >= 0; test -v.
    u, w = -x0, -y0
    if u >= 0 and w >= 0:
        if (u / alpha) ** alpha * (w / (1 - alpha)) ** (1 - alpha) >= abs(z0):
            return "polar"
    if x0 >= 0 and y0 >= 0 and x0**alpha * y0 ** (1 - alpha) >= abs(z0):
        return "cone"
    if z0 == 0:
        return "z=0"
    return "general"


def _pow_xy(x0, y0, r, lam, drl, alpha):
    """Coordinates x, y of the projection given r = |z| and lam = |z0| - r.

    Stationarity of (1/2)||p - v||^2 + lam (|z| - x^a y^(1-a)) at a point
    with x^a y^(1-a) = r gives x^2 - x0 x - a r lam = 0, whose positive
    root is x = (x0 + sqrt(x0^2 + 4 a r lam)) / 2; likewise y with 1 - a.
    Both r and lam are passed so that neither is formed by cancellation.
    `drl` is the derivative of r lam along the root-finding variable.
    Returns x, y and their derivatives along that variable.
    """
    out = []
    for c0, beta in ((x0, alpha), (y0, 1 - alpha)):
        q = 4 * beta * r * lam
        S = math.sqrt(c0 * c0 + q)
        # Avoid cancellation in (c0 + S) / 2 when c0 < 0.
        c = 0.5 * (c0 + S) if c0 >= 0 else 0.5 * q / (S - c0)
        dc = beta * drl / S if S > 0 else 0.0
        out.append((c, dc))
    (x, dx), (y, dy) = out
    return x, y, dx, dy


def _pow_r(x0, y0, z0, alpha):
    """r = |z| and lam = |z0| - r of the projection in the general region.

    r is the root in (0, |z0|) of F(r) = r - x(r)^a y(r)^(1-a), with x(r),
    y(r) from `_pow_xy`; F < 0 near r = 0 (v is not in the polar cone),
    F(|z0|) > 0 (v is not in K), and the root is unique (the projection
    is). The root find runs in r when the root lies in (0, |z0|/2) and in
    lam otherwise, so that the smaller of the two is accurate to relative
    precision.
    """
    scale = max(abs(x0), abs(y0), abs(z0))
    x0, y0, zabs = x0 / scale, y0 / scale, abs(z0) / scale

    def zeta(r, lam, drl):
        x, y, dx, dy = _pow_xy(x0, y0, r, lam, drl, alpha)
        if x <= 0 or y <= 0:
            return 0.0, 0.0
        val = math.exp(alpha * math.log(x) + (1 - alpha) * math.log(y))
        return val, val * (alpha * dx / x + (1 - alpha) * dy / y)

    def F_of_r(r):
        lam = zabs - r
        val, der = zeta(r, lam, lam - r)
        return r - val, 1 - der

    def G_of_lam(lam):
        # G(lam) = -F(|z0| - lam), increasing in lam.
        r = zabs - lam
        val, der = zeta(r, lam, r - lam)
        return val - r, der + 1

    half = 0.5 * zabs
    if F_of_r(half)[0] >= 0:
        r = _newton_bisect(F_of_r, 0.0, half, 0.5 * half, atol=0.0)
        lam = zabs - r
    else:
        lam = _newton_bisect(G_of_lam, 0.0, half, 0.5 * half, atol=0.0)
        r = zabs - lam
    return r * scale, lam * scale


def proj_pow(v: np.ndarray, alpha: float) -> np.ndarray:
    """Projection onto the 3-d power cone.

    K_a = {(x, y, z) : x, y >= 0, x^a y^(1-a) >= |z|}. The result is v for
    v in K; 0 for v in -K*; (max(x, 0), max(y, 0), 0) when z = 0;
    otherwise (x(r), y(r), sign(z) r) with r in (0, |z|) the root of a
    univariate equation (see `_pow_r`), found by safeguarded Newton to
    relative precision in min(r, |z| - r).

    Args:
        v: array (3,).
        alpha: exponent a in (0, 1).

    Returns:
        Array (3,).
    """
    x0, y0, z0 = (float(c) for c in v)
    region = _pow_region(x0, y0, z0, alpha)
    if region == "cone":
        return np.array([x0, y0, z0])
    if region == "polar":
        return np.zeros(3)
    if region == "z=0":
        return np.array([max(x0, 0.0), max(y0, 0.0), 0.0])
    r, lam = _pow_r(x0, y0, z0, alpha)
    x, y, _, _ = _pow_xy(x0, y0, r, lam, 0.0, alpha)
    return np.array([x, y, math.copysign(r, z0)])


def dproj_pow(v: np.ndarray, alpha: float) -> np.ndarray:
    """Jacobian of `proj_pow`.

    In the general region p = (x, y, z) satisfies g(p) = |z| - r = 0 with
    r = x^a y^(1-a), multiplier lam > 0 (v - p = lam grad g),
    grad g = (-a r/x, -(1-a) r/y, sign z) and
    hess g = a (1-a) r [[1/x^2, -1/(xy), 0], [-1/(xy), 1/y^2, 0], [0, 0, 0]];
    the Jacobian is H^{-1} - h h' / (grad g' h), H = I + lam hess g,
    h = H^{-1} grad g. It is I in K and 0 in -K*. At z = 0 (one of x, y
    positive, the other negative) it is diag([x > 0], [y > 0], c), the
    limit of the Jacobian as z -> 0: with b the exponent of the positive
    coordinate, c = 1 if b > 1/2, 0 if b < 1/2, and
    c = pos / (pos + 2 |neg|) if b = 1/2.

    Args:
        v: array (3,).
        alpha: exponent a in (0, 1).

    Returns:
        Dense symmetric array (3, 3).
    """
    x0, y0, z0 = (float(c) for c in v)
    region = _pow_region(x0, y0, z0, alpha)
    if region == "cone":
        return np.eye(3)
    if region == "polar":
        return np.zeros((3, 3))
    if region == "z=0":
        pos, neg, b = (x0, y0, alpha) if x0 > 0 else (y0, x0, 1 - alpha)
        c = 1.0 if b > 0.5 else 0.0 if b < 0.5 else pos / (pos - 2 * neg)
        return np.diag([float(x0 > 0), float(y0 > 0), c])
    p = proj_pow(v, alpha)
    x, y, z = p
    r = abs(z)
    if x <= 0 or y <= 0:
        return np.zeros((3, 3))
    # grad g = (-a r/x, -(1-a) r/y, sign z); use g = (m/r) grad g with
    # m = min(x, y) <= r, whose entries are bounded by 1. Then
    # v - p = lam grad g = mu g gives lam = mu m / r, and
    # lam hess g = gamma w w' with w = (1/x, -1/y, 0), gamma = lam a(1-a) r;
    # rescaled, w~ = m w and gamma~ = gamma / m^2 = mu a (1-a) / m.
    m = min(x, y)
    g = np.array([-alpha * m / x, -(1 - alpha) * m / y,
                  math.copysign(m / r, z)])
    mu = _multiplier(np.array([x0, y0, z0]) - p, g)
    w = np.array([m / x, -m / y, 0.0])
    return _kkt_jacobian(g, w, mu * alpha * (1 - alpha) / m)


# --------------------------------------------------------------------------
# Product cone
# --------------------------------------------------------------------------


def _check_vector(v, dims):
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (dims.size,):
        raise ValueError(
            f"`v` must have shape ({dims.size},) for these cone dims, got "
            f"{v.shape}."
        )
    return v


def _check_batch(V, dims):
    V = np.asarray(V, dtype=np.float64)
    if V.ndim != 2 or V.shape[1] != dims.size:
        raise ValueError(
            f"`V` must have shape (B, {dims.size}) for these cone dims, got "
            f"{V.shape}."
        )
    return V


def _blocks(dims):
    """Yield (kind, start, stop, parameter) for each block in order."""
    i = dims.zero + dims.nonneg
    for k in dims.soc:
        yield "soc", i, i + k, None
        i += k
    for k in dims.psd:
        n = k * (k + 1) // 2
        yield "psd", i, i + n, None
        i += n
    for _ in range(dims.exp):
        yield "exp", i, i + 3, None
        i += 3
    for a in dims.power:
        yield "pow", i, i + 3, a
        i += 3


@functools.lru_cache(maxsize=32)
def _non_soc_blocks(dims):
    """The blocks of ``_blocks`` other than second-order cones (these go
    by ``_soc_runs``), as a tuple."""
    return tuple(b for b in _blocks(dims) if b[0] != "soc")


@functools.lru_cache(maxsize=32)
def _soc_runs(dims):
    """(size, start, count) for each run of consecutive equal-size SOCs."""
    runs = []
    i = dims.zero + dims.nonneg
    for k in dims.soc:
        if runs and runs[-1][0] == k and runs[-1][1] + k * runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([k, i, 1])
        i += k
    return tuple(tuple(r) for r in runs)


def dproj_dual_stack(kind, V, param=None):
    """DPi_{K*} of one non-orthant cone block at each row of V (B, k).

    Returns (B, k, k). The exponential and power cones are not self-dual;
    by Moreau, Pi_{K*}(v) = v + Pi_K(-v), so DPi_{K*}(v) = I - DPi_K(-v).
    """
    if kind == "soc":
        return _dproj_soc_stack(V)
    if kind == "psd":
        return _dproj_psd_stack(V)
    k = V.shape[1]
    return np.stack([np.eye(k) - _dproj_block(kind, -v, param) for v in V])


def _proj_block(kind, v, param):
    if kind == "soc":
        return proj_soc(v)
    if kind == "psd":
        return proj_psd(v)
    if kind == "exp":
        return proj_exp(v)
    return proj_pow(v, param)


def _dproj_block(kind, v, param):
    if kind == "soc":
        return dproj_soc(v)
    if kind == "psd":
        return dproj_psd(v)
    if kind == "exp":
        return dproj_exp(v)
    return dproj_pow(v, param)


def project(v, dims: ConeDims, dual: bool = False) -> np.ndarray:
    """Euclidean projection onto K (or onto K* when `dual`).

    Args:
        v: array (m,), m = dims.size; not mutated.
        dims: the cone.
        dual: project onto the dual cone K* instead: the zero cone becomes
            the free space, exponential and power cones use
            P_K*(v) = v + P_K(-v); the others are self-dual.

    Returns:
        Array (m,), float64.

    Raises:
        ValueError: if `v` does not have shape (dims.size,).
    """
    v = _check_vector(v, dims)
    p = np.empty_like(v)
    z, l = dims.zero, dims.nonneg
    p[:z] = v[:z] if dual else 0.0
    p[z:z + l] = np.maximum(v[z:z + l], 0.0)
    for kind, i, j, param in _blocks(dims):
        if dual and kind in ("exp", "pow"):
            p[i:j] = v[i:j] + _proj_block(kind, -v[i:j], param)
        else:
            p[i:j] = _proj_block(kind, v[i:j], param)
    return p


def dproject(v, dims: ConeDims, dual: bool = False) -> sp.csc_matrix:
    """Jacobian of `project(., dims, dual)` at v.

    Nonnegative entries use the derivative 1 for v > 0 and 0 for v <= 0;
    see the module docstring for the other nonsmooth points.

    Args:
        v: array (m,), m = dims.size; not mutated.
        dims: the cone.
        dual: differentiate the projection onto K* instead, using
            D P_K*(v) = I - D P_K(-v) for exponential and power cones.

    Returns:
        Block-diagonal, symmetric (up to rounding) CSC matrix (m, m),
        float64, with explicit zeros removed.

    Raises:
        ValueError: if `v` does not have shape (dims.size,).
    """
    v = _check_vector(v, dims)
    z, l = dims.zero, dims.nonneg
    diag = np.concatenate(
        [np.full(z, 1.0 if dual else 0.0), (v[z:z + l] > 0).astype(float)]
    )
    blocks = [sp.diags(diag)] if z + l else []
    for kind, i, j, param in _blocks(dims):
        if dual and kind in ("exp", "pow"):
            blocks.append(np.eye(3) - _dproj_block(kind, -v[i:j], param))
        else:
            blocks.append(_dproj_block(kind, v[i:j], param))
    if not blocks:
        return sp.csc_matrix((0, 0))
    D = sp.block_diag(blocks, format="csc")
    D.eliminate_zeros()
    return D


def project_batch(V, dims: ConeDims, dual: bool = False) -> np.ndarray:
    """`project` applied to each row of V.

    Zero, nonnegative, second-order and PSD blocks are vectorized over the
    batch (PSD through one stacked eigendecomposition); exponential and
    power blocks loop over rows.

    Args:
        V: array (B, m), m = dims.size; not mutated.
        dims: the cone.
        dual: project onto K* instead (see `project`).

    Returns:
        Array (B, m), float64.

    Raises:
        ValueError: if `V` does not have shape (B, dims.size).
    """
    V = _check_batch(V, dims)
    P = np.empty_like(V)
    z, l = dims.zero, dims.nonneg
    P[:, :z] = V[:, :z] if dual else 0.0
    P[:, z:z + l] = np.maximum(V[:, z:z + l], 0.0)
    B = V.shape[0]
    # Consecutive second-order cones of one size are projected together.
    for k, i, count in _soc_runs(dims):
        j = i + k * count
        P[:, i:j] = _proj_soc_stack(V[:, i:j].reshape(B * count, k)).reshape(
            B, k * count)
    for kind, i, j, param in _non_soc_blocks(dims):
        Vb = V[:, i:j]
        if kind == "psd":
            w, U = np.linalg.eigh(smat(Vb))
            P[:, i:j] = svec((U * np.maximum(w, 0.0)[:, None, :]) @
                             np.swapaxes(U, -1, -2))
        elif dual:
            for b in range(V.shape[0]):
                P[b, i:j] = Vb[b] + _proj_block(kind, -Vb[b], param)
        else:
            for b in range(V.shape[0]):
                P[b, i:j] = _proj_block(kind, Vb[b], param)
    return P


def degenerate_elements(Y, S, dims, tol=1e-9):
    """Elements whose primal-dual pair is not strictly complementary in
    the way that makes the solution map's derivative undefined at an
    active constraint: a nonnegative entry with y_i = s_i = 0 (an active
    constraint whose multiplier is zero, e.g. a degenerate LP vertex), or
    a second-order cone of size 2 or more with y and s both at its apex
    (e.g. a norm of a residual fitted exactly). "Zero" is tol times
    1 + the element's largest |y| or |s|.

    Returns a boolean array (B,).
    """
    B = Y.shape[0]
    both, scale = _zero_level(Y, S, tol)
    z, l = dims.zero, dims.nonneg
    bad = ((both[:, z:z + l] <= scale).any(axis=1) if l
           else np.zeros(B, bool))
    for k, i, count in _soc_runs(dims):
        if k < 2:
            continue
        block = both[:, i:i + k * count].reshape(B, count, k).max(axis=2)
        bad |= (block <= scale).any(axis=1)
    return bad


def _zero_level(Y, S, tol):
    """max(|y_i|, |s_i|) entry by entry (a block is at zero where its
    largest such entry is), and the level (B, 1) below which an entry
    counts as zero: tol times 1 + the element's largest one."""
    both = np.maximum(np.abs(Y), np.abs(S))
    return both, (tol * (1.0 + both.max(axis=1, initial=0.0)))[:, None]


def flip_degenerate(Y, S, dims, tol=1e-9):
    """(Y, S) with each degenerate part (see :func:`degenerate_elements`,
    same ``tol``) moved to its other side, for the other one-sided
    derivative: a nonnegative entry with y = s = 0 to the other side of 0
    in v = y - s, a second-order cone with both at its apex from inside
    its dual (v = +e e0) to the polar (v = -e e0) or back; e is tol times
    1 + the element's largest |y| or |s|. Other entries are kept (y and s
    are recomputed from v by Moreau's decomposition)."""
    B = Y.shape[0]
    both, scale = _zero_level(Y, S, tol)
    V = Y - S
    z, l = dims.zero, dims.nonneg
    if l:
        Vn = V[:, z:z + l]
        zero = both[:, z:z + l] <= scale
        V[:, z:z + l] = np.where(zero, np.where(Vn > 0, -scale, scale), Vn)
    for k, i, count in _soc_runs(dims):
        if k < 2:
            continue
        j = i + k * count
        Vb = V[:, i:j].reshape(B, count, k)
        apex = both[:, i:j].reshape(B, count, k).max(axis=2) <= scale
        r = np.sqrt(np.einsum("bck,bck->bc", Vb[..., 1:], Vb[..., 1:]))
        flipped = np.zeros_like(Vb)
        flipped[..., 0] = np.where(r <= Vb[..., 0], -1.0, 1.0) * scale
        V[:, i:j] = np.where(apex[..., None], flipped, Vb).reshape(B, -1)
    Y2 = project_batch(V, dims, dual=True)
    return Y2, Y2 - V


@functools.lru_cache(maxsize=32)
def _soc_run_index(i, k, count):
    """Row and column index arrays of a run's (count, k, k) blocks."""
    idx = i + np.arange(count * k).reshape(count, k)
    return idx[:, :, None], idx[:, None, :]


def dproject_batch_dense(V, dims: ConeDims, dual: bool = False) -> np.ndarray:
    """`dproject` for each row of V, as one dense (B, m, m) array.

    For small cones (the full Jacobians of small programs); runs of
    second-order cones of one size are differentiated together.
    """
    V = _check_batch(V, dims)
    B, m = V.shape
    D = np.zeros((B, m, m))
    z, l = dims.zero, dims.nonneg
    if dual and z:
        idx = np.arange(z)
        D[:, idx, idx] = 1.0
    idx = np.arange(z, z + l)
    D[:, idx, idx] = V[:, z:z + l] > 0
    for k, i, count in _soc_runs(dims):
        rows, cols = _soc_run_index(i, k, count)
        Vr = V[:, i:i + k * count].reshape(B * count, k)
        D[:, rows, cols] = _dproj_soc_stack(Vr).reshape(B, count, k, k)
    for kind, i, j, param in _non_soc_blocks(dims):
        if kind == "psd":
            D[:, i:j, i:j] = _dproj_psd_stack(V[:, i:j])
        elif dual:
            D[:, i:j, i:j] = dproj_dual_stack(kind, V[:, i:j], param)
        else:
            D[:, i:j, i:j] = np.stack([_dproj_block(kind, u, param)
                                       for u in V[:, i:j]])
    return D


@functools.lru_cache(maxsize=32)
def _jacobian_pattern(dims: ConeDims):
    """CSC structure of the block-diagonal Jacobian and the data order.

    The data of one Jacobian is the concatenation of the diagonal of the
    zero and nonnegative part and each dense block raveled row-major;
    `perm` reorders it into CSC order.
    """
    m = dims.size
    z_l = dims.zero + dims.nonneg
    rows, cols = [np.arange(z_l)], [np.arange(z_l)]
    for _, i, j, _ in _blocks(dims):
        idx = np.arange(i, j)
        rows.append(np.repeat(idx, j - i))
        cols.append(np.tile(idx, j - i))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    order = sp.coo_matrix(
        (np.arange(1, rows.size + 1, dtype=float), (rows, cols)), shape=(m, m)
    ).tocsc()
    perm = order.data.astype(np.int64) - 1
    return perm, order.indices, order.indptr


def dproject_batch(V, dims: ConeDims, dual: bool = False) -> list:
    """`dproject` for each row of V.

    Second-order and PSD blocks are differentiated for the whole batch at
    once; exponential and power blocks loop over rows.

    Args:
        V: array (B, m), m = dims.size; not mutated.
        dims: the cone.
        dual: differentiate the projection onto K* instead.

    Returns:
        List of B CSC matrices (m, m), as returned by `dproject`.

    Raises:
        ValueError: if `V` does not have shape (B, dims.size).
    """
    V = _check_batch(V, dims)
    B, m = V.shape
    if B == 0:
        return []
    z, l = dims.zero, dims.nonneg
    parts = [
        np.full((B, z), 1.0 if dual else 0.0),
        (V[:, z:z + l] > 0).astype(float),
    ]
    for kind, i, j, param in _blocks(dims):
        Vb = V[:, i:j]
        if kind == "soc":
            D = _dproj_soc_stack(Vb)
        elif kind == "psd":
            D = _dproj_psd_stack(Vb)
        elif dual:
            D = np.stack([np.eye(3) - _dproj_block(kind, -u, param)
                          for u in Vb])
        else:
            D = np.stack([_dproj_block(kind, u, param) for u in Vb])
        parts.append(D.reshape(B, -1))
    data = np.concatenate(parts, axis=1)
    perm, indices, indptr = _jacobian_pattern(dims)
    out = []
    for b in range(B):
        D = sp.csc_matrix((data[b, perm], indices.copy(), indptr.copy()),
                          shape=(m, m))
        D.eliminate_zeros()
        out.append(D)
    return out
