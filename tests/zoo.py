"""The shared problem zoo: small parametrized DPP problems for every test.

Each :class:`Case` builds a fresh CVXPY problem with its parameters and the
requested outputs, samples parameter values that keep the problem feasible,
bounded and (where a closed form is checked) away from kinks, and says which
parameters get a batch dimension in mixed batched/unbatched tests. Some cases
carry the closed-form solution and its vector-Jacobian product, so the layer
can be checked against exact answers, not only against another solver.

Fixed problem data (matrices that are not parameters) come from seeded
generators at import time, so every build of a case is the same problem.

Example:
    >>> case = get_case("relu")
    >>> problem, params, variables = case.build()
    >>> values = make_inputs(case, np.random.default_rng(0), batch_size=5)
"""

import dataclasses
from collections.abc import Callable

import cvxpy as cp
import numpy as np

# Closed forms are only checked where every kink is at least this far away,
# so that central differences with small steps never straddle one.
KINK_MARGIN = 1e-2


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One problem of the zoo.

    Attributes:
        name: unique name, used as the pytest id.
        tags: cone and problem classes, e.g. ``{"lp"}``, ``{"exp"}``.
        build: ``() -> (problem, parameters, variables)``; a fresh problem on
            every call, parameters in the layer's input order, variables the
            outputs (may include ``constraint.dual_variables[0]``).
        sample: ``rng -> list`` of unbatched float64 values, one per
            parameter.
        batch_mask: which parameters get a batch dimension in mixed tests.
        layer_kwargs: keyword arguments for ``optlayer.Layer``.
        closed_form: optional ``values -> tuple of outputs`` for unbatched
            values.
        closed_form_grad: optional ``(values, cotangents) -> tuple of
            gradients`` for unbatched values.
        accept: optional ``values -> bool``; :func:`make_inputs` redraws a
            batch element until it holds for the combined (batched and
            shared) values of that element. Used to keep combinations of
            independently drawn parameters away from kinks.
    """

    name: str
    tags: frozenset
    build: Callable
    sample: Callable
    batch_mask: tuple
    layer_kwargs: dict = dataclasses.field(default_factory=dict)
    closed_form: Callable | None = None
    closed_form_grad: Callable | None = None
    accept: Callable | None = None


def _data(seed):
    """A seeded generator for a case's fixed (non-parameter) data."""
    return np.random.default_rng(1000 + seed)


def _param(shape, name, **attrs):
    return cp.Parameter(shape, name=name, **attrs)


