"""The JAX adapter against the NumPy core: eager, jit, grad, vmap, dtypes.

The adapter has no mathematics of its own, so in float64 its outputs and
gradients must equal the core's (``Layer.__call__`` and ``Layer.vjp``) on the
same inputs up to rounding; the core itself is checked against finite
differences and closed forms in its own tests. Here ``check_grads`` adds an
independent finite-difference check through JAX's own machinery.
"""

import copy
import doctest
import pickle

import cvxpy as cp
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import optlayer  # noqa: E402
import optlayer_jax  # noqa: E402
from optlayer_jax import layer as jax_layer_module  # noqa: E402
from tests.zoo import CASES, get_case, make_inputs  # noqa: E402

# Adapter vs core in float64: the same core computes both, so they differ
# only by the solver's run-to-run noise. SCS is not bit-reproducible: two
# solves of the same data differ by up to ~5e-12 in outputs and ~5e-13 in
# gradients (measured on the zoo), all in entries that are zero at the
# solution; atol covers that with margin, rtol is the brief's 1e-8.
RTOL = 1e-8
ATOL = 1e-10

CASE_NAMES = [case.name for case in CASES]

_LAYERS = {}


def _layer(name):
    """One compiled JAX layer per zoo case, shared by the tests."""
    if name not in _LAYERS:
        case = get_case(name)
        problem, params, variables = case.build()
        _LAYERS[name] = optlayer_jax.Layer(problem, params, variables,
                                           **case.layer_kwargs)
    return _LAYERS[name]


def _inputs(name, batch_size, seed=0):
    return make_inputs(get_case(name), np.random.default_rng(seed),
                       batch_size)


def _cotangents(layer, values, rng):
    """Random weights shaped like the core's outputs for ``values``."""
    batch = layer.core.batch_size(*values)
    lead = () if batch is None else (batch,)
    return [rng.standard_normal(lead + shape) for shape in layer.output_shapes]


def _weighted_loss(layer, weights):
    """``values -> sum_k <output_k, weights_k>``."""
    def loss(*values):
        outputs = layer(*values)
        return sum(jnp.sum(o * w) for o, w in zip(outputs, weights))
    return loss


def _assert_all_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol)


class _CoreCalls:
    """Counts the core's solve and adjoint calls on one layer."""

    def __init__(self, layer, monkeypatch):
        self.solves = []
        self.adjoints = []
        core = layer.core
        solve, adjoint = core.solve, core.adjoint

        def counting_solve(*values, **kwargs):
            self.solves.append([np.shape(v) for v in values])
            return solve(*values, **kwargs)

        def counting_adjoint(*args, **kwargs):
            self.adjoints.append(1)
            return adjoint(*args, **kwargs)

        monkeypatch.setattr(core, "solve", counting_solve)
        monkeypatch.setattr(core, "adjoint", counting_adjoint)


# -- the zoo: eager, jit, vmap -----------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 5], ids=["unbatched", "mixed"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_zoo_eager_matches_core(name, batch_size):
    layer = _layer(name)
    values = _inputs(name, batch_size)
    weights = _cotangents(layer, values, np.random.default_rng(1))
    args = [jnp.asarray(v) for v in values]

    _assert_all_close(layer(*args), layer.core(*values))
    grads = jax.grad(_weighted_loss(layer, weights),
                     argnums=tuple(range(len(values))))(*args)
    _assert_all_close(grads, layer.core.vjp(values, weights))


def _loss_and_outputs(fn, weights):
    """``values -> (sum_k <output_k, weights_k>, outputs)`` for has_aux."""
    def loss(*values):
        outputs = fn(*values)
        return sum(jnp.sum(o * w) for o, w in zip(outputs, weights)), outputs
    return loss


