"""The JAX layer: the NumPy core behind ``jax.custom_vjp`` and callbacks.

The forward pass calls :meth:`optlayer.Layer.solve`, the backward pass
:meth:`optlayer.Layer.adjoint`; this module only moves arrays between JAX
and NumPy and folds ``vmap`` axes into the core's batch axis. Everything
the backward pass needs (the parameter values and the solver's primal-dual
solution) is carried by JAX as residual arrays, so the layer composes with
``jax.jit``, ``jax.grad`` and ``jax.vmap``.
"""

import collections.abc
import functools

import jax
import jax.numpy as jnp
import numpy as np

import optlayer

# Under vmap the callbacks receive the mapped axes as extra leading axes;
# unmapped arguments get axes of size 1 instead of copies ("expand_dims"),
# and the host code broadcasts them. The whole mapped batch then reaches the
# core in one call.
_VMAP_METHOD = "expand_dims"


class Layer:
    """A parametrized convex problem as a differentiable JAX function.

    Calling the layer with one array per parameter (in the order of
    ``parameters``) solves the problem and returns a tuple with one array per
    entry of ``variables``. It is a ``jax.custom_vjp`` function whose forward
    and backward passes reach the NumPy core (:class:`optlayer.Layer`, built
    here, once) through ``jax.pure_callback``, so it works eagerly and under
    ``jax.jit``, ``jax.grad``, ``jax.value_and_grad`` and ``jax.vmap``.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: every ``cvxpy.Parameter`` of the problem, each once, in
            input order.
        variables: the outputs: ``cvxpy.Variable`` objects of the problem or
            dual variables of its constraints
            (``constraint.dual_variables[0]``).
        **options: passed to :class:`optlayer.Layer` (``solver_options``,
            ``n_jobs``, ...).

    Inputs and batching: each value has its parameter's shape (unbatched,
    shared by the batch) or one more leading axis (batched); batched values
    share one batch size, and a batch size of 1 broadcasts. Outputs have the
    leading batch axis iff an input does. Under ``jax.vmap`` (also nested, and
    over an already batched call) the mapped axes and the layer's own batch
    axis are flattened into one batch for a single core call.

    Dtypes: the inputs are promoted to one floating dtype
    (``jnp.result_type``; integers become the default float), the outputs
    have that dtype and each gradient has its input's dtype. The core always
    computes in float64. The solver state that the backward pass needs is
    carried as the raw bits of the core's float64 arrays (``uint32``, shape
    ``core.state_shapes(B) + (2,)``), so it is exact whether or not
    ``jax_enable_x64`` is on: with x64 off, only the rounding of inputs and
    outputs to float32 remains. The layer also works inside a
    ``jax.enable_x64(True)`` context (float64 never crosses a callback as
    float64, see :func:`_to_bits`).

    Errors: the number and shapes of the inputs are checked when the call is
    traced, so a wrong shape raises the core's ``ValueError`` directly, also
    under ``jax.jit``. Errors that depend on values (NaN, a value outside a
    parameter's declared domain, ``optlayer.SolverError`` for an infeasible
    or unbounded problem) are raised with their own type and message when
    the layer runs eagerly (also under eager ``jax.grad``). Inside a traced
    computation (``jax.jit``, ``jax.vmap``) they are raised by the callback
    while XLA runs, and JAX reports them with a message that contains the
    original exception type and message, as ``jax.errors.JaxRuntimeError``
    or, when an already compiled function runs again, as a plain
    ``ValueError`` (JAX's choice; catch both). Under
    ``vmap`` the indices in a ``SolverError`` refer to the flattened batch
    (mapped axes first, row-major, then the layer's own batch axis).

    Copies: ``copy.deepcopy`` and ``pickle`` work (the core is copied, the
    ``custom_vjp`` function is rebuilt around the copy).

    Limits: first-order reverse mode only. ``jax.jvp`` and ``jax.jacfwd``
    raise JAX's ``TypeError`` for ``custom_vjp`` functions; second
    derivatives (``jax.hessian``, grad of grad) raise ``NotImplementedError``
    because the backward pass is a callback without a derivative of its
    own.

    Example:
        >>> import cvxpy as cp
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optlayer_jax
        >>> x = cp.Variable(2)
        >>> a = cp.Parameter(2)
        >>> problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
        >>> layer = optlayer_jax.Layer(problem, [a], [x])
        >>> (sol,) = layer(jnp.array([1.0, -1.0]))
        >>> bool(jnp.allclose(sol, jnp.array([1.0, 0.0]), atol=1e-6))
        True
        >>> loss = lambda a: jnp.sum(layer(a)[0] ** 2)
        >>> grad = jax.jit(jax.grad(loss))(jnp.array([1.0, -1.0]))
        >>> bool(jnp.allclose(grad, jnp.array([2.0, 0.0]), atol=1e-6))
        True
        >>> jax.vmap(layer)(jnp.ones((8, 2)))[0].shape  # one core call
        (8, 2)

    Raises:
        ValueError: at construction, from the core (problem not DPP,
            parameters or variables not matching it); at call time, for a
            wrong number of inputs or wrong shapes, for a dict of values
            (values are positional, in parameter order), and (eagerly) for
            non-finite values or values outside a declared domain.
        TypeError: for complex inputs.
        NotImplementedError: when a second derivative is traced.
        optlayer.SolverError: eagerly, if a solve in the batch fails.
    """

    def __init__(self, problem, parameters, variables, **options):
        self.core = optlayer.Layer(problem, parameters, variables, **options)
        self._function = self._custom_vjp()

    def _custom_vjp(self):
        function = jax.custom_vjp(self._primal)
        function.defvjp(self._forward, self._backward)
        return function

    # -- copying: the core pickles; the custom_vjp function is rebuilt ---

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_function"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._function = self._custom_vjp()

    @property
    def param_shapes(self):
        """The parameters' shapes (unbatched), in input order."""
        return self.core.param_shapes

    @property
    def output_shapes(self):
        """The outputs' shapes (unbatched), in output order."""
        return self.core.output_shapes

    def __call__(self, *values):
        """Solve for the given parameter values; return the outputs.

        Args:
            *values: one array per parameter, unbatched or with a leading
                batch axis (a single list or tuple of them is accepted too).

        Returns:
            A tuple with one array per requested variable.
        """
        if (len(values) == 1 and isinstance(values[0], (list, tuple))
                and len(self.core.parameters) != 1):
            values = tuple(values[0])
        if any(isinstance(v, collections.abc.Mapping) for v in values):
            names = ", ".join(self.core.compiled.param_names)
            raise ValueError(
                "optlayer_jax.Layer takes parameter values positionally, one "
                "array per parameter, in the layer's parameter order: "
                f"layer({names}). Got a dict; pass its values in that order."
            )
        # Traced values are copied: a NumPy array mapped by vmap stays a
        # NumPy array inside its tracer, which jit then rejects as a
        # constant of the custom_vjp call ("non-canonical constant"); the
        # copy makes it a JAX array (and costs nothing once compiled).
        values = tuple(jnp.array(v, copy=True)
                       if isinstance(v, jax.core.Tracer) else jnp.asarray(v)
                       for v in values)
        # Shapes are static, so a bad call fails here, while tracing.
        self._batch_size(values)
        dtype = _float_dtype(values)
        return self._function(*(v.astype(dtype) for v in values))

    # -- custom_vjp rules (inputs already share one floating dtype) ------

    def _primal(self, *values):
        return self._solve(values, with_state=False)

    def _forward(self, *values):
        outputs, state = self._solve(values, with_state=True)
        return outputs, (values, state)

    def _backward(self, residuals, cotangents):
        values, state = residuals
        layout = self._layout(values)
        specs = tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values)
        host = functools.partial(self._host_adjoint, layout)
        return _call_host(host, specs, (*values, *state, *cotangents))

    def _solve(self, values, with_state):
        layout = self._layout(values)
        _, batch, dtype = layout
        lead = () if batch is None else (batch,)
        specs = tuple(jax.ShapeDtypeStruct(lead + shape, dtype)
                      for shape in self.core.output_shapes)
        if with_state:
            # The state stays in its uint32 encoding (see _to_bits).
            state_specs = tuple(
                jax.ShapeDtypeStruct(shape + (2,), np.uint32)
                for shape in self.core.state_shapes(batch or 1))
            specs = (specs, state_specs)
        host = functools.partial(self._host_solve, layout, with_state)
        return _call_host(host, specs, values)

    def _layout(self, values):
        """Static facts of a call: shapes without vmap axes, batch, dtype."""
        shapes = tuple(tuple(v.shape) for v in values)
        return shapes, self._batch_size(values), values[0].dtype

    def _batch_size(self, values):
        """The core's batch size for these shapes; raises its ValueError."""
        batched, batch, _ = self.core.shape_layout(
            *(v.shape for v in values))
        return batch if batched else None

    # -- host side: NumPy in, NumPy out ----------------------------------

    def _host_solve(self, layout, with_state, *values):
        shapes, batch, dtype = layout
        values = [np.asarray(v, dtype=np.float64) for v in values]
        extra = values[0].ndim - len(shapes[0])
        if extra == 0:
            outputs, state = self.core.solve(*values)
        else:
            # vmap: fold the mapped axes and the layer's batch axis into one.
            lead = np.broadcast_shapes(*(v.shape[:extra] for v in values))
            inner = batch or 1
            folded = [_fold(v, extra, lead, inner, shape, pshape)
                      for v, shape, pshape in
                      zip(values, shapes, self.core.param_shapes)]
            outputs, state = self.core.solve(*folded)
            outputs = [_unfold(o, lead, inner, batch is None)
                       for o in outputs]
            state = [s.reshape(lead + (inner, s.shape[-1])) for s in state]
        outputs = tuple(np.asarray(o, dtype=dtype) for o in outputs)
        if not with_state:
            return outputs
        return outputs, tuple(_to_bits(s) for s in state)

    def _host_adjoint(self, layout, *arrays):
        shapes, batch, dtype = layout
        count = len(shapes)
        values = [np.asarray(a, dtype=np.float64) for a in arrays[:count]]
        state = [_from_bits(a) for a in arrays[count:count + 3]]
        cotangents = [np.asarray(a, dtype=np.float64)
                      for a in arrays[count + 3:]]
        extra = values[0].ndim - len(shapes[0])
        if extra == 0:
            grads = self.core.adjoint(values, state, cotangents)
        else:
            grads = self._folded_adjoint(shapes, batch, extra, values, state,
                                         cotangents)
        return tuple(np.asarray(g, dtype=dtype) for g in grads)

    def _folded_adjoint(self, shapes, batch, extra, values, state,
                        cotangents):
        """The adjoint under vmap: one core call for the flattened batch.

        Every value is passed batched to the core, so each element of the
        mapped axes gets its own gradient; the layer's own broadcasting
        (unbatched values, batch size 1) is undone by summing afterwards.
        """
        arrays = values + state + cotangents
        lead = np.broadcast_shapes(*(a.shape[:extra] for a in arrays))
        inner = batch or 1
        core = self.core
        values = [_fold(v, extra, lead, inner, shape, pshape)
                  for v, shape, pshape in
                  zip(values, shapes, core.param_shapes)]
        state = [np.broadcast_to(s, lead + s.shape[extra:])
                 .reshape(-1, s.shape[-1]) for s in state]
        out_lead = () if batch is None else (batch,)
        cotangents = [_fold(c, extra, lead, inner, out_lead + oshape, oshape)
                      for c, oshape in zip(cotangents, core.output_shapes)]
        grads = core.adjoint(values, state, cotangents)
        result = []
        for g, shape, pshape in zip(grads, shapes, core.param_shapes):
            g = g.reshape(lead + (inner,) + pshape)
            if shape == pshape:
                g = g.sum(axis=extra)
            elif shape[0] != inner:
                g = g.sum(axis=extra, keepdims=True)
            result.append(g)
        return result


