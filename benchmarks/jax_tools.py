"""JAX helpers shared by the JAX training loops (optlayer's and
cvxpylayers'), so that both run the same optimizer in the same precision.
Imports no optimization-layer library."""

import jax
import jax.numpy as jnp


def x64():
    """A context in which JAX uses float64, whatever the caller's setting."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older JAX releases
    return enable_x64()


def adam_update(params, grads, moments, step, lr, beta1=0.9, beta2=0.999,
                eps=1e-8):
    """One Adam step (bias-corrected first and second moments)."""
    m, v = moments
    m = jax.tree_util.tree_map(lambda m, g: beta1 * m + (1 - beta1) * g,
                               m, grads)
    v = jax.tree_util.tree_map(lambda v, g: beta2 * v + (1 - beta2) * g * g,
                               v, grads)
    # step counts from 1; the corrections undo the zero initialization.
    m_scale = 1.0 / (1.0 - beta1 ** step)
    v_scale = 1.0 / (1.0 - beta2 ** step)
    params = jax.tree_util.tree_map(
        lambda p, m, v: p - lr * (m * m_scale) / (jnp.sqrt(v * v_scale) + eps),
        params, m, v)
    return params, (m, v)