@pytest.mark.parametrize("batch_size", [None, 5], ids=["unbatched", "mixed"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_zoo_jit_matches_core(name, batch_size):
    layer = _layer(name)
    values = _inputs(name, batch_size, seed=2)
    weights = _cotangents(layer, values, np.random.default_rng(3))
    args = [jnp.asarray(v) for v in values]

    # One compiled function gives outputs (as aux) and gradients.
    (value, outputs), grads = jax.jit(jax.value_and_grad(
        _loss_and_outputs(layer, weights), argnums=tuple(range(len(args))),
        has_aux=True))(*args)
    expected = layer.core(*values)
    _assert_all_close(outputs, expected)
    np.testing.assert_allclose(
        value, sum(np.sum(o * w) for o, w in zip(expected, weights)),
        rtol=RTOL, atol=ATOL)
    _assert_all_close(grads, layer.core.vjp(values, weights))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_zoo_vmap_is_one_core_call(name, monkeypatch):
    case = get_case(name)
    if not any(case.batch_mask):
        pytest.skip(reason="no parameter to map over")
    layer = _layer(name)
    values = _inputs(name, 5, seed=4)
    weights = _cotangents(layer, values, np.random.default_rng(5))
    expected_outputs = layer.core(*values)
    expected_grads = layer.core.vjp(values, weights)
    axes = tuple(0 if mapped else None for mapped in case.batch_mask)
    args = [jnp.asarray(v) for v in values]
    calls = _CoreCalls(layer, monkeypatch)

    # Map the unbatched layer over the batch: the whole mapped batch reaches
    # the core in one solve, and the gradient in one adjoint.
    (_, outputs), grads = jax.jit(jax.value_and_grad(
        _loss_and_outputs(jax.vmap(layer, in_axes=axes), weights),
        argnums=tuple(range(len(args))), has_aux=True))(*args)
    assert (len(calls.solves), len(calls.adjoints)) == (1, 1)
    _assert_all_close(outputs, expected_outputs)
    _assert_all_close(grads, expected_grads)

    # Per-example gradients: rows of the core's batched gradient, and for
    # shared parameters one gradient per example summing to the core's.
    def one_loss(w, *v):
        return sum(jnp.sum(o * wk) for o, wk in zip(layer(*v), w))

    per_example = jax.jit(jax.vmap(
        jax.grad(one_loss, argnums=tuple(range(1, len(args) + 1))),
        in_axes=(0,) + axes))([jnp.asarray(w) for w in weights], *args)
    assert (len(calls.solves), len(calls.adjoints)) == (2, 2)
    for g, e, is_mapped in zip(per_example, expected_grads, case.batch_mask):
        assert g.shape[0] == 5
        g = g if is_mapped else jnp.sum(g, axis=0)
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


# -- vmap: already batched calls, nested maps, mapped cotangents -------------


def test_vmap_of_batched_call(monkeypatch):
    layer = _layer("qp")
    case = get_case("qp")
    rng = np.random.default_rng(6)
    batches = [_inputs("qp", 4, seed=s) for s in (7, 8, 9)]
    # Stack three batches of the mapped parameters; share the others.
    values = [np.stack([b[i] for b in batches]) if mapped else batches[0][i]
              for i, mapped in enumerate(case.batch_mask)]
    axes = tuple(0 if m else None for m in case.batch_mask)
    flat = [v.reshape((12,) + v.shape[2:]) if m else v
            for v, m in zip(values, case.batch_mask)]
    weights = [rng.standard_normal((3, 4) + s) for s in layer.output_shapes]
    flat_weights = [w.reshape((12,) + w.shape[2:]) for w in weights]
    calls = _CoreCalls(layer, monkeypatch)

    outputs = jax.vmap(layer, in_axes=axes)(*values)
    assert len(calls.solves) == 1
    expected = layer.core(*flat)
    _assert_all_close(outputs, [e.reshape((3, 4) + e.shape[1:])
                                for e in expected])

    def loss(*v):
        outs = jax.vmap(layer, in_axes=axes)(*v)
        return sum(jnp.sum(o * w) for o, w in zip(outs, weights))

    grads = jax.grad(loss, argnums=(0, 1, 2))(*values)
    expected = layer.core.vjp(flat, flat_weights)
    _assert_all_close(grads, [e.reshape(v.shape)
                              for e, v in zip(expected, values)])


def test_jit_of_vmap_with_numpy_mapped_argument():
    # NumPy data mapped by vmap under jit (a data batch kept in NumPy) must
    # work like the same data as JAX arrays, values and gradients.
    layer = _layer("qp")
    case = get_case("qp")
    values = _inputs("qp", 4, seed=12)
    axes = tuple(0 if m else None for m in case.batch_mask)
    first = case.batch_mask.index(True)

    def run(v0):
        args = [v0 if i == first else v for i, v in enumerate(values)]
        return jax.vmap(layer, in_axes=axes)(*args)

    def loss(v0):
        return sum(jnp.sum(o) for o in run(v0))

    v0 = values[first]
    got = jax.jit(run)(jnp.asarray(v0))
    _assert_all_close(got, layer.core(*values))
    grad = jax.jit(jax.grad(loss))(jnp.asarray(v0))
    weights = [np.ones((4,) + s) for s in layer.output_shapes]
    _assert_all_close([grad], [layer.core.vjp(values, weights)[first]])


def test_nested_vmap(monkeypatch):
    # Outer map over q, inner map over h, g shared: a 3 x 4 grid of problems.
    layer = _layer("qp")
    rng = np.random.default_rng(10)
    q, h, g = _inputs("qp", None, seed=11)
    qs = q + 0.1 * rng.standard_normal((3,) + q.shape)
    hs = h + 0.1 * np.abs(rng.standard_normal((4,) + h.shape))
    weights = [rng.standard_normal((3, 4) + s) for s in layer.output_shapes]

    def grid(q, h, g):
        inner = jax.vmap(layer, in_axes=(None, 0, None))
        return jax.vmap(inner, in_axes=(0, None, None))(q, h, g)

    def loss(q, h, g):
        return sum(jnp.sum(o * w) for o, w in zip(grid(q, h, g), weights))

    flat = [np.repeat(qs, 4, axis=0), np.tile(hs, (3, 1)), g]
    flat_weights = [w.reshape((12,) + w.shape[2:]) for w in weights]
    calls = _CoreCalls(layer, monkeypatch)

    expected = layer.core(*flat)
    _assert_all_close(grid(qs, hs, g), [e.reshape((3, 4) + e.shape[1:])
                                        for e in expected])
    assert len(calls.solves) == 2  # the reference and the grid: one each

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qs, hs, g)
    gq, gh, gg = layer.core.vjp(flat, flat_weights)
    _assert_all_close(grads, [gq.reshape(3, 4, -1).sum(axis=1),
                              gh.reshape(3, 4, -1).sum(axis=0), gg])


def test_vmap_over_cotangents_reuses_one_solution(monkeypatch):
    # The forward runs once, unmapped; only the pullback is mapped, so the
    # residuals reach the callback with size-1 leading axes.
    layer = _layer("socp")
    values = _inputs("socp", 5, seed=12)
    rng = np.random.default_rng(13)
    weights = [rng.standard_normal((3, 5) + s) for s in layer.output_shapes]
    calls = _CoreCalls(layer, monkeypatch)

    _, pullback = jax.vjp(layer, *values)
    grads = jax.jit(jax.vmap(pullback))(tuple(jnp.asarray(w)
                                              for w in weights))
    assert (len(calls.solves), len(calls.adjoints)) == (1, 1)
    for k in range(3):
        expected = layer.core.vjp(values, [w[k] for w in weights])
        _assert_all_close([g[k] for g in grads], expected)


# -- jit ---------------------------------------------------------------------


def test_jit_does_not_retrace_on_new_values():
    layer = _layer("relu")
    traces = []

    @jax.jit
    def first_output(*values):
        traces.append(1)  # runs only while tracing
        return layer(*values)[0]

    for seed in (14, 15, 16):
        values = _inputs("relu", 5, seed=seed)
        np.testing.assert_allclose(first_output(*values),
                                   layer.core(*values)[0],
                                   rtol=RTOL, atol=ATOL)
    assert len(traces) == 1


# -- finite differences through JAX ------------------------------------------


@pytest.mark.parametrize("name", ["lp", "qp", "socp", "relu"])
def test_check_grads(name):
    # eps 1e-4: the zoo keeps every kink (active-set change) at least 1e-2
    # away, and the solver's 1e-10 accuracy costs 1e-10 / 1e-4 = 1e-6 in the
    # central differences; tolerances 1e-5 sit above that.
    layer = _layer(name)
    values = [jnp.asarray(v) for v in _inputs(name, 3, seed=17)]
    check_grads(layer, values, order=1, modes=["rev"], eps=1e-4,
                atol=1e-5, rtol=1e-5)


# -- dtypes ------------------------------------------------------------------


def test_float32_in_float32_out():
    layer = _layer("relu")
    values = [v.astype(np.float32) for v in _inputs("relu", 5, seed=18)]
    weights = _cotangents(layer, values, np.random.default_rng(19))
    args = [jnp.asarray(v) for v in values]
    outputs = layer(*args)
    grads = jax.jit(jax.grad(_weighted_loss(layer, weights),
                             argnums=(0, 1, 2)))(*args)

    assert all(o.dtype == jnp.float32 for o in outputs)
    assert all(g.dtype == jnp.float32 for g in grads)
    # The core computes in float64 from the same float32 inputs; only the
    # final rounding to float32 (relative 6e-8) separates the results.
    wide = [v.astype(np.float64) for v in values]
    _assert_all_close(outputs, layer.core(*wide), rtol=1e-6, atol=1e-7)
    _assert_all_close(grads, layer.core.vjp(wide, weights), rtol=1e-6,
                      atol=1e-7)


def test_mixed_dtypes_promote_and_keep_gradient_dtypes():
    layer = _layer("relu")
    W, b, x = _inputs("relu", 5, seed=20)
    args = (jnp.asarray(W, dtype=jnp.float32), jnp.asarray(b),
            jnp.asarray(x, dtype=jnp.float32))
    (z,) = layer(*args)
    assert z.dtype == jnp.float64
    grads = jax.grad(lambda *v: jnp.sum(layer(*v)[0]),
                     argnums=(0, 1, 2))(*args)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float64, jnp.float32]
    wide = [np.asarray(a, dtype=np.float64) for a in args]
    np.testing.assert_allclose(z, layer.core(*wide)[0], rtol=RTOL, atol=ATOL)