def _call_host(host, specs, args):
    """``host(*args)`` on NumPy arrays; directly if eager, else a callback.

    Eagerly (also inside eager ``jax.grad``) the arguments are concrete and
    ``host`` runs right here, so the core's exceptions reach the caller
    unchanged. Under tracing the call is staged with ``jax.pure_callback``.

    Args:
        host: takes one NumPy array per entry of ``args``; returns a pytree
            of NumPy arrays matching ``specs``.
        specs: pytree of ``jax.ShapeDtypeStruct``, the results' true types.
        args: sequence of JAX arrays.
    """
    if not any(isinstance(a, jax.core.Tracer) for a in args):
        results = host(*(np.asarray(a) for a in args))
        return jax.tree_util.tree_map(jnp.asarray, results)

    # The callback is only ever run on primal values or cotangents; a
    # tangent reaching it means a second derivative was asked for. Without
    # this rule the uint32 wire format below would hide the dependence and
    # JAX would return zeros instead of failing.
    @jax.custom_jvp
    def staged(*args):
        return _callback(host, specs, args)

    @staged.defjvp
    def no_derivative(primals, tangents):
        raise NotImplementedError(
            "optlayer_jax.Layer has first-order reverse-mode derivatives "
            "only (jax.grad, jax.vjp, jax.jacrev); higher-order derivatives "
            "(jax.hessian, grad of grad) are not available because the "
            "backward pass runs in a host callback."
        )

    return staged(*args)