def _orthogonal(rng, n):
    """A random orthogonal matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


# -- lp: min c'x s.t. Ax <= b, -1 <= x <= 1 ---------------------------------

_LP_A = _data(1).normal(size=(3, 4))


def _lp_build():
    x = cp.Variable(4, name="x")
    c = _param(4, "c")
    b = _param(3, "b")
    problem = cp.Problem(cp.Minimize(c @ x),
                         [_LP_A @ x <= b, x >= -1, x <= 1])
    return problem, [c, b], [x]


def _lp_sample(rng):
    # b > 0 keeps x = 0 feasible; the box keeps the LP bounded.
    return [rng.normal(size=4), rng.uniform(0.2, 1.0, size=3)]


# -- qp: min 1/2 x'Px + q'x s.t. Gx <= h, Fx = g -----------------------------

_QP_RNG = _data(2)
_QP_L = _QP_RNG.normal(size=(5, 5))
_QP_P = _QP_L @ _QP_L.T + 0.5 * np.eye(5)
_QP_G = _QP_RNG.normal(size=(4, 5))
_QP_F = _QP_RNG.normal(size=(2, 5))


def _qp_build():
    x = cp.Variable(5, name="x")
    q = _param(5, "q")
    h = _param(4, "h")
    g = _param(2, "g")
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.quad_form(x, _QP_P) + q @ x),
        [_QP_G @ x <= h, _QP_F @ x == g],
    )
    return problem, [q, h, g], [x]


def _qp_sample(rng):
    # g = F x0 with max |G x0| = 0.3 < 0.5 <= h, so any mix of samples is
    # strictly feasible; a large q makes some inequalities active.
    x0 = rng.normal(size=5)
    x0 *= 0.3 / np.max(np.abs(_QP_G @ x0))
    return [3.0 * rng.normal(size=5), rng.uniform(0.5, 1.5, size=4),
            _QP_F @ x0]


# -- constrained_lsq: min ||Ax - b||^2 s.t. x >= 0, sum x = 1 ---------------


def _lsq_build():
    x = cp.Variable(4, name="x")
    A = _param((6, 4), "A")
    b = _param(6, "b")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)),
                         [x >= 0, cp.sum(x) == 1])
    return problem, [A, b], [x]


def _lsq_sample(rng):
    return [rng.normal(size=(6, 4)), rng.normal(size=6)]


# -- lasso: min ||Ax - b||^2 + lam ||x||_1 -----------------------------------

_LASSO_A = _data(4).normal(size=(8, 5))


def _lasso_build():
    x = cp.Variable(5, name="x")
    b = _param(8, "b")
    lam = _param((), "lam", nonneg=True)
    problem = cp.Problem(cp.Minimize(
        cp.sum_squares(_LASSO_A @ x - b) + lam * cp.norm1(x)))
    return problem, [b, lam], [x]


def _lasso_sample(rng):
    return [rng.normal(size=8), rng.uniform(0.5, 3.0)]


# -- socp: min f'x s.t. ||x - a||_2 <= r  (x = a - r f / ||f||) -------------


def _socp_build():
    x = cp.Variable(3, name="x")
    f = _param(3, "f")
    a = _param(3, "a")
    r = _param((), "r", pos=True)
    problem = cp.Problem(cp.Minimize(f @ x), [cp.norm(x - a, 2) <= r])
    return problem, [f, a, r], [x]


def _socp_sample(rng):
    f = rng.normal(size=3)
    f *= rng.uniform(0.5, 2.0) / np.linalg.norm(f)
    return [f, rng.normal(size=3), rng.uniform(0.5, 2.0)]


def _socp_closed_form(values):
    f, a, r = values
    return (a - r * f / np.linalg.norm(f),)


def _socp_closed_form_grad(values, cotangents):
    f, a, r = values
    (w,) = cotangents
    nf = np.linalg.norm(f)
    u = f / nf
    # d(f / ||f||) = (I - u u') df / ||f||, a symmetric Jacobian.
    grad_f = -r * (w - u * (u @ w)) / nf
    return (grad_f, w.copy(), np.array(-(u @ w)))


# -- sdp: min tr(CX) s.t. tr X = t, X PSD  (X = t v v', v lowest eigvec) -----


def _sdp_build():
    X = cp.Variable((3, 3), name="X", PSD=True)
    C = _param((3, 3), "C")
    t = _param((), "t", pos=True)
    problem = cp.Problem(cp.Minimize(cp.trace(C @ X)),
                         [cp.trace(X) == t])
    return problem, [C, t], [X]


def _sdp_sample(rng):
    # An eigengap of at least 1 makes the minimizer unique and smooth.
    lam = np.array([rng.uniform(-1.5, -0.5), rng.uniform(0.5, 1.5),
                    rng.uniform(1.5, 2.5)])
    Q = _orthogonal(rng, 3)
    C = Q @ np.diag(lam) @ Q.T
    return [(C + C.T) / 2, rng.uniform(0.5, 2.0)]


def _sdp_closed_form(values):
    C, t = values
    _, V = np.linalg.eigh((C + C.T) / 2)
    v = V[:, 0]
    return (t * np.outer(v, v),)


def _sdp_closed_form_grad(values, cotangents):
    C, t = values
    (W,) = cotangents
    lam, V = np.linalg.eigh((C + C.T) / 2)
    v = V[:, 0]
    Ws = W + W.T
    # First-order perturbation of the eigenvector of the smallest
    # eigenvalue: dv = sum_j v_j (v_j' dC v) / (lam_0 - lam_j).
    G = np.zeros((3, 3))
    for j in range(1, 3):
        G += (v @ Ws @ V[:, j]) / (lam[0] - lam[j]) * np.outer(V[:, j], v)
    # The problem only sees the symmetric part of C.
    G = t * (G + G.T) / 2
    return (G, np.array(v @ W @ v))


# -- psd_param: closest PSD matrix to a symmetric parameter ------------------


def _psd_build():
    X = cp.Variable((3, 3), name="X", PSD=True)
    S = _param((3, 3), "S", symmetric=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - S)))
    return problem, [S], [X]


def _psd_sample(rng, smallest=0.3):
    # Eigenvalues of both signs, all at least `smallest` away from zero:
    # the projection is smooth there and has a nontrivial active face.
    mags = rng.uniform(smallest, 1.5, size=3)
    lam = mags * np.array([-1.0, 1.0, rng.choice([-1.0, 1.0])])
    Q = _orthogonal(rng, 3)
    S = Q @ np.diag(lam) @ Q.T
    return [(S + S.T) / 2]


def _psd_closed_form(values):
    (S,) = values
    lam, V = np.linalg.eigh(S)
    return ((V * np.maximum(lam, 0.0)) @ V.T,)


def _psd_closed_form_grad(values, cotangents):
    (S,) = values
    (W,) = cotangents
    lam, V = np.linalg.eigh(S)
    pos = np.maximum(lam, 0.0)
    # Divided differences of max(., 0) on the spectrum (Daleckii-Krein).
    diff = lam[:, None] - lam[None, :]
    same = np.abs(diff) < 1e-12
    gamma = np.where(same, (lam[:, None] > 0) * 1.0,
                     (pos[:, None] - pos[None, :]) / np.where(same, 1, diff))
    Wt = V.T @ ((W + W.T) / 2) @ V
    return (V @ (gamma * Wt) @ V.T,)


# -- entropy: max sum entr(x) + c'x s.t. sum x = s  (x = s softmax(c)) -------


def _entropy_build():
    x = cp.Variable(4, name="x")
    c = _param(4, "c")
    s = _param((), "s", pos=True)
    problem = cp.Problem(cp.Maximize(cp.sum(cp.entr(x)) + c @ x),
                         [cp.sum(x) == s])
    return problem, [c, s], [x]


def _entropy_sample(rng):
    return [rng.normal(size=4), rng.uniform(0.5, 2.0)]


def _softmax(c):
    e = np.exp(c - np.max(c))
    return e / e.sum()


def _entropy_closed_form(values):
    c, s = values
    return (s * _softmax(c),)


def _entropy_closed_form_grad(values, cotangents):
    c, s = values
    (w,) = cotangents
    p = _softmax(c)
    # Jacobian of softmax: diag(p) - p p'.
    return (s * (p * w - p * (p @ w)), np.array(p @ w))


# -- logistic: min sum logistic(Aw + c) + mu ||w||^2 -------------------------


def _logistic_build():
    w = cp.Variable(3, name="w")
    A = _param((8, 3), "A")
    c = _param(8, "c")
    problem = cp.Problem(cp.Minimize(
        cp.sum(cp.logistic(A @ w + c)) + 0.5 * cp.sum_squares(w)))
    return problem, [A, c], [w]


def _logistic_sample(rng):
    return [rng.normal(size=(8, 3)), 0.5 * rng.normal(size=8)]


# -- power: min sum t - c'x s.t. (t, s, x) in 3-d power cones, alpha = 2/3 --
# t^(2/3) s^(1/3) >= |x| gives t >= |x|^1.5 / sqrt(s), so the minimizer is
# x = sign(c) c^2 s / 2.25 and t = |c|^3 s / 3.375.


def _power_build():
    x = cp.Variable(3, name="x")
    t = cp.Variable(3, name="t")
    c = _param(3, "c")
    s = _param(3, "s", pos=True)
    problem = cp.Problem(cp.Minimize(cp.sum(t) - c @ x),
                         [cp.PowCone3D(t, s, x, 2.0 / 3.0)])
    return problem, [c, s], [x, t]


def _power_sample(rng):
    # |c| >= 0.5 keeps x away from the cone's kink at x = 0.
    c = rng.uniform(0.5, 1.5, size=3) * rng.choice([-1.0, 1.0], size=3)
    return [c, rng.uniform(0.5, 2.0, size=3)]


def _power_closed_form(values):
    c, s = values
    return (np.sign(c) * c ** 2 * s / 2.25, np.abs(c) ** 3 * s / 3.375)


def _power_closed_form_grad(values, cotangents):
    c, s = values
    wx, wt = cotangents
    grad_c = wx * 2 * np.abs(c) * s / 2.25 + wt * np.sign(c) * c ** 2 * s / 1.125
    grad_s = wx * np.sign(c) * c ** 2 / 2.25 + wt * np.abs(c) ** 3 / 3.375
    return (grad_c, grad_s)


# -- relu: min ||z - Wt x - b||^2 s.t. z >= 0, Wt = W  (z = max(Wx + b, 0)) --


def _relu_build(n_out=3, n_in=4):
    z = cp.Variable(n_out, name="z")
    Wt = cp.Variable((n_out, n_in), name="Wtilde")
    W = _param((n_out, n_in), "W")
    b = _param(n_out, "b")
    x = _param(n_in, "x")
    # The extra variable Wtilde keeps the product with x DPP.
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - Wt @ x - b)),
                         [z >= 0, Wt == W])
    return problem, [W, b, x], [z]


def _relu_sample(rng):
    return [rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=4)]


def _relu_accept(values):
    W, b, x = values
    return bool(np.all(np.abs(W @ x + b) > KINK_MARGIN))


def relu_closed_form(values):
    """``max(Wx + b, 0)`` for unbatched ``(W, b, x)``."""
    W, b, x = values
    return (np.maximum(W @ x + b, 0.0),)


def relu_closed_form_grad(values, cotangents):
    """Gradients of ``w . max(Wx + b, 0)`` in ``(W, b, x)``."""
    W, b, x = values
    (w,) = cotangents
    gate = w * (W @ x + b > 0)
    return (np.outer(gate, x), gate, W.T @ gate)


# -- scalar_param: min ||x - d||^2 s.t. sum x = t, t a 0-d parameter ----------


def _scalar_build():
    x = cp.Variable(4, name="x")
    t = _param((), "t")
    d = _param(4, "d")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - d)),
                         [cp.sum(x) == t])
    return problem, [t, d], [x]


def _scalar_sample(rng):
    return [rng.normal(), rng.normal(size=4)]


def _scalar_closed_form(values):
    t, d = values
    return (d - (d.sum() - t) / d.size,)


def _scalar_closed_form_grad(values, cotangents):
    t, d = values
    (w,) = cotangents
    return (np.array(w.sum() / d.size), w - w.sum() / d.size)


# -- matrix_param: min ||x - x0||^2 s.t. Gx <= h, G a matrix parameter -------

_MATRIX_X0 = np.array([2.0, -1.0, 1.5])


def _matrix_build():
    x = cp.Variable(3, name="x")
    G = _param((4, 3), "G")
    h = _param(4, "h")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - _MATRIX_X0)),
                         [G @ x <= h])
    return problem, [G, h], [x]


def _matrix_sample(rng):
    # h > 0 keeps x = 0 feasible; x0 is far enough out that constraints
    # bind.
    return [rng.normal(size=(4, 3)), rng.uniform(0.5, 1.5, size=4)]


# -- objective_only: min ||x - p||^2 + lam sum x s.t. 0 <= x <= 1 -------------
# x = clip(p - lam / 2, 0, 1).


def _objective_build():
    x = cp.Variable(4, name="x")
    p = _param(4, "p")
    lam = _param((), "lam", nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p) + lam * cp.sum(x)),
                         [x >= 0, x <= 1])
    return problem, [p, lam], [x]


def _objective_sample(rng):
    return [rng.uniform(-0.5, 1.8, size=4), rng.uniform(0.1, 1.0)]


def _objective_accept(values):
    p, lam = values
    v = p - lam / 2
    return bool(np.all(np.abs(v) > KINK_MARGIN)
                and np.all(np.abs(v - 1) > KINK_MARGIN))


def _objective_closed_form(values):
    p, lam = values
    return (np.clip(p - lam / 2, 0.0, 1.0),)


def _objective_closed_form_grad(values, cotangents):
    p, lam = values
    (w,) = cotangents
    v = p - lam / 2
    gate = w * ((v > 0) & (v < 1))
    return (gate, np.array(-gate.sum() / 2))


# -- constraints_only: min ||x - x0||^2 s.t. Ax <= b, x >= l -----------------

_CONS_RNG = _data(13)
_CONS_A = _CONS_RNG.normal(size=(3, 4))
_CONS_X0 = 2.0 * _CONS_RNG.normal(size=4)


def _constraints_build():
    x = cp.Variable(4, name="x")
    b = _param(3, "b")
    lo = _param(4, "lo")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - _CONS_X0)),
                         [_CONS_A @ x <= b, x >= lo])
    return problem, [b, lo], [x]


def _constraints_sample(rng):
    # b > 0 and lo < 0 keep x = 0 strictly feasible.
    return [rng.uniform(0.2, 1.0, size=3), -rng.uniform(0.2, 1.0, size=4)]


# -- dual: min ||x - p||^2 s.t. x <= u; outputs x and the multiplier ---------
# x = min(p, u), multiplier = 2 max(p - u, 0).


def _dual_build():
    x = cp.Variable(4, name="x")
    p = _param(4, "p")
    u = _param(4, "u")
    bound = x <= u
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [bound])
    return problem, [p, u], [x, bound.dual_variables[0]]


def _dual_sample(rng):
    return [rng.normal(size=4), rng.normal(size=4)]


def _dual_accept(values):
    p, u = values
    return bool(np.all(np.abs(p - u) > KINK_MARGIN))


def _dual_closed_form(values):
    p, u = values
    return (np.minimum(p, u), 2.0 * np.maximum(p - u, 0.0))


def _dual_closed_form_grad(values, cotangents):
    p, u = values
    wx, wy = cotangents
    free = p < u
    grad_p = np.where(free, wx, 2.0 * wy)
    grad_u = np.where(free, 0.0, wx - 2.0 * wy)
    return (grad_p, grad_u)


# -- scalar_outputs: min (x - 2p)^2 s.t. x >= q, x a scalar variable ---------
# x = max(2p, q); the constraint's multiplier is 2 max(q - 2p, 0). Both
# outputs are scalars (shape ()).


def _scalar_out_build():
    x = cp.Variable(name="x")
    p = _param((), "p")
    q = _param((), "q")
    bound = x >= q
    problem = cp.Problem(cp.Minimize(cp.square(x - 2 * p)), [bound])
    return problem, [p, q], [x, bound.dual_variables[0]]


def _scalar_out_sample(rng):
    return [np.array(rng.normal()), np.array(rng.normal())]


def _scalar_out_accept(values):
    p, q = values
    return bool(abs(2 * p - q) > KINK_MARGIN)


def _scalar_out_closed_form(values):
    p, q = values
    return (np.maximum(2 * p, q), 2.0 * np.maximum(q - 2 * p, 0.0))


def _scalar_out_closed_form_grad(values, cotangents):
    p, q = values
    wx, wy = cotangents
    free = 2 * p > q
    grad_p = np.where(free, 2.0 * wx, -4.0 * wy)
    grad_q = np.where(free, 0.0, wx + 2.0 * wy)
    return (grad_p, grad_q)


# -- quad_form_param: min (1/2) x'Px + q'x s.t. x >= -10, P a PSD parameter ---
# The bound stays inactive (accept): x = -P^{-1} q. The layer reads P's
# symmetric part, so the gradient of w'x in P is the symmetric part of
# -(P^{-1} w) x'; in q it is -P^{-1} w.


def _quad_form_build():
    x = cp.Variable(3, name="x")
    P = _param((3, 3), "P", PSD=True)
    q = _param(3, "q")
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P) + q @ x),
                         [x >= -10])
    return problem, [P, q], [x]


def _quad_form_sample(rng):
    M = rng.normal(size=(3, 3))
    return [M @ M.T / 3 + np.eye(3), rng.normal(size=3)]


def _quad_form_accept(values):
    P, q = values
    return bool(np.all(-np.linalg.solve(P, q) > -10 + 1.0))


def _quad_form_closed_form(values):
    P, q = values
    return (-np.linalg.solve(P, q),)


def _quad_form_closed_form_grad(values, cotangents):
    P, q = values
    (w,) = cotangents
    x = -np.linalg.solve(P, q)
    u = np.linalg.solve(P, w)
    G = -np.outer(u, x)
    return ((G + G.T) / 2, -u)


def _tags(*names):
    return frozenset(names)


CASES = [
    Case("lp", _tags("lp"), _lp_build, _lp_sample, (True, False)),
    Case("qp", _tags("qp"), _qp_build, _qp_sample, (True, True, False)),
    Case("constrained_lsq", _tags("qp", "socp"), _lsq_build, _lsq_sample,
         (True, False)),
    Case("lasso", _tags("qp", "socp"), _lasso_build, _lasso_sample,
         (True, False)),
    Case("socp", _tags("socp"), _socp_build, _socp_sample,
         (True, True, False), closed_form=_socp_closed_form,
         closed_form_grad=_socp_closed_form_grad),
    Case("sdp", _tags("sdp"), _sdp_build, _sdp_sample, (True, False),
         closed_form=_sdp_closed_form,
         closed_form_grad=_sdp_closed_form_grad),
    Case("psd_param", _tags("sdp", "socp", "symmetric"), _psd_build,
         _psd_sample, (True,), closed_form=_psd_closed_form,
         closed_form_grad=_psd_closed_form_grad),
    Case("entropy", _tags("exp"), _entropy_build, _entropy_sample,
         (True, False), closed_form=_entropy_closed_form,
         closed_form_grad=_entropy_closed_form_grad),
    Case("logistic", _tags("exp"), _logistic_build, _logistic_sample,
         (True, False)),
    Case("power", _tags("pow"), _power_build, _power_sample, (True, False),
         closed_form=_power_closed_form,
         closed_form_grad=_power_closed_form_grad),
    Case("relu", _tags("relu", "qp"), _relu_build, _relu_sample,
         (False, False, True), closed_form=relu_closed_form,
         closed_form_grad=relu_closed_form_grad, accept=_relu_accept),
    Case("scalar_param", _tags("qp"), _scalar_build, _scalar_sample,
         (True, False), closed_form=_scalar_closed_form,
         closed_form_grad=_scalar_closed_form_grad),
    Case("matrix_param", _tags("qp"), _matrix_build, _matrix_sample,
         (True, False)),
    Case("objective_only", _tags("qp"), _objective_build, _objective_sample,
         (True, False), closed_form=_objective_closed_form,
         closed_form_grad=_objective_closed_form_grad,
         accept=_objective_accept),
    Case("constraints_only", _tags("qp"), _constraints_build,
         _constraints_sample, (False, True)),
    Case("dual", _tags("qp", "dual"), _dual_build, _dual_sample,
         (True, False), closed_form=_dual_closed_form,
         closed_form_grad=_dual_closed_form_grad, accept=_dual_accept),
    Case("scalar_outputs", _tags("qp", "dual"), _scalar_out_build,
         _scalar_out_sample, (True, False),
         closed_form=_scalar_out_closed_form,
         closed_form_grad=_scalar_out_closed_form_grad,
         accept=_scalar_out_accept),
    Case("quad_form_param", _tags("qp", "symmetric", "quadratic_only"),
         _quad_form_build,
         _quad_form_sample, (True, False),
         closed_form=_quad_form_closed_form,
         closed_form_grad=_quad_form_closed_form_grad,
         accept=_quad_form_accept),
]

_BY_NAME = {case.name: case for case in CASES}


def get_case(name):
    """The case called ``name``; KeyError listing the names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"No zoo case named {name!r}; known: {', '.join(_BY_NAME)}."
        ) from None