def test_integer_inputs_become_the_default_float():
    layer = _layer("lp")
    c, b = _inputs("lp", None, seed=21)
    (x,) = layer(jnp.asarray(np.round(c * 10), dtype=jnp.int32),
                 jnp.asarray(b))
    assert x.dtype == jnp.float64


@pytest.fixture
def x64_off():
    """JAX without float64 for one test (the module turns it on)."""
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


def test_without_x64_state_is_exact(x64_off):
    layer = _layer("relu")
    values = _inputs("relu", 5, seed=22)
    weights = _cotangents(layer, values, np.random.default_rng(23))
    args = [jnp.asarray(v) for v in values]
    assert args[0].dtype == jnp.float32
    loss = _weighted_loss(layer, weights)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    eager = jax.grad(loss, argnums=(0, 1, 2))(*args)

    assert all(g.dtype == jnp.float32 for g in grads)
    # The state crosses from forward to backward as float64 bits, so the
    # only differences from the core are the float32 roundings of the
    # inputs (applied to both) and of the gradients (relative 6e-8).
    wide = [np.asarray(a, dtype=np.float64) for a in args]
    expected = layer.core.vjp(wide, weights)
    _assert_all_close(grads, expected, rtol=1e-6, atol=1e-7)
    _assert_all_close(eager, expected, rtol=1e-6, atol=1e-7)


