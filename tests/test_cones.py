"""Tests for optlayer.cones: projections onto cones and their derivatives."""

import math

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp
import scs

from optlayer import cones
from optlayer.cones import ConeDims

ALPHAS = (0.3, 0.5, 0.8)
MIXED = ConeDims(zero=2, nonneg=3, soc=(4, 1, 3), psd=(3, 1), exp=3,
                 power=ALPHAS)
CLARABEL_TOL = dict(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)


# --------------------------------------------------------------------------
# Independent helpers: membership, finite differences, sample points
# --------------------------------------------------------------------------


def _mat(v):
    """Symmetric matrix of an svec vector, written without cones.smat."""
    k = int(round((math.sqrt(8 * v.size + 1) - 1) / 2))
    X = np.zeros((k, k))
    idx = 0
    for j in range(k):
        for i in range(j, k):
            X[i, j] = X[j, i] = v[idx] if i == j else v[idx] / math.sqrt(2)
            idx += 1
    return X


def _exp_le(c, t, w, tol):
    """Whether c exp(t) <= w + tol, for c > 0, without overflow."""
    bound = w + tol
    return bound > 0 and t + math.log(c) <= math.log(bound)


def _in_exp(p, tol):
    # K = {y > 0, y exp(x/y) <= z} plus {y = 0, x <= 0, z >= 0}.
    x, y, z = p
    if y > 0 and _exp_le(y, x / y, z, tol):
        return True
    return abs(y) <= tol and x <= tol and z >= -tol


def _in_exp_dual(d, tol):
    # K* = {(u, v, w): u < 0, -u exp(v/u) <= e w} plus {u = 0, v, w >= 0}.
    u, v, w = d
    if u < 0 and _exp_le(-u, v / u - 1, w, tol):
        return True
    return abs(u) <= tol and v >= -tol and w >= -tol


def _in_pow(p, a, tol):
    x, y, z = p
    gm = max(x, 0) ** a * max(y, 0) ** (1 - a)
    return x >= -tol and y >= -tol and gm >= abs(z) - tol


def _in_pow_dual(d, a, tol):
    u, v, w = d
    gm = (max(u, 0) / a) ** a * (max(v, 0) / (1 - a)) ** (1 - a)
    return u >= -tol and v >= -tol and gm >= abs(w) - tol


def _member(p, dims, dual, tol):
    """Whether p lies in K (or K* if dual), block by block."""
    z, l = dims.zero, dims.nonneg
    ok = dual or np.all(np.abs(p[:z]) <= tol)
    ok &= np.all(p[z:z + l] >= -tol)
    i = z + l
    for k in dims.soc:
        ok &= np.linalg.norm(p[i + 1:i + k]) <= p[i] + tol
        i += k
    for k in dims.psd:
        n = k * (k + 1) // 2
        ok &= np.linalg.eigvalsh(_mat(p[i:i + n])).min() >= -tol
        i += n
    for _ in range(dims.exp):
        ok &= (_in_exp_dual if dual else _in_exp)(p[i:i + 3], tol)
        i += 3
    for a in dims.power:
        ok &= (_in_pow_dual if dual else _in_pow)(p[i:i + 3], a, tol)
        i += 3
    return bool(ok)


def _fd_jacobian(f, v, h=1e-6):
    """Central finite-difference Jacobian of f at v."""
    J = np.empty((v.size, v.size))
    for i in range(v.size):
        e = np.zeros(v.size)
        e[i] = h
        J[:, i] = (f(v + e) - f(v - e)) / (2 * h)
    return J


def _exp_ray(rho):
    """Boundary ray a(rho) of K_exp and its outer normal b(rho)."""
    return (np.array([rho, 1.0, math.exp(rho)]),
            np.array([1.0, 1.0 - rho, -math.exp(-rho)]))


def _exp_points(rng):
    """Points in all four regions of the exponential-cone projection."""
    pts = [rng.standard_normal(3) * rng.choice([0.1, 1.0, 10.0])
           for _ in range(40)]
    for _ in range(8):
        rho = rng.uniform(-3, 3)
        a, b = _exp_ray(rho)
        # v = s a + mu b lies in the general region; s or mu small puts it
        # next to the polar cone or next to K.
        for s, mu in ((1.0, 1.0), (1e-2, 1.0), (1.0, 1e-2)):
            pts.append(s * a + mu * b)
        # Strictly inside K, strictly inside the polar cone -K*.
        pts.append(a + np.array([-0.3, 0.1, 0.5]))
        pts.append(b + np.array([0.3, -0.2, -0.5]) * math.exp(-rho))
    # x, y < 0, with z on either side of 0.
    pts += [np.array([-1.0, -0.5, 2.0]), np.array([-0.2, -3.0, -1.0])]
    return pts


