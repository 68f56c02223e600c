"""The PyTorch layer: ``torch.nn.Module`` over a ``torch.autograd.Function``.

All mathematics lives in the NumPy core (:class:`optlayer.Layer`). This
module only moves tensors to float64 NumPy arrays on the CPU, calls the core,
and moves the results back to the inputs' dtype and device.
"""

import numpy as np
import torch

import optlayer


def _compile_disabled(function):
    """``function`` hidden from torch.compile (as it is where torch has no
    torch.compiler.disable)."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return function if disable is None else disable(function)


class Layer(torch.nn.Module):
    """A parametrized convex problem as a differentiable PyTorch module.

    The forward pass solves ``problem`` for the given parameter values; the
    backward pass returns the gradient of a loss on the solution with respect
    to every input that requires one (implicit differentiation of the cone
    program, done by the NumPy core).

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: every ``cvxpy.Parameter`` of the problem, each once; the
            layer takes their values in this order.
        variables: the outputs: ``cvxpy.Variable`` objects of the problem or
            dual variables of its constraints
            (``constraint.dual_variables[0]``).
        **options: keyword options of :class:`optlayer.Layer`
            (``solver_options``, ``n_jobs``, ``warm_start``).

    Calling the module with one value per parameter returns a tuple with one
    tensor per requested variable. A value has the parameter's shape
    (unbatched, shared by the whole batch) or one more leading dimension
    (batched); the gradient of an unbatched value is summed over the batch.
    Values may be tensors, NumPy arrays or Python numbers.

    Outputs take the dtype of the tensor inputs (``torch.promote_types``
    over them, or the default dtype if that is not a floating type). With no
    tensor input, floating NumPy arrays keep their dtype and other values
    count as the default dtype. Outputs go to the device of the first tensor
    input not on the CPU (else the CPU). The solve itself always runs in
    float64 on the CPU (bfloat16 inputs work like float16 ones). Each
    gradient has its input's dtype and device. Complex values raise a
    ``ValueError`` naming the parameter.

    Limits: the solve runs in NumPy, so double backward
    (``create_graph=True``: gradient penalties, Hessians) raises a
    ``RuntimeError``, and ``torch.func`` transforms (``torch.func.grad``,
    ``vmap``, ``jacrev``, ...) raise ``NotImplementedError``. Use ordinary
    autograd (``loss.backward()``, ``torch.autograd.grad``) and the layer's
    own batch dimension instead.

    Example:
        >>> import cvxpy as cp, torch, optlayer_torch
        >>> x = cp.Variable(2)
        >>> a = cp.Parameter(2)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
        >>> layer = optlayer_torch.Layer(prob, [a], [x])
        >>> a_t = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> (sol,) = layer(a_t)                       # ~ [1, 0]
        >>> sol.sum().backward()                      # a_t.grad ~ [1, 0]

    Raises:
        ValueError: at construction, if the problem is not DPP or the
            parameters or variables do not match the problem; at call time,
            for values of the wrong shape, non-finite values, or values
            outside a parameter's declared domain (the core's messages),
            and for complex values.
        NotImplementedError: for inputs wrapped by a ``torch.func``
            transform.
        optlayer.SolverError: if any solve in the batch fails.
    """

    def __init__(self, problem, parameters, variables, **options):
        super().__init__()
        # Kept as a plain attribute (not a submodule, no tensors): it is
        # compiled from the problem, so state_dict has nothing to store.
        self.core = optlayer.Layer(problem, parameters, variables, **options)

    @property
    def param_shapes(self):
        """The parameters' shapes (unbatched), in input order."""
        return self.core.param_shapes

    @property
    def output_shapes(self):
        """The outputs' shapes (unbatched), in output order."""
        return self.core.output_shapes

    # torch.compile calls the layer as it is (a graph break) instead of
    # tracing the NumPy solve and adjoint inside.
    @_compile_disabled
    def forward(self, *values):
        """Solve for the given parameter values.

        Args:
            *values: one tensor (or array, or number) per parameter, shaped
                like the parameter or with one more leading batch dimension.

        Returns:
            A tuple with one tensor per requested variable, shaped like the
            variable, with a leading batch dimension if any input has one.
        """
        values = _unpack(values, len(self.core.parameters))
        names = self.core.compiled.param_names
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "optlayer_torch.Layer cannot be traced (torch.jit.trace, "
                "torch.onnx.export): the solve runs in NumPy, so a trace "
                "would record its outputs as constants. Call the module "
                "directly (torch.compile, which treats it as an opaque "
                "call, works too).")
        if any(_is_dual(v) for v in values):
            raise NotImplementedError(
                "optlayer_torch.Layer has no forward-mode derivative "
                "(torch.autograd.forward_ad): the solve runs in NumPy and "
                "its tangent would be lost. Use reverse mode "
                "(loss.backward(), torch.autograd.grad).")
        for i, v in enumerate(values):
            if v is None or (isinstance(v, (list, tuple)) and any(
                    isinstance(e, torch.Tensor) for e in v)):
                if v is not None:
                    raise ValueError(
                        f"Parameter {i} '{names[i]}': a list of tensors; "
                        "pass one tensor (torch.stack the list), so that "
                        "gradients can reach its entries.")
                # The core's message for None.
                self.core.batch_size(*values)
        if any(_is_transformed(v) for v in values):
            raise NotImplementedError(
                "optlayer_torch.Layer does not support torch.func transforms "
                "(torch.func.grad, vmap, jacrev, jvp, ...): the solve and its "
                "adjoint run in NumPy, outside torch. Use ordinary autograd "
                "(loss.backward() or torch.autograd.grad) for gradients and "
                "the layer's leading batch dimension instead of vmap."
            )
        for i, (name, v) in enumerate(zip(names, values)):
            if _is_complex(v):
                dtype = getattr(v, "dtype", None)
                raise optlayer.layer.complex_value_error(
                    i, name, None if dtype is None else str(dtype))
        try:
            tensors = tuple(_as_tensor(v) for v in values)
        except (TypeError, ValueError):
            # Let the core report it: its message names the parameter.
            self.core.batch_size(*(_to_float64(v)
                                   if isinstance(v, torch.Tensor) else v
                                   for v in values))
            raise
        dtype, device = _output_spec(values)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _SolveFunction.apply(self.core, dtype, device, *tensors)

        # Nothing to differentiate: solve without recording any state.
        arrays = [_to_float64(t) for t in tensors]
        outputs = self.core(*arrays)
        return tuple(_from_float64(o, dtype, device) for o in outputs)

    def extra_repr(self):
        shapes = ", ".join(str(s) for s in self.core.param_shapes)
        outs = ", ".join(str(s) for s in self.core.output_shapes)
        return f"parameters=[{shapes}], outputs=[{outs}]"