def test_inside_enable_x64_context(x64_off):
    # Callbacks can run on an XLA thread where the context is not in force;
    # float64 must still come back as float64, unrounded.
    layer = _layer("socp")
    values = _inputs("socp", 5, seed=24)
    weights = _cotangents(layer, values, np.random.default_rng(25))
    with jax.enable_x64(True):
        args = [jnp.asarray(v) for v in values]
        value_and_grad = jax.jit(jax.value_and_grad(
            _weighted_loss(layer, weights), argnums=(0, 1, 2)))
        _, grads = value_and_grad(*args)
        outputs = jax.jit(jax.vmap(layer, in_axes=(0, 0, None)))(*args)
    assert all(g.dtype == jnp.float64 for g in grads)
    _assert_all_close(grads, layer.core.vjp(values, weights))
    _assert_all_close(outputs, layer.core(*values))


# -- errors ------------------------------------------------------------------


def _core_error(fn, *args):
    with pytest.raises(Exception) as info:
        fn(*args)
    return info.value


def test_wrong_shape_raises_core_value_error_eagerly_and_under_jit():
    layer = _layer("qp")
    q, h, g = _inputs("qp", None, seed=26)
    bad = (q, h[:-1], g)
    expected = _core_error(layer.core.batch_size, *bad)
    assert isinstance(expected, ValueError)
    for fn in (layer, jax.jit(layer), jax.grad(lambda *v: layer(*v)[0][0])):
        with pytest.raises(ValueError) as info:
            fn(*bad)
        assert str(info.value) == str(expected)