def _pow_boundary(a, x, y, sign):
    """Point p on the boundary of K_a and a multiple of its normal."""
    r = x**a * y ** (1 - a)
    p = np.array([x, y, sign * r])
    grad = np.array([-a * r / x, -(1 - a) * r / y, sign])
    return p, grad


def _pow_points(rng, a):
    pts = [rng.standard_normal(3) * rng.choice([0.1, 1.0, 10.0])
           for _ in range(30)]
    for _ in range(8):
        x, y = rng.uniform(0.2, 2.0, size=2)
        p, grad = _pow_boundary(a, x, y, rng.choice([-1.0, 1.0]))
        for lam in (1.0, 1e-2):
            pts.append(p + lam * grad)
        pts.append(p * 1e-2 + grad)  # next to the polar cone
        pts.append(p + np.array([0.5, 0.5, 0.0]))  # inside K
    return pts


def _soc_points(rng, k):
    pts = [rng.standard_normal(k) for _ in range(20)]
    for _ in range(5 if k > 1 else 0):  # k = 1 has only the kink t = 0
        x = rng.standard_normal(k - 1)
        r = np.linalg.norm(x)
        for t in (0.99 * r, -0.99 * r, 0.5 * r):
            pts.append(np.concatenate(([t], x)))
    return pts


def _psd_points(rng, k):
    pts = []
    for _ in range(10):
        U, _ = np.linalg.qr(rng.standard_normal((k, k)))
        w = rng.uniform(-2, 2, size=k)
        w[0] = 1e-2  # an eigenvalue close to 0, but not at it
        pts.append(cones.svec((U * w) @ U.T))
    return pts


# --------------------------------------------------------------------------
# ConeDims
# --------------------------------------------------------------------------


def test_dims_size_and_scs_round_trip():
    assert MIXED.size == 2 + 3 + 8 + 6 + 1 + 9 + 9
    assert ConeDims.from_scs(MIXED.to_scs()) == MIXED
    assert ConeDims.from_scs({}) == ConeDims()
    assert ConeDims.from_scs({"l": 2, "ed": 0}) == ConeDims(nonneg=2)


@pytest.mark.parametrize(
    "cone, message",
    [
        ({"l": 1, "ed": 2}, r"Dual exponential cones \(`ed`=2\)"),
        ({"p": [0.5, -0.3]}, r"Dual power cones \(negative exponents "
                             r"\[-0.3\]"),
        ({"l": 1, "bu": [1.0], "bl": [0.0]}, r"Unsupported SCS cone keys "
                                             r"\['bl', 'bu'\]"),
        ({"f": 3}, r"Unsupported SCS cone keys \['f'\]"),
        ({"p": [1.5]}, r"`power` exponents must lie in \(0, 1\)"),
        ({"q": [0]}, r"`soc` sizes must be positive"),
        ({"l": -1}, r"`nonneg` must be a nonnegative integer"),
    ],
)
def test_from_scs_errors(cone, message):
    with pytest.raises(ValueError, match=message):
        ConeDims.from_scs(cone)


def test_wrong_shapes_raise():
    m = MIXED.size
    with pytest.raises(ValueError, match=rf"`v` must have shape \({m},\)"):
        cones.project(np.zeros(m - 1), MIXED)
    with pytest.raises(ValueError, match=rf"`V` must have shape \(B, {m}\)"):
        cones.dproject_batch(np.zeros(m), MIXED)


# --------------------------------------------------------------------------
# svec convention
# --------------------------------------------------------------------------


def test_svec_is_scaled_lower_triangle_column_major():
    X = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    r2 = math.sqrt(2)
    np.testing.assert_allclose(cones.svec(X),
                               [1, 2 * r2, 3 * r2, 4, 5 * r2, 6])
    np.testing.assert_allclose(cones.smat(cones.svec(X)), X)
    # Isometry: svec(X) . svec(Y) = tr(XY).
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((2, 4, 4))
    A, B = A + A.T, B + B.T
    assert cones.svec(A) @ cones.svec(B) == pytest.approx(np.trace(A @ B))