def _draw(case, rng):
    return [np.asarray(v, dtype=np.float64) for v in case.sample(rng)]


def make_inputs(case, rng, batch_size=None, max_tries=1000):
    """Parameter values for ``case``.

    Args:
        case: a :class:`Case`.
        rng: a ``numpy.random.Generator``.
        batch_size: None for unbatched values; an int B to give the
            parameters with ``batch_mask`` True a leading batch dimension of
            B independent samples (the others come from one shared sample).
        max_tries: redraws allowed per element to satisfy ``case.accept``.

    Returns:
        A list of float64 arrays, one per parameter.
    """
    def combine(shared, own):
        return [o if batched else s
                for s, o, batched in zip(shared, own, case.batch_mask)]

    def ok(values):
        return case.accept is None or case.accept(values)

    for _ in range(max_tries):
        shared = _draw(case, rng)
        if ok(shared):
            break
    else:
        raise RuntimeError(f"case {case.name!r}: no acceptable sample")
    if batch_size is None:
        return shared
    elements = []
    for _ in range(batch_size):
        for _ in range(max_tries):
            element = combine(shared, _draw(case, rng))
            if ok(element):
                break
        else:
            raise RuntimeError(f"case {case.name!r}: no acceptable sample")
        elements.append(element)
    return [np.stack([e[i] for e in elements]) if batched else shared[i]
            for i, batched in enumerate(case.batch_mask)]
