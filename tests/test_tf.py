"""Tests of the TensorFlow/Keras adapter, ``optlayer_tf.Layer``.

The adapter holds no mathematics, so most checks compare it with the NumPy
core on the same inputs (outputs and ``Layer.vjp``), eagerly and inside
``tf.function``; ``tf.test.compute_gradient`` adds an independent
finite-difference check of the gradients through TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import copy  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")

import cvxpy as cp  # noqa: E402
import keras  # noqa: E402

import optlayer  # noqa: E402
import optlayer_tf  # noqa: E402
from benchmarks import relu as relu_driver  # noqa: E402
from benchmarks import relu_tf  # noqa: E402
from tests.zoo import CASES, get_case, make_inputs  # noqa: E402

# The adapter and the core run the same float64 computation, but two solves
# of one instance agree only to about 1e-12 absolute (the core's solves are
# not bitwise reproducible). That matters only for entries that are zero in
# exact arithmetic, hence an absolute floor far below any real error.
RTOL_CORE = 1e-8
ATOL_CORE = 1e-10

ZOO_NAMES = [case.name for case in CASES]


def _layer(case, **overrides):
    kwargs = dict(case.layer_kwargs)
    kwargs.update(overrides)
    return optlayer_tf.Layer(*case.build(), **kwargs)


def _reference(core, values, weights):
    """The core's outputs and its gradient of sum(out * w)."""
    outputs, state = core.solve(*values)
    return outputs, core.adjoint(values, state, weights)


def _weighted_sum(outputs, weights):
    return tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outputs, weights)])


def _assert_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL_CORE,
                               atol=ATOL_CORE)


def _nonneg_lsq(m=4, n=3):
    """minimize ||A x - b||^2 + 0.1 ||x||^2 s.t. x >= 0; params A, b."""
    A = cp.Parameter((m, n), name="A")
    b = cp.Parameter(m, name="b")
    x = cp.Variable(n, name="x")
    objective = cp.sum_squares(A @ x - b) + 0.1 * cp.sum_squares(x)
    return cp.Problem(cp.Minimize(objective), [x >= 0]), [A, b], [x]