def test_svec_matches_scs_psd_cone():
    # min tr(C X) s.t. tr X = 1, X PSD has solution u u', u the eigenvector
    # of the smallest eigenvalue of C; SCS returns it in its own PSD
    # vectorization, which must be ours.
    rng = np.random.default_rng(1)
    k = 3
    C = rng.standard_normal((k, k))
    C = C + C.T
    n = k * (k + 1) // 2
    A = sp.csc_matrix(np.vstack([cones.svec(np.eye(k))[None], -np.eye(n)]))
    b = np.concatenate([[1.0], np.zeros(n)])
    solver = scs.SCS(dict(A=A, b=b, c=cones.svec(C)),
                     ConeDims(zero=1, psd=(k,)).to_scs(),
                     eps_abs=1e-10, eps_rel=1e-10, verbose=False)
    sol = solver.solve()
    assert sol["info"]["status"] == "solved"
    u = np.linalg.eigh(C)[1][:, 0]
    np.testing.assert_allclose(sol["x"], cones.svec(np.outer(u, u)),
                               atol=1e-7)


# --------------------------------------------------------------------------
# Projections
# --------------------------------------------------------------------------

SINGLE_DIMS = {
    "zero": ConeDims(zero=4),
    "nonneg": ConeDims(nonneg=6),
    "soc": ConeDims(soc=(5, 1, 2)),
    "psd": ConeDims(psd=(4, 2)),
    "exp": ConeDims(exp=4),
    "pow": ConeDims(power=ALPHAS),
    "mixed": MIXED,
}


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("name", list(SINGLE_DIMS))
def test_projection_properties(name, dual):
    dims = SINGLE_DIMS[name]
    rng = np.random.default_rng(2)
    for _ in range(30):
        v = rng.standard_normal(dims.size) * rng.choice([0.1, 1.0, 10.0])
        p = cones.project(v, dims, dual=dual)
        # Membership and idempotence, to 1e-9 relative: the root finds
        # stop at ~1e-15 in their variable, eigh is backward stable.
        tol = 1e-9 * max(1.0, np.linalg.norm(v))
        assert _member(p, dims, dual, tol)
        np.testing.assert_allclose(cones.project(p, dims, dual=dual), p,
                                   rtol=0, atol=tol)
        # Moreau: v = P_C(v) - P_C*(-v) with orthogonal parts, where C is
        # K or K* and C* its dual.
        d = cones.project(-v, dims, dual=not dual)
        assert _member(d, dims, not dual, tol)
        np.testing.assert_allclose(p - d, v, rtol=0, atol=tol)
        assert abs(p @ d) <= tol * np.linalg.norm(v)


def test_exp_regions():
    # v in K, v in -K*, x, y <= 0, and the general case.
    a, b = _exp_ray(0.7)
    np.testing.assert_array_equal(cones.proj_exp(2 * a + [0, 0, 1]),
                                  2 * a + [0, 0, 1])
    np.testing.assert_array_equal(cones.proj_exp(3 * b - [0, 0, 1]),
                                  np.zeros(3))
    np.testing.assert_array_equal(cones.proj_exp([-1.0, -2.0, 3.0]),
                                  [-1.0, 0.0, 3.0])
    np.testing.assert_array_equal(cones.proj_exp([-1.0, -2.0, -3.0]),
                                  [-1.0, 0.0, 0.0])
    # General case: v = s a + mu b projects to s a, for s, mu > 0.
    for rho in (-20.0, -2.0, 0.0, 0.5, 3.0, 15.0):
        a, b = _exp_ray(rho)
        for s, mu in ((1.0, 1.0), (1e-3, 1.0), (1.0, 1e-3), (5.0, 0.2)):
            v = s * a + mu * b
            np.testing.assert_allclose(cones.proj_exp(v), s * a,
                                       rtol=1e-12, atol=1e-12 * np.abs(v).max())


def test_pow_known_projection():
    rng = np.random.default_rng(3)
    for a in ALPHAS:
        for _ in range(10):
            x, y = rng.uniform(0.05, 3.0, size=2)
            p, grad = _pow_boundary(a, x, y, rng.choice([-1.0, 1.0]))
            v = p + rng.uniform(1e-3, 3.0) * grad
            np.testing.assert_allclose(cones.proj_pow(v, a), p,
                                       rtol=1e-11, atol=1e-12)
        # z = 0 with mixed signs projects onto the quadrant.
        np.testing.assert_array_equal(cones.proj_pow([2.0, -1.0, 0.0], a),
                                      [2.0, 0.0, 0.0])


