"""optlayer for PyTorch: differentiable convex optimization layers.

``optlayer_torch.Layer`` is a ``torch.nn.Module`` with the constructor of
:class:`optlayer.Layer`; it solves the problem in the forward pass and
returns exact gradients in the backward pass. Failed solves raise
``optlayer_torch.SolverError``, the same class as ``optlayer.SolverError``.

Example:
    >>> import cvxpy as cp, torch, optlayer_torch
    >>> x = cp.Variable(2)
    >>> a = cp.Parameter(2)
    >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    >>> layer = optlayer_torch.Layer(prob, [a], [x])
    >>> a_t = torch.tensor([[1.0, -1.0], [2.0, 3.0]], requires_grad=True)
    >>> (sol,) = layer(a_t)              # batch of 2: ~ [[1, 0], [2, 3]]
    >>> sol.sum().backward()
"""

from optlayer import SolverError as SolverError

from optlayer_torch.layer import Layer as Layer

__all__ = ["Layer", "SolverError"]
