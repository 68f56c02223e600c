"""README.md's usage examples run as written, and give what they promise.

The examples are the Python blocks of the README, run in order in one
namespace (the first defines the problem the others use). With a = 1 the
solution is x = (1/3, 1/3, 1/3) on the face sum(x) = 1, where sum(x) does
not move with a: the gradient of sum(x) is zero. The PyTorch example draws
a at random: where sum(max(a, 0)) < 1 the sum bound is inactive, x =
max(a, 0) and the gradient is 1 where a > 0; elsewhere it is zero. The
tolerance, 1e-8, is far above the solutions' error (about 1e-12) and far
below any nonzero gradient entry a wrong answer would have (order 1).
"""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run_and_give_zero_gradients():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    pytest.importorskip("tensorflow")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5, "the README's usage examples were not found"
    ns = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)   # noqa: S102
    assert ns["a_t"].grad is not None                   # PyTorch
    a_t = ns["a_t"].detach().numpy()
    inactive = np.maximum(a_t, 0.0).sum(axis=1, keepdims=True) < 1.0
    expected = np.where(inactive, (a_t > 0).astype(float), 0.0)
    np.testing.assert_allclose(ns["a_t"].grad.numpy(), expected, atol=1e-8)
    np.testing.assert_allclose(np.asarray(ns["g"]), 0.0, atol=1e-8)  # JAX
    assert ns["grad"] is not None                       # TensorFlow
    np.testing.assert_allclose(np.asarray(ns["grad"]), 0.0, atol=1e-8)
    np.testing.assert_allclose(ns["sol"], 1.0 / 3.0, atol=1e-8)  # NumPy
    np.testing.assert_allclose(ns["grad_a"], 0.0, atol=1e-8)