# -- the shared zoo against the core ----------------------------------------


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_eager_matches_core(name, batch_size):
    case = get_case(name)
    rng = np.random.default_rng(0)
    values = make_inputs(case, rng, batch_size)
    layer = _layer(case)
    batch = () if batch_size is None else (batch_size,)
    weights = [rng.standard_normal(batch + s) for s in layer.core.output_shapes]
    expected, grads = _reference(layer.core, values, weights)

    inputs = [tf.constant(v) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(*inputs)
        loss = _weighted_sum(outputs, weights)
    assert isinstance(outputs, tuple) and len(outputs) == len(expected)
    for out, exp in zip(outputs, expected):
        assert out.dtype == tf.float64 and out.shape == exp.shape
        _assert_close(out, exp)
    for inp, got, exp in zip(inputs, tape.gradient(loss, inputs), grads):
        assert got.shape == inp.shape
        _assert_close(got, exp)


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_tf_function_matches_core(name, batch_size):
    case = get_case(name)
    rng = np.random.default_rng(0)
    values = make_inputs(case, rng, batch_size)
    layer = _layer(case)
    batch = () if batch_size is None else (batch_size,)
    weights = [rng.standard_normal(batch + s) for s in layer.core.output_shapes]
    expected, grads = _reference(layer.core, values, weights)
    traced_shapes = []

    @tf.function
    def forward_backward(*inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(*inputs)
            loss = _weighted_sum(outputs, weights)
        # Runs once, while tracing: the static shapes the graph carries.
        traced_shapes.append([tuple(o.shape) for o in outputs])
        return outputs, tape.gradient(loss, inputs)

    outputs, got_grads = forward_backward(*[tf.constant(v) for v in values])
    assert traced_shapes == [[e.shape for e in expected]]
    for out, exp in zip(outputs, expected):
        _assert_close(out, exp)
    for got, exp in zip(got_grads, grads):
        _assert_close(got, exp)


def test_unknown_batch_dimension_in_graph():
    # With the batch dimension unknown while tracing, the outputs carry
    # (None, ...) and the rest of the shape; the numbers are the core's.
    case = get_case("relu")
    layer = _layer(case)
    W, b, x = make_inputs(case, np.random.default_rng(1), 4)
    signature = [tf.TensorSpec(W.shape, tf.float64),
                 tf.TensorSpec(b.shape, tf.float64),
                 tf.TensorSpec((None,) + x.shape[1:], tf.float64)]
    traced = []

    @tf.function(input_signature=signature)
    def grads(W, b, x):
        with tf.GradientTape() as tape:
            tape.watch([W, b, x])
            (z,) = layer(W, b, x)
            loss = tf.reduce_sum(z ** 2)
        traced.append(tuple(z.shape))
        return z, tape.gradient(loss, [W, b, x])

    z, (gW, gb, gx) = grads(W, b, x)
    assert traced == [(None, 3)]
    (z_core,) = layer.core(W, b, x)
    _assert_close(z, z_core)
    for got, exp in zip((gW, gb, gx),
                        layer.core.vjp([W, b, x], [2 * z_core])):
        _assert_close(got, exp)


def test_backward_keeps_no_per_call_state():
    # Two calls of one layer on a persistent tape, differentiated in the
    # reverse order: each backward must use its own call's solution.
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 3))
    bs = [rng.standard_normal((2, 4)), rng.standard_normal((2, 4))]
    b_tensors = [tf.constant(b) for b in bs]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(b_tensors)
        losses = [tf.reduce_sum(layer(A, b)[0]) for b in b_tensors]
    for b, b_t, loss in reversed(list(zip(bs, b_tensors, losses))):
        (_, gb) = layer.core.vjp([A, b], [np.ones((2, 3))])
        _assert_close(tape.gradient(loss, b_t), gb)


