"""Tests of the PyTorch adapter, ``optlayer_torch.Layer``.

The adapter holds no mathematics, so most checks compare it with the NumPy
core on the same inputs (outputs and ``Layer.vjp``); ``gradcheck`` adds an
independent finite-difference check of the gradients through torch.
"""

import copy
import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cvxpy as cp  # noqa: E402

import optlayer  # noqa: E402
import optlayer_torch  # noqa: E402
from benchmarks import relu as relu_driver  # noqa: E402
from benchmarks import relu_torch  # noqa: E402
from tests.zoo import CASES, get_case, make_inputs  # noqa: E402

# The adapter and the core run the same float64 computation; only the
# tensor <-> array conversions lie between them. Two runs of the core agree
# to about 1e-12 absolute (not bitwise: threaded solves and factorizations
# round differently), which matters only for entries that are zero in exact
# arithmetic, e.g. the LP's gradient in c; hence the absolute floor.
RTOL_CORE = 1e-8
ATOL_CORE = 1e-10

ZOO_NAMES = [case.name for case in CASES]


def _layers(case, **overrides):
    """(torch layer, independent core layer) for a fresh build of ``case``."""
    kwargs = dict(case.layer_kwargs)
    kwargs.update(overrides)
    torch_layer = optlayer_torch.Layer(*case.build(), **kwargs)
    core = optlayer.Layer(*case.build(), **kwargs)
    return torch_layer, core


def _nonneg_lsq(m=4, n=3):
    """minimize ||A x - b||^2 + 0.1 ||x||^2 s.t. x >= 0; params A, b."""
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    x = cp.Variable(n)
    objective = cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(objective), [x >= 0]), [A, b], [x]


def _lsq_values(rng, batch=None, m=4, n=3):
    shape_b = (m,) if batch is None else (batch, m)
    return rng.standard_normal((m, n)), rng.standard_normal(shape_b)


# -- the shared zoo against the core ----------------------------------------


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_matches_core(name, batch_size):
    case = get_case(name)
    rng = np.random.default_rng(0)
    values = make_inputs(case, rng, batch_size)
    torch_layer, core = _layers(case)

    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for v in values]
    outputs = torch_layer(*inputs)
    expected = core(*values)
    assert len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        assert out.dtype == torch.float64
        np.testing.assert_allclose(out.detach().numpy(), exp,
                                   rtol=RTOL_CORE, atol=ATOL_CORE)

    # Random weights make the loss touch every output entry.
    weights = [rng.standard_normal(e.shape) for e in expected]
    loss = sum((out * torch.from_numpy(w)).sum()
               for out, w in zip(outputs, weights))
    loss.backward()
    grads = core.vjp(values, weights)
    for inp, g in zip(inputs, grads):
        assert inp.grad.shape == inp.shape
        np.testing.assert_allclose(inp.grad.numpy(), g, rtol=RTOL_CORE,
                                   atol=ATOL_CORE)


# -- gradcheck ----------------------------------------------------------------

# With SCS at eps 1e-12, central differences with step 1e-5 agree with the
# adapter's Jacobians to 6e-8 or better on these four cases (measured; the
# entries are O(1)): the solution noise (~1e-12 / 1e-5) and the truncation
# error (O(eps^2)) are both small at this step, while step 1e-6 is already
# dominated by noise (5e-7). atol = rtol = 1e-6 keeps a margin of 15 over
# that and still fails when every gradient is scaled by 1 + 1e-4.
GRADCHECK = {"eps": 1e-5, "atol": 1e-6, "rtol": 1e-6}
TIGHT = {"eps_abs": 1e-12, "eps_rel": 1e-12, "max_iters": 200_000}
# Finite differences on an LP are only valid inside one affine piece of its
# solution map: every inequality must be clearly active with a clearly
# positive multiplier, or clearly slack (far more than the step above).
LP_MARGIN = 1e-3