def _callback(host, specs, args):
    """Stage ``host`` with ``jax.pure_callback``.

    float64 arrays cross the boundary as uint32 pairs (see
    :func:`_to_bits`): callbacks may run on an XLA thread where a
    ``jax.enable_x64`` context is not in force, and JAX would then cast
    float64 arguments to float32 and reject float64 results.
    """
    wide_in = [a.dtype == np.float64 for a in args]
    flat_specs, tree = jax.tree_util.tree_flatten(specs)
    wide_out = [s.dtype == np.float64 for s in flat_specs]
    wire_specs = [jax.ShapeDtypeStruct(s.shape + (2,), np.uint32) if wide
                  else s for s, wide in zip(flat_specs, wide_out)]

    def on_host(*wire):
        arrays = [_from_bits(a) if wide else np.asarray(a)
                  for a, wide in zip(wire, wide_in)]
        results = jax.tree_util.tree_leaves(host(*arrays))
        return [_to_bits(r) if wide else r
                for r, wide in zip(results, wide_out)]

    wire = [jax.lax.bitcast_convert_type(a, np.uint32) if wide else a
            for a, wide in zip(args, wide_in)]
    results = jax.pure_callback(on_host, wire_specs, *wire,
                                vmap_method=_VMAP_METHOD)
    results = [jax.lax.bitcast_convert_type(r, np.float64) if wide else r
               for r, wide in zip(results, wide_out)]
    return jax.tree_util.tree_unflatten(tree, results)


