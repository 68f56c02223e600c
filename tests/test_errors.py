"""Every error, warning and side channel of the NumPy core, message checked.

Construction errors (not DPP, parameters or variables that do not match the
problem), call errors (count, shape, batch size, NaN/inf, declared domains),
solver failures (``optlayer.SolverError`` naming batch elements and
statuses), inaccurate-solve warnings, and silence: nothing printed, logging
only through the ``optlayer`` logger.
"""

import logging
import os
import re
import warnings

import cvxpy as cp
import numpy as np
import pytest
import scipy.sparse as sp

import optlayer
from tests.zoo import get_case, make_inputs


def _relu():
    """The zoo's ReLU problem: parameters W (3, 4), b (3,), x (4,)."""
    return get_case("relu").build()


@pytest.fixture(scope="module")
def relu_layer():
    problem, params, variables = _relu()
    return optlayer.Layer(problem, params, variables)


@pytest.fixture
def relu_values():
    return make_inputs(get_case("relu"), np.random.default_rng(0), None)


# -- construction ----------------------------------------------------------


def test_not_dpp():
    x = cp.Variable(2)
    a = cp.Parameter(name="a")
    b = cp.Parameter(name="b")
    # A product of two parameters is DCP but not DPP.
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + a * b * cp.sum(x)))
    assert problem.is_dcp() and not problem.is_dpp()
    # The message names the smallest expression that is not DPP.
    with pytest.raises(ValueError,
                       match=r"the objective \(in: a \* b\) is not DPP"):
        optlayer.Layer(problem, [a, b], [x])
    # So for atoms that need a constant argument.
    p = cp.Parameter(pos=True, name="p")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + cp.quad_over_lin(
        x, p) + cp.norm1(x - a)))
    with pytest.raises(ValueError, match=r"the objective \(in: quad_over_"
                       r"lin\(var\d+, p, None, False\)\) is not DPP"):
        optlayer.Layer(problem, [a, p], [x])


def test_not_dpp_names_the_parts_and_the_quad_form_rewrite():
    # The message lists the parts that are not DPP (here the objective and
    # the second constraint, not the first) and, for quad_form with a
    # parameter matrix, the DPP rewrite sum_squares(L @ x).
    x = cp.Variable(3)
    P = cp.Parameter((3, 3), PSD=True, name="P")
    q = cp.Parameter(3, name="q")
    a = cp.Parameter(name="a")
    b = cp.Parameter(name="b")
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, P) + q @ x),
                         [x >= 0, a * b * x <= 1])
    with pytest.raises(ValueError) as info:
        optlayer.Layer(problem, [P, q, a, b], [x])
    message = str(info.value)
    assert "the objective (in: QuadForm(" in message
    assert "constraint 1 (" in message and "(in: a * b)" in message
    assert "constraint 0" not in message
    assert "sum_squares(L @ x)" in message
    # The rewrite it suggests is DPP.
    L = cp.Parameter((3, 3), name="L")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(L @ x) + q @ x), [x >= 0])
    assert problem.is_dpp()


def test_problem_must_be_a_problem():
    x = cp.Variable(2)
    with pytest.raises(ValueError, match=r"problem must be a cvxpy\.Problem"):
        optlayer.Layer(cp.Minimize(cp.sum(x)), [], [x])


def test_parameter_missing():
    problem, (W, b, x), variables = _relu()
    with pytest.raises(ValueError,
                       match=r"parameter\(s\) 'x' are missing from parameters"):
        optlayer.Layer(problem, [W, b], variables)


def test_parameter_not_in_problem():
    problem, params, variables = _relu()
    other = cp.Parameter(2, name="other")
    with pytest.raises(ValueError, match=r"parameters\[3\] 'other' does not "
                                         r"appear in the problem"):
        optlayer.Layer(problem, params + [other], variables)


def test_parameter_listed_twice():
    problem, (W, b, x), variables = _relu()
    with pytest.raises(ValueError, match=r"Parameter 'W' is listed twice in "
                                         r"parameters \(again at position 3\)"):
        optlayer.Layer(problem, [W, b, x, W], variables)


def test_parameter_must_be_a_parameter():
    problem, (W, b, x), variables = _relu()
    with pytest.raises(ValueError, match=r"parameters\[2\] must be a "
                                         r"cvxpy\.Parameter, got ndarray"):
        optlayer.Layer(problem, [W, b, np.zeros(4)], variables)


def test_variable_not_in_problem():
    problem, params, _ = _relu()
    stranger = cp.Variable(3, name="stranger")
    with pytest.raises(ValueError, match=r"variables\[0\] 'stranger' does not "
                                         r"appear in the problem"):
        optlayer.Layer(problem, params, [stranger])


def test_no_variables():
    problem, params, _ = _relu()
    with pytest.raises(ValueError, match=r"variables is empty"):
        optlayer.Layer(problem, params, [])


def test_problem_without_parameters():
    x = cp.Variable(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - 1)))
    with pytest.raises(ValueError, match=r"The problem has no parameters"):
        optlayer.Layer(problem, [], [x])


def test_linear_objective_without_constraints():
    # CVXPY does not compile it for a cone solver; the error says why.
    x = cp.Variable(2)
    a = cp.Parameter(2, name="a")
    with pytest.raises(ValueError, match=r"cannot compile this problem for "
                                         r"the cone solver SCS .* affine and "
                                         r"there are no constraints"):
        optlayer.Layer(cp.Problem(cp.Minimize(a @ x)), [a], [x])


