"""The seed's ReLU network in JAX, each ReLU solved by an optlayer layer.

``train`` runs the seed example (two ReLU layers written as the convex
problem of ``seed/relu_layers.md``, then a linear layer; Adam on the mean
squared error) with plain functions over a parameter dictionary. The forward
pass and the backward pass are each compiled with ``jax.jit`` (split with
``jax.vjp`` so that each can be timed), and so is the Adam update.

Run the seed size (20 -> 20 -> 20 -> 1, 300 samples, 25 steps)::

    python -m benchmarks.relu_jax
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import optlayer_jax
from benchmarks import relu as relu_driver
from benchmarks.jax_tools import adam_update, x64
from benchmarks.relu import relu_problem, train_result

_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


def relu_layer(d_in, d_out, **options):
    """The seed's ReLU problem as a layer ``(W, b, x) -> (z,)``."""
    return optlayer_jax.Layer(*relu_problem(d_in, d_out), **options)


def _closed_relu(W, b, x):
    return (jnp.maximum(x @ W.T + b, 0.0),)


def _network(relus):
    """``params, X, Y -> (loss, largest ReLU error)`` for two ReLU maps."""
    def loss_fn(params, X, Y):
        errors = []
        h = X
        for k, relu in zip((1, 2), relus):
            W, b = params[f"W{k}"], params[f"b{k}"]
            (z,) = relu(W, b, h)
            # The layer's output against the closed form at the same W, b, x.
            errors.append(jnp.max(jnp.abs(z - jnp.maximum(h @ W.T + b, 0.0))))
            h = z
        out = h @ params["W3"].T + params["b3"]
        loss = jnp.sum((Y - out) ** 2) / X.shape[0]
        return loss, jnp.maximum(*errors)
    return loss_fn


def train(init, X, Y, *, steps=25, lr=1e-2, closed_form=False,
          solver_options=None, n_jobs=None, log=print):
    """Train the seed's network with Adam; see ``benchmarks/relu.py``.

    Args:
        init: dict of float64 arrays "W1" (h, d), "b1" (h,), "W2" (h, h),
            "b2" (h,), "W3" (1, h), "b3" (1,); not mutated.
        X: (N, d) float64 inputs.
        Y: (N, 1) float64 targets.
        steps: number of full-batch Adam steps.
        lr: Adam's learning rate (beta1 0.9, beta2 0.999, epsilon 1e-8).
        closed_form: replace the optlayer ReLUs by ``max(Wx + b, 0)``.
        solver_options: passed to the layers.
        n_jobs: passed to the layers.
        log: called with one line per step.

    Returns:
        dict with "losses" (loss before each update), "forward_time",
        "backward_time", "wall_time" (seconds), "max_output_error" and
        "max_grad_error" (both 0.0 when ``closed_form``).
    """
    with x64():
        return _train(init, X, Y, steps, lr, closed_form, solver_options,
                      n_jobs, log)


def _train(init, X, Y, steps, lr, closed_form, solver_options, n_jobs, log):
    params = {k: jnp.asarray(np.asarray(init[k], dtype=np.float64))
              for k in _NAMES}
    X = jnp.asarray(np.asarray(X, dtype=np.float64))
    Y = jnp.asarray(np.asarray(Y, dtype=np.float64))
    h, d = params["W1"].shape
    closed_loss = _network((_closed_relu, _closed_relu))
    if closed_form:
        loss_fn = closed_loss
    else:
        options = {"solver_options": solver_options, "n_jobs": n_jobs}
        loss_fn = _network((relu_layer(d, h, **options),
                            relu_layer(h, h, **options)))

    # Forward and backward are compiled separately so each can be timed;
    # the forward returns the pullback, whose residuals hold the solutions.
    forward = jax.jit(lambda p: jax.vjp(lambda p: loss_fn(p, X, Y), p,
                                        has_aux=True))
    backward = jax.jit(lambda pullback: pullback(jnp.ones(()))[0])
    update = jax.jit(adam_update)
    closed_grad = jax.jit(jax.grad(lambda p: closed_loss(p, X, Y)[0]))

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    moments = (zeros, zeros)
    # Compile ahead of the timed loop (XLA compilation is a one-time cost
    # of a JAX program, like importing the framework): tracing for the
    # compiler runs no solve.
    step = jnp.asarray(1.0)
    pullback_type = jax.eval_shape(forward, params)[1]
    forward = forward.lower(params).compile()
    backward = backward.lower(pullback_type).compile()
    update = update.lower(params, params, moments, step, lr).compile()
    losses = []
    forward_time = backward_time = 0.0
    max_output_error = max_grad_error = check_time = 0.0
    start = time.perf_counter()
    for k in range(steps):
        tic = time.perf_counter()
        loss, pullback, error = forward(params)
        loss = float(loss)
        forward_time += time.perf_counter() - tic

        tic = time.perf_counter()
        grads = jax.block_until_ready(backward(pullback))
        backward_time += time.perf_counter() - tic

        losses.append(loss)
        log(f"step {k:3d}  loss {loss:.12f}")
        # Accuracy checks: not part of the wall time.
        tick = time.perf_counter()
        if not closed_form:
            max_output_error = max(max_output_error, float(error))
            if k == 0:
                reference = closed_grad(params)
                max_grad_error = max(
                    float(jnp.max(jnp.abs(grads[n] - reference[n])))
                    for n in ("W1", "b1", "W2", "b2"))
        check_time += time.perf_counter() - tick
        params, moments = update(params, grads, moments,
                                 jnp.asarray(k + 1.0), lr)
    jax.block_until_ready(params)
    wall_time = time.perf_counter() - start - check_time
    return train_result(losses, forward_time, backward_time,
                                    wall_time, max_output_error,
                                    max_grad_error)


def main(argv=None):
    """The seed's run on JAX: ``optlayer-relu --framework jax``."""
    return relu_driver.main(["--framework", "jax", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