def test_unused_output_gets_zero_cotangent():
    # The power case has two outputs (x, t); the loss uses t only.
    case = get_case("power")
    layer = _layer(case)
    values = make_inputs(case, np.random.default_rng(3), 2)
    inputs = [tf.constant(v) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        _, t = layer(*inputs)
        loss = tf.reduce_sum(3.0 * t)
    expected = layer.core.vjp(values, [None, 3.0 * np.ones((2, 3))])
    for got, exp in zip(tape.gradient(loss, inputs), expected):
        _assert_close(got, exp)


def test_gathered_outputs_give_indexed_slices_cotangents():
    # tf.gather (and embedding lookups) send the gradient back as
    # tf.IndexedSlices; it must equal the gradient of the same selection
    # written as a dense mask, and the core's.
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    rng = np.random.default_rng(11)
    A, b = rng.standard_normal((4, 3)), rng.standard_normal((5, 4))
    rows = [0, 2, 2]
    mask = np.zeros((5, 3))
    np.add.at(mask, rows, 1.0)
    (_, gb_core) = layer.core.vjp([A, b], [mask])
    assert np.max(np.abs(gb_core)) > 0.1

    def gradients(select):
        A_t, b_t = tf.constant(A), tf.constant(b)
        with tf.GradientTape() as tape:
            tape.watch([A_t, b_t])
            (x,) = layer(A_t, b_t)
            loss = tf.reduce_sum(select(x))
        return tape.gradient(loss, [A_t, b_t])

    dense = gradients(lambda x: x * mask)
    for select in (lambda x: tf.gather(x, rows),
                   lambda x: tf.nn.embedding_lookup(x, rows),
                   lambda x: keras.ops.take(x, rows, axis=0)):
        for run in (gradients, tf.function(gradients)):
            got = run(select)
            for g, d in zip(got, dense):
                _assert_close(g, d)
            _assert_close(got[1], gb_core)


def test_second_derivatives_raise_instead_of_dropping_the_layer():
    # x = relu(a): with nested tapes the layer's part of d2/da2 used to be
    # dropped silently ([6, -6] instead of [8, -6]); it must refuse.
    x = cp.Variable(2)
    a = cp.Parameter(2)
    layer = optlayer_tf.Layer(
        cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0]), [a], [x])
    a_np = np.array([1.0, -1.0])

    def second(a_var):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                (sol,) = layer(a_var)
                loss = tf.reduce_sum(sol ** 2) + tf.reduce_sum(a_var ** 3)
            g = inner.gradient(loss, a_var)
        return g, outer.gradient(g, a_var)

    a_var = tf.Variable(a_np)
    for run in (second, tf.function(second)):
        with pytest.raises(NotImplementedError, match="first-order"):
            run(a_var)

    # A constant cotangent: the layer's part depends on a only through
    # its values, which must raise too.
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            (sol,) = layer(a_var)
            loss = tf.reduce_sum(sol)
        g = inner.gradient(loss, a_var)
    with pytest.raises(NotImplementedError, match="first-order"):
        outer.gradient(g, a_var)

    # Forward mode (previously a silent None).
    with pytest.raises(NotImplementedError, match="first-order"):
        with tf.autodiff.ForwardAccumulator(a_var, tf.ones(2, tf.float64)):
            layer(a_var)

    # First-order gradients, also with an outer tape that is not used
    # through the layer, are unchanged: the core's plus 3 a^2.
    (sol_core,) = layer.core(a_np)
    (g_core,) = layer.core.vjp([a_np], [2 * sol_core])
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            (sol,) = layer(a_var)
            loss = tf.reduce_sum(sol ** 2) + tf.reduce_sum(a_var ** 3)
        g = inner.gradient(loss, a_var)
        cube = tf.reduce_sum(a_var ** 3)
    _assert_close(g, g_core + 3 * a_np ** 2)
    np.testing.assert_allclose(g, [2.0 + 3.0, 3.0], rtol=1e-8)
    _assert_close(outer.gradient(cube, a_var), 3 * a_np ** 2)


# -- tf.test.compute_gradient -------------------------------------------------

# Central differences with step 1e-6. Truncation error: O(delta^2) = 1e-12
# for the smooth cases, none for the LP (its solution map is affine near the
# zoo's sample, but a kink lies within 1e-4 of it, so the step must stay
# small). Noise: solution error / delta; solved to eps 1e-12 (and polished
# by the core), the differences stay within 1e-6 of the analytic Jacobians
# on these cases, while a wrong term would be O(1). atol 1e-5 keeps a
# margin of 10.
DELTA = 1e-6
ATOL_FD = 1e-5
TIGHT = {"eps_abs": 1e-12, "eps_rel": 1e-12, "max_iters": 200_000}


@pytest.mark.parametrize("name", ["lp", "qp", "socp", "relu"])
def test_compute_gradient(name):
    case = get_case(name)
    options = dict(case.layer_kwargs.get("solver_options") or {})
    options.update(TIGHT)
    layer = _layer(case, solver_options=options)
    values = make_inputs(case, np.random.default_rng(4), None)

    def flat_outputs(*inputs):
        return tf.concat([tf.reshape(o, [-1]) for o in layer(*inputs)], 0)

    analytic, numeric = tf.test.compute_gradient(
        flat_outputs, [tf.constant(v) for v in values], delta=DELTA)
    for a, n in zip(analytic, numeric):
        assert np.max(np.abs(a)) > 0.0 or np.max(np.abs(n)) < ATOL_FD
        np.testing.assert_allclose(a, n, rtol=0.0, atol=ATOL_FD)


# -- dtypes -----------------------------------------------------------------