# -- call: count, shape, batch size ----------------------------------------


def test_wrong_number_of_values(relu_layer, relu_values):
    with pytest.raises(ValueError, match=r"Expected 3 parameter values "
                                         r"\(W, b, x\), got 2\."):
        relu_layer(*relu_values[:2])
    with pytest.raises(ValueError, match=r"Expected 3 parameter values"):
        relu_layer.vjp(relu_values + [np.zeros(4)], [np.ones(3)])


@pytest.mark.parametrize("position, value, received, expected", [
    (1, np.zeros(4), r"\(4,\)", r"\(3,\)"),
    (0, np.zeros((4, 3)), r"\(4, 3\)", r"\(3, 4\)"),
    (2, np.zeros((5, 3)), r"\(5, 3\)", r"\(4,\)"),
    (2, np.zeros((2, 5, 4)), r"\(2, 5, 4\)", r"\(4,\)"),
    (1, np.zeros(()), r"\(\)", r"\(3,\)"),
], ids=["vector", "transposed", "batched_wrong", "two_batch_dims", "scalar"])
def test_wrong_shape(relu_layer, relu_values, position, value, received,
                     expected):
    name = "Wbx"[position]
    values = list(relu_values)
    values[position] = value
    pattern = (rf"Parameter {position} '{name}' has shape {received}; "
               rf"expected {expected}")
    with pytest.raises(ValueError, match=pattern):
        relu_layer(*values)
    # The same check guards batch_size, solve and vjp.
    with pytest.raises(ValueError, match=pattern):
        relu_layer.batch_size(*values)
    with pytest.raises(ValueError, match=pattern):
        relu_layer.vjp(values, [np.ones(3)])


def test_batch_sizes_disagree(relu_layer, relu_values):
    W, b, x = relu_values
    values = [np.stack([W, W]), b, np.stack([x, x, x])]
    with pytest.raises(ValueError,
                       match=r"disagree on the batch size: 'W' \(position 0\)"
                             r": 2, 'x' \(position 2\): 3"):
        relu_layer(*values)


def test_empty_batch(relu_layer, relu_values):
    # A batch of size 0 gives empty outputs, and gradients shaped like the
    # inputs: empty for batched ones, zero for shared ones.
    W, b, x = relu_values
    (out,) = relu_layer(W, b, np.zeros((0, 4)))
    (single,) = relu_layer(W, b, x)
    assert out.shape == (0,) + single.shape
    grads = relu_layer.vjp([W, b, np.zeros((0, 4))], [np.zeros(out.shape)])
    assert grads[2].shape == (0, 4)
    for g, v in zip(grads[:2], (W, b)):
        assert g.shape == np.shape(v) and not np.any(g)
    # The next call with elements is unaffected.
    (again,) = relu_layer(W, b, x)
    np.testing.assert_allclose(again, single, atol=1e-12)


def test_value_not_numeric(relu_layer, relu_values):
    W, b, _ = relu_values
    with pytest.raises(ValueError, match=r"Parameter 2 'x': value of type str "
                                         r"cannot be converted"):
        relu_layer(W, b, "abcd")


def test_cotangent_wrong_shape(relu_layer, relu_values):
    with pytest.raises(ValueError, match=r"Cotangent 0 for output 'z' has "
                                         r"shape \(4,\); expected \(3,\)"):
        relu_layer.vjp(relu_values, [np.ones(4)])


# -- call: non-finite values and domains -----------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_unbatched(relu_layer, relu_values, bad):
    W, b, x = relu_values
    x = x.copy()
    x[1] = bad
    with pytest.raises(ValueError, match=r"Parameter 2 'x' has 1 NaN or "
                                         r"infinite entry\."):
        relu_layer(W, b, x)


def test_non_finite_batched(relu_layer, relu_values):
    W, b, x = relu_values
    xs = np.stack([x, x, x])
    xs[1, 0] = np.nan
    xs[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"Parameter 2 'x' has 2 NaN or "
                                         r"infinite entries in batch "
                                         r"element\(s\) \[1\]"):
        relu_layer(W, b, xs)


def _vector_domain_layer(attribute):
    x = cp.Variable(2)
    p = cp.Parameter(2, name="p", **{attribute: True})
    d = cp.Parameter(2, name="d")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - d) + p @ x))
    return optlayer.Layer(problem, [d, p], [x])


@pytest.mark.parametrize("attribute, bad, word", [
    ("nonneg", -0.5, "nonnegative"),
    ("pos", 0.0, "positive"),
    ("nonpos", 0.5, "nonpositive"),
    ("neg", 0.0, "negative"),
])
def test_sign_domains(attribute, bad, word):
    layer = _vector_domain_layer(attribute)
    good = {"nonneg": 1.0, "pos": 1.0, "nonpos": -1.0, "neg": -1.0}[attribute]
    d = np.zeros(2)
    layer(d, np.full(2, good))  # inside the domain: no error
    pattern = (rf"Parameter 1 'p' is declared {attribute}=True but has "
               rf"entries that are not {word}")
    with pytest.raises(ValueError, match=pattern):
        layer(d, np.array([good, bad]))
    # A violation in one batch element only.
    batch = np.full((3, 2), good)
    batch[2, 0] = bad
    with pytest.raises(ValueError, match=pattern + r".* in batch "
                                         r"element\(s\) 2\."):
        layer(d, batch)