class _SolveFunction(torch.autograd.Function):
    """Forward: the core's batched solve. Backward: the core's adjoint."""

    @staticmethod
    def forward(ctx, core, dtype, device, *tensors):
        arrays = [_to_float64(t) for t in tensors]
        outputs, state = core.solve(*arrays)

        # The backward pass needs the values the solution was computed at
        # and the primal-dual solution; both are private float64 copies.
        ctx.core = core
        ctx.arrays = arrays
        ctx.state = state
        ctx.input_specs = [(t.dtype, t.device) for t in tensors]
        # Outputs nobody uses arrive as None: the core treats them as zero.
        ctx.set_materialize_grads(False)
        return tuple(_from_float64(o, dtype, device) for o in outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            # create_graph=True: the gradient would be returned as a
            # constant (the adjoint runs in NumPy), so that a gradient
            # penalty, a Hessian or any derivative of it came out silently
            # wrong or zero.
            raise RuntimeError(
                "optlayer_torch.Layer is differentiable once: its backward "
                "pass runs in NumPy and has no derivative of its own, so "
                "create_graph=True (gradient penalties, Hessians, "
                "double backward) is not supported through it.")
        # The first three inputs of forward (core, dtype, device) have no
        # gradient.
        needs = list(ctx.needs_input_grad[3:])
        nones = (None, None, None)
        if not any(needs):
            return nones + (None,) * len(needs)
        try:
            cotangents = [None if g is None else _to_float64(g)
                          for g in grad_outputs]
        except RuntimeError as error:
            # Batched cotangents look like plain tensors here, but cannot
            # leave torch: torch's vmap rejects the conversion.
            if "atching rule" not in str(error):
                raise
            raise NotImplementedError(
                "optlayer_torch.Layer cannot take batched cotangents "
                "(torch.autograd.grad with is_grads_batched=True, "
                "torch.autograd.functional.jacobian with vectorize=True): "
                "its backward pass runs in NumPy. Call backward once per "
                "cotangent (vectorize=False) instead.") from error
        grads = ctx.core.adjoint(ctx.arrays, ctx.state, cotangents,
                                 needs_grad=needs)
        result = []
        for g, (dtype, device) in zip(grads, ctx.input_specs):
            result.append(None if g is None
                          else _from_float64(g, dtype, device))
        return nones + tuple(result)


# Floating NumPy dtypes torch can hold; wider ones (longdouble) map to
# float64, the precision of the solve.
_NUMPY_FLOATS = {np.dtype(np.float16): torch.float16,
                 np.dtype(np.float32): torch.float32,
                 np.dtype(np.float64): torch.float64}


# Tensor dtypes that .numpy() converts; others go through float64 in torch.
_NUMPY_DTYPES = frozenset((
    torch.float16, torch.float32, torch.float64, torch.bool, torch.uint8,
    torch.int8, torch.int16, torch.int32, torch.int64))

try:
    _is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # not in this torch version: nothing to detect
    def _is_functorch_wrapped(tensor):
        return False


try:
    from torch.autograd import forward_ad as _forward_ad
except ImportError:  # pragma: no cover - part of every supported torch
    _forward_ad = None


def _is_dual(value):
    """Whether ``value`` carries a forward-mode tangent."""
    if (_forward_ad is None or not isinstance(value, torch.Tensor)
            or getattr(_forward_ad, "_current_level", 0) < 0):
        return False
    return _forward_ad.unpack_dual(value).tangent is not None


def _unpack(values, num_params):
    """Accept one list or tuple of values, as the core does."""
    if len(values) == 1 and isinstance(values[0], (list, tuple)) and \
            num_params != 1:
        return tuple(values[0])
    return tuple(values)


def _as_tensor(value):
    """``value`` itself if a tensor, else a float64 CPU tensor (no grad)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.array(value, dtype=np.float64))


def _output_spec(values):
    """The dtype and device of the outputs for these input values."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        dtypes = [t.dtype for t in tensors]
    else:
        # No tensor at all: NumPy inputs keep their precision (float64
        # arrays give float64 outputs); Python numbers and lists get the
        # default dtype, as torch.as_tensor would give them.
        dtypes = [_NUMPY_FLOATS.get(v.dtype, torch.float64)
                  if isinstance(v, (np.ndarray, np.generic))
                  and v.dtype.kind == "f" else torch.get_default_dtype()
                  for v in values]
    dtype = None
    for d in dtypes:
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    device = next((t.device for t in tensors if t.device.type != "cpu"),
                  torch.device("cpu"))
    return dtype, device


def _to_float64(tensor):
    """A private float64 NumPy copy of ``tensor`` (on the CPU, detached).

    Always a copy: a view would change if the caller later modified the
    tensor in place, and the backward pass must see the forward's values.
    Dtypes NumPy has no equivalent for (bfloat16, float8) are widened by
    torch first.
    """
    if tensor.dtype not in _NUMPY_DTYPES:
        tensor = tensor.detach().to(dtype=torch.float64)
    return np.array(tensor.numpy(force=True), dtype=np.float64, copy=True)


def _is_complex(value):
    """Whether ``value`` holds complex numbers (which would be truncated)."""
    if isinstance(value, torch.Tensor):
        return value.is_complex()
    try:
        return bool(np.iscomplexobj(value))
    except Exception:
        # Not array-like: the conversion reports it, naming the parameter.
        return False


def _is_transformed(value):
    """Whether ``value`` is wrapped by a torch.func transform (grad, vmap)."""
    return isinstance(value, torch.Tensor) and _is_functorch_wrapped(value)


def _from_float64(array, dtype, device):
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d).
    return torch.from_numpy(np.asarray(array, order="C")).to(
        device=device, dtype=dtype)