def _float_dtype(values):
    """The floating dtype all inputs are promoted to."""
    dtype = jnp.result_type(*values)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"optlayer_jax.Layer takes real inputs; got dtype {dtype}. Pass "
            "the real and imaginary parts as separate real parameters."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return dtype


def _to_bits(array):
    """float64 (..., k) -> its raw bits as uint32 (..., k, 2).

    The solver state is carried in this form between the forward and the
    backward pass, so it stays exact even when JAX has no float64 (x64 off).
    Every float64 array crossing a callback travels this way too: callbacks
    may run on an XLA thread where a ``jax.enable_x64`` context is not in
    force, and JAX would then cast float64 arguments to float32.
    """
    # order="C" rather than ascontiguousarray, which turns 0-d into 1-d; the
    # trailing axis of 1 lets NumPy reinterpret 0-d arrays too.
    array = np.asarray(array, dtype=np.float64, order="C")
    return array.reshape(array.shape + (1,)).view(np.uint32)


def _from_bits(array):
    """Inverse of :func:`_to_bits`."""
    array = np.asarray(array, dtype=np.uint32, order="C")
    return array.view(np.float64)[..., 0]


def _fold(array, extra, lead, inner, shape, pshape):
    """(lead..., [batch], *pshape) -> (prod(lead) * inner, *pshape).

    ``shape`` is the array's shape without the mapped axes: ``pshape`` for a
    value shared by the layer's batch, else ``(inner or 1, *pshape)``.
    """
    if shape == pshape:
        array = array.reshape(array.shape[:extra] + (1,) + pshape)
    array = np.broadcast_to(array, lead + (inner,) + pshape)
    return array.reshape((-1,) + pshape)


def _unfold(array, lead, inner, drop_batch):
    """Inverse of :func:`_fold` for outputs of the core."""
    pshape = array.shape[1:]
    if drop_batch:
        return array.reshape(lead + pshape)
    return array.reshape(lead + (inner,) + pshape)