def test_bounds_domain():
    x = cp.Variable(3)
    p = cp.Parameter(3, name="p", bounds=(np.zeros(3), np.array([1, 2, 3])))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)))
    layer = optlayer.Layer(problem, [p], [x])
    (got,) = layer(np.array([0.0, 2.0, 0.5]))  # on and inside the bounds
    # x = p; the layer's accuracy is a relative KKT residual of about
    # 1e-12 on data of size 1, so 1e-9 leaves room for conditioning.
    np.testing.assert_allclose(got, [0.0, 2.0, 0.5], atol=1e-9)
    with pytest.raises(ValueError, match=r"Parameter 0 'p' has entries "
                                         r"outside its declared bounds "
                                         r"\(e.g. 2.5 against the upper "
                                         r"bound 2\)\.$"):
        layer(np.array([0.0, 2.5, 0.5]))
    batch = np.full((3, 3), 0.5)
    batch[1, 0] = -0.1
    with pytest.raises(ValueError, match=r"-0.1 against the lower bound 0\)"
                                         r" in batch element\(s\) 1\."):
        layer(batch)
    # float32 values of a bound (0.1f is above 0.1) are accepted.
    q = cp.Parameter(name="q", bounds=(0, 0.1))
    y = cp.Variable()
    small = optlayer.Layer(cp.Problem(cp.Minimize((y - q) ** 2)), [q], [y])
    (got,) = small(np.float32(0.1))
    np.testing.assert_allclose(got, np.float32(0.1), rtol=1e-9)
    # So are float16 and bfloat16 values of a bound 0.3 (it rounds up in
    # both); bfloat16 values arrive as float64 of 8 significant bits.
    r = cp.Parameter(name="r", bounds=(0, 0.3))
    third = optlayer.Layer(cp.Problem(cp.Minimize((y - r) ** 2)), [r], [y])
    bf16 = np.array(np.float32(0.3).view(np.uint32) + 0x8000 & 0xFFFF0000,
                    dtype=np.uint32).view(np.float32)
    for value in (np.float16(0.3), bf16):
        assert float(value) > 0.3
        (got,) = third(np.float64(value))
        np.testing.assert_allclose(got, float(value), rtol=1e-9)
    # A float16 value beyond its rounding is not.
    with pytest.raises(ValueError, match="outside its declared bounds"):
        third(np.float64(np.float16(0.302)))


@pytest.mark.parametrize("attribute, bad, words", [
    ("integer", 0.5, "integers"),
    ("boolean", 2.0, "0 or 1"),
])
def test_integer_and_boolean_domains(attribute, bad, words):
    x = cp.Variable(2)
    k = cp.Parameter(2, name="k", **{attribute: True})
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x) + k @ x))
    layer = optlayer.Layer(problem, [k], [x])
    (got,) = layer(np.array([1.0, 0.0]))
    # x = -k / 2 (data of size 1, KKT residual about 1e-12).
    np.testing.assert_allclose(got, [-0.5, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match=rf"Parameter 0 'k' is declared "
                                         rf"{attribute}=True but has entries "
                                         rf"that are not {words}"):
        layer(np.array([1.0, bad]))


def _matrix_domain_layer(attribute):
    X = cp.Variable((2, 2), symmetric=True)
    S = cp.Parameter((2, 2), name="S", **{attribute: True})
    problem = cp.Problem(cp.Minimize(cp.sum_squares(X - S)))
    return optlayer.Layer(problem, [S], [X])


def test_symmetric_domain():
    layer = _matrix_domain_layer("symmetric")
    layer(np.array([[1.0, 0.5], [0.5, -1.0]]))
    with pytest.raises(ValueError, match=r"Parameter 0 'S' is declared "
                                         r"symmetric=True but its value is "
                                         r"not symmetric"):
        layer(np.array([[1.0, 0.5], [0.4, -1.0]]))


def test_psd_domain():
    layer = _matrix_domain_layer("PSD")
    layer(np.array([[2.0, 0.5], [0.5, 1.0]]))
    pattern = (r"Parameter 0 'S' is declared PSD=True but its value has "
               r"smallest eigenvalue -1")
    with pytest.raises(ValueError, match=pattern):
        layer(np.array([[1.0, 0.0], [0.0, -1.0]]))
    batch = np.stack([np.eye(2), np.diag([1.0, -1.0])])
    with pytest.raises(ValueError, match=pattern + r".* in batch "
                                         r"element\(s\) 1\."):
        layer(batch)
    with pytest.raises(ValueError, match=r"declared PSD=True but its value "
                                         r"is not symmetric"):
        layer(np.array([[1.0, 0.5], [0.0, 1.0]]))


def test_single_precision_symmetric_and_psd_values_are_accepted():
    # float32 products such as M C M' (C symmetric) or K K' are symmetric,
    # PSD, only up to single-precision rounding (about 1e-7 relative):
    # accepted, with answers equal to those for the symmetrized value.
    rng = np.random.default_rng(3)
    for attribute in ("symmetric", "PSD"):
        layer = _matrix_domain_layer(attribute)
        for _ in range(10):
            M = rng.normal(size=(2, 2)).astype(np.float32)
            K = rng.normal(size=(2, 1)).astype(np.float32)
            C = np.array([[1.0, 0.3], [0.3, -2.0]], dtype=np.float32)
            S = (M @ C @ M.T if attribute == "symmetric" else K @ K.T)
            S = S.astype(np.float64)
            (got,) = layer(S)
            (want,) = layer((S + S.T) / 2)
            # The two values differ by float32 rounding (~1e-7 of entries
            # of size ~1); so can the projections.
            np.testing.assert_allclose(got, want, atol=1e-6)
    # The same asymmetry in double precision values is still an error.
    layer = _matrix_domain_layer("symmetric")
    with pytest.raises(ValueError, match="not symmetric"):
        layer(np.array([[1.0, 0.1 + 1e-7], [0.1, 1.0]]))


def test_diag_parameter_off_diagonal_values():
    x = cp.Variable(3)
    D = cp.Parameter((3, 3), diag=True, name="D")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(D @ x - 1)
                                     + cp.sum_squares(x)))
    layer = optlayer.Layer(problem, [D], [x])
    (got,) = layer(np.diag([1.0, 2.0, 3.0]))
    d = np.array([1.0, 2.0, 3.0])
    # Closed form x = d / (d^2 + 1); solutions are polished to ~1e-12.
    np.testing.assert_allclose(got, d / (d * d + 1), atol=1e-8)
    batch = np.stack([np.eye(3), np.ones((3, 3))])
    with pytest.raises(ValueError, match=r"Parameter 0 'D' is declared "
                                         r"diag=True but has nonzero entries "
                                         r"off the diagonal .* in batch "
                                         r"element\(s\) 1;"):
        layer(batch)


