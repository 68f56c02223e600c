"""A Keras 3 layer over the NumPy core, differentiable by tf.custom_gradient.

The layer only converts tensors to float64 NumPy arrays, calls
:class:`optlayer.Layer` and converts back. Eagerly the core is called
directly, so its exceptions reach the caller unchanged; in graph mode
(``tf.function``, ``Model.fit``, ``Model.predict``) the forward solve and
the adjoint each run inside a ``tf.numpy_function``. The solver's
primal-dual solution travels from the forward to the backward pass as
tensors, so no per-call Python state is kept.
"""

import copy
import inspect
import warnings

import keras
import numpy as np
import tensorflow as tf

import optlayer

# The core works in float64; inputs are cast to it and outputs cast back.
_CORE_DTYPE = tf.float64

# Keyword arguments that go to the core; all others go to Keras.
_CORE_OPTIONS = tuple(
    name for name, p in inspect.signature(optlayer.Layer).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def _check_backend():
    """RuntimeError unless Keras runs on TensorFlow: the layer's gradient
    and graph-mode solve are TensorFlow's (tf.custom_gradient,
    tf.numpy_function)."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"optlayer_tf.Layer needs Keras's TensorFlow backend; Keras "
            f"runs on '{backend}' here. Set KERAS_BACKEND=tensorflow "
            "before importing keras, or use optlayer_jax.Layer or "
            "optlayer_torch.Layer with JAX or PyTorch.")


def _warn_if_saving():
    """UserWarning when traced for a SavedModel (model.export,
    tf.saved_model.save): the solve is a Python callback, which the saved
    graph cannot carry."""
    try:
        from tensorflow.python.saved_model import save_context
    except ImportError:  # pragma: no cover - TensorFlow moved the module
        return
    if save_context.in_save_context():
        warnings.warn(
            "A SavedModel of optlayer_tf.Layer (model.export, "
            "tf.saved_model.save) calls back into this Python process to "
            "solve: its serving function fails once loaded in another "
            "process. Build the model in code and restore its weights with "
            "save_weights / load_weights.", UserWarning, stacklevel=2)


# Registered so that keras.models.load_model finds the class and reports
# from_config's explanation, not an unknown class.
@keras.saving.register_keras_serializable(package="optlayer")
class Layer(keras.layers.Layer):
    """A parametrized convex problem as a Keras layer.

    Calling the layer with one tensor per parameter (in the order of
    ``parameters``) solves the problem and returns a tuple with one tensor
    per entry of ``variables``; gradients of a loss on those outputs flow
    back to the inputs by implicit differentiation (computed by the core).

    Inputs follow the core's batching rule: a tensor with exactly the
    parameter's shape is shared by the whole batch (its gradient is summed
    over the batch); a tensor with one more leading dimension is batched.
    Outputs carry the batch dimension if any input does, have static shapes
    where the input shapes allow, and have the result dtype of the inputs
    (float32 in, float32 out; any float64 input gives float64 outputs).
    The core always computes in float64.

    Values may be tensors, Keras variables, NumPy arrays or, for scalar
    parameters, Python numbers. A Python float takes the floating dtype of
    the other inputs (float64 beside a float64 input, so it is not rounded;
    Keras's floatx, float32 by default, if no other input is floating); a
    Python int counts as int32.

    Works eagerly (with ``tf.GradientTape``), inside ``tf.function`` and in
    models trained with ``Model.fit``. Limitations: the graph path runs
    ``tf.numpy_function``, so the layer cannot be XLA-compiled
    (``supports_jit`` is False), runs on the host, and a model holding it
    cannot be exported as a SavedModel (the Python function is not part of
    the graph). Gradients are first-order reverse mode only: the layer's
    part of a second derivative (nested ``GradientTape``s) or of a
    forward-mode derivative (``tf.autodiff.ForwardAccumulator``) raises
    ``NotImplementedError`` instead of being silently dropped.

    The CVXPY problem is not serializable: :meth:`get_config` describes the
    layer (parameter and variable names and shapes, the core's options) so
    that a model can be summarized or written to JSON, but
    :meth:`from_config` cannot rebuild it; construct the layer from the
    problem in code and restore weights with ``load_weights``.
    ``copy.deepcopy`` and ``pickle`` work: the copy is a new layer (not
    connected to any model) with the same Keras settings around a copy of
    the core. Saving a model (``model.save``, ``to_json``) warns that it
    cannot be loaded back.

    The layer returns a tuple even for one output, so in a
    ``keras.Sequential`` model no layer can follow it directly (Keras
    then fails with "Cannot convert ... to a shape"); use the functional
    API and take ``outputs[0]``, or subclass ``keras.Model``.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: every ``cvxpy.Parameter`` of the problem, each once; the
            layer takes their values in this order.
        variables: the outputs: ``cvxpy.Variable`` objects of the problem or
            dual variables of its constraints.
        **kwargs: the core's keyword arguments (``solver_options``,
            ``n_jobs``, ``warm_start``, ...; see :class:`optlayer.Layer`),
            and Keras layer arguments (``name``, ``trainable``, ...).
            ``autocast`` defaults to False so that float64 inputs are not
            cast to Keras's compute dtype.

    Example:
        >>> x = cp.Variable(2)
        >>> a = cp.Parameter(2)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
        >>> layer = optlayer_tf.Layer(prob, [a], [x])
        >>> a_tf = tf.Variable([1.0, -1.0], dtype=tf.float64)
        >>> with tf.GradientTape() as tape:
        ...     (sol,) = layer(a_tf)                     # ~ [1, 0]
        ...     loss = tf.reduce_sum(sol)
        >>> tape.gradient(loss, a_tf)                    # ~ [1, 0]

    Raises:
        ValueError: at construction, if the core rejects the problem; when
            called, for inputs of the wrong number or shape (raised while
            tracing when the shapes are static; unknown dimensions are
            shown as None), for complex inputs, or, eagerly, for
            non-finite or out-of-domain values.
        NotImplementedError: when a second or forward-mode derivative
            through the layer is asked for.
        RuntimeError: at construction, if Keras runs on a backend other
            than TensorFlow (``KERAS_BACKEND``).
        optlayer.SolverError: eagerly, if a solve in the batch fails.
        tf.errors.OpError: in graph mode, for errors found while running
            (bad values, failed solves); the core's message is kept.
    """

    def __init__(self, problem, parameters, variables, **kwargs):
        _check_backend()
        options = {k: kwargs.pop(k) for k in _CORE_OPTIONS if k in kwargs}
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self._setup(
            optlayer.Layer(problem, parameters, variables, **options),
            options)

    def _setup(self, core, options):
        self.core = core
        # Kept for get_config: the options as given, not merged defaults.
        self._options = options
        # tf.numpy_function has no XLA kernel.
        self.supports_jit = False
        # No weights: nothing to build.
        self.built = True

    # -- copying ---------------------------------------------------------

    def __reduce__(self):
        # Keras copies and pickles layers through its saving library, which
        # rebuilds them with from_config: impossible here (the problem is
        # not part of the config). The copy is a new, unconnected layer of
        # the same class and Keras settings around a copy of the core
        # (which pickles, compiled problem included), as Keras's own copy
        # of a layer is. Attributes a subclass adds are not copied.
        keras_kwargs = {"name": self.name, "trainable": self.trainable,
                        "dtype": self.dtype_policy, "autocast": self.autocast}
        return (_rebuild,
                (type(self), self.core, dict(self._options), keras_kwargs))

    def __deepcopy__(self, memo):
        rebuild, args = self.__reduce__()
        copied = rebuild(*copy.deepcopy(args, memo))
        memo[id(self)] = copied
        return copied

    # -- Keras interface -------------------------------------------------

    def __call__(self, *values, **kwargs):
        # Keras only takes tensors and arrays as positional arguments:
        # Python numbers and lists become tensors (see _python_to_tensor),
        # and anything not numeric gets the core's error.
        listed = (len(values) == 1 and isinstance(values[0], (list, tuple))
                  and len(self.core.param_shapes) != 1)
        items = values[0] if listed else values
        float_dtype = _number_dtype(items)
        items = type(items)(_python_to_tensor(v, float_dtype)
                            for v in items)
        if not all(_is_array_like(v) and not isinstance(v, (list, tuple))
                   for v in items):
            # Values left as they were are not numeric: the core's error.
            self.core.batch_size(*items)
        values = (items,) if listed else items
        return super().__call__(*values, **kwargs)

    def call(self, *values):
        """Solve for one tensor per parameter; return the outputs' tuple."""
        try:
            return self._call(values)
        except (ValueError, optlayer.SolverError) as error:
            # Keras re-creates exceptions leaving call() to prepend argument
            # info, which would drop SolverError.elements and .statuses and
            # reword the core's message. Marked as already annotated, the
            # original exception passes through every enclosing layer.
            error._keras_call_info_injected = True
            raise

    def _call(self, values):
        values = self._unpack(values)
        tensors = self._to_tensors(values)
        dtype = _result_dtype([t.dtype for t in tensors])
        prefix = self._static_batch_prefix(
            [_shape_tuple(t.shape) for t in tensors])
        outputs = self._solve(prefix, *[tf.cast(t, _CORE_DTYPE)
                                        for t in tensors])
        return tuple(tf.cast(o, dtype) for o in outputs)

    def compute_output_spec(self, *values):
        """Output specs for symbolic inputs (shapes and dtype, no solve)."""
        try:
            return self._output_spec(values)
        except ValueError as error:
            # As in call(): the core's message, not Keras's rewording.
            error._keras_call_info_injected = True
            raise

    def _output_spec(self, values):
        values = self._unpack(values)
        _check_real(self.core, [v.dtype for v in values])
        dtype = _result_dtype([v.dtype for v in values])
        prefix = self._static_batch_prefix(
            [_shape_tuple(v.shape) for v in values])
        return tuple(
            keras.KerasTensor(None if prefix is None else prefix + shape,
                              dtype=dtype)
            for shape in self.core.output_shapes)

    def get_config(self):
        """A JSON-able description of the layer (not enough to rebuild it).

        Warns: Keras asks for it when saving a model (``model.save``,
        ``to_json``), and such a saved model cannot be loaded back.
        """
        warnings.warn(
            "optlayer_tf.Layer's config does not hold its CVXPY problem: a "
            "model saved with it (model.save, to_json) cannot be loaded by "
            "keras.models.load_model. Build the model in code and restore "
            "its weights with save_weights / load_weights.",
            UserWarning, stacklevel=2)
        config = super().get_config()
        compiled = self.core.compiled
        config.update(
            {k: dict(v) if isinstance(v, dict) else v
             for k, v in self._options.items()})
        config["parameters"] = [
            {"name": name, "shape": list(shape)}
            for name, shape in zip(compiled.param_names,
                                   self.core.param_shapes)
        ]
        config["variables"] = [
            {"name": out.name, "shape": list(out.shape)}
            for out in compiled.outputs
        ]
        return config

    @classmethod
    def from_config(cls, config):
        """Not supported: the CVXPY problem is not part of the config."""
        raise NotImplementedError(
            "optlayer_tf.Layer cannot be rebuilt from its config: the CVXPY "
            "problem is not serializable. Construct the layer from the "
            "problem in code (e.g. in a subclass or a model-building "
            "function) and restore weights with `load_weights`."
        )

    # -- forward and backward --------------------------------------------

    def _unpack(self, values):
        # Like the core, accept one list of values as well as positional
        # values, unless the layer has exactly one parameter.
        if (len(values) == 1 and isinstance(values[0], (list, tuple))
                and len(self.core.param_shapes) != 1):
            values = tuple(values[0])
        if len(values) != len(self.core.param_shapes):
            # The core words the error (count and parameter names).
            self.core.batch_size(*values)
        return values

    def _to_tensors(self, values):
        try:
            tensors = [tf.convert_to_tensor(v) for v in values]
        except (TypeError, ValueError):
            tensors = None
        if tensors is not None:
            _check_real(self.core, [t.dtype for t in tensors])
        if tensors is None or not all(_is_numeric(t.dtype) for t in tensors):
            # The core words the error (which parameter, which type).
            self.core.batch_size(*values)
            raise ValueError(
                "optlayer_tf.Layer takes numeric tensors, arrays or numbers, "
                f"got types {[type(v).__name__ for v in values]}."
            )
        return tensors

    def _solve(self, prefix, *values):
        """Outputs for float64 tensors, with the core's adjoint as gradient."""

        @tf.custom_gradient
        def backward(*arrays):
            # The adjoint leaves TensorFlow (NumPy), so an enclosing tape
            # would see no dependence of the gradient on the inputs and
            # silently drop the layer's part of a second derivative (or of
            # a forward-mode derivative); its own gradient refuses instead.
            n = len(self.core.param_shapes)
            grads = self._backward(arrays[:n], arrays[n:n + 3],
                                   arrays[n + 3:])

            def no_second_order(*_):
                raise NotImplementedError(
                    "optlayer_tf.Layer has first-order reverse-mode "
                    "gradients only (one tf.GradientTape); second "
                    "derivatives (nested tapes) and forward mode "
                    "(tf.autodiff.ForwardAccumulator) are not available "
                    "because the backward pass runs in NumPy."
                )

            return grads, no_second_order

        @tf.custom_gradient
        def solve(*values):
            outputs, state = self._forward(values, prefix)

            def grad(*cotangents):
                # Outputs that do not reach the loss may get no cotangent;
                # gathers (tf.gather, embedding lookups) give IndexedSlices.
                cotangents = [
                    tf.zeros_like(o) if c is None
                    else tf.cast(tf.convert_to_tensor(c), _CORE_DTYPE)
                    for o, c in zip(outputs, cotangents)
                ]
                return backward(*values, *state, *cotangents)

            return tuple(outputs), grad

        return solve(*values)

    def _forward(self, values, prefix):
        n_out = len(self.core.output_shapes)
        if tf.executing_eagerly():
            # Direct call: the core's exceptions reach the user unchanged.
            outputs, state = self.core.solve(*[v.numpy() for v in values])
            outputs = [tf.constant(o, _CORE_DTYPE) for o in outputs]
            state = [tf.constant(s, _CORE_DTYPE) for s in state]
        else:
            _warn_if_saving()
            flat = tf.numpy_function(
                self._solve_numpy, list(values),
                [_CORE_DTYPE] * (n_out + 3), name="optlayer_solve")
            outputs, state = list(flat[:n_out]), list(flat[n_out:])
        if prefix is not None:
            for o, shape in zip(outputs, self.core.output_shapes):
                o.set_shape(prefix + shape)
            # The state has a batch row even for unbatched inputs.
            batch = prefix[0] if prefix else 1
            for s, shape in zip(state, self.core.state_shapes(batch)):
                s.set_shape(shape)
        return outputs, state

    def _backward(self, values, state, cotangents):
        if tf.executing_eagerly():
            grads = self.core.adjoint(
                [v.numpy() for v in values], [s.numpy() for s in state],
                [c.numpy() for c in cotangents])
            return [tf.constant(g, _CORE_DTYPE) for g in grads]
        grads = tf.numpy_function(
            self._adjoint_numpy, [*values, *state, *cotangents],
            [_CORE_DTYPE] * len(values), name="optlayer_adjoint")
        for g, v in zip(grads, values):
            g.set_shape(v.shape)
        return list(grads)

    def _solve_numpy(self, *values):
        outputs, state = self.core.solve(*values)
        return [np.asarray(a, dtype=np.float64) for a in (*outputs, *state)]

    def _adjoint_numpy(self, *arrays):
        n = len(self.core.param_shapes)
        values, state, cotangents = arrays[:n], arrays[n:n + 3], arrays[n + 3:]
        grads = self.core.adjoint(values, state, cotangents)
        return [np.asarray(g, dtype=np.float64) for g in grads]

    # -- static shapes ---------------------------------------------------

    def _static_batch_prefix(self, shapes):
        """The outputs' batch prefix: (), (batch,) or (None,).

        ``shapes`` are the inputs' static shapes (tuples with None for
        unknown dimensions). Returns None when an input's rank is unknown.
        The core validates the shapes themselves (unknown dimensions can
        be anything), so shape errors are the core's, name the shapes as
        received, and are raised while tracing.
        """
        if any(s is None for s in shapes):
            return None
        batched, batch, _ = self.core.shape_layout(*shapes)
        if not batched:
            return ()
        return (batch,)


def _rebuild(cls, core, options, keras_kwargs):
    """A layer of class ``cls`` around ``core`` (see Layer.__reduce__)."""
    layer = cls.__new__(cls)
    keras.layers.Layer.__init__(layer, **keras_kwargs)
    layer._setup(core, options)
    return layer


def _shape_tuple(shape):
    """A tuple of ints and None, or None for an unknown rank."""
    shape = tf.TensorShape(shape)
    if shape.rank is None:
        return None
    return tuple(shape.as_list())


def _is_array_like(value):
    return (tf.is_tensor(value) or isinstance(value, keras.KerasTensor)
            or hasattr(value, "__array__")
            or isinstance(value, (list, tuple)))


def _check_real(core, dtypes):
    """Raise a ValueError naming the first complex input, if any."""
    for i, (name, dtype) in enumerate(zip(core.compiled.param_names,
                                          dtypes)):
        if tf.as_dtype(dtype).is_complex:
            raise optlayer.layer.complex_value_error(
                i, name, tf.as_dtype(dtype).name)


def _is_python_float(value):
    return isinstance(value, float) and not isinstance(value, np.floating)


def _python_to_tensor(value, float_dtype):
    """A Python number or (nested) list as a tensor; other values as they
    are. Floats take ``float_dtype``, the floating dtype of the other
    inputs (as a weakly typed number would), so that they are not rounded
    to float32 beside float64 inputs; ints become int32, as
    ``tf.convert_to_tensor`` makes them. Lists that NumPy cannot read as
    numbers are left for the core's error."""
    if _is_python_float(value):
        return tf.constant(value, dtype=float_dtype)
    if isinstance(value, (bool, int, float)):
        return tf.convert_to_tensor(value)
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except (TypeError, ValueError):
            return value
        if array.dtype.kind == "f":
            return tf.constant(array, dtype=float_dtype)
        if array.dtype.kind in "iub":
            return tf.convert_to_tensor(array)
    return value


def _number_dtype(values):
    """The dtype for Python floats among ``values``: the result dtype of
    the other floating inputs, or Keras's floatx if there are none."""
    dtypes = []
    for v in values:
        dtype = getattr(v, "dtype", None)
        if dtype is None or _is_python_float(v):
            continue
        try:
            dtype = tf.as_dtype(dtype)
        except TypeError:
            continue
        if dtype.is_floating:
            dtypes.append(dtype)
    return _result_dtype(dtypes) if dtypes else tf.as_dtype(
        keras.config.floatx())


def _is_numeric(dtype):
    return dtype.is_floating or dtype.is_integer or dtype.is_bool


def _result_dtype(dtypes):
    """The dtype of the outputs: the inputs' result dtype, if floating."""
    names = [keras.backend.standardize_dtype(d) for d in dtypes]
    dtype = keras.backend.result_type(*names)
    if not keras.backend.is_float_dtype(dtype):
        dtype = keras.config.floatx()
    return tf.as_dtype(dtype)