def test_float32_in_float32_out():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    rng = np.random.default_rng(5)
    A32 = tf.constant(rng.standard_normal((4, 3)), tf.float32)
    b32 = tf.constant(rng.standard_normal((3, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([A32, b32])
        (x,) = layer(A32, b32)
        loss = tf.reduce_sum(x)
    gA, gb = tape.gradient(loss, [A32, b32])
    assert x.dtype == gA.dtype == gb.dtype == tf.float32

    # The float64 core's numbers at the float32 inputs, rounded to float32.
    A_r, b_r = A32.numpy().astype(np.float64), b32.numpy().astype(np.float64)
    (x_core,) = layer.core(A_r, b_r)
    gA_core, gb_core = layer.core.vjp([A_r, b_r], [np.ones_like(x_core)])
    np.testing.assert_allclose(x, x_core, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gA, gA_core, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gb, gb_core, rtol=1e-6, atol=1e-6)


def test_mixed_dtypes_and_arrays():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    rng = np.random.default_rng(6)
    A, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    A32 = tf.constant(A, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(A32)
        (x,) = layer(A32, tf.constant(b))
    # float32 with float64 gives float64; each gradient keeps its input's.
    assert x.dtype == tf.float64
    assert tape.gradient(x, A32).dtype == tf.float32

    # Plain NumPy float64 arrays stay float64 (Keras does not autocast).
    (x_np,) = layer(A, b)
    assert x_np.dtype == tf.float64
    _assert_close(x_np, layer.core(A, b)[0])


def test_python_numbers_for_a_scalar_parameter():
    a = cp.Parameter(name="a")
    y = cp.Variable(name="y")
    layer = optlayer_tf.Layer(
        cp.Problem(cp.Minimize(cp.square(y - a)), [y >= 0]), [a], [y])
    (y_pos,) = layer(2.0)
    (y_neg,) = layer(-2.0)
    # Alone, a Python float becomes a float32 tensor (Keras's floatx).
    assert y_pos.dtype == tf.float32 and y_pos.shape == ()
    np.testing.assert_allclose([float(y_pos), float(y_neg)], [2.0, 0.0],
                               atol=1e-6)


def test_python_floats_take_the_other_inputs_float_dtype():
    # min ||x - a - b||^2 has x = a + b: a Python float a beside float64
    # inputs must reach the solve unrounded (0.3 in float32 is off by
    # 1.2e-8), beside float32 inputs it must not widen the outputs, and
    # Python lists are read like arrays.
    a = cp.Parameter(name="a")
    b = cp.Parameter(3, name="b")
    x = cp.Variable(3)
    layer = optlayer_tf.Layer(
        cp.Problem(cp.Minimize(cp.sum_squares(x - a - b))), [a, b], [x])
    (x64,) = layer(0.3, np.zeros((2, 3)))
    assert x64.dtype == tf.float64
    np.testing.assert_allclose(x64.numpy(), 0.3, rtol=0, atol=1e-12)
    (x32,) = layer(0.3, tf.zeros((2, 3)))
    assert x32.dtype == tf.float32
    (x_list,) = layer([0.3, [0.0, 0.0, 1.0]])   # one list of values
    assert x_list.dtype == tf.float32           # no float input: floatx
    np.testing.assert_allclose(x_list.numpy(), [0.3, 0.3, 1.3], atol=1e-6)
    with pytest.raises(ValueError, match=r"Parameter 1 'b'.*cannot be "
                       r"converted"):
        layer(0.3, [0.0, "one", 2.0])


# -- errors -------------------------------------------------------------------


def test_eager_value_errors_are_the_core_errors():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    A = np.ones((4, 3))
    bad_inputs = [
        (A, np.ones(5)),                   # wrong shape
        (A, np.full(4, np.nan)),           # not finite
        (A, np.ones((2, 4)), np.ones(4)),  # wrong number of values
        (np.ones((2, 4, 3)), np.ones((3, 4))),   # batch sizes disagree
        (A, "b"),                          # not a number
    ]
    for inputs in bad_inputs:
        with pytest.raises(ValueError) as core_error:
            layer.core(*inputs)
        with pytest.raises(ValueError) as error:
            layer(*[v if isinstance(v, str) else tf.constant(v)
                    for v in inputs])
        assert str(error.value) == str(core_error.value)


def test_eager_solver_error():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [x >= a, x <= 0])
    layer = optlayer_tf.Layer(problem, [a], [x])
    assert optlayer_tf.SolverError is optlayer.SolverError
    values = np.array([[-1.0, -1.0], [1.0, 0.5]])   # element 1 infeasible
    with pytest.raises(optlayer.SolverError) as core_error:
        layer.core(values)
    with pytest.raises(optlayer_tf.SolverError) as error:
        layer(tf.constant(values))
    assert str(error.value) == str(core_error.value)
    assert error.value.elements == (1,)


def test_graph_errors_keep_the_message():
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [x >= a, x <= 0])
    layer = optlayer_tf.Layer(problem, [a], [x])
    call = tf.function(lambda v: layer(v)[0],
                       input_signature=[tf.TensorSpec((None, 2), tf.float64)])

    # Found only when the graph runs: an OpError carrying the message.
    nan = np.array([[np.nan, 0.0]])
    infeasible = np.array([[-1.0, -1.0], [1.0, 0.5]])
    for values, core_type in [(nan, ValueError),
                              (infeasible, optlayer.SolverError)]:
        with pytest.raises(core_type) as core_error:
            layer.core(values)
        with pytest.raises(tf.errors.OpError,
                           match=re.escape(str(core_error.value))):
            call(tf.constant(values))

    # Static shapes are checked while tracing: the core's ValueError.
    with pytest.raises(ValueError) as core_error:
        layer.core(np.ones((2, 3)))
    with pytest.raises(ValueError, match=re.escape(str(core_error.value))):
        tf.function(lambda v: layer(v))(tf.ones((2, 3), tf.float64))


def test_shape_errors_show_unknown_dimensions_as_none():
    # The core validates stand-ins for unknown dimensions; the message must
    # show the shape as received, not the stand-in's made-up numbers.
    x = cp.Variable(2)
    lo = cp.Parameter(2, name="lo")
    layer = optlayer_tf.Layer(
        cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= lo]), [lo], [x])
    expected = ("Parameter 0 'lo' has shape (None, 3); expected (2,) "
                "(unbatched) or (batch, 2) (batched).")
    with pytest.raises(ValueError) as error:
        layer(keras.Input(shape=(3,)))
    assert str(error.value) == expected
    call = tf.function(lambda v: layer(v),
                       input_signature=[tf.TensorSpec((None, 3), tf.float64)])
    with pytest.raises(ValueError, match=re.escape(expected)):
        call.get_concrete_function()
    rank3 = tf.function(lambda v: layer(v), input_signature=[
        tf.TensorSpec((None, None, 3), tf.float64)])
    with pytest.raises(ValueError,
                       match=re.escape("has shape (None, None, 3)")):
        rank3.get_concrete_function()
    # Known shapes keep the core's message word for word.
    with pytest.raises(ValueError) as core_error:
        layer.core(np.ones((4, 3)))
    with pytest.raises(ValueError) as error:
        layer(keras.Input(batch_shape=(4, 3)))
    assert str(error.value) == str(core_error.value)
    # A valid unknown batch still gives (None, 2) and the core's numbers.
    (out,) = layer(keras.Input(shape=(2,)))
    assert tuple(out.shape) == (None, 2)
    lows = np.array([[1.0, -1.0], [0.5, 2.0]])
    (got,) = tf.function(lambda v: layer(v), input_signature=[
        tf.TensorSpec((None, 2), tf.float64)])(tf.constant(lows))
    _assert_close(got, layer.core(lows)[0])