def test_sparsity_parameter_values_outside_the_pattern():
    # Entries outside a declared sparsity pattern are not part of the
    # compiled problem: a value with nonzeros there must be refused, not
    # solved as if they were zero. Inside the pattern the layer solves
    # S x = 1 exactly (S nonsingular): x = S^{-1} 1, polished to ~1e-12.
    x = cp.Variable(3)
    S = cp.Parameter((3, 3), sparsity=([0, 1, 2, 0], [0, 1, 2, 2]),
                     name="S")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(S @ x - 1)))
    with warnings.catch_warnings():
        # CVXPY's own note on reading sparse parameters stays inside.
        warnings.simplefilter("error")
        layer = optlayer.Layer(problem, [S], [x])
    M = np.eye(3)
    M[0, 2] = 0.7
    (got,) = layer(M)
    np.testing.assert_allclose(got, np.linalg.solve(M, np.ones(3)),
                               atol=1e-8)
    full = np.eye(3) + 0.5
    with pytest.raises(ValueError, match=r"Parameter 0 'S' is declared "
                                         r"with a sparsity pattern but has "
                                         r"nonzero entries outside it "
                                         r"\(e.g. at \(0, 1\).* in batch "
                                         r"element\(s\) 1;"):
        layer(np.stack([M, full]))


def test_diag_variable_output():
    # A diagonal matrix variable comes back as the full matrix, zero off
    # the diagonal: here the diagonal of P.
    D = cp.Variable((3, 3), diag=True)
    P = cp.Parameter((3, 3))
    layer = optlayer.Layer(cp.Problem(cp.Minimize(cp.sum_squares(D - P))),
                           [P], [D])
    value = np.arange(9.0).reshape(3, 3)
    (got,) = layer(value)
    # Exact answer, solutions polished to ~1e-12.
    np.testing.assert_allclose(got, np.diag(np.diag(value)), atol=1e-8)


def test_geometric_and_quasiconvex_programs_are_named():
    # Both are valid CVXPY problems of other classes; the error says which
    # class and what to do, not just "not DCP".
    x = cp.Variable(pos=True)
    y = cp.Variable(pos=True)
    a = cp.Parameter(pos=True)
    gp = cp.Problem(cp.Minimize(x * y), [x * y * a >= 1, x <= 2])
    with pytest.raises(ValueError, match=r"geometric program \(DGP"):
        optlayer.Layer(gp, [a], [x])
    z = cp.Variable()
    b = cp.Parameter()
    qp = cp.Problem(cp.Minimize(cp.ceil(z)), [z >= b])
    with pytest.raises(ValueError, match=r"quasiconvex \(DQCP"):
        optlayer.Layer(qp, [b], [z])


def test_not_dcp():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Maximize(cp.sum_squares(x - a)), [x <= 1])
    with pytest.raises(ValueError, match="not DCP"):
        optlayer.Layer(problem, [a], [x])


def test_complex_values_for_a_real_parameter():
    # A complex value would lose its imaginary part in the conversion to
    # float: an error naming the parameter instead.
    x = cp.Variable(2)
    a = cp.Parameter(2, name="a")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    layer = optlayer.Layer(problem, [a], [x])
    with pytest.raises(ValueError, match=r"Parameter 0 'a' is complex "
                                         r"\(dtype complex128\)"):
        layer(np.array([1.0 + 2.0j, 0.5]))


def test_integer_variables():
    x = cp.Variable(2, integer=True, name="k")
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    with pytest.raises(ValueError, match=r"Integer or boolean variables "
                                         r"\('k'\) are not supported"):
        optlayer.Layer(problem, [a], [x])


def test_complex_problem():
    a = cp.Parameter(2, complex=True, name="a")
    x = cp.Variable(2, complex=True, name="x")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(cp.abs(x - a))),
                         [cp.real(cp.sum(x)) <= 1])
    with pytest.raises(ValueError, match=r"Complex parameters or variables "
                                         r"\('a', 'x'\) are not supported"):
        optlayer.Layer(problem, [a], [x])