def _assert_strictly_complementary(case, values):
    problem, params, _ = case.build()
    for param, value in zip(params, values):
        param.value = value
    problem.solve(solver=cp.CLARABEL)
    for con in problem.constraints:
        slack = -np.asarray(con.expr.value)
        dual = np.asarray(con.dual_value)
        assert np.all((slack > LP_MARGIN) | (dual > LP_MARGIN)), (
            f"LP sample too close to a change of active set: slack {slack}, "
            f"dual {dual}")


@pytest.mark.parametrize("name", ["lp", "qp", "socp", "relu"])
def test_gradcheck(name):
    case = get_case(name)
    options = dict(case.layer_kwargs.get("solver_options") or {})
    options.update(TIGHT)
    torch_layer, _ = _layers(case, solver_options=options)
    values = make_inputs(case, np.random.default_rng(1), None)
    if name == "lp":
        _assert_strictly_complementary(case, values)
    inputs = tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True)
                   for v in values)
    assert torch.autograd.gradcheck(lambda *a: torch_layer(*a), inputs,
                                    **GRADCHECK)


# -- dtype and device ---------------------------------------------------------


def test_float32_in_float32_out():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(2), batch=3)
    A32 = torch.tensor(A, dtype=torch.float32, requires_grad=True)
    b32 = torch.tensor(b, dtype=torch.float32, requires_grad=True)
    (x,) = layer(A32, b32)
    assert x.dtype == torch.float32
    x.sum().backward()
    assert A32.grad.dtype == torch.float32 and b32.grad.dtype == torch.float32

    # Same numbers as the float64 core at the float32-rounded inputs, up to
    # float32 rounding of the results.
    A_r, b_r = A32.detach().double().numpy(), b32.detach().double().numpy()
    (x_core,) = layer.core(A_r, b_r)
    gA, gb = layer.core.vjp([A_r, b_r], [np.ones_like(x_core)])
    np.testing.assert_allclose(x.detach().numpy(), x_core, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(A32.grad.numpy(), gA, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b32.grad.numpy(), gb, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_promote():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(3))
    A32 = torch.tensor(A, dtype=torch.float32, requires_grad=True)
    b64 = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    (x,) = layer(A32, b64)
    assert x.dtype == torch.promote_types(torch.float32, torch.float64)
    x.sum().backward()
    # Each gradient keeps its own input's dtype.
    assert A32.grad.dtype == torch.float32
    assert b64.grad.dtype == torch.float64


def test_outputs_follow_input_device():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables).to("cpu")
    A, b = _lsq_values(np.random.default_rng(4), batch=2)
    A_t = torch.tensor(A).to("cpu").requires_grad_()
    b_t = torch.tensor(b).to(torch.device("cpu")).requires_grad_()
    (x,) = layer(A_t, b_t)
    assert x.device == A_t.device
    x.sum().backward()
    assert A_t.grad.device == A_t.device and b_t.grad.device == b_t.device
    (x_core,) = layer.core(A, b)
    np.testing.assert_allclose(x.detach().cpu().numpy(), x_core,
                               rtol=RTOL_CORE, atol=ATOL_CORE)


def test_non_tensor_inputs():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(5))
    (x_core,) = layer.core(A, b)

    # NumPy only: float64 arrays keep float64.
    (x,) = layer(A, b)
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float64
    np.testing.assert_allclose(x.numpy(), x_core, rtol=RTOL_CORE,
                               atol=ATOL_CORE)

    # A tensor next to a NumPy array: the tensor sets the dtype, and only
    # the tensor gets a gradient.
    b_t = torch.tensor(b, requires_grad=True)
    (x,) = layer(A, b_t)
    x.sum().backward()
    _, gb = layer.core.vjp([A, b], [np.ones(3)])
    np.testing.assert_allclose(b_t.grad.numpy(), gb, rtol=RTOL_CORE,
                               atol=ATOL_CORE)

    # Python numbers for a scalar parameter.
    a = cp.Parameter()
    y = cp.Variable()
    scalar = optlayer_torch.Layer(
        cp.Problem(cp.Minimize(cp.square(y - a)), [y >= 0]), [a], [y])
    (y_pos,) = scalar(2.0)
    (y_neg,) = scalar(-2.0)
    assert y_pos.dtype == torch.get_default_dtype()
    assert abs(float(y_pos) - 2.0) < 1e-6 and abs(float(y_neg)) < 1e-6


