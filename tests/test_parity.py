"""Every installed backend gives the same outputs, gradients and losses.

The adapters share the NumPy core, so they may differ only by the tensor
conversions: outputs and gradients must agree to 1e-8 relative (with an
absolute floor of 1e-10, since two solves agree to about 1e-12, not bit for
bit). The ReLU network's loss curves must agree step by step to 1e-7: Keras's
Adam stores the learning rate in float32 and puts epsilon on the
uncorrected second moment, which moves the TensorFlow curve by about 1e-8.
"""

import dataclasses
import importlib.util

import numpy as np
import pytest

import optlayer
from tests.zoo import CASES, make_inputs

RTOL, ATOL = 1e-8, 1e-10


def _installed(module):
    return importlib.util.find_spec(module) is not None


def _numpy_backend(case, values, cotangents):
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, **case.layer_kwargs)
    outputs, state = layer.solve(*values)
    grads = layer.adjoint(values, state, cotangents)
    return outputs, grads


def _torch_backend(case, values, cotangents):
    import torch

    import optlayer_torch

    problem, params, variables = case.build()
    layer = optlayer_torch.Layer(problem, params, variables,
                                 **case.layer_kwargs)
    inputs = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for v in values]
    outputs = layer(*inputs)
    loss = sum((o * torch.tensor(w)).sum()
               for o, w in zip(outputs, cotangents))
    loss.backward()
    return ([o.detach().numpy() for o in outputs],
            [t.grad.numpy() for t in inputs])


def _jax_backend(case, values, cotangents):
    import jax
    import jax.numpy as jnp

    import optlayer_jax

    jax.config.update("jax_enable_x64", True)
    problem, params, variables = case.build()
    layer = optlayer_jax.Layer(problem, params, variables,
                               **case.layer_kwargs)
    inputs = [jnp.asarray(v, dtype=jnp.float64) for v in values]
    outputs, pullback = jax.vjp(lambda *a: layer(*a), *inputs)
    grads = pullback(tuple(jnp.asarray(w) for w in cotangents))
    return [np.asarray(o) for o in outputs], [np.asarray(g) for g in grads]


def _tf_backend(case, values, cotangents):
    import tensorflow as tf

    import optlayer_tf

    problem, params, variables = case.build()
    layer = optlayer_tf.Layer(problem, params, variables,
                              **case.layer_kwargs)
    inputs = [tf.Variable(v, dtype=tf.float64) for v in values]
    with tf.GradientTape() as tape:
        outputs = layer(*inputs)
        loss = tf.add_n([tf.reduce_sum(o * w)
                         for o, w in zip(outputs, cotangents)])
    grads = tape.gradient(loss, inputs)
    return [o.numpy() for o in outputs], [g.numpy() for g in grads]


BACKENDS = {"numpy": _numpy_backend}
if _installed("torch"):
    BACKENDS["torch"] = _torch_backend
if _installed("jax"):
    BACKENDS["jax"] = _jax_backend
if _installed("tensorflow"):
    BACKENDS["tf"] = _tf_backend


# The cone form of least-squares cases (quadratic_objective=False; the
# default keeps them quadratic) reaches the core through every adapter's
# options.
CONE_FORM = [dataclasses.replace(
    c, name=c.name + "_cone_form",
    layer_kwargs={**c.layer_kwargs, "quadratic_objective": False})
    for c in CASES if c.name in ("constrained_lsq", "relu")]


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize("case", CASES + CONE_FORM, ids=lambda c: c.name)
def test_backends_agree(case, batch_size):
    if len(BACKENDS) < 2:
        pytest.skip("needs at least one framework besides NumPy")
    rng = np.random.default_rng(7)
    values = make_inputs(case, rng, batch_size)
    problem, params, variables = case.build()
    shapes = optlayer.Layer(problem, params, variables,
                            **case.layer_kwargs).output_shapes
    lead = () if batch_size is None else (batch_size,)
    cotangents = [rng.standard_normal(lead + s) for s in shapes]
    results = {name: run(case, values, cotangents)
               for name, run in BACKENDS.items()}
    if case in CONE_FORM:
        # Cone form and quadratic form: the same answers.
        results["quadratic form"] = _numpy_backend(
            dataclasses.replace(case, layer_kwargs={
                k: v for k, v in case.layer_kwargs.items()
                if k != "quadratic_objective"}), values, cotangents)
    ref_out, ref_grad = results.pop("numpy")
    for name, (outputs, grads) in results.items():
        for k, (a, b) in enumerate(zip(outputs, ref_out)):
            np.testing.assert_allclose(
                a, b, rtol=RTOL, atol=ATOL,
                err_msg=f"{name}: output {k} differs from the core")
        for k, (a, b) in enumerate(zip(grads, ref_grad)):
            assert a.shape == b.shape, (name, k, a.shape, b.shape)
            np.testing.assert_allclose(
                a, b, rtol=RTOL, atol=ATOL,
                err_msg=f"{name}: gradient {k} differs from the core")


def test_relu_network_losses_agree_across_frameworks():
    from benchmarks import relu

    frameworks = relu.installed_frameworks()
    if len(frameworks) < 2:
        pytest.skip("needs at least two frameworks")
    init, X, Y = relu.make_problem_data(d=6, h=5, n_samples=24, seed=3)
    reference = relu.reference_curve(init, X, Y, steps=4)
    curves = {}
    for fw in frameworks:
        module = __import__(f"benchmarks.relu_{fw}", fromlist=["train"])
        result = module.train(init, X, Y, steps=4, log=lambda s: None)
        curves[fw] = np.array(result["losses"])
        assert result["max_output_error"] < 1e-6, fw
        assert result["max_grad_error"] < 1e-6, fw
    for fw, curve in curves.items():
        np.testing.assert_allclose(curve, reference, rtol=0, atol=1e-7,
                                   err_msg=f"{fw} vs closed-form curve")
    names = list(curves)
    for other in names[1:]:
        np.testing.assert_allclose(curves[other], curves[names[0]], rtol=0,
                                   atol=1e-7,
                                   err_msg=f"{other} vs {names[0]}")
    assert curves[names[0]][-1] < curves[names[0]][0]