def test_single_parameter_and_variable_need_no_list():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    (got,) = optlayer.Layer(problem, a, x)(np.array([1.0, -1.0]))
    # Exact answer (the projection onto x >= 0), polished to ~1e-12.
    np.testing.assert_allclose(got, [1.0, 0.0], atol=1e-9)


@pytest.mark.parametrize("options, pattern", [
    ({"eps": 1e-6}, r"solver_options were rejected by SCS: 'eps' .* use "
                    r"eps_abs and eps_rel"),
    ({"max_iter": 10}, r"solver_options were rejected by SCS: 'max_iter'"),
    # Pairs would pass dict.update but not the checks that read the keys.
    ([("max_iters", 5)], r"solver_options must be a dict of SCS settings"
                         r".* got list"),
])
def test_bad_solver_options_fail_at_construction(options, pattern):
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    with pytest.raises(ValueError, match=pattern):
        optlayer.Layer(problem, [a], [x], solver_options=options)


@pytest.mark.parametrize("n_jobs", [0, -2, 2.5, "2", True])
def test_bad_n_jobs(n_jobs):
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    with pytest.raises(ValueError, match="n_jobs must be a positive "
                                         "integer, or None or -1"):
        optlayer.Layer(problem, [a], [x], n_jobs=n_jobs)


@pytest.mark.parametrize("option", ["warm_start", "presolve", "refine",
                                    "quadratic_objective"])
def test_switches_must_be_booleans(option):
    # A string such as "no" would count as True.
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    with pytest.raises(ValueError, match=f"{option} must be True or False; "
                                         "got 'no'"):
        optlayer.Layer(problem, [a], [x], **{option: "no"})
    optlayer.Layer(problem, [a], [x], **{option: np.bool_(False)})


def test_solver_options_may_be_any_mapping():
    import types

    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    layer = optlayer.Layer(problem, [a], [x], solver_options=types.
                           MappingProxyType({"max_iters": 5000}))
    assert layer.solver_options["max_iters"] == 5000
    assert layer._user_limits


def test_verbose_prints_nothing_at_construction(capfd):
    # The settings are checked on a probe program, which stays quiet;
    # the layer's own solves print SCS's log (an LP: SCS solves it).
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(a @ x), [x >= -1, x <= 1])
    layer = optlayer.Layer(problem, [a], [x],
                           solver_options={"verbose": True})
    assert "SCS" not in capfd.readouterr().out
    layer(np.array([1.0, 2.0]))
    assert "SCS" in capfd.readouterr().out


def test_adjoint_rejects_a_state_with_nan():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    layer = optlayer.Layer(problem, [a], [x])
    value = np.array([1.0, -1.0])
    _, (X, Y, S) = layer.solve(value)
    X = X.copy()
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="state has NaN or infinite"):
        layer.adjoint([value], (X, Y, S), [np.ones(2)])


def test_n_jobs_minus_one_means_every_cpu():
    # Also on the threaded paths (64 elements of a program with m n >=
    # 4000), which failed with n_jobs=-1 before.
    x = cp.Variable(40)
    A = cp.Parameter((110, 40))
    b = cp.Parameter(110)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
    layer = optlayer.Layer(problem, [A, b], [x], n_jobs=-1)
    assert layer.n_jobs == (os.cpu_count() or 1)
    rng = np.random.default_rng(4)
    As, bs = rng.normal(size=(110, 40)), rng.normal(size=(64, 110))
    (got,) = layer(As, bs)
    (want,) = optlayer.Layer(problem, [A, b], [x], n_jobs=1)(As, bs)
    # Both polished to ~1e-12; only the thread layout differs.
    np.testing.assert_allclose(got, want, atol=1e-8)


# -- solver failures -------------------------------------------------------


@pytest.fixture(scope="module")
def box_layer():
    """min sum(x) s.t. lo <= x <= hi: infeasible where lo > hi."""
    x = cp.Variable(2)
    lo = cp.Parameter(2, name="lo")
    hi = cp.Parameter(2, name="hi")
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [x >= lo, x <= hi])
    return optlayer.Layer(problem, [lo, hi], [x])


@pytest.fixture(scope="module")
def ray_layer():
    """min c'x s.t. x >= lo: unbounded where some c_i < 0."""
    x = cp.Variable(2)
    c = cp.Parameter(2, name="c")
    lo = cp.Parameter(2, name="lo")
    problem = cp.Problem(cp.Minimize(c @ x), [x >= lo])
    return optlayer.Layer(problem, [c, lo], [x])


def test_infeasible_elements(box_layer):
    hi = np.ones((4, 2))
    hi[1] = -1.0
    hi[3, 0] = -2.0
    with pytest.raises(optlayer.SolverError,
                       match=r"2 of 4 batch elements.*1: infeasible, "
                             r"3: infeasible") as info:
        box_layer(np.zeros(2), hi)
    assert isinstance(info.value, RuntimeError)
    assert info.value.elements == (1, 3)
    assert info.value.statuses == ("infeasible", "infeasible")
    # The backward pass solves first, and fails the same way.
    with pytest.raises(optlayer.SolverError, match=r"1: infeasible"):
        box_layer.vjp([np.zeros(2), hi], [np.ones((4, 2))])


def test_unbounded_elements(ray_layer):
    c = np.ones((3, 2))
    c[2, 1] = -1.0
    with pytest.raises(optlayer.SolverError,
                       match=r"1 of 3 batch elements.*2: unbounded") as info:
        ray_layer(c, np.zeros(2))
    assert info.value.elements == (2,)
    assert info.value.statuses == ("unbounded",)