def _cvxpy_projection(v, constraint):
    p = cp.Variable(v.size)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(p - v)), constraint(p))
    prob.solve(solver=cp.CLARABEL, **CLARABEL_TOL)
    assert prob.status == cp.OPTIMAL
    return p.value


def test_exp_matches_cvxpy():
    rng = np.random.default_rng(4)
    for _ in range(6):
        v = rng.standard_normal(3)
        ref = _cvxpy_projection(
            v, lambda p: [cp.constraints.ExpCone(p[0], p[1], p[2])])
        # Interior-point solution to ~1e-11 gap: 1e-6 in the point.
        np.testing.assert_allclose(cones.proj_exp(v), ref, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_pow_matches_cvxpy(alpha):
    rng = np.random.default_rng(5)
    for _ in range(3):
        v = rng.standard_normal(3)
        ref = _cvxpy_projection(
            v, lambda p: [cp.PowCone3D(p[0], p[1], p[2], alpha)])
        np.testing.assert_allclose(cones.proj_pow(v, alpha), ref, atol=1e-6)


def test_psd_matches_cvxpy():
    rng = np.random.default_rng(6)
    for k in (2, 3, 4):
        V = rng.standard_normal((k, k))
        V = V + V.T
        X = cp.Variable((k, k), symmetric=True)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(X - V)), [X >> 0])
        prob.solve(solver=cp.CLARABEL, **CLARABEL_TOL)
        assert prob.status == cp.OPTIMAL
        np.testing.assert_allclose(cones.proj_psd(cones.svec(V)),
                                   cones.svec(X.value), atol=1e-6)


def test_soc_closed_form():
    np.testing.assert_allclose(cones.proj_soc([0.0, 3.0, 4.0]),
                               [2.5, 1.5, 2.0])
    np.testing.assert_array_equal(cones.proj_soc([-5.0, 3.0, 4.0]), 0.0)
    np.testing.assert_array_equal(cones.proj_soc([5.0, 3.0, 4.0]),
                                  [5.0, 3.0, 4.0])
    np.testing.assert_array_equal(cones.proj_soc([-1.0]), [0.0])


# --------------------------------------------------------------------------
# Derivatives
# --------------------------------------------------------------------------

# Central differences with h = 1e-6 have O(h^2 |f'''|) truncation error and
# O(eps |f| / h) ~ 1e-10 rounding error; near a boundary at distance d,
# |f'''| ~ 1/d^2, so with d >= 1e-2 the total stays below ~1e-7. atol 1e-6
# leaves margin; a wrong formula is off by O(1).
FD_ATOL = 1e-6