def test_bfloat16_in_bfloat16_out():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(30), batch=3)
    A16 = torch.tensor(A, dtype=torch.bfloat16, requires_grad=True)
    b16 = torch.tensor(b, dtype=torch.bfloat16, requires_grad=True)
    w = np.random.default_rng(31).standard_normal((3, 3))
    (x,) = layer(A16, b16)
    assert x.dtype == torch.bfloat16
    (x * torch.tensor(w, dtype=torch.bfloat16)).sum().backward()
    assert A16.grad.dtype == b16.grad.dtype == torch.bfloat16

    # The float64 core at the bfloat16-rounded inputs (and weights),
    # rounded to bfloat16 (8 bits of mantissa: relative error 2^-8).
    A_r, b_r = A16.detach().double().numpy(), b16.detach().double().numpy()
    w_r = torch.tensor(w, dtype=torch.bfloat16).double().numpy()
    (x_core,) = layer.core(A_r, b_r)
    gA, gb = layer.core.vjp([A_r, b_r], [w_r])
    assert np.max(np.abs(gb)) > 0.1
    for got, exp in ((x, x_core), (A16.grad, gA), (b16.grad, gb)):
        np.testing.assert_allclose(got.detach().double().numpy(), exp,
                                   rtol=1e-2, atol=1e-2)

    # Without gradients (the direct path) too.
    with torch.no_grad():
        (x_ng,) = layer(A16, b16)
    assert x_ng.dtype == torch.bfloat16
    np.testing.assert_allclose(x_ng.double().numpy(), x_core, rtol=1e-2,
                               atol=1e-2)


def test_complex_values_raise_naming_the_parameter():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(32))
    bad_values = [torch.tensor(b + 1j, requires_grad=True),
                  torch.tensor(b, dtype=torch.complex64),
                  b + 1j, list(b + 1j)]
    for bad in bad_values:
        # Raised, not truncated to the real part with a ComplexWarning.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError,
                               match="Parameter 1 'param[0-9]+' is complex"):
                layer(torch.tensor(A), bad)
    # Real values of the same shapes are the core's solution.
    (x,) = layer(torch.tensor(A), torch.tensor(b))
    np.testing.assert_allclose(x.numpy(), layer.core(A, b)[0],
                               rtol=RTOL_CORE, atol=ATOL_CORE)


# -- grad bookkeeping ---------------------------------------------------------


def test_no_grad_keeps_no_state():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(6), batch=2)
    A_t = torch.tensor(A, requires_grad=True)
    b_t = torch.tensor(b, requires_grad=True)

    # No autograd node means no saved values or solver state.
    with torch.no_grad():
        (x,) = layer(A_t, b_t)
    assert x.grad_fn is None and not x.requires_grad
    (x2,) = layer(A_t.detach(), b_t.detach())
    assert x2.grad_fn is None and not x2.requires_grad
    np.testing.assert_allclose(x.numpy(), layer.core(A, b)[0],
                               rtol=RTOL_CORE, atol=ATOL_CORE)