def test_unbatched_failure(ray_layer):
    with pytest.raises(optlayer.SolverError,
                       match=r"failed on the problem.*unbounded") as info:
        ray_layer(np.array([1.0, -1.0]), np.zeros(2))
    assert info.value.elements == (0,)
    assert info.value.statuses == ("unbounded",)


def test_inaccurate_solve_warns():
    # Without refinement every element stopped by max_iters is reported.
    case = get_case("qp")
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, refine=False,
                           solver_options={"max_iters": 5})
    values = make_inputs(case, np.random.default_rng(1), 3)
    with pytest.warns(RuntimeWarning,
                      match=r"inaccurate solution for batch element\(s\) "
                            r"\[0, 1, 2\]"):
        (x,) = layer(*values)
    assert x.shape == (3, 5)


def _refinement_stuck_on(monkeypatch, layer, values, elements):
    """Make Newton refinement leave the given batch elements untouched.

    Refinement (with its regularized steps and second SCS pass) now
    finishes every element of these small programs even from a few SCS
    iterations, so the inaccurate-solution path is reached by pretending
    that it does not converge on ``elements`` (recognized by their c).
    """
    import optlayer.refine

    _, _, theta = layer._prepare(layer._as_arrays(values))
    targets = layer._data(theta)[2][elements]
    original = optlayer.refine.refine

    def stuck(Av, rows, cols, Bv, C, X, Y, S, dims, **kwargs):
        Xr, Yr, Sr, res = original(Av, rows, cols, Bv, C, X, Y, S, dims,
                                   **kwargs)
        hit = (C[:, None, :] == targets[None]).all(axis=2).any(axis=1)
        keep = hit[:, None]
        return (np.where(keep, X, Xr), np.where(keep, Y, Yr),
                np.where(keep, S, Sr), np.where(hit, np.inf, res))

    monkeypatch.setattr(optlayer.refine, "refine", stuck)


def test_inaccurate_warning_names_only_unrefined_elements(monkeypatch):
    # With refinement, elements that Newton steps bring to full accuracy
    # are not reported; the warning names exactly the inaccurate ones.
    case = get_case("qp")
    layer = optlayer.Layer(*case.build(), solver_options={"max_iters": 3})
    values = make_inputs(case, np.random.default_rng(1), 3)
    _refinement_stuck_on(monkeypatch, layer, values, [1])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        (x,) = layer(*values)
    messages = [str(w.message) for w in record
                if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    monkeypatch.undo()
    (ref,) = optlayer.Layer(*case.build())(*values)
    wrong = np.flatnonzero(np.abs(x - ref).max(axis=1) > 1e-8).tolist()
    assert _named_elements(messages[0]) == wrong == [1]


def _named_elements(message):
    match = re.search(r"element\(s\) \[([0-9, ]*)\]", message)
    assert match, message
    return [int(k) for k in match.group(1).split(",")]


def test_inaccurate_warnings_name_inaccurate_elements(monkeypatch):
    # min c'x + ||x||^2 s.t. x >= lo, solved as x = max(-c / 2, lo), by
    # 3 SCS iterations without the help of refinement. Whichever elements
    # that leaves inaccurate, the warning names exactly those.
    x = cp.Variable(3)
    c = cp.Parameter(3, name="c")
    lo = cp.Parameter(3, name="lo")
    problem = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [x >= lo])
    layer = optlayer.Layer(problem, [c, lo], [x],
                           solver_options={"max_iters": 3})
    cs = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 3.0], [0.0, 0.0, 0.0],
                   [2.0, 1.0, -1.0]])
    lo_value = -np.ones(3)
    _refinement_stuck_on(monkeypatch, layer, [cs, lo_value], [0, 1, 2, 3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (xs,) = layer(cs, lo_value)
    exact = np.maximum(-cs / 2, lo_value)
    inaccurate = {k for k in range(4)
                  if np.max(np.abs(xs[k] - exact[k])) > 1e-8}
    assert inaccurate, "expected some elements to stay inaccurate"
    messages = [str(w.message) for w in caught
                if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert set(_named_elements(messages[0])) == inaccurate, messages[0]


# -- silence ---------------------------------------------------------------


def test_normal_call_prints_and_warns_nothing(capsys):
    case = get_case("qp")
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables)
    values = make_inputs(case, np.random.default_rng(2), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs, state = layer.solve(*values)
        cotangents = [np.ones_like(o) for o in outputs]
        layer.adjoint(values, state, cotangents)
        layer.vjp(values, cotangents)
        layer(*[v[0] if v.ndim == 2 and v.shape[0] == 3 else v
                for v in values])
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_logging_only_through_optlayer_logger(caplog):
    package = os.path.dirname(os.path.abspath(optlayer.__file__))
    case = get_case("lasso")
    with caplog.at_level(logging.DEBUG):
        problem, params, variables = case.build()
        layer = optlayer.Layer(problem, params, variables)
        values = make_inputs(case, np.random.default_rng(3), 2)
        layer.vjp(values, [np.ones((2, 5))])
    ours = [r for r in caplog.records
            if os.path.abspath(r.pathname).startswith(package + os.sep)]
    # The core logs its compilation at DEBUG, so there is something to
    # check; every record from its modules must use the optlayer logger.
    assert ours, "expected DEBUG records from optlayer"
    for record in ours:
        assert record.name == "optlayer" or record.name.startswith(
            "optlayer."), (record.name, record.getMessage())


@pytest.mark.parametrize("cold_newton", [None, False])
def test_nearly_infeasible_elements_are_named(cold_newton, monkeypatch):
    # min ||x - a||^2 s.t. x >= p, sum(x) <= u with u = sum(p) - 1e-3 in
    # two elements: infeasible by 1e-3. SCS ends them "solved (inaccurate)"
    # at points that violate x >= p; with the default limits that is a
    # failure naming exactly those elements, whichever path solved the
    # others (Newton steps from the origin, or SCS).
    rng = np.random.default_rng(16)
    x = cp.Variable(4)
    a = cp.Parameter(4)
    p = cp.Parameter(4)
    u = cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)),
                         [x >= p, cp.sum(x) <= u])
    layer = optlayer.Layer(problem, [a, p, u], [x], warm_start=False)
    if cold_newton is not None:
        layer._cold_newton = cold_newton
    else:
        # Newton steps from the origin even for this small batch.
        monkeypatch.setattr("optlayer.layer._COLD_MIN_WORK", 0)
        monkeypatch.setattr("optlayer.layer._COLD_MIN_BATCH", 0)
    A = rng.standard_normal((40, 4)) + 3
    P = rng.standard_normal((40, 4))
    U = P.sum(axis=1) + 1.0
    U[[7, 31]] = P[[7, 31]].sum(axis=1) - 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(optlayer.SolverError) as info:
            layer(A, P, U)
    assert info.value.elements == (7, 31)
    for status in info.value.statuses:
        assert "infeasible" in status or "relative KKT residual" in status


