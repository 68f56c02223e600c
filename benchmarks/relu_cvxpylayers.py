"""The seed's ReLU network with cvxpylayers' layers, for comparison.

The same training loop as ``benchmarks/relu_torch.py`` and
``benchmarks/relu_jax.py`` (two ReLU layers written as the convex problem of
:func:`benchmarks.relu.relu_problem`, a linear layer, Adam on the mean
squared error, full batch), but every ReLU is solved by cvxpylayers'
``CvxpyLayer`` instead of optlayer's layer:

* PyTorch: ``cvxpylayers.torch.CvxpyLayer``, ``torch.optim.Adam``.
* JAX: ``cvxpylayers.jax.CvxpyLayer`` and the same hand-written, jitted Adam
  update as ``benchmarks/relu_jax.py``. cvxpylayers' JAX layer cannot be
  traced by ``jax.jit`` with its default backend, so the forward pass
  (``jax.vjp``) and the backward pass (the pullback) run eagerly.

cvxpylayers runs with its default settings (the diffcp backend, SCS with
diffcp's default tolerances, derivatives by LSQR). As in the seed, ``W`` and
``b`` are repeated along the batch (one copy per sample, by
``expand``/``broadcast_to``) so that every argument of the layer is batched.

The returned dict has the keys of optlayer's ``train`` functions, and the
errors are measured the same way: the largest difference between a layer's
output and ``max(W x + b, 0)`` at the same ``W``, ``b``, ``x`` (both layers,
all steps), and the largest difference between the gradients w.r.t. W1, b1,
W2, b2 and those of the closed-form network at the first step.

Run through the driver, next to optlayer::

    python -m benchmarks.relu --compare
"""

import time

import numpy as np

from benchmarks.relu import relu_problem, train_result

FRAMEWORKS = ("torch", "jax")
_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3")


def train(init, X, Y, *, framework="torch", steps=25, lr=1e-2, n_jobs=None,
          log=print):
    """Train the seed's network on cvxpylayers; return losses, times, errors.

    Args:
        init: float64 arrays "W1" (h, d), "b1" (h,), "W2" (h, h), "b2" (h,),
            "W3" (1, h), "b3" (1,); not mutated.
        X: inputs, (N, d) float64.
        Y: targets, (N, 1) float64.
        framework: "torch" or "jax".
        steps: number of full-batch Adam steps.
        lr: Adam's learning rate (beta1 0.9, beta2 0.999, epsilon 1e-8).
        n_jobs: solver threads for diffcp's forward and backward passes
            (``n_jobs_forward``/``n_jobs_backward``); None keeps
            cvxpylayers' default (one per core).
        log: called with one line per step.

    Returns:
        A dict: "losses" (loss before each update), "forward_time",
        "backward_time", "wall_time" (seconds), "max_output_error" and
        "max_grad_error".

    Example:
        >>> from benchmarks.relu import make_problem_data
        >>> init, X, Y = make_problem_data(5, 5, 20)
        >>> result = train(init, X, Y, steps=3, log=lambda line: None)
    """
    solver_args = {}
    if n_jobs:
        solver_args = {"n_jobs_forward": n_jobs, "n_jobs_backward": n_jobs}
    if framework == "torch":
        return _train_torch(init, X, Y, steps, lr, solver_args, log)
    if framework == "jax":
        return _train_jax(init, X, Y, steps, lr, solver_args, log)
    raise ValueError(f"unknown framework {framework!r}; choose from "
                     f"{', '.join(FRAMEWORKS)}")


# ----------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------