def test_wrong_count_and_disagreeing_batches_raise_value_error():
    layer = _layer("qp")
    q, h, g = _inputs("qp", None, seed=27)
    count = _core_error(layer.core.batch_size, q, h)
    with pytest.raises(ValueError, match="Expected 3 parameter values"):
        jax.jit(layer)(q, h)
    assert "Expected 3" in str(count)
    batches = (np.stack([q] * 2), np.stack([h] * 3), g)
    expected = _core_error(layer.core.batch_size, *batches)
    with pytest.raises(ValueError) as info:
        jax.jit(layer)(*batches)
    assert str(info.value) == str(expected)


def test_vmap_with_bad_shape_raises_at_trace_time():
    layer = _layer("qp")
    q, h, g = _inputs("qp", None, seed=28)
    with pytest.raises(ValueError, match="Parameter 1 'h'"):
        jax.vmap(layer, in_axes=(0, 0, None))(np.stack([q] * 2),
                                              np.stack([h[:-1]] * 2), g)


def test_non_finite_value_raises_core_value_error_eagerly():
    layer = _layer("qp")
    q, h, g = _inputs("qp", None, seed=29)
    q = q.copy()
    q[0] = np.nan
    expected = _core_error(layer.core, q, h, g)
    assert isinstance(expected, ValueError)
    with pytest.raises(ValueError) as info:
        layer(q, h, g)
    assert str(info.value) == str(expected)


def test_complex_input_raises_type_error():
    layer = _layer("lp")
    c, b = _inputs("lp", None, seed=30)
    with pytest.raises(TypeError, match="real inputs"):
        layer(jnp.asarray(c) + 1j, b)


def _infeasible_layer():
    """min x s.t. x >= a, x <= 0: infeasible for a > 0."""
    x = cp.Variable()
    a = cp.Parameter()
    problem = cp.Problem(cp.Minimize(x), [x >= a, x <= 0])
    return optlayer_jax.Layer(problem, [a], [x])


def test_infeasible_raises_solver_error_eagerly():
    layer = _infeasible_layer()
    expected = _core_error(layer.core, np.array(1.0))
    assert isinstance(expected, optlayer.SolverError)
    assert optlayer_jax.SolverError is optlayer.SolverError
    with pytest.raises(optlayer_jax.SolverError) as info:
        layer(jnp.asarray(1.0))
    assert str(info.value) == str(expected)
    # Eager jax.grad runs the forward rule on concrete values as well.
    with pytest.raises(optlayer_jax.SolverError) as info:
        jax.grad(lambda a: layer(a)[0])(jnp.asarray(1.0))
    assert info.value.statuses == expected.statuses


def test_infeasible_under_jit_keeps_the_message():
    # Under jit the callback raises while XLA runs; JAX wraps the error in
    # its runtime error, whose text holds the core's type and message.
    layer = _infeasible_layer()
    scalar, pair = np.array(1.0), np.ones(2)
    for fn, arg in ((jax.jit(layer), scalar),
                    (jax.jit(jax.grad(lambda a: layer(a)[0])), scalar),
                    (jax.vmap(layer), pair)):
        expected = _core_error(layer.core, arg)
        assert isinstance(expected, optlayer.SolverError)
        with pytest.raises(Exception) as info:
            jax.block_until_ready(fn(jnp.asarray(arg)))
        assert not isinstance(info.value, optlayer.SolverError)
        assert "SolverError" in str(info.value)
        assert str(expected) in str(info.value)
    # A feasible value after the failure still works.
    np.testing.assert_allclose(jax.jit(layer)(jnp.asarray(-1.0))[0], -1.0,
                               atol=1e-7)