def test_complex_inputs_raise_naming_the_parameter():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables)
    A, b = np.ones((4, 3)), np.ones(4)
    for bad in (b + 1j, tf.constant(b + 1j, tf.complex64)):
        # Not truncated to the real part (no ComplexWarning either).
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=re.escape(
                    "Parameter 1 'b' is complex (dtype complex")):
                layer(A, bad)
    with pytest.raises(ValueError, match="Parameter 1 'b' is complex"):
        layer(keras.Input((4, 3)), keras.Input((4,), dtype="complex64"))
    # Real values of the same shape work and match the core.
    _assert_close(layer(A, b)[0], layer.core(A, b)[0])


# -- Keras --------------------------------------------------------------------


def _sparsemax_model(seed=7):
    """Dense(3) -> projection onto the simplex (optlayer) -> Dense(1)."""
    z = cp.Variable(3, name="z")
    v = cp.Parameter(3, name="v")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - v)),
                         [z >= 0, cp.sum(z) == 1])
    layer = optlayer_tf.Layer(problem, [v], [z], name="simplex")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.Dense(3, dtype="float64")(inputs)
    (proj,) = layer(hidden)
    outputs = keras.layers.Dense(1, dtype="float64")(proj)
    return keras.Model(inputs, outputs), layer, proj


