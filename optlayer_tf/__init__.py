"""TensorFlow/Keras adapter of optlayer.

A parametrized convex problem written in CVXPY becomes a Keras 3 layer; the
mathematics lives in the NumPy core, :class:`optlayer.Layer`.
"""

from optlayer import SolverError as SolverError
from optlayer_tf.layer import Layer as Layer

__all__ = ["Layer", "SolverError"]