def test_requires_grad_false_gets_none(monkeypatch):
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(7), batch=3)
    gA_core, gb_core = layer.core.vjp([A, b], [np.ones((3, 3))])

    # Record what the adapter asks of the core.
    calls = []
    adjoint = layer.core.adjoint

    def recording(values, state, cotangents, needs_grad=None):
        calls.append(needs_grad)
        return adjoint(values, state, cotangents, needs_grad=needs_grad)

    monkeypatch.setattr(layer.core, "adjoint", recording)
    A_t = torch.tensor(A)                       # constant
    b_t = torch.tensor(b, requires_grad=True)
    (x,) = layer(A_t, b_t)
    x.sum().backward()
    assert calls == [[False, True]]
    assert A_t.grad is None
    np.testing.assert_allclose(b_t.grad.numpy(), gb_core, rtol=RTOL_CORE,
                               atol=ATOL_CORE)

    # Now A only.
    A_t = torch.tensor(A, requires_grad=True)
    b_t = torch.tensor(b)
    (x,) = layer(A_t, b_t)
    (gA,) = torch.autograd.grad(x.sum(), [A_t])
    assert calls[-1] == [True, False]
    np.testing.assert_allclose(gA.numpy(), gA_core, rtol=RTOL_CORE,
                               atol=ATOL_CORE)


def test_mixed_batching_sums_unbatched_gradient():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(8), batch=4)
    A_t = torch.tensor(A, requires_grad=True)   # shared, (4, 3)
    b_t = torch.tensor(b, requires_grad=True)   # batched, (4, 4)
    weights = torch.tensor(np.random.default_rng(9).standard_normal((4, 3)))
    (x,) = layer(A_t, b_t)
    assert x.shape == (4, 3)
    (x * weights).sum().backward()
    assert A_t.grad.shape == (4, 3) and b_t.grad.shape == (4, 4)

    # Element by element, unbatched: A's gradient is the sum of the
    # per-element gradients, b's are stacked.
    gA_sum = torch.zeros(4, 3, dtype=torch.float64)
    for i in range(4):
        A_i = torch.tensor(A, requires_grad=True)
        b_i = torch.tensor(b[i], requires_grad=True)
        (x_i,) = layer(A_i, b_i)
        torch.testing.assert_close(x_i, x[i].detach(), rtol=1e-8, atol=1e-10)
        (x_i * weights[i]).sum().backward()
        gA_sum += A_i.grad
        torch.testing.assert_close(b_i.grad, b_t.grad[i], rtol=1e-7,
                                   atol=1e-9)
    torch.testing.assert_close(gA_sum, A_t.grad, rtol=1e-7, atol=1e-9)


def test_unused_output_gets_no_cotangent():
    # Two outputs; the loss uses only one. The gradient must equal the
    # core's with a None (zero) cotangent for the other.
    x = cp.Variable(2)
    a = cp.Parameter(2)
    con = x >= 0
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [con])
    layer = optlayer_torch.Layer(problem, [a], [x, con.dual_variables[0]])
    a_val = np.array([0.7, -0.4])
    a_t = torch.tensor(a_val, requires_grad=True)
    sol, dual = layer(a_t)
    (2.0 * dual).sum().backward()
    (g,) = layer.core.vjp([a_val], [None, 2.0 * np.ones(2)])
    np.testing.assert_allclose(a_t.grad.numpy(), g, rtol=RTOL_CORE,
                               atol=ATOL_CORE)
    # Closed form: dual = 2 max(-a, 0), so d(2 sum dual)/da = (0, -4).
    np.testing.assert_allclose(a_t.grad.numpy(), [0.0, -4.0], atol=1e-6)


def test_backward_sees_forward_values():
    # Changing an input in place after the forward must not change the
    # gradient: the adapter keeps its own copy of the values.
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(10))
    A_t = torch.tensor(A, requires_grad=True)
    b_t = torch.tensor(b, requires_grad=True)
    (x,) = layer(A_t, b_t)
    with torch.no_grad():
        A_t.mul_(3.0)
        b_t.add_(1.0)
    x.sum().backward()
    gA, gb = layer.core.vjp([A, b], [np.ones(3)])
    np.testing.assert_allclose(A_t.grad.numpy(), gA, rtol=RTOL_CORE,
                               atol=ATOL_CORE)
    np.testing.assert_allclose(b_t.grad.numpy(), gb, rtol=RTOL_CORE,
                               atol=ATOL_CORE)