def test_second_derivatives_raise_instead_of_returning_zeros():
    # A wrong zero here would be silent; the layer must refuse instead.
    layer = _layer("relu")
    values = [jnp.asarray(v) for v in _inputs("relu", None, seed=32)]

    def cubic(W):
        return jnp.sum(layer(W, *values[1:])[0] ** 3)

    def grad_of_grad(W):
        return jnp.sum(jax.grad(cubic)(W))

    for fn in (jax.grad(grad_of_grad), jax.jit(jax.grad(grad_of_grad)),
               jax.hessian(cubic)):
        with pytest.raises(NotImplementedError, match="first-order"):
            fn(values[0])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(cubic, (values[0],), (values[0],))


def test_dict_of_values_raises_a_clear_error():
    layer = _layer("qp")
    q, h, g = _inputs("qp", None, seed=33)
    names = ", ".join(layer.core.compiled.param_names)
    for fn in (layer, jax.jit(layer)):
        with pytest.raises(ValueError, match=(
                r"positionally, one array per parameter, in the layer's "
                rf"parameter order: layer\({names}\)")):
            fn(dict(zip(layer.core.compiled.param_names, (q, h, g))))
    # Positional values in that order are the core's solution.
    _assert_all_close(layer(q, h, g), layer.core(q, h, g))


def test_deepcopy_and_pickle_give_an_equivalent_layer():
    case = get_case("socp")
    problem, params, variables = case.build()
    layer = optlayer_jax.Layer(problem, params, variables,
                               **case.layer_kwargs)
    values = _inputs("socp", 3, seed=34)
    weights = _cotangents(layer, values, np.random.default_rng(34))
    expected = layer.core(*values)
    expected_grads = layer.core.vjp(values, weights)
    argnums = tuple(range(len(values)))
    layer(*values)   # a used layer copies as well as a fresh one
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.core is not layer.core
        for fn in (clone, jax.jit(clone)):
            _assert_all_close(fn(*values), expected)
        loss = _weighted_loss(clone, weights)
        for grad in (jax.grad(loss, argnums),
                     jax.jit(jax.grad(loss, argnums))):
            _assert_all_close(grad(*values), expected_grads)
    # The original still works after being copied.
    _assert_all_close(layer(*values), expected)


# -- documentation and the seed example -----------------------------------


@pytest.mark.parametrize("module", [optlayer_jax, jax_layer_module],
                         ids=["package", "layer"])
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, verbose=False)
    assert tried > 0
    assert failures == 0


def _small_relu_problem(seed=31, d=5, h=5, n=20):
    rng = np.random.default_rng(seed)
    # Weights of order one, so that both ReLU layers are active and the
    # three steps move the loss visibly.
    init = {"W1": 0.5 * rng.standard_normal((h, d)),
            "b1": 0.1 * rng.standard_normal(h),
            "W2": 0.5 * rng.standard_normal((h, h)),
            "b2": 0.1 * rng.standard_normal(h),
            "W3": 0.5 * rng.standard_normal((1, h)),
            "b3": np.zeros(1)}
    X = rng.standard_normal((n, d))
    Y = rng.standard_normal((n, 1))
    return init, X, Y


def test_relu_train_small_matches_closed_form(x64_off):
    # train switches float64 on by itself: here the caller has it off.
    relu_jax = pytest.importorskip("benchmarks.relu_jax")
    init, X, Y = _small_relu_problem()
    lines = []
    result = relu_jax.train(init, X, Y, steps=3, log=lines.append)
    reference = relu_jax.train(init, X, Y, steps=3, closed_form=True,
                               log=lambda line: None)

    losses = result["losses"]
    assert len(losses) == 3 and len(lines) == 3
    assert all(isinstance(v, float) for v in losses)
    assert losses[2] < losses[1] < losses[0]
    assert 0.0 <= result["max_output_error"] < 1e-6
    assert 0.0 <= result["max_grad_error"] < 1e-6
    np.testing.assert_allclose(losses, reference["losses"], rtol=0,
                               atol=1e-6)
    assert reference["max_output_error"] == reference["max_grad_error"] == 0
    for key in ("forward_time", "backward_time", "wall_time"):
        assert result[key] > 0
    assert lines[0].startswith("step   0  loss ")