def _train_torch(init, X, Y, steps, lr, solver_args, log):
    import torch
    from cvxpylayers.torch import CvxpyLayer

    class ReluLayer(torch.nn.Module):
        """``max(W x + b, 0)`` by cvxpylayers; W, b repeated per sample."""

        def __init__(self, W, b):
            super().__init__()
            self.W = torch.nn.Parameter(torch.tensor(W, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))
            output_dim, input_dim = self.W.shape
            problem, parameters, variables = relu_problem(input_dim,
                                                          output_dim)
            self.layer = CvxpyLayer(problem, parameters=parameters,
                                    variables=variables)
            self.closed_form = False
            # (x, z) of the last forward solve, for the accuracy check.
            self.last = None

        def forward(self, x):
            if self.closed_form:
                return torch.relu(x @ self.W.T + self.b)
            n = x.shape[0]
            (z,) = self.layer(self.W.expand(n, *self.W.shape),
                              self.b.expand(n, *self.b.shape), x,
                              solver_args=solver_args)
            self.last = (x.detach(), z.detach())
            return z

        def output_error(self):
            """max |z - max(W x + b, 0)| for the last solve."""
            x, z = self.last
            with torch.no_grad():
                exact = torch.relu(x @ self.W.T + self.b)
            return float((z - exact).abs().max())

    relus = [ReluLayer(init["W1"], init["b1"]),
             ReluLayer(init["W2"], init["b2"])]
    dense = torch.nn.Linear(init["W3"].shape[1], 1, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.as_tensor(init["W3"]))
        dense.bias.copy_(torch.as_tensor(init["b3"]))
    net = torch.nn.Sequential(*relus, dense)
    X = torch.as_tensor(np.asarray(X, dtype=np.float64))
    Y = torch.as_tensor(np.asarray(Y, dtype=np.float64))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999),
                                 eps=1e-8)
    # The first step() imports torch's compiler stack (seconds, once per
    # process); a step without gradients does it outside the timed loop and
    # changes no weight.
    optimizer.step()

    def loss_fn():
        return ((Y - net(X)) ** 2).sum() / X.shape[0]

    relu_params = [relus[0].W, relus[0].b, relus[1].W, relus[1].b]
    losses = []
    forward_time = backward_time = 0.0
    max_output_error = max_grad_error = check_time = 0.0
    start = time.perf_counter()
    for k in range(steps):
        optimizer.zero_grad()
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        forward_time += t1 - t0
        backward_time += t2 - t1
        losses.append(loss.item())
        log(f"step {k:3d}  loss {losses[-1]:.12f}")

        # Accuracy checks, outside the timed passes and before the update;
        # not part of the wall time.
        tick = time.perf_counter()
        for relu in relus:
            max_output_error = max(max_output_error, relu.output_error())
        if k == 0:
            for relu in relus:
                relu.closed_form = True
            exact = torch.autograd.grad(loss_fn(), relu_params)
            for relu in relus:
                relu.closed_form = False
            max_grad_error = max(float((p.grad - e).abs().max())
                                 for p, e in zip(relu_params, exact))
        check_time += time.perf_counter() - tick
        optimizer.step()
    wall_time = time.perf_counter() - start - check_time
    return train_result(losses, forward_time, backward_time, wall_time,
                   max_output_error, max_grad_error)


# ----------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------

def _train_jax(init, X, Y, steps, lr, solver_args, log):
    from benchmarks.jax_tools import x64

    with x64():
        return _train_jax_x64(init, X, Y, steps, lr, solver_args, log)


def _train_jax_x64(init, X, Y, steps, lr, solver_args, log):
    import jax
    import jax.numpy as jnp
    from cvxpylayers.jax import CvxpyLayer

    from benchmarks.jax_tools import adam_update

    params = {k: jnp.asarray(np.asarray(init[k], dtype=np.float64))
              for k in _NAMES}
    X = jnp.asarray(np.asarray(X, dtype=np.float64))
    Y = jnp.asarray(np.asarray(Y, dtype=np.float64))
    h, d = params["W1"].shape
    # Built under float64: the layer keeps its problem data as JAX arrays.
    layers = [CvxpyLayer(*relu_problem(d, h)),
              CvxpyLayer(*relu_problem(h, h))]

    def solved_relu(layer):
        def relu(W, b, x):
            n = x.shape[0]
            (z,) = layer(jnp.broadcast_to(W, (n, *W.shape)),
                         jnp.broadcast_to(b, (n, *b.shape)), x,
                         solver_args=solver_args)
            return z
        return relu

    def closed_relu(W, b, x):
        return jnp.maximum(x @ W.T + b, 0.0)

    def network(relus):
        """``params -> (loss, [(x, z) of each ReLU])``."""
        def loss_fn(params):
            h = X
            pairs = []
            for k, relu in zip((1, 2), relus):
                z = relu(params[f"W{k}"], params[f"b{k}"], h)
                pairs.append((h, z))
                h = z
            out = h @ params["W3"].T + params["b3"]
            return jnp.sum((Y - out) ** 2) / X.shape[0], pairs
        return loss_fn

    solved_loss = network([solved_relu(layer) for layer in layers])
    closed_loss = network([closed_relu, closed_relu])
    update = jax.jit(adam_update)
    closed_grad = jax.jit(jax.grad(lambda p: closed_loss(p)[0]))

    def output_error(params, pairs):
        # A few small operations: cheaper eagerly than compiled.
        return jnp.max(jnp.stack([
            jnp.max(jnp.abs(z - closed_relu(params[f"W{k}"], params[f"b{k}"],
                                            x)))
            for k, (x, z) in zip((1, 2), pairs)]))

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    moments = (zeros, zeros)
    losses = []
    forward_time = backward_time = 0.0
    max_output_error = max_grad_error = check_time = 0.0
    start = time.perf_counter()
    for k in range(steps):
        tic = time.perf_counter()
        loss, pullback, pairs = jax.vjp(solved_loss, params, has_aux=True)
        loss = float(loss)
        forward_time += time.perf_counter() - tic

        tic = time.perf_counter()
        (grads,) = pullback(jnp.ones(()))
        grads = jax.block_until_ready(grads)
        backward_time += time.perf_counter() - tic

        losses.append(loss)
        log(f"step {k:3d}  loss {loss:.12f}")
        # Accuracy checks, outside the timed passes and before the update;
        # not part of the wall time.
        tick = time.perf_counter()
        max_output_error = max(max_output_error,
                               float(output_error(params, pairs)))
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
    return train_result(losses, forward_time, backward_time, wall_time,
                   max_output_error, max_grad_error)