def test_slightly_infeasible_elements_report_infeasibility():
    # An LP infeasible by 1e-4 or 1e-5 (x0 >= 0 and x0 <= -gap) passes
    # SCS's loose first tolerance, does not refine, and ends inaccurate at
    # the medium one; the tight run finds the certificate, and the error
    # reports it rather than the residual of the inaccurate point.
    x = cp.Variable(4)
    p = cp.Parameter(4)
    q = cp.Parameter(4)
    layer = optlayer.Layer(cp.Problem(cp.Minimize(cp.sum(x)),
                                      [x >= p, x <= q]), [p, q], [x],
                           warm_start=False)
    Q = np.ones((4, 4))
    Q[1, 0], Q[3, 0] = -1e-4, -1e-5
    with pytest.raises(optlayer.SolverError) as info:
        layer(np.zeros(4), Q)
    assert info.value.elements == (1, 3)
    for status in info.value.statuses:
        assert status.startswith("infeasible"), status


def test_inaccurate_failures_suggest_rescaling():
    # Failures with an inaccurate status (the iteration limit, as on badly
    # scaled squared norms) point at the data's scale; plain infeasibility
    # does not.
    from optlayer.solve import check_statuses, SOLVED

    with pytest.raises(optlayer.SolverError, match="rescale") as info:
        check_statuses([SOLVED, 2], ["solved", "solved (inaccurate - "
                                    "reached max_iters)"], True,
                       residuals=[0.0, 1e-2])
    assert list(info.value.elements) == [1]
    with pytest.raises(optlayer.SolverError) as info:
        check_statuses([SOLVED, -2], ["solved", "infeasible"], True)
    assert "rescale" not in str(info.value)
    assert list(info.value.elements) == [1]


def test_parameter_inside_a_quadratic_form():
    # problem.is_dpp() is True, but CVXPY compiles quad_form(x - p, P) as
    # not DPP for cone solvers: a clear error with the rewriting, with or
    # without a value for p, also on a second attempt (CVXPY caches).
    x = cp.Variable(2)
    p = cp.Parameter(2)
    P = np.array([[1.0, 0.2], [0.2, 2.0]])
    problem = cp.Problem(cp.Minimize(cp.quad_form(x - p, P)),
                         [cp.abs(x) <= 5])
    for value in (None, np.array([1.0, 2.0])):
        p.value = value
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=r"not DPP for a cone "
                                                 r"solver.*quad_form\(x, P\)"):
                optlayer.Layer(problem, [p], [x])
    # The rewriting works and gives the projection in the P-norm.
    rewritten = cp.Problem(cp.Minimize(cp.quad_form(x, P) - 2 * (P @ p) @ x),
                           [cp.abs(x) <= 5])
    (got,) = optlayer.Layer(rewritten, [p], [x])(np.array([1.0, 2.0]))
    # Exact answer x = p (inside the box), polished to ~1e-12.
    np.testing.assert_allclose(got, [1.0, 2.0], atol=1e-8)


def test_shape_layout_takes_unknown_dimensions(relu_layer):
    # Symbolic shapes (None for dimensions not known yet) are validated
    # like values: errors show the shape as given, never a made-up size.
    layout = relu_layer.shape_layout
    assert layout((3, 4), (3,), (4,)) == (False, None, [False] * 3)
    assert layout((None, 3, 4), (3,), (None, 4)) == (True, None,
                                                      [True, False, True])
    assert layout((None, 3, 4), (5, 3), (1, 4)) == (True, 5,
                                                    [True, True, True])
    assert layout((1, 3, 4), (3,), (4,)) == (True, 1, [True, False, False])
    with pytest.raises(ValueError, match=r"Parameter 1 'b' has shape "
                       r"\(None, 2\); expected \(3,\) \(unbatched\) or "
                       r"\(batch, 3\)"):
        layout((None, 3, 4), (None, 2), (4,))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        layout((2, 3, 4), (None, 3), (5, 4))
    with pytest.raises(ValueError, match="Expected 3 parameter values"):
        layout((3, 4), (3,))


