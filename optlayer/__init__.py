"""optlayer: differentiable convex optimization layers.

A parametrized convex problem written in CVXPY becomes a function from
parameter values to its solution, with exact gradients by implicit
differentiation of the cone program's optimality conditions. This package is
the framework-agnostic NumPy core; ``optlayer_torch``, ``optlayer_jax`` and
``optlayer_tf`` wrap it for PyTorch, JAX and TensorFlow/Keras.
"""

from optlayer import _malloc  # noqa: F401  (process-wide; see its doc)
from optlayer.errors import SolverError
from optlayer.layer import Layer

__all__ = ["Layer", "SolverError"]
__version__ = "0.1.0"
