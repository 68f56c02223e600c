"""The ReLU example in Keras 3: ReLU layers solved as convex problems.

Each ``ReluLayer`` computes ``z = max(Wx + b, 0)`` by solving

    minimize ||z - Wtilde x - b||^2  subject to  z >= 0, Wtilde = W

with optlayer (``Wtilde`` keeps the problem DPP). ``W`` and ``b`` are the
layer's weights, passed unbatched to the optimization layer; ``x`` is the
batch. Two of them and a ``Dense(1)`` form a ``keras.Sequential`` model.
This is illustrative only: the closed form is far cheaper.

Run ``python -m benchmarks.relu_tf`` for the seed's size (20 -> 20 -> 20 -> 1,
300 samples, 25 Adam steps, float64) and a short ``Model.fit`` run.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import optlayer_tf  # noqa: E402
from benchmarks import relu  # noqa: E402
from benchmarks.relu import relu_problem, train_result  # noqa: E402


class ReluLayer(keras.layers.Layer):
    """``max(Wx + b, 0)`` as the solution of a convex problem.

    Args:
        input_dim: size d of the input x.
        output_dim: size h of the output z.
        closed_form: compute ``max(Wx + b, 0)`` directly instead (the
            reference network).
        solver_options: SCS settings for the optimization layer.
        n_jobs: solver threads for the optimization layer.
        **kwargs: Keras layer arguments; ``dtype`` defaults to float64.

    Example:
        >>> relu = ReluLayer(3, 2)
        >>> z = relu(np.random.randn(5, 3))           # shape (5, 2)
    """

    def __init__(self, input_dim, output_dim, *, closed_form=False,
                 solver_options=None, n_jobs=None, **kwargs):
        kwargs.setdefault("dtype", "float64")
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.closed_form = closed_form
        # Small weights as in the seed; train() overwrites them.
        init = keras.initializers.RandomNormal(stddev=1e-3)
        self.W = self.add_weight(shape=(output_dim, input_dim),
                                 initializer=init, name="W")
        self.b = self.add_weight(shape=(output_dim,), initializer=init,
                                 name="b")
        self.solver = None
        if not closed_form:
            self.solver = optlayer_tf.Layer(
                *relu_problem(input_dim, output_dim),
                solver_options=solver_options,
                n_jobs=n_jobs)

    def call(self, x):
        if self.closed_form:
            return self.reference(x)
        # W and b are shared by the batch: passed without a batch axis.
        (z,) = self.solver(self.W, self.b, x)
        return z

    def reference(self, x):
        """The closed form ``max(Wx + b, 0)`` at the current weights."""
        ops = keras.ops
        return ops.relu(ops.matmul(x, ops.transpose(self.W)) + self.b)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(input_dim=self.input_dim, output_dim=self.output_dim,
                      closed_form=self.closed_form)
        return config


def build_model(d, h, *, closed_form=False, solver_options=None,
                n_jobs=None):
    """The seed's network: two ReLU layers and a linear output, float64."""
    relu_kwargs = dict(closed_form=closed_form,
                       solver_options=solver_options, n_jobs=n_jobs)
    return keras.Sequential([
        keras.Input((d,), dtype="float64"),
        ReluLayer(d, h, **relu_kwargs),
        ReluLayer(h, h, **relu_kwargs),
        keras.layers.Dense(1, dtype="float64"),
    ])


def load_init(model, init):
    """Copy the caller's initial weights into ``model``."""
    relu1, relu2, dense = model.layers
    relu1.W.assign(init["W1"])
    relu1.b.assign(init["b1"])
    relu2.W.assign(init["W2"])
    relu2.b.assign(init["b2"])
    # Dense computes x @ kernel: its kernel is W3 transposed.
    dense.kernel.assign(np.asarray(init["W3"]).T)
    dense.bias.assign(init["b3"])


def _forward(model, x):
    """The Sequential forward, keeping each ReLU layer's input and output."""
    trace = []
    for layer in model.layers:
        out = layer(x)
        if isinstance(layer, ReluLayer):
            trace.append((layer, x, out))
        x = out
    return x, trace


def _reference_forward(model, x):
    """The same network with every ReLU layer in closed form."""
    for layer in model.layers:
        x = layer.reference(x) if isinstance(layer, ReluLayer) else layer(x)
    return x


def _loss(Y, out):
    # (1/N) sum (Y - out)^2, as in the seed.
    return tf.reduce_mean(tf.square(Y - out))


def _relu_weights(model):
    return [w for layer in model.layers if isinstance(layer, ReluLayer)
            for w in (layer.W, layer.b)]


def _grad_error(model, X, Y):
    """Max |grad - closed-form grad| of the loss in (W1, b1, W2, b2)."""
    weights = _relu_weights(model)
    with tf.GradientTape(persistent=True) as tape:
        loss = _loss(Y, _forward(model, X)[0])
        loss_ref = _loss(Y, _reference_forward(model, X))
    grads = tape.gradient(loss, weights)
    grads_ref = tape.gradient(loss_ref, weights)
    return max(float(tf.reduce_max(tf.abs(g - r)))
               for g, r in zip(grads, grads_ref))