def _check_block_derivative(proj, dproj, points, dual):
    for v in points:
        v = np.asarray(v, dtype=float)
        if dual:
            # P_K*(v) = v + P_K(-v), D P_K*(v) = I - D P_K(-v).
            f = lambda u: u + proj(-u)  # noqa: E731
            J = np.eye(v.size) - dproj(-v)
        else:
            f, J = proj, dproj(v)
        scale = max(1.0, np.abs(v).max())
        Jfd = _fd_jacobian(f, v, h=1e-6 * scale)
        np.testing.assert_allclose(J, Jfd, rtol=0, atol=FD_ATOL,
                                   err_msg=f"at v = {v!r}")
        # Symmetric up to rounding (it is the Hessian of the squared
        # distance's complement, a convex function).
        np.testing.assert_allclose(J, J.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dual", [False, True])
def test_dproj_exp_finite_differences(dual):
    rng = np.random.default_rng(7)
    _check_block_derivative(cones.proj_exp, cones.dproj_exp,
                            _exp_points(rng), dual)


@pytest.mark.parametrize("dual", [False, True])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_dproj_pow_finite_differences(alpha, dual):
    rng = np.random.default_rng(8)
    _check_block_derivative(lambda v: cones.proj_pow(v, alpha),
                            lambda v: cones.dproj_pow(v, alpha),
                            _pow_points(rng, alpha), dual)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_dproj_soc_finite_differences(k):
    rng = np.random.default_rng(9)
    _check_block_derivative(cones.proj_soc, cones.dproj_soc,
                            _soc_points(rng, k), dual=False)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dproj_psd_finite_differences(k):
    rng = np.random.default_rng(10)
    _check_block_derivative(cones.proj_psd, cones.dproj_psd,
                            _psd_points(rng, k), dual=False)


def test_exp_derivative_near_edge():
    # Projections within ~1e-16 of the edge y = 0 of K (rho ~ 40): the
    # Jacobian is close to diag(0, 0, 1) and must stay finite and accurate.
    v = np.array([0.0417025887, -1.6174675, 1.109638])
    J = cones.dproj_exp(v)
    np.testing.assert_allclose(J, np.diag([0.0, 0.0, 1.0]), atol=1e-9)
    # Power cone: projection with y ~ 1e-19, Jacobian ~ diag(1, 0, 1).
    v = np.array([2.733623, -1.18354636, -3.5252967e-04])
    J = cones.dproj_pow(v, 0.8)
    np.testing.assert_allclose(J, np.diag([1.0, 0.0, 1.0]), atol=1e-9)


@pytest.mark.parametrize("dual", [False, True])
def test_dproject_mixed_finite_differences(dual):
    rng = np.random.default_rng(11)
    for _ in range(5):
        v = rng.standard_normal(MIXED.size)
        J = cones.dproject(v, MIXED, dual=dual)
        assert sp.issparse(J) and J.format == "csc"
        J = J.toarray()
        Jfd = _fd_jacobian(lambda u: cones.project(u, MIXED, dual=dual), v)
        np.testing.assert_allclose(J, Jfd, rtol=0, atol=FD_ATOL)
        np.testing.assert_allclose(J, J.T, rtol=0, atol=1e-10)


def test_derivative_conventions_at_kinks():
    # Nonnegative entry at exactly 0 and the SOC at its apex: the zero map.
    dims = ConeDims(nonneg=2, soc=(3,))
    J = cones.dproject(np.array([0.0, 1.0, 0.0, 0.0, 0.0]), dims).toarray()
    np.testing.assert_array_equal(J, np.diag([0.0, 1.0, 0.0, 0.0, 0.0]))
    # Exponential and power cones at the origin: the zero map too.
    np.testing.assert_array_equal(cones.dproj_exp(np.zeros(3)), 0.0)
    np.testing.assert_array_equal(cones.dproj_pow(np.zeros(3), 0.4), 0.0)
    # On the boundary of K away from the origin: the identity, the limit
    # from inside K.
    np.testing.assert_array_equal(cones.dproj_exp([-1.0, 0.0, 2.0]),
                                  np.eye(3))
    np.testing.assert_array_equal(cones.dproj_soc([5.0, 3.0, 4.0]),
                                  np.eye(3))
    # Zero cone: 0 for K = {0}, identity for K* = free space.
    dims = ConeDims(zero=2)
    assert cones.dproject(np.ones(2), dims).nnz == 0
    np.testing.assert_array_equal(
        cones.dproject(np.ones(2), dims, dual=True).toarray(), np.eye(2))
    # Power cone at z = 0 (mixed signs): the limit of the Jacobian as
    # z -> 0, a valid element of the generalized Jacobian.
    for a in ALPHAS:
        for v in ([1.3, -0.7, 0.0], [-0.6, 0.9, 0.0]):
            J0 = cones.dproj_pow(v, a)
            Jz = cones.dproj_pow(np.array(v) + [0, 0, 1e-9], a)
            np.testing.assert_allclose(J0, Jz, atol=1e-6)


# --------------------------------------------------------------------------
# Batch helpers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dual", [False, True])
def test_batch_matches_single(dual):
    rng = np.random.default_rng(12)
    V = rng.standard_normal((7, MIXED.size)) * 2.0
    V[0, MIXED.zero + MIXED.nonneg] = 0.0  # a nonnegative entry at its kink
    P = cones.project_batch(V, MIXED, dual=dual)
    Js = cones.dproject_batch(V, MIXED, dual=dual)
    assert P.shape == V.shape and len(Js) == V.shape[0]
    for b, v in enumerate(V):
        np.testing.assert_allclose(P[b], cones.project(v, MIXED, dual=dual),
                                   rtol=1e-13, atol=1e-13)
        J = cones.dproject(v, MIXED, dual=dual)
        assert Js[b].format == "csc"
        np.testing.assert_allclose(Js[b].toarray(), J.toarray(),
                                   rtol=1e-12, atol=1e-12)


def test_batch_psd_larger_orders():
    # The stacked PSD derivative against the per-matrix formula.
    rng = np.random.default_rng(13)
    dims = ConeDims(psd=(6,))
    V = rng.standard_normal((3, dims.size))
    Js = cones.dproject_batch(V, dims)
    for b, v in enumerate(V):
        np.testing.assert_allclose(Js[b].toarray(), cones.dproj_psd(v),
                                   atol=1e-12)


# Second-order cones of distinct sizes, and of repeated sizes in an
# interleaved order (the reduced systems treat the cones of one size
# together).
SOC_LAYOUTS = [(1, 2, 4, 5), (3, 1, 3, 4, 3, 1, 4)]


@pytest.mark.parametrize("soc", SOC_LAYOUTS, ids=str)
def test_reduced_structure_applies_the_projection_derivative(soc):
    # The reduced systems apply P = DPi_{K*} blockwise in closed form
    # (second-order cones through e1, e0 and the middle projector, other
    # cones through an eigendecomposition); check P z against the sparse
    # derivative on every kind of cone and every region of the SOC.
    from optlayer import reduced

    rng = np.random.default_rng(0)
    dims = ConeDims(zero=2, nonneg=3, soc=soc, psd=(2,), exp=1,
                    power=(0.3,))
    m = 2 + 3 + sum(soc) + 3 + 3 + 3
    V = rng.normal(size=(40, m))
    V[:8, 5] = 9.0      # first SOC inside
    V[8:16, 5] = -9.0   # ... and in the polar
    if soc[:2] == (1, 2):
        V[:, 7] = 1.0   # (t, x) of the 2-d SOC: inside
    else:
        V[16:24, 9] = 9.0   # the second cone of size 3: inside
    Z = rng.normal(size=(40, m))
    got = reduced.Structure(V, dims).apply_P(Z)
    for b in range(40):
        D = cones.dproject(V[b], dims, dual=True).toarray()
        np.testing.assert_allclose(got[b], D @ Z[b], atol=1e-12)


@pytest.mark.parametrize("soc", SOC_LAYOUTS, ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_reduced_solves_match_the_full_jacobian(soc, shared):
    # Newton step and adjoint from the reduced system equal direct solves
    # with J = [[0, A'P], [-A, I - P]] and J' wherever J is well
    # conditioned (random data, all cone kinds, hard and soft directions;
    # one A per element, or one for all).
    from optlayer import reduced

    rng = np.random.default_rng(1)
    dims = ConeDims(zero=2, nonneg=3, soc=soc, psd=(2,), exp=1)
    # n large enough for J to be nonsingular for most points: about the
    # number of hard directions.
    m, n, B = 2 + 3 + sum(soc) + 3 + 3, 10 if len(soc) < 5 else 20, 40
    V = rng.normal(size=(B, m))
    V[:8, 5] = 9.0
    V[8:16, 5] = -9.0
    st = reduced.Structure(V, dims)
    if shared:
        Ad = np.broadcast_to(rng.normal(size=(m, n)), (B, m, n)).copy()
    else:
        Ad = rng.normal(size=(B, m, n))
    system = reduced.System(Ad, st, shared)
    F1, F2 = rng.normal(size=(B, n)), rng.normal(size=(B, m))
    g1, g2 = rng.normal(size=(B, n)), rng.normal(size=(B, m))
    dx, dv = system.newton(F1, F2)
    r1, r2 = system.adjoint(g1, g2)
    checked = 0
    for b in range(B):
        D = cones.dproject(V[b], dims, dual=True).toarray()
        J = np.block([[np.zeros((n, n)), Ad[b].T @ D],
                      [-Ad[b], np.eye(m) - D]])
        if np.linalg.cond(J) > 1e8:
            continue
        checked += 1
        # Two direct solves of equivalent systems with cond(J) <= 1e8 and
        # O(1) data agree to about 1e-16 * 1e8.
        step = np.linalg.solve(J, -np.concatenate([F1[b], F2[b]]))
        np.testing.assert_allclose(np.concatenate([dx[b], dv[b]]), step,
                                   atol=1e-8)
        adj = np.linalg.solve(J.T, np.concatenate([g1[b], g2[b]]))
        np.testing.assert_allclose(np.concatenate([r1[b], r2[b]]), adj,
                                   atol=1e-8)
    assert checked >= B // 2


@pytest.mark.parametrize("shared", [False, True])
def test_reduced_solves_with_bound_rows_match_the_full_jacobian(shared):
    # Hard rows of the zero and nonnegative cones with one nonzero (bounds)
    # fix their column and leave the reduced system; two such rows on one
    # column stay ordinary hard rows. Newton steps and adjoints must still
    # equal direct solves with J and J', with A per element or shared.
    from optlayer import reduced

    rng = np.random.default_rng(2)
    dims = ConeDims(zero=2, nonneg=5, soc=(4,), exp=1)
    m, n, B = 2 + 5 + 4 + 3, 8, 40
    V = rng.normal(size=(B, m))
    V[:, :2] = 1.0                      # zero cone: always hard
    V[:20, 2:7] = np.abs(V[:20, 2:7])   # active bounds in half the batch
    # Rows 2 and 3 bound the same variable; both active (degenerate, J
    # singular) only in the first 4 elements.
    V[4:, 3] = -np.abs(V[4:, 3])
    base = rng.normal(size=(m, n))
    base[0] = 0.0
    base[0, 1] = 2.0                    # x_1 = const
    base[2] = 0.0
    base[2, 3] = -1.0                   # x_3 >= const ...
    base[3] = 0.0
    base[3, 3] = 1.0                    # ... and x_3 <= const: not pinned
    base[4] = 0.0
    base[4, 5] = -3.0                   # -3 x_5 <= const
    if shared:
        Ad = np.broadcast_to(base, (B, m, n)).copy()
    else:
        Ad = base + 0.1 * rng.normal(size=(B, m, n)) * (base != 0)
    st = reduced.Structure(V, dims)
    system = reduced.System(Ad, st, shared)
    assert system.any_pin and system.pinned[:20, [1, 5]].all()
    # Column 3 is pinned where exactly one of its two bound rows is hard.
    hard2, hard3 = V[:, 2] > 0, V[:, 3] > 0
    assert not system.pinned[hard2 & hard3, 3].any()
    assert system.pinned[hard2 ^ hard3, 3].all()
    F1, F2 = rng.normal(size=(B, n)), rng.normal(size=(B, m))
    g1, g2 = rng.normal(size=(B, n)), rng.normal(size=(B, m))
    dx, dv = system.newton(F1, F2)
    r1, r2 = system.adjoint(g1, g2)
    checked = 0
    for b in range(B):
        D = cones.dproject(V[b], dims, dual=True).toarray()
        J = np.block([[np.zeros((n, n)), Ad[b].T @ D],
                      [-Ad[b], np.eye(m) - D]])
        if np.linalg.cond(J) > 1e8:
            continue
        checked += 1
        # As in the test above: cond(J) <= 1e8, O(1) data.
        step = np.linalg.solve(J, -np.concatenate([F1[b], F2[b]]))
        np.testing.assert_allclose(np.concatenate([dx[b], dv[b]]), step,
                                   atol=1e-8)
        adj = np.linalg.solve(J.T, np.concatenate([g1[b], g2[b]]))
        np.testing.assert_allclose(np.concatenate([r1[b], r2[b]]), adj,
                                   atol=1e-8)
    assert checked >= B // 2


def test_regularized_solve_keeps_nonsingular_elements_exact():
    # One exactly singular matrix makes LAPACK fail the whole stack; the
    # others must still get their exact solutions (regularized solve plus
    # one round of iterative refinement), the singular but consistent one
    # a solution with a small residual.
    from optlayer import reduced

    rng = np.random.default_rng(3)
    B, n, r = 6, 4, 3
    N = n + r
    K = np.zeros((B, N, N))
    for b in range(B):
        H = rng.normal(size=(n, n))
        Ah = rng.normal(size=(r, n))
        K[b, :n, :n] = H @ H.T
        K[b, :n, n:] = Ah.T
        K[b, n:, :n] = Ah
    K[2, n:, :n] = 0.0
    K[2, :n, n:] = 0.0               # hard rows all zero: singular
    rhs = rng.normal(size=(B, N))
    rhs[2, n:] = 0.0                 # ... but consistent
    sol = reduced._solve_regularized(K, rhs, n)
    for b in range(B):
        if b == 2:
            res = np.abs(K[b] @ sol[b] - rhs[b]).max()
            assert res < 1e-8
        else:
            # Condition numbers here are below 1e4: 1e-10 is ample.
            np.testing.assert_allclose(sol[b], np.linalg.solve(K[b], rhs[b]),
                                       rtol=1e-10, atol=1e-10)