def test_second_derivatives_raise_instead_of_returning_constants():
    # With create_graph=True the gradient would otherwise come back as a
    # constant: a gradient penalty or a Hessian silently zero.
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(34))
    A_t = torch.tensor(A)
    b_t = torch.tensor(b, requires_grad=True)

    def loss(b_):
        return (layer(A_t, b_)[0] ** 2).sum()

    attempts = [
        lambda: torch.autograd.grad(loss(b_t), [b_t], create_graph=True),
        lambda: torch.autograd.functional.hessian(loss, b_t),
    ]
    for attempt in attempts:
        with pytest.raises(RuntimeError, match="differentiable once"):
            attempt()
    # First derivatives are unaffected.
    (g,) = torch.autograd.grad(loss(b_t), [b_t])
    x = layer.core(A, b)[0]
    (_, gb_core) = layer.core.vjp([A, b], [2 * x])
    np.testing.assert_allclose(g.numpy(), gb_core, rtol=RTOL_CORE,
                               atol=ATOL_CORE)


def test_torch_func_transforms_raise_a_clear_error():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(33), batch=2)
    A_t, b_t = torch.tensor(A), torch.tensor(b)

    def loss(b_):
        return layer(A_t, b_)[0].sum()

    transforms = [
        lambda: torch.func.grad(loss)(b_t[0]),
        lambda: torch.func.vmap(lambda b_: layer(A_t, b_)[0])(b_t),
        lambda: torch.func.jacrev(lambda b_: layer(A_t, b_)[0])(b_t[0]),
        lambda: torch.func.vjp(lambda b_: layer(A_t, b_)[0], b_t[0]),
    ]
    for transform in transforms:
        with pytest.raises(NotImplementedError,
                           match="does not support torch.func transforms"):
            transform()

    # What the message recommends: ordinary autograd over the layer's batch
    # gives the core's gradient.
    b_g = b_t.clone().requires_grad_()
    (g,) = torch.autograd.grad(layer(A_t, b_g)[0].sum(), [b_g])
    (_, gb_core) = layer.core.vjp([A, b], [np.ones((2, 3))])
    np.testing.assert_allclose(g.numpy(), gb_core, rtol=RTOL_CORE,
                               atol=ATOL_CORE)
    # A transform over something the layer does not see is unaffected.
    (x,) = layer(A_t, b_t)
    scale = torch.func.grad(lambda s: (s * x).sum())(
        torch.tensor(2.0, dtype=torch.float64))
    np.testing.assert_allclose(float(scale), float(x.sum()), rtol=1e-12)


