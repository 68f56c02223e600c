"""The ReLU-layer network of the seed example, trained with PyTorch.

Each ReLU layer ``z = max(Wx + b, 0)`` is the convex problem

    minimize ||z - Wtilde x - b||^2  subject to  z >= 0,  Wtilde == W

(``Wtilde`` keeps the problem DPP), solved by :class:`optlayer_torch.Layer`.
Two of them and a linear layer form the network; Adam trains it on random
data. ``train(..., closed_form=True)`` swaps the solves for
``torch.relu(x @ W.T + b)``, the reference curve.

Run ``python -m benchmarks.relu_torch`` for the seed instance (20 -> 20 ->
20 -> 1, 300 samples, 25 steps).
"""

import sys
import time

import numpy as np
import torch

import optlayer_torch
from benchmarks import relu
from benchmarks.relu import relu_problem, train_result


class ReluLayer(torch.nn.Module):
    """``max(W x + b, 0)`` as a convex optimization layer.

    ``W`` and ``b`` are trainable and passed to the solver unbatched (one
    copy for the whole batch; their gradients are summed over it); ``x`` is
    batched, shape (batch, input_dim).

    Args:
        W: initial weight, shape (output_dim, input_dim), float64.
        b: initial bias, shape (output_dim,), float64.
        closed_form: compute ``torch.relu(x @ W.T + b)`` instead of solving.
        **options: options of :class:`optlayer_torch.Layer`.

    Example:
        >>> layer = ReluLayer(np.zeros((3, 2)), np.ones(3))
        >>> z = layer(torch.zeros(4, 2, dtype=torch.float64))  # (4, 3) ones
    """

    def __init__(self, W, b, *, closed_form=False, **options):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor(W, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.closed_form = closed_form
        output_dim, input_dim = self.W.shape
        self.layer = optlayer_torch.Layer(*relu_problem(input_dim, output_dim),
                                          **options)
        # (x, z) of the last forward solve, for the accuracy check.
        self.last = None

    def forward(self, x):
        if self.closed_form:
            return torch.relu(x @ self.W.T + self.b)
        (z,) = self.layer(self.W, self.b, x)
        self.last = (x.detach(), z.detach())
        return z

    def output_error(self):
        """max |z - max(W x + b, 0)| for the last solve (at current W, b)."""
        if self.last is None:
            return 0.0
        x, z = self.last
        with torch.no_grad():
            exact = torch.relu(x @ self.W.T + self.b)
        return float((z - exact).abs().max())


def build_network(init, *, closed_form=False, **options):
    """Two ReLU layers and a linear output layer, from ``init``."""
    relu1 = ReluLayer(init["W1"], init["b1"], closed_form=closed_form,
                      **options)
    relu2 = ReluLayer(init["W2"], init["b2"], closed_form=closed_form,
                      **options)
    h = init["W3"].shape[1]
    dense = torch.nn.Linear(h, 1, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.as_tensor(init["W3"]))
        dense.bias.copy_(torch.as_tensor(init["b3"]))
    return torch.nn.Sequential(relu1, relu2, dense)


def _loss(net, X, Y):
    # Mean over samples of the squared error, as in the seed.
    return ((Y - net(X)) ** 2).sum() / X.shape[0]


def _relu_grads(net, X, Y):
    """Gradients of the loss w.r.t. (W1, b1, W2, b2)."""
    params = [net[0].W, net[0].b, net[1].W, net[1].b]
    return torch.autograd.grad(_loss(net, X, Y), params)


def train(init, X, Y, *, steps=25, lr=1e-2, closed_form=False,
          solver_options=None, n_jobs=None, log=print):
    """Train the seed network with Adam; return losses, timings and errors.

    Args:
        init: float64 arrays "W1" (h, d), "b1" (h,), "W2" (h, h), "b2" (h,),
            "W3" (1, h), "b3" (1,). Not mutated.
        X: inputs, (N, d) float64.
        Y: targets, (N, 1) float64.
        steps: Adam steps (full batch).
        lr: Adam learning rate (beta1 = 0.9, beta2 = 0.999, eps = 1e-8).
        closed_form: use ``torch.relu`` instead of the optimization layers.
        solver_options: passed to :class:`optlayer_torch.Layer`.
        n_jobs: passed to :class:`optlayer_torch.Layer`.
        log: called with one line per step.

    Returns:
        A dict: "losses" (loss before each update), "forward_time",
        "backward_time", "wall_time" (seconds), "max_output_error" (largest
        |layer output - max(Wx + b, 0)| over both layers and all steps) and
        "max_grad_error" (largest gradient difference w.r.t. W1, b1, W2, b2
        from the closed-form network at the first step); both errors are 0.0
        when ``closed_form``.

    Example:
        >>> init, X, Y = relu.make_problem_data(5, 5, 20)
        >>> result = train(init, X, Y, steps=3, log=lambda line: None)
    """
    options = {"solver_options": solver_options, "n_jobs": n_jobs}
    net = build_network(init, closed_form=closed_form, **options)
    X = torch.as_tensor(np.asarray(X, dtype=np.float64))
    Y = torch.as_tensor(np.asarray(Y, dtype=np.float64))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999),
                                 eps=1e-8)
    # The first step() imports torch's compiler stack (seconds, once per
    # process); a step without gradients does it outside the timed loop and
    # changes no weight.
    optimizer.step()
    relus = [net[0], net[1]]

    losses = []
    forward_time = backward_time = 0.0
    max_output_error = max_grad_error = check_time = 0.0
    start = time.perf_counter()
    for k in range(steps):
        optimizer.zero_grad()
        t0 = time.perf_counter()
        loss = _loss(net, X, Y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        forward_time += t1 - t0
        backward_time += t2 - t1
        losses.append(loss.item())
        log(f"step {k:3d}  loss {losses[-1]:.12f}")

        # Accuracy checks, outside the timed passes and before the update,
        # so they see the weights the layers were solved with; their time
        # is not part of the wall time.
        tick = time.perf_counter()
        if not closed_form:
            for relu in relus:
                max_output_error = max(max_output_error, relu.output_error())
            if k == 0:
                for relu in relus:
                    relu.closed_form = True
                exact = _relu_grads(net, X, Y)
                for relu in relus:
                    relu.closed_form = False
                got = [net[0].W.grad, net[0].b.grad, net[1].W.grad,
                       net[1].b.grad]
                max_grad_error = max(float((g - e).abs().max())
                                     for g, e in zip(got, exact))
        check_time += time.perf_counter() - tick
        optimizer.step()
    wall_time = time.perf_counter() - start - check_time

    return train_result(losses, forward_time, backward_time,
                                    wall_time, max_output_error,
                                    max_grad_error)


def main(argv=None):
    """The seed's run on PyTorch: ``optlayer-relu --framework torch``."""
    return relu.main(["--framework", "torch", *(argv or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