class _Adam:
    """Adam with bias-corrected moments, in float64.

    Keras's Adam stores the learning rate in float32 and adds epsilon to the
    uncorrected second moment; with gradients as small as this network's
    (about 1e-7 for some weights) that moves the loss curve by about 1e-6.
    The textbook update used here keeps the curve equal to the other
    frameworks' and to the NumPy reference; ``fit_demo`` shows Keras's own
    optimizer in ``Model.fit``.
    """

    def __init__(self, weights, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.weights = list(weights)
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = [tf.zeros_like(w) for w in self.weights]
        self.v = [tf.zeros_like(w) for w in self.weights]
        self.t = 0

    def apply(self, grads):
        self.t += 1
        c1 = 1.0 - self.beta1 ** self.t
        c2 = 1.0 - self.beta2 ** self.t
        for k, (w, g) in enumerate(zip(self.weights, grads)):
            self.m[k] = self.beta1 * self.m[k] + (1.0 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1.0 - self.beta2) * g * g
            w.assign_sub(self.lr * (self.m[k] / c1)
                         / (tf.sqrt(self.v[k] / c2) + self.eps))


def train(init, X, Y, *, steps=25, lr=1e-2, closed_form=False,
          solver_options=None, n_jobs=None, log=print):
    """Train the seed's network with Adam in a GradientTape loop.

    Args:
        init: float64 arrays "W1" (h, d), "b1" (h,), "W2" (h, h), "b2" (h,),
            "W3" (1, h), "b3" (1,).
        X: inputs, (N, d) float64.
        Y: targets, (N, 1) float64.
        steps: full-batch Adam steps.
        lr: Adam's learning rate.
        closed_form: use ``max(Wx + b, 0)`` instead of optlayer (reference).
        solver_options: SCS settings for the optimization layers.
        n_jobs: solver threads for the optimization layers.
        log: called with one line per step.

    Returns:
        A dict: "losses" (the loss before each update), "forward_time",
        "backward_time", "wall_time" (seconds), "max_output_error" (largest
        |layer output - max(Wx + b, 0)| over both ReLU layers and all steps)
        and "max_grad_error" (largest difference of the gradients in W1, b1,
        W2, b2 from the closed-form network's, at the first step); both
        errors are 0.0 with ``closed_form``.
    """
    X = tf.constant(X, dtype=tf.float64)
    Y = tf.constant(Y, dtype=tf.float64)
    d = int(X.shape[1])
    h = int(np.shape(init["W1"])[0])
    model = build_model(d, h, closed_form=closed_form,
                        solver_options=solver_options, n_jobs=n_jobs)
    load_init(model, init)
    weights = model.trainable_variables
    optimizer = _Adam(weights, lr)

    # At the initial weights, i.e. the first step's; not timed.
    max_grad_error = 0.0 if closed_form else _grad_error(model, X, Y)

    losses = []
    forward_time = backward_time = max_output_error = check_time = 0.0
    start = time.perf_counter()
    for k in range(steps):
        with tf.GradientTape() as tape:
            tick = time.perf_counter()
            out, trace = _forward(model, X)
            loss = _loss(Y, out)
            forward_time += time.perf_counter() - tick
        tick = time.perf_counter()
        grads = tape.gradient(loss, weights)
        backward_time += time.perf_counter() - tick
        # Accuracy check: not part of the wall time.
        tick = time.perf_counter()
        if not closed_form:
            # Before the update, so the weights are the ones each layer saw.
            for layer, x, z in trace:
                error = tf.reduce_max(tf.abs(z - layer.reference(x)))
                max_output_error = max(max_output_error, float(error))
        check_time += time.perf_counter() - tick
        optimizer.apply(grads)

        losses.append(float(loss))
        log(f"step {k:3d}  loss {losses[-1]:.12f}")
    wall_time = time.perf_counter() - start - check_time
    return train_result(losses, forward_time, backward_time,
                                    wall_time, max_output_error,
                                    max_grad_error)


def fit_demo(init, X, Y, *, epochs=5, lr=1e-2, solver_options=None,
             n_jobs=None, verbose=0):
    """Train the same network with ``Model.fit`` (full batch).

    Args:
        init, X, Y, lr, solver_options, n_jobs: as for :func:`train`.
        epochs: one full-batch step each.
        verbose: passed to ``Model.fit``.

    Returns:
        The history's losses, one per epoch (the loss before each update).
    """
    d = int(np.shape(X)[1])
    h = int(np.shape(init["W1"])[0])
    model = build_model(d, h, solver_options=solver_options, n_jobs=n_jobs)
    load_init(model, init)
    optimizer = keras.optimizers.Adam(learning_rate=lr, beta_1=0.9,
                                      beta_2=0.999, epsilon=1e-8)
    # The optimization layers run through tf.numpy_function: no XLA.
    model.compile(optimizer=optimizer, loss="mean_squared_error",
                  jit_compile=False)
    # Keras casts float64 NumPy arrays to float32 when it batches them; a
    # dataset of float64 tensors keeps the data in float64.
    data = tf.data.Dataset.from_tensor_slices(
        (np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)))
    history = model.fit(data.batch(len(X)), epochs=epochs, shuffle=False,
                        verbose=verbose)
    return [float(v) for v in history.history["loss"]]


def main(argv=None):
    """The seed's run (``optlayer-relu --framework tf``), then Model.fit."""
    code = relu.main(["--framework", "tf", *(argv or [])])
    init, X, Y = relu.make_problem_data()
    print("Model.fit, 5 full-batch epochs")
    tick = time.perf_counter()
    losses = fit_demo(init, X, Y, epochs=5)
    print("losses:", " ".join(f"{v:.10f}" for v in losses))
    print(f"fit time: {time.perf_counter() - tick:.2f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