def test_tracing_forward_mode_and_batched_cotangents_raise():
    # Each would otherwise lose the layer's dependence on its inputs
    # silently (a trace records the outputs as constants; a forward-mode
    # tangent is dropped) or fail with torch's internal messages.
    import torch.autograd.forward_ad as fwad

    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(35))
    A_t, b_t = torch.tensor(A), torch.tensor(b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's own
        with pytest.raises(NotImplementedError, match="cannot be traced"):
            torch.jit.trace(layer, (A_t, b_t))
    with fwad.dual_level():
        dual = fwad.make_dual(b_t, torch.ones_like(b_t))
        with pytest.raises(NotImplementedError, match="no forward-mode"):
            layer(A_t, dual)
    b_g = b_t.clone().requires_grad_()
    (x,) = layer(A_t, b_g)
    with pytest.raises(NotImplementedError, match="batched cotangents"):
        torch.autograd.grad(x, [b_g], torch.eye(3, dtype=torch.float64),
                            is_grads_batched=True)
    # The unbatched Jacobian works and equals the core's, row by row.
    jac = torch.autograd.functional.jacobian(lambda b_: layer(A_t, b_)[0],
                                             b_t)
    for k in range(3):
        (_, row) = layer.core.vjp([A, b], [np.eye(3)[k]])
        np.testing.assert_allclose(jac[k].numpy(), row, rtol=RTOL_CORE,
                                   atol=ATOL_CORE)


def test_torch_compile_calls_the_layer_as_it_is():
    # torch.compile must not trace the NumPy solve (a graph break instead):
    # values and gradients as eager.
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(36), batch=3)
    A_t = torch.tensor(A)

    def loss(b_):
        return (layer(A_t, b_)[0] ** 2).sum()

    compiled = torch.compile(loss, backend="eager")
    b_c = torch.tensor(b, requires_grad=True)
    b_e = torch.tensor(b, requires_grad=True)
    value_c, value_e = compiled(b_c), loss(b_e)
    value_c.backward()
    value_e.backward()
    np.testing.assert_allclose(value_c.item(), value_e.item(), rtol=1e-10)
    np.testing.assert_allclose(b_c.grad.numpy(), b_e.grad.numpy(),
                               rtol=RTOL_CORE, atol=ATOL_CORE)


# -- errors -------------------------------------------------------------------


def test_none_and_lists_of_tensors_get_clear_errors():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(37))
    with pytest.raises(ValueError, match=r"Parameter 1 .*the value is None"):
        layer(torch.tensor(A), None)
    with pytest.raises(ValueError, match=r"Parameter 1 .*a list of tensors"
                                         r".*torch.stack"):
        layer(torch.tensor(A), [torch.tensor(v) for v in b])


def test_shape_error_is_the_core_error():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A = np.ones((4, 3))
    b = np.ones(5)
    with pytest.raises(ValueError) as core_error:
        layer.core(A, b)
    with pytest.raises(ValueError, match=re.escape(str(core_error.value))):
        layer(torch.tensor(A, requires_grad=True), torch.tensor(b))
    with pytest.raises(ValueError, match=re.escape(str(core_error.value))):
        layer(torch.tensor(A), torch.tensor(b))
    # A wrong number of values, and a value that is no number at all.
    with pytest.raises(ValueError) as core_error:
        layer.core(A)
    with pytest.raises(ValueError, match=re.escape(str(core_error.value))):
        layer(torch.tensor(A))
    with pytest.raises(ValueError) as core_error:
        layer.core(A, "b")
    with pytest.raises(ValueError, match=re.escape(str(core_error.value))):
        layer(torch.tensor(A), "b")


def test_infeasible_raises_solver_error():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [x >= a, x <= 0])
    layer = optlayer_torch.Layer(problem, [a], [x])
    assert optlayer_torch.SolverError is optlayer.SolverError
    values = np.array([[-1.0, -1.0], [1.0, 0.5]])   # element 1 infeasible
    with pytest.raises(optlayer.SolverError) as core_error:
        layer.core(values)
    with pytest.raises(optlayer_torch.SolverError) as error:
        layer(torch.tensor(values, requires_grad=True))
    assert str(error.value) == str(core_error.value)
    assert error.value.elements == (1,)


# -- inside models ------------------------------------------------------------


class _Projection(torch.nn.Module):
    """Feeds a linear map's output to the layer as the parameter ``b``."""

    def __init__(self, m=4, n=3, seed=11):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.A = torch.nn.Parameter(torch.tensor(rng.standard_normal((m, n))))
        self.layer = optlayer_torch.Layer(*_nonneg_lsq(m, n))

    def forward(self, b):
        (x,) = self.layer(self.A, b)
        return x


def _model(seed=11):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(5, 4, dtype=torch.float64)
    return torch.nn.Sequential(linear, _Projection(seed=seed),
                               torch.nn.Linear(3, 1, dtype=torch.float64))


