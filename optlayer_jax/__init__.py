"""optlayer for JAX: convex optimization layers as ``custom_vjp`` functions.

Example:
    >>> import cvxpy as cp
    >>> import jax.numpy as jnp
    >>> import optlayer_jax
    >>> x = cp.Variable(2)
    >>> a = cp.Parameter(2)
    >>> problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    >>> layer = optlayer_jax.Layer(problem, [a], [x])
    >>> (sol,) = layer(jnp.array([1.0, -1.0]))
    >>> bool(jnp.allclose(sol, jnp.array([1.0, 0.0]), atol=1e-6))
    True
"""

from optlayer.errors import SolverError as SolverError
from optlayer_jax.layer import Layer as Layer

__all__ = ["Layer", "SolverError"]