def test_other_keras_backends_are_named(monkeypatch):
    # Under another Keras backend the layer's TensorFlow gradient would
    # never run: construction says so and names the backend.
    import optlayer_tf.layer as tf_layer

    monkeypatch.setattr(tf_layer.keras.backend, "backend", lambda: "jax")
    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    with pytest.raises(RuntimeError, match="'jax'.*KERAS_BACKEND"):
        optlayer_tf.Layer(problem, [a], [x])


def test_keras_model_fit_and_predict():
    model, layer, proj = _sparsemax_model()
    assert tuple(proj.shape) == (None, 3) and proj.dtype == "float64"
    rng = np.random.default_rng(8)
    X = rng.standard_normal((16, 4))
    Y = X[:, :1] - 0.5 * X[:, 1:2]
    # Keras casts float64 NumPy arrays to float32 when it batches them; a
    # dataset of float64 tensors keeps float64 end to end.
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(16)
    # jit_compile="auto" must resolve to no XLA: the layer opts out.
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(data, epochs=6, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.9 * losses[0]

    # predict runs the graph path, the eager call the core directly.
    predicted = model.predict(
        tf.data.Dataset.from_tensor_slices(X).batch(8), verbose=0)
    assert predicted.shape == (16, 1) and predicted.dtype == np.float64
    np.testing.assert_allclose(predicted, model(X).numpy(), rtol=1e-8,
                               atol=1e-10)


def test_keras_config_describes_the_layer():
    model, layer, _ = _sparsemax_model()
    with pytest.warns(UserWarning, match="cannot be loaded"):
        config = layer.get_config()
    assert config["parameters"] == [{"name": "v", "shape": [3]}]
    assert config["variables"] == [{"name": "z", "shape": [3]}]
    assert config["name"] == "simplex"
    with pytest.warns(UserWarning, match="cannot be loaded"):
        described = json.loads(model.to_json())
    names = [entry["config"]["name"]
             for entry in described["config"]["layers"]]
    assert "simplex" in names
    with pytest.raises(NotImplementedError, match="not serializable"):
        optlayer_tf.Layer.from_config(config)


def test_loading_a_saved_model_explains_why_it_cannot(tmp_path):
    # Keras saves the config; loading finds the class (it is registered)
    # and reports why the layer cannot be rebuilt, not an unknown class.
    model, _, _ = _sparsemax_model()
    path = str(tmp_path / "model.keras")
    # Saving already warns that the model cannot be loaded back.
    with pytest.warns(UserWarning, match=r"model.save.*cannot be loaded.*"
                                         r"load_weights"):
        model.save(path)
    with pytest.raises(NotImplementedError, match=r"not serializable.*"
                                                  r"load_weights"):
        keras.models.load_model(path)


def test_exporting_a_saved_model_warns_that_it_serves_only_here(tmp_path):
    # model.export traces the layer for a SavedModel whose solve is a
    # Python callback: the export warns (the serving function fails once
    # loaded in another process); an ordinary tf.function does not.
    model, _, _ = _sparsemax_model()
    with pytest.warns(UserWarning, match=r"SavedModel.*another process"):
        model.export(str(tmp_path / "exported"), verbose=False)
    x = tf.constant(np.ones((2,) + tuple(model.inputs[0].shape[1:])),
                    model.inputs[0].dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tf.function(model)(x)


def test_core_and_keras_options_are_routed():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables,
                              solver_options={"max_iters": 4321}, n_jobs=1,
                              name="lsq", trainable=False)
    assert layer.core.solver_options["max_iters"] == 4321
    assert layer.core.n_jobs == 1
    assert layer.name == "lsq" and not layer.trainable
    with pytest.warns(UserWarning, match="cannot be loaded"):
        config = layer.get_config()
    assert config["solver_options"] == {"max_iters": 4321}
    assert config["n_jobs"] == 1
    json.dumps(config)


def test_deepcopy_and_pickle_give_an_equivalent_layer():
    problem, params, variables = _nonneg_lsq()
    layer = optlayer_tf.Layer(problem, params, variables, name="lsq",
                              n_jobs=1, trainable=False)
    rng = np.random.default_rng(12)
    A, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 4))
    w = rng.standard_normal((3, 3))
    (x_core,) = layer.core(A, b)
    grads_core = layer.core.vjp([A, b], [w])

    def outputs_and_grads(lay):
        inputs = [tf.constant(A), tf.constant(b)]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            (x,) = lay(*inputs)
            loss = tf.reduce_sum(x * w)
        return x, tape.gradient(loss, inputs)

    layer(A, b)   # a used layer copies as well as a fresh one
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(clone) is optlayer_tf.Layer and clone is not layer
        assert clone.core is not layer.core
        assert clone.name == "lsq" and not clone.trainable
        assert clone.core.n_jobs == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # see get_config
            assert clone.get_config() == layer.get_config()
        x, grads = outputs_and_grads(clone)
        _assert_close(x, x_core)
        for g, g_core in zip(grads, grads_core):
            _assert_close(g, g_core)
        # The graph path works on the copy too.
        (x_graph,) = tf.function(clone)(tf.constant(A), tf.constant(b))
        _assert_close(x_graph, x_core)
    x, grads = outputs_and_grads(layer)
    _assert_close(x, x_core)


# -- the ReLU benchmark -------------------------------------------------------


def test_relu_benchmark_small():
    init, X, Y = relu_driver.make_problem_data(d=5, h=5, n_samples=20,
                                               seed=9)
    lines = []
    result = relu_tf.train(init, X, Y, steps=3, log=lines.append)
    reference = relu_tf.train(init, X, Y, steps=3, closed_form=True,
                              log=lambda line: None)
    losses = result["losses"]
    assert len(losses) == 3 and len(lines) == 3
    assert losses[2] < losses[1] < losses[0]
    assert result["max_output_error"] < 1e-6
    assert result["max_grad_error"] < 1e-6
    assert reference["max_output_error"] == reference["max_grad_error"] == 0
    np.testing.assert_allclose(losses, reference["losses"], rtol=0,
                               atol=1e-6)
    for key in ("forward_time", "backward_time", "wall_time"):
        assert result[key] > 0.0

    # Model.fit takes the same full-batch Adam steps; Keras tracks the loss
    # in float32, hence the tolerance.
    fit_losses = relu_tf.fit_demo(init, X, Y, epochs=3)
    assert fit_losses[-1] < fit_losses[0]
    np.testing.assert_allclose(fit_losses, losses, rtol=1e-6)