def test_in_sequential():
    model = _model()
    inputs = torch.tensor(np.random.default_rng(12).standard_normal((6, 5)))
    out = model(inputs)
    assert out.shape == (6, 1)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    # Chain rule by hand: the first linear layer's weight gradient is
    # g_b' inputs, with g_b the core's gradient for b.
    linear, proj, head = model
    with torch.no_grad():
        b = linear(inputs).numpy()
    cot = np.tile(head.weight.detach().numpy(), (6, 1))
    _, gb = proj.layer.core.vjp([proj.A.detach().numpy(), b], [cot])
    np.testing.assert_allclose(linear.weight.grad.numpy(),
                               gb.T @ inputs.numpy(), rtol=1e-8, atol=1e-10)


def test_state_dict_round_trip():
    model = _model(seed=13)
    inputs = torch.tensor(np.random.default_rng(14).standard_normal((3, 5)))
    with torch.no_grad():
        model[1].A.mul_(2.0)            # differ from a fresh init
        expected = model(inputs)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)

    # The layer itself adds no entries; the Parameters around it do.
    state = torch.load(buffer)
    assert set(state) == {"0.weight", "0.bias", "1.A", "2.weight", "2.bias"}
    fresh = _model(seed=99)
    fresh.load_state_dict(state)
    with torch.no_grad():
        got = fresh(inputs)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_deepcopy_gives_an_equivalent_layer():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_torch.Layer(problem, params, variables)
    A, b = _lsq_values(np.random.default_rng(34), batch=3)
    layer(torch.tensor(A), torch.tensor(b))
    clone = copy.deepcopy(layer)
    assert clone.core is not layer.core
    A_t = torch.tensor(A, requires_grad=True)
    b_t = torch.tensor(b, requires_grad=True)
    (x,) = clone(A_t, b_t)
    x.sum().backward()
    (x_core,) = layer.core(A, b)
    gA, gb = layer.core.vjp([A, b], [np.ones((3, 3))])
    for got, exp in ((x.detach(), x_core), (A_t.grad, gA), (b_t.grad, gb)):
        np.testing.assert_allclose(got.numpy(), exp, rtol=RTOL_CORE,
                                   atol=ATOL_CORE)


# -- the seed example ---------------------------------------------------------


def test_relu_train_small():
    # The instance the Keras test trains too; on it the loss falls from the
    # first Adam step (with 1e-3 weights it need not, on every draw).
    init, X, Y = relu_driver.make_problem_data(d=5, h=5, n_samples=20,
                                               seed=9)
    lines = []
    result = relu_torch.train(init, X, Y, steps=3, n_jobs=1, log=lines.append)
    reference = relu_torch.train(init, X, Y, steps=3, closed_form=True,
                                 log=lambda line: None)

    losses = result["losses"]
    assert len(losses) == 3 and len(lines) == 3
    assert lines[0] == f"step   0  loss {losses[0]:.12f}"
    assert losses[0] > losses[1] > losses[2]
    assert result["max_output_error"] < 1e-6
    assert result["max_grad_error"] < 1e-6
    np.testing.assert_allclose(losses, reference["losses"], rtol=0,
                               atol=1e-6)
    assert reference["max_output_error"] == 0.0
    assert reference["max_grad_error"] == 0.0
    for key in ("forward_time", "backward_time", "wall_time"):
        assert result[key] > 0.0


def test_empty_batch_gives_empty_outputs_and_gradients():
    # A batch of 0 elements (say, an empty last batch): empty outputs, an
    # empty gradient for the batched input, zero for the shared one.
    x = cp.Variable(3)
    a = cp.Parameter(3)
    c = cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)),
                         [x >= 0, cp.sum(x) <= c])
    layer = optlayer_torch.Layer(problem, [a, c], [x])
    a_t = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    c_t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (sol,) = layer(a_t, c_t)
    assert sol.shape == (0, 3)
    sol.sum().backward()
    assert a_t.grad.shape == (0, 3)
    assert c_t.grad.item() == 0.0