def test_degenerate_solutions_warn_in_the_backward_pass():
    # z = max(a, 0) at a_0 = 0 exactly: the bound z_0 >= 0 is active with a
    # zero multiplier, where the solution map has no derivative. The
    # backward pass warns, naming the batch element; the forward pass and
    # nondegenerate elements do not.
    z = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - a)), [z >= 0])
    layer = optlayer.Layer(problem, [a], [z])
    values = np.array([[0.5, -1.0], [0.0, 1.0], [-0.3, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,) = layer(values)
        layer.vjp([values[[0, 2]]], [np.ones((2, 2))])
    np.testing.assert_allclose(out, np.maximum(values, 0), atol=1e-12)
    with pytest.warns(RuntimeWarning, match=r"batch element\(s\) \[1\] is "
                      r"degenerate"):
        layer.vjp([values], [np.ones((3, 2))])


def test_degeneracy_that_does_not_reach_the_gradient_is_quiet():
    # Inactive norm1 / norm_inf bounds: their epigraph variables are not
    # unique, and the solution found has constraints at 0 with zero
    # multipliers, but x = a whatever they are: both one-sided gradients
    # are the identity, and no warning is due.
    x = cp.Variable(3)
    a = cp.Parameter(3)
    values = np.array([[1.0, -2.0, 0.5], [0.2, 0.3, -0.4]])
    cot = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]])
    for bound in (cp.norm1(x) <= 100, cp.norm_inf(x) <= 10):
        problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [bound])
        layer = optlayer.Layer(problem, [a], [x])
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            (g,) = layer.vjp([values], [cot])
        # dx/da = I: the adjoint solves are exact up to the conditioning
        # of well-scaled systems (about 1e-12); 1e-9 leaves room.
        np.testing.assert_allclose(g, cot, rtol=1e-9, atol=1e-12)


def test_empty_scs_status_reads_unknown_and_hint_fits_the_option():
    # SCS leaves its status text empty when it cannot tell; the error says
    # "unknown". The rescaling hint suggests quadratic_objective=True only
    # to layers that do not use it already.
    from optlayer.solve import failures, solver_error

    failed = failures([-4], [" (inaccurate - reached max_iters)"])
    assert failed == {0: "unknown (inaccurate - reached max_iters)"}
    assert "the problem: unknown (inaccurate" in str(
        solver_error(failed, False, 1))
    status = {0: "solved (inaccurate - reached max_iters)"}
    assert "construct the layer with quadratic_objective=True" in str(
        solver_error(status, False, 1))
    assert "kept quadratic already" in str(
        solver_error(status, False, 1, quadratic_objective=True))


def test_values_that_are_not_arrays_are_named():
    x = cp.Variable(2)
    a = cp.Parameter(2, name="a")
    c = cp.Parameter(name="c")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a) + c * cp.sum(x)))
    layer = optlayer.Layer(problem, [a, c], [x])
    cases = [
        ((None, 1.0), r"Parameter 0 'a': the value is None"),
        (([[1.0, 2.0], [3.0]], 1.0),
         r"Parameter 0 'a': value of type list cannot be converted"),
        ((sp.csr_matrix(np.ones((1, 2))), 1.0),
         r"Parameter 0 'a': sparse matrices .* value.toarray\(\)"),
        ((np.ones(2), np.ones((3, 1))),
         r"Parameter 1 'c' has shape \(3, 1\); expected \(\) \(unbatched\) "
         r"or \(batch,\) \(batched\)"),
    ]
    for values, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            layer(*values)


def test_adjoint_checks_cotangents_and_state():
    x = cp.Variable(2)
    a = cp.Parameter(2, name="a")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    layer = optlayer.Layer(problem, [a], [x])
    values = [np.array([1.0, -1.0])]
    _, state = layer.solve(*values)
    for cotangents in ([], [np.ones(2), np.ones(2)]):
        with pytest.raises(ValueError, match=r"Expected 1 cotangent\(s\), "
                                             r"one per output"):
            layer.adjoint(values, state, cotangents)
    # A state of another batch size.
    batch = [np.array([[1.0, -1.0], [2.0, 0.5]])]
    with pytest.raises(ValueError, match=r"state x has shape \(1, \d+\); "
                                         r"expected \(2, \d+\) for this "
                                         r"call's batch size 2"):
        layer.adjoint(batch, state, [np.ones((2, 2))])


def test_callback_parameter_whose_callback_fails_at_compile_time():
    # CVXPY evaluates a CallbackParam's callback while compiling; before
    # its inputs have values that fails inside the user's code. The error
    # must name the parameter and say what to do.
    A1 = cp.Parameter((3, 2))
    A2 = cp.Parameter((2, 4))
    b = cp.Parameter(3, name="b")
    x = cp.Variable(4)
    A = cp.CallbackParam(shape=(3, 4), callback=lambda: A1.value @ A2.value,
                         name="A")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x + b)))
    with pytest.raises(ValueError, match=r"\(TypeError: .*CallbackParam "
                                         r"parameter\(s\) 0 'A' .*declare "
                                         r"it as a cp.Parameter"):
        optlayer.Layer(problem, [A, b], [x])
