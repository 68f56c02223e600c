"""Tests of the NumPy core (optlayer.Layer) on every case of the problem zoo.

Every case is checked at batch sizes None (unbatched), 1 and 5 (mixed
batched and shared parameters, as the case's ``batch_mask`` says) against:

* CVXPY's own solve of the same instance (Clarabel at tight tolerances);
* central finite differences of the layer's forward map (the gradient);
* closed forms where the zoo has them (ReLU, projections, softmax, ...).

Tolerances, and why:

* Forward: ``FORWARD_RTOL = 1e-6`` relative to ``max(1, max |ref|)`` per
  output. Both solvers run at 1e-10; the slack covers Clarabel's
  interior-point accuracy on exponential and power cones.
* Gradients: ``FD_RTOL = 1e-4`` relative to ``max(1, |analytic|)`` with
  steps ``FD_STEP = 1e-5`` times ``max(1, |theta|)``. The forward map is
  computed to about 1e-10, so a central difference carries a noise of about
  1e-10 / h = 1e-5, and its truncation error is O(h^2) = 1e-10; a step of
  1e-6 would put the noise (1e-4) at the tolerance. Any sign or
  transposition slip in the adjoint is O(1) and fails by far.
* Closed forms: ``CLOSED_FORM_TOL = 1e-6``, relative to ``max(1, |ref|)``.
"""

import functools
import os
import subprocess
import sys
import textwrap
import warnings
import zlib

import cvxpy as cp
import numpy as np
import pytest

import optlayer
from tests.zoo import (
    CASES,
    get_case,
    make_inputs,
    relu_closed_form,
    relu_closed_form_grad,
)

BATCH_SIZES = [None, 1, 5]
FORWARD_RTOL = 1e-6
FD_STEP = 1e-5
FD_RTOL = 1e-4
CLOSED_FORM_TOL = 1e-6
# Central differences per parameter entry are capped at this many probes
# per test (a random subset beyond it); batched parameters of a batch of
# more than one are probed along random directions instead.
MAX_ENTRY_PROBES = 30
RANDOM_DIRECTIONS = 4

# Tighter than 1e-10: on smooth objectives (entropy, logistic) a duality
# gap g only pins the solution to about sqrt(g), and a gap of 1e-10 left
# Clarabel's solution 1e-6 off the closed form.
CLARABEL_OPTIONS = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    # The default 1e-6 stops exponential and power cone solves early.
    "tol_ktratio": 1e-10,
    "max_iter": 500,
}
SCS_OPTIONS = {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 200_000}

@pytest.fixture(params=["full", "reduced"])
def linear_system(request, monkeypatch):
    """Newton steps and adjoints by the full Jacobian (forced for every
    stack size) or by the reduced systems (never the full Jacobian)."""
    import optlayer.reduced

    if request.param == "full":
        monkeypatch.setattr(optlayer.reduced, "FULL_SIZE", 10**9)
        monkeypatch.setattr(optlayer.reduced, "FULL_WORK", np.inf)
    else:
        monkeypatch.setattr(optlayer.reduced, "FULL_SIZE", 0)
    return request.param


def _case_params(cases=CASES):
    params = []
    for case in cases:
        params.append(pytest.param(case, id=case.name))
    return params


def _rng(*key):
    """A generator seeded by the test's identity, stable across runs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


@functools.cache
def _layer(name):
    """One compiled layer per case, shared by the tests (compiling is the
    slow part; calls are stateless without warm starts)."""
    case = get_case(name)
    problem, params, variables = case.build()
    return optlayer.Layer(problem, params, variables, **case.layer_kwargs)


def _is_symmetric_param(param):
    return any(param.attributes.get(a) for a in ("symmetric", "PSD", "NSD"))


def _elements(layer, values):
    """Split values into per-element unbatched values.

    Returns:
        ``(batch, elements)``: the batch size (None if unbatched) and one
        list of values per batch element.
    """
    batch = layer.batch_size(*values)
    if batch is None:
        return None, [list(values)]
    elements = []
    for k in range(batch):
        element = []
        for v, shape in zip(values, layer.param_shapes):
            if v.shape == tuple(shape):
                element.append(v)
            else:
                element.append(v[k if v.shape[0] > 1 else 0])
        elements.append(element)
    return batch, elements


def _stack(batch, per_element):
    """Per-element tuples of arrays -> one tuple, batched if ``batch``."""
    if batch is None:
        return tuple(per_element[0])
    return tuple(np.stack(arrays) for arrays in zip(*per_element))


def _aggregate_grads(layer, values, per_element):
    """Per-element gradients -> gradients shaped like the values: stacked
    for batched values, summed over the batch for shared ones."""
    grads = []
    for i, (v, shape) in enumerate(zip(values, layer.param_shapes)):
        parts = np.stack([np.asarray(g[i], dtype=float) for g in per_element])
        if v.shape == tuple(shape):
            grads.append(parts.sum(axis=0))
        elif v.shape[0] == 1:
            grads.append(parts.sum(axis=0, keepdims=True))
        else:
            grads.append(parts)
    return grads


def _assert_close(got, want, rtol, what):
    got = np.asarray(got, dtype=float)
    want = np.asarray(want, dtype=float)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0))
    assert err <= rtol * scale, (
        f"{what}: max abs error {err:.3g} > {rtol:g} * {scale:.3g}"
    )


def reference_solve(case, element):
    """CVXPY's own solution of one unbatched instance of ``case``.

    Clarabel at tight tolerances; SCS at eps 1e-10 when Clarabel does not
    take the problem or does not reach an optimal status.
    """
    problem, params, variables = case.build()
    for param, value in zip(params, element):
        param.value = value
    try:
        with warnings.catch_warnings():
            # An inaccurate Clarabel solve is redone with SCS below.
            warnings.filterwarnings("ignore", "Solution may be inaccurate")
            problem.solve(cp.CLARABEL, **CLARABEL_OPTIONS)
    except cp.error.SolverError:
        pass
    if problem.status != cp.OPTIMAL:
        problem.solve(cp.SCS, **SCS_OPTIONS)
    assert problem.status == cp.OPTIMAL, f"reference solve: {problem.status}"
    return tuple(np.asarray(v.value, dtype=float) for v in variables)


def _random_cotangents(layer, batch, rng):
    lead = () if batch is None else (batch,)
    return [rng.normal(size=lead + tuple(s)) for s in layer.output_shapes]


def _probe_directions(layer, values, rng):
    """Perturbation directions for finite differences.

    Unit directions for every entry of shared parameters and of batches of
    one (a random subset of ``MAX_ENTRY_PROBES`` if there are more), plus
    ``RANDOM_DIRECTIONS`` random directions over all parameters at once when
    some parameter has a batch of more than one. Directions of symmetric
    parameters are symmetrized, so perturbed values keep their domain.
    """
    def symmetrize(i, d):
        if _is_symmetric_param(layer.parameters[i]):
            return (d + np.swapaxes(d, -1, -2)) / 2
        return d

    entries = []
    big_batch = False
    for i, (v, shape) in enumerate(zip(values, layer.param_shapes)):
        if v.shape != tuple(shape) and v.shape[0] > 1:
            big_batch = True
            continue
        entries.extend((i, k) for k in range(v.size))
    if len(entries) > MAX_ENTRY_PROBES:
        keep = rng.choice(len(entries), MAX_ENTRY_PROBES, replace=False)
        entries = [entries[j] for j in sorted(keep)]
    directions = []
    for i, k in entries:
        d = [np.zeros_like(v) for v in values]
        d[i].flat[k] = 1.0
        d[i] = symmetrize(i, d[i])
        directions.append(d)
    if big_batch:
        for _ in range(RANDOM_DIRECTIONS):
            directions.append([symmetrize(i, rng.normal(size=v.shape))
                               for i, v in enumerate(values)])
    return directions


def _finite_difference(layer, values, direction, cotangents):
    """Central difference of ``<cotangents, f(values)>`` along direction."""
    moved = [np.abs(v[d != 0]) for v, d in zip(values, direction)]
    scale = max([1.0] + [float(m.max()) for m in moved if m.size])
    h = FD_STEP * scale
    plus = layer(*[v + h * d for v, d in zip(values, direction)])
    minus = layer(*[v - h * d for v, d in zip(values, direction)])
    return sum(float(np.sum((p - m) * w))
               for p, m, w in zip(plus, minus, cotangents)) / (2 * h)


def assert_vjp_matches_finite_differences(layer, values, rng):
    """Check ``layer.vjp`` against central differences; see module doc."""
    batch = layer.batch_size(*values)
    cotangents = _random_cotangents(layer, batch, rng)
    grads = layer.vjp(values, cotangents)
    assert len(grads) == len(values)
    for g, v in zip(grads, values):
        assert np.shape(g) == v.shape
    failures = []
    for direction in _probe_directions(layer, values, rng):
        fd = _finite_difference(layer, values, direction, cotangents)
        analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, direction))
        if abs(fd - analytic) > FD_RTOL * max(1.0, abs(analytic)):
            where = [(i, np.flatnonzero(d).tolist()[:4])
                     for i, d in enumerate(direction) if np.any(d)]
            failures.append(f"direction {where}: analytic {analytic:.9g}, "
                            f"finite difference {fd:.9g}")
    assert not failures, "\n".join(failures)


# -- forward ---------------------------------------------------------------


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("case", _case_params())
def test_forward_matches_cvxpy(case, batch_size):
    layer = _layer(case.name)
    values = make_inputs(case, _rng("forward", case.name, batch_size),
                         batch_size)
    outputs = layer(*values)

    lead = () if batch_size is None else (batch_size,)
    assert len(outputs) == len(layer.output_shapes)
    for out, shape in zip(outputs, layer.output_shapes):
        assert out.shape == lead + tuple(shape)
        assert out.dtype == np.float64

    batch, elements = _elements(layer, values)
    assert batch == batch_size
    reference = _stack(batch, [reference_solve(case, e) for e in elements])
    for k, (got, want) in enumerate(zip(outputs, reference)):
        _assert_close(got, want, FORWARD_RTOL, f"output {k}")


@pytest.mark.parametrize("case", _case_params())
def test_forward_through_scs_matches_cvxpy(case):
    # Cold calls try Newton steps from the origin first; where they solve
    # an element, SCS never runs. This keeps the other path, SCS then
    # refinement, checked on every case as well.
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, **case.layer_kwargs)
    layer._cold_newton = False
    values = make_inputs(case, _rng("forward_scs", case.name), 3)
    outputs = layer(*values)
    batch, elements = _elements(layer, values)
    reference = _stack(batch, [reference_solve(case, e) for e in elements])
    for k, (got, want) in enumerate(zip(outputs, reference)):
        _assert_close(got, want, FORWARD_RTOL, f"output {k}")


@pytest.mark.parametrize("case", _case_params())
def test_forward_from_the_origin_matches_cvxpy(case, monkeypatch):
    # The zoo's batches are too small for Newton steps from the origin to
    # be tried; here they always are. Whatever they solve must be CVXPY's
    # answer (they accept only KKT residuals below 1e-11), the rest goes
    # to SCS, and the gradients equal those at SCS's refined points.
    import optlayer.layer

    monkeypatch.setattr(optlayer.layer, "_COLD_MIN_WORK", 0)
    monkeypatch.setattr(optlayer.layer, "_COLD_MIN_BATCH", 0)
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, **case.layer_kwargs)
    rng = _rng("forward_origin", case.name)
    values = make_inputs(case, rng, 3)
    outputs, state = layer.solve(*values)
    batch, elements = _elements(layer, values)
    reference = _stack(batch, [reference_solve(case, e) for e in elements])
    for k, (got, want) in enumerate(zip(outputs, reference)):
        _assert_close(got, want, FORWARD_RTOL, f"output {k}")
    scs = optlayer.Layer(*case.build(), **case.layer_kwargs)
    scs._cold_newton = False
    _, scs_state = scs.solve(*values)
    cotangents = _random_cotangents(layer, 3, rng)
    got = layer.adjoint(values, state, cotangents)
    want = scs.adjoint(values, scs_state, cotangents)
    # Two refined solutions of the same programs (residuals below 1e-11),
    # as in the warm/cold comparison above.
    for k, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, 1e-7, f"gradient {k}")


def _count_scs_calls(monkeypatch):
    import optlayer.solve

    calls = []
    one, workspace = optlayer.solve.solve_one, optlayer.solve.Workspace.solve

    def counting_one(*args, **kwargs):
        calls.append(1)
        return one(*args, **kwargs)

    def counting_workspace(*args, **kwargs):
        calls.append(1)
        return workspace(*args, **kwargs)

    monkeypatch.setattr(optlayer.solve, "solve_one", counting_one)
    monkeypatch.setattr(optlayer.solve.Workspace, "solve", counting_workspace)
    return calls


@pytest.mark.parametrize("quadratic", [False, True])
def test_cold_newton_solves_least_squares_without_scs(quadratic,
                                                      monkeypatch):
    # Nonnegative least squares: Newton steps from the origin converge (the
    # first overshoots, the next recover), so no element of a batch of 32
    # needs SCS, and the answers are CVXPY's. In cone form a single
    # element of this small program is solved by SCS (there, 10 to 20
    # stacked steps cost more than SCS and a few polishing steps); kept
    # quadratic, where the steps take a few iterations, it is not.
    rng = _rng("cold_newton_nnls")
    x = cp.Variable(8)
    A = cp.Parameter((12, 8))
    b = cp.Parameter(12)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
    layer = optlayer.Layer(problem, [A, b], [x], warm_start=False,
                           quadratic_objective=quadratic)
    # This program is small enough that the cost rule would leave 32
    # elements to SCS; the batch-size rule still applies in cone form.
    monkeypatch.setattr(optlayer.layer, "_COLD_MIN_WORK", 0)
    As, bs = rng.normal(size=(32, 12, 8)), rng.normal(size=(32, 12))
    calls = _count_scs_calls(monkeypatch)
    (single,) = layer(As[:1], bs[:1])
    if quadratic:
        assert calls == [] and layer._cold_newton is True
    else:
        assert len(calls) == 1 and layer._cold_newton is None
    scs_calls = len(calls)
    (got,) = layer(As, bs)
    assert len(calls) == scs_calls
    assert layer._cold_newton is True
    monkeypatch.undo()
    _assert_close(single[0], got[0], 1e-9, "batch of one")
    for k in range(32):
        A.value, b.value = As[k], bs[k]
        problem.solve(solver=cp.CLARABEL, **CLARABEL_OPTIONS)
        _assert_close(got[k], x.value, FORWARD_RTOL, f"element {k}")


def test_cold_newton_is_dropped_where_it_fails(monkeypatch):
    # LPs: from the origin Newton steps do not find the active set. The
    # first call solves every element with SCS after a few steps and
    # remembers; later calls go to SCS directly. Answers are CVXPY's.
    import optlayer.refine

    rng = _rng("cold_newton_lp")
    x = cp.Variable(20)
    A = cp.Parameter((40, 20))
    b = cp.Parameter(40)
    c = cp.Parameter(20)
    problem = cp.Problem(cp.Minimize(c @ x), [A @ x <= b, cp.abs(x) <= 1])
    layer = optlayer.Layer(problem, [A, b, c], [x], warm_start=False)

    def sample():
        As = rng.normal(size=(16, 40, 20))
        bs = np.einsum("bmn,bn->bm", As, rng.uniform(-0.5, 0.5, (16, 20)))
        return (As, bs + rng.uniform(0.1, 1.0, (16, 40)),
                rng.normal(size=(16, 20)))

    first, second = sample(), sample()
    calls = _count_scs_calls(monkeypatch)
    layer(*first)
    assert len(calls) >= 16
    assert layer._cold_newton is False
    starts = []
    original = optlayer.refine.refine

    def spy(*args, **kwargs):
        starts.append(kwargs.get("give_up"))
        return original(*args, **kwargs)

    monkeypatch.setattr(optlayer.refine, "refine", spy)
    (got,) = layer(*second)
    assert starts and all(s is None for s in starts)   # SCS, then polish
    # One SCS solve per element, plus the second pass of any element
    # that SCS's point left short of the active set.
    assert len(calls) >= 32
    monkeypatch.undo()
    for k in range(16):
        A.value, b.value, c.value = (v[k] for v in second)
        problem.solve(solver=cp.SCS, eps_abs=1e-12, eps_rel=1e-12,
                      max_iters=200_000)
        # Clarabel stops near 1e-7 on LPs; SCS at 1e-12 is the reference.
        _assert_close(got[k], x.value, FORWARD_RTOL, f"element {k}")


# -- gradients -------------------------------------------------------------


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("case", _case_params())
def test_vjp_matches_finite_differences(case, batch_size):
    layer = _layer(case.name)
    rng = _rng("fd", case.name, batch_size)
    values = make_inputs(case, rng, batch_size)
    assert_vjp_matches_finite_differences(layer, values, rng)


CLOSED_FORM_CASES = [c for c in CASES if c.closed_form is not None]


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("case", _case_params(CLOSED_FORM_CASES))
def test_closed_form(case, batch_size):
    layer = _layer(case.name)
    rng = _rng("closed", case.name, batch_size)
    values = make_inputs(case, rng, batch_size)
    batch, elements = _elements(layer, values)

    outputs = layer(*values)
    expected = _stack(batch, [case.closed_form(e) for e in elements])
    for k, (got, want) in enumerate(zip(outputs, expected)):
        _assert_close(got, want, CLOSED_FORM_TOL, f"output {k}")

    if case.closed_form_grad is None:
        return
    cotangents = _random_cotangents(layer, batch, rng)
    grads = layer.vjp(values, cotangents)
    per_element = []
    for k, element in enumerate(elements):
        cot = cotangents if batch is None else [w[k] for w in cotangents]
        per_element.append(case.closed_form_grad(element, cot))
    expected = _aggregate_grads(layer, values, per_element)
    for i, (got, want) in enumerate(zip(grads, expected)):
        _assert_close(got, want, CLOSED_FORM_TOL, f"gradient {i}")


def _relu_values(rng, batched):
    """(W, b, x) with |Wx + b| > 1e-3 in every element; ``batched`` is a
    triple of booleans, one per parameter, with a batch of 4."""
    shapes = [(3, 4), (3,), (4,)]
    batch = 4 if any(batched) else None
    for _ in range(1000):
        values = [rng.normal(size=((batch,) if f else ()) + s)
                  for f, s in zip(batched, shapes)]
        W, b, x = values
        pre = (np.einsum("...ij,...j->...i", W, x) + b)
        if np.all(np.abs(pre) > 1e-3):
            return values
    raise RuntimeError("no ReLU sample away from the kink")


@pytest.mark.parametrize("batched", [
    (False, False, False),
    (False, False, True),
    (True, True, True),
    (True, False, True),
], ids=["unbatched", "x_batched", "all_batched", "W_x_batched"])
def test_relu_closed_form(batched):
    layer = _layer("relu")
    rng = _rng("relu", batched)
    values = _relu_values(rng, batched)
    batch, elements = _elements(layer, values)

    (z,) = layer(*values)
    expected = _stack(batch, [relu_closed_form(e) for e in elements])[0]
    _assert_close(z, expected, CLOSED_FORM_TOL, "z")

    cotangents = _random_cotangents(layer, batch, rng)
    grads = layer.vjp(values, cotangents)
    per_element = [
        relu_closed_form_grad(e, cotangents if batch is None
                              else [cotangents[0][k]])
        for k, e in enumerate(elements)
    ]
    expected = _aggregate_grads(layer, values, per_element)
    for name, got, want in zip("Wbx", grads, expected):
        _assert_close(got, want, CLOSED_FORM_TOL, f"gradient of {name}")


# -- batch semantics -------------------------------------------------------


def test_unbatched_and_batch_of_one_dimensions():
    layer = _layer("relu")
    case = get_case("relu")
    rng = _rng("dims")
    values = make_inputs(case, rng, None)
    (z,) = layer(*values)
    assert z.shape == (3,)

    # A batch of one keeps its leading dimension, whichever input has it.
    for i in range(3):
        one = [v[None] if j == i else v for j, v in enumerate(values)]
        (z1,) = layer(*one)
        assert z1.shape == (1, 3)
        np.testing.assert_allclose(z1[0], z, rtol=0, atol=1e-9)
        grads = layer.vjp(one, [np.ones((1, 3))])
        for j, (g, v) in enumerate(zip(grads, one)):
            assert g.shape == v.shape, (i, j)
    assert layer.batch_size(*values) is None
    assert layer.batch_size(values[0], values[1], values[2][None]) == 1


@pytest.mark.parametrize("case", _case_params())
def test_batch_equals_elementwise(case):
    layer = _layer(case.name)
    rng = _rng("elementwise", case.name)
    values = make_inputs(case, rng, 5)
    batch, elements = _elements(layer, values)
    outputs = layer(*values)
    cotangents = _random_cotangents(layer, batch, rng)
    grads = layer.vjp(values, cotangents)

    singles = [layer(*e) for e in elements]
    for k, got in enumerate(outputs):
        for b, single in enumerate(singles):
            _assert_close(got[b], single[k], 1e-8, f"output {k}, element {b}")

    per_element = [layer.vjp(e, [w[b] for w in cotangents])
                   for b, e in enumerate(elements)]
    expected = _aggregate_grads(layer, values, per_element)
    for i, (got, want) in enumerate(zip(grads, expected)):
        _assert_close(got, want, 1e-7, f"gradient {i}")


MULTI_PARAM_CASES = [c for c in CASES if len(c.batch_mask) >= 2]


@pytest.mark.parametrize("case", _case_params(MULTI_PARAM_CASES))
def test_batch_of_one_broadcasts(case):
    layer = _layer(case.name)
    rng = _rng("broadcast", case.name)
    values = make_inputs(case, rng, 4)
    shared = [i for i, f in enumerate(case.batch_mask) if not f]
    # The same values, with the shared parameters given a batch of one.
    ones = [v[None] if i in shared else v for i, v in enumerate(values)]
    assert layer.batch_size(*ones) == 4

    outputs = layer(*values)
    outputs_ones = layer(*ones)
    for k, (a, b) in enumerate(zip(outputs, outputs_ones)):
        assert b.shape == a.shape
        _assert_close(b, a, 1e-8, f"output {k}")

    cotangents = _random_cotangents(layer, 4, rng)
    grads = layer.vjp(values, cotangents)
    grads_ones = layer.vjp(ones, cotangents)
    for i, (g, g1) in enumerate(zip(grads, grads_ones)):
        if i in shared:
            # Summed over the batch, keeping the leading 1.
            assert g1.shape == (1,) + g.shape
            _assert_close(g1[0], g, 1e-7, f"gradient {i}")
        else:
            _assert_close(g1, g, 1e-7, f"gradient {i}")


# -- state round trip ------------------------------------------------------


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("case", _case_params())
def test_solve_adjoint_round_trip(case, batch_size):
    layer = _layer(case.name)
    rng = _rng("state", case.name, batch_size)
    values = make_inputs(case, rng, batch_size)
    outputs, state = layer.solve(*values)
    assert len(state) == 3
    shapes = layer.state_shapes(batch_size or 1)
    assert tuple(a.shape for a in state) == shapes
    for a, b in zip(outputs, layer(*values)):
        _assert_close(a, b, 1e-9, "outputs of solve and call")

    cotangents = _random_cotangents(layer, batch_size, rng)
    grads = layer.adjoint(values, state, cotangents)
    reference = layer.vjp(values, cotangents)
    for i, (g, r) in enumerate(zip(grads, reference)):
        assert g.shape == values[i].shape
        _assert_close(g, r, 1e-8, f"gradient {i}")

    # needs_grad=False gives None and leaves the others unchanged.
    needs = [i % 2 == 0 for i in range(len(values))]
    partial = layer.adjoint(values, state, cotangents, needs_grad=needs)
    for i, (g, r) in enumerate(zip(partial, grads)):
        if needs[i]:
            _assert_close(g, r, 1e-12, f"gradient {i}")
        else:
            assert g is None
    # One flag per parameter, or an error that says so.
    with pytest.raises(ValueError, match=f"needs_grad has {len(values) + 1} "
                       f"entries; expected {len(values)}"):
        layer.adjoint(values, state, cotangents, needs_grad=needs + [True])

    # A None cotangent counts as zero.
    zeroed = [None] + list(cotangents[1:])
    explicit = [np.zeros_like(cotangents[0])] + list(cotangents[1:])
    for g, r in zip(layer.adjoint(values, state, zeroed),
                    layer.adjoint(values, state, explicit)):
        _assert_close(g, r, 1e-12, "None cotangent")


@pytest.mark.parametrize("case", _case_params())
def test_sparse_adjoint_equals_dense(case, monkeypatch):
    # Every zoo program is small enough for the stacked dense adjoint; the
    # sparse LU path (with its LSQR fallback) serves larger ones. Forcing it
    # here checks that both solve the same system. Both are direct solves
    # of the same bordered matrix, so they agree to rounding (1e-8 leaves
    # room for the conditioning of the degenerate LP cases).
    import optlayer.adjoint

    layer = _layer(case.name)
    rng = _rng("sparse", case.name)
    values = make_inputs(case, rng, 3)
    outputs, state = layer.solve(*values)
    cotangents = _random_cotangents(layer, 3, rng)
    dense = layer.adjoint(values, state, cotangents)
    monkeypatch.setattr(optlayer.adjoint, "DENSE_LIMIT", 0)
    sparse = layer.adjoint(values, state, cotangents)
    for i, (g, r) in enumerate(zip(sparse, dense)):
        _assert_close(g, r, 1e-8, f"gradient {i}")


# -- accuracy on degenerate LPs and near cone boundaries --------------------


def _lp_all_data():
    x = cp.Variable(6)
    c = cp.Parameter(6, name="c")
    A = cp.Parameter((5, 6), name="A")
    b = cp.Parameter(5, name="b")
    problem = cp.Problem(cp.Minimize(c @ x),
                         [A @ x <= b, x >= -1, x <= 1])
    return optlayer.Layer(problem, [c, A, b], [x])


@pytest.mark.parametrize("seed", range(3))
def test_lp_gradients_with_all_data_parametrized(seed):
    # An LP's KKT system is degenerate at every vertex (the derivative of
    # the projection is 0/1 and complementary pairs are both zero), so the
    # adjoint system is rank deficient beyond the two known null vectors.
    layer = _lp_all_data()
    rng = _rng("lp_all", seed)
    values = [rng.normal(size=6), rng.normal(size=(5, 6)),
              rng.uniform(0.2, 1.0, size=5)]
    (x,) = layer(*values)
    # Most of the box is active at a vertex: the solution is not interior.
    assert np.sum(np.abs(np.abs(x) - 1) < 1e-6) >= 1
    assert_vjp_matches_finite_differences(layer, values, rng)


@pytest.mark.parametrize("smallest", [1e-3, 1e-2])
def test_psd_projection_near_boundary(smallest):
    # Eigenvalues +-smallest: the projection is near the PSD cone's boundary
    # but still smooth at scales far above the finite-difference step.
    case = get_case("psd_param")
    layer = _layer("psd_param")
    rng = _rng("psd_boundary", smallest)
    Q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    S = Q @ np.diag([-2 * smallest, smallest, 1.0]) @ Q.T
    values = [(S + S.T) / 2]
    (X,) = layer(*values)
    _assert_close(X, case.closed_form(values)[0], CLOSED_FORM_TOL, "X")
    W = rng.normal(size=(3, 3))
    (g,) = layer.vjp(values, [W])
    _assert_close(g, case.closed_form_grad(values, [W])[0], CLOSED_FORM_TOL,
                  "gradient")
    assert_vjp_matches_finite_differences(layer, values, rng)


@functools.cache
def _soc_projection_layer():
    x = cp.Variable(4)
    p = cp.Parameter(4, name="p")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - p)),
                         [cp.norm(x[1:], 2) <= x[0]])
    return optlayer.Layer(problem, [p], [x])


def _soc_projection(p):
    t, u = p[0], p[1:]
    nu = np.linalg.norm(u)
    if nu <= t:
        return p.copy()
    if nu <= -t:
        return np.zeros_like(p)
    return (t + nu) / 2 * np.concatenate([[1.0], u / nu])


@pytest.mark.parametrize("offset", [-1e-3, 1e-3], ids=["inside", "outside"])
def test_soc_projection_near_boundary(offset):
    layer = _soc_projection_layer()
    rng = _rng("soc_boundary", offset)
    u = rng.normal(size=3)
    # ||u|| = t (1 + offset): just outside or just inside the cone.
    p = np.concatenate([[np.linalg.norm(u) / (1 + offset)], u])
    (x,) = layer(p)
    _assert_close(x, _soc_projection(p), CLOSED_FORM_TOL, "x")
    assert_vjp_matches_finite_differences(layer, [p], rng)


def test_entropy_near_exp_cone_boundary():
    # One weight of about 1e-4: the exponential cone's solution is close to
    # its boundary x = 0.
    case = get_case("entropy")
    layer = _layer("entropy")
    rng = _rng("exp_boundary")
    values = [np.array([-8.0, 0.3, 1.0, -0.4]), np.array(1.0)]
    (x,) = layer(*values)
    assert x.min() < 1e-3
    _assert_close(x, case.closed_form(values)[0], CLOSED_FORM_TOL, "x")
    w = rng.normal(size=4)
    grads = layer.vjp(values, [w])
    for i, (g, r) in enumerate(zip(grads, case.closed_form_grad(values, [w]))):
        _assert_close(g, r, CLOSED_FORM_TOL, f"gradient {i}")
    assert_vjp_matches_finite_differences(layer, values, rng)


# -- import isolation ------------------------------------------------------


def test_import_without_frameworks():
    # The frameworks are blocked by an import hook that makes their import
    # fail. Setting sys.modules[name] = None would block them too, but
    # SciPy (imported by CVXPY) reads sys.modules["torch"] on import and
    # breaks on the None entry, with or without optlayer.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent("""
        import sys
        BLOCKED = ("torch", "tensorflow", "jax", "keras")

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Blocker())
        import numpy as np
        import optlayer
        from tests.zoo import get_case, make_inputs, relu_closed_form
        case = get_case("relu")
        problem, params, variables = case.build()
        layer = optlayer.Layer(problem, params, variables)
        values = make_inputs(case, np.random.default_rng(0), None)
        (z,) = layer(*values)
        assert np.allclose(z, relu_closed_form(values)[0], atol=1e-6)
        grads = layer.vjp(values, [np.ones(3)])
        assert len(grads) == 3
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("LOADED:", loaded)
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED: []" in result.stdout, result.stdout


@pytest.mark.parametrize("case", _case_params())
def test_reduced_adjoint_equals_bordered(case, monkeypatch):
    # The stacked adjoint solves the reduced system (about n + number of
    # active constraints unknowns); the bordered residual-map system is its
    # fallback. On these nondegenerate programs both are direct solves of
    # equivalent systems and must agree to rounding.
    import optlayer.adjoint

    layer = _layer(case.name)
    rng = _rng("reduced", case.name)
    values = make_inputs(case, rng, 3)
    _, state = layer.solve(*values)
    cotangents = _random_cotangents(layer, 3, rng)
    calls = []
    bordered = optlayer.adjoint.adjoint_bordered

    def spy(*args):
        calls.append(args[0].shape[0])
        return bordered(*args)

    monkeypatch.setattr(optlayer.adjoint, "adjoint_bordered", spy)
    reduced = layer.adjoint(values, state, cotangents)
    assert calls == [], "the reduced system was not used"
    monkeypatch.setattr(optlayer.adjoint, "adjoint_dense", bordered)
    want = layer.adjoint(values, state, cotangents)
    for i, (g, r) in enumerate(zip(reduced, want)):
        _assert_close(g, r, 1e-9, f"gradient {i}")


def _force_system(monkeypatch, which):
    import optlayer.reduced

    if which == "full":
        monkeypatch.setattr(optlayer.reduced, "FULL_SIZE", 10**9)
        monkeypatch.setattr(optlayer.reduced, "FULL_WORK", np.inf)
    else:
        monkeypatch.setattr(optlayer.reduced, "FULL_SIZE", 0)


def _count_structures(monkeypatch):
    """Count the reduced systems built (optlayer.reduced.Structure)."""
    import optlayer.reduced

    built = []
    original = optlayer.reduced.Structure

    class Counting(original):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optlayer.reduced, "Structure", Counting)
    return built


@pytest.mark.parametrize("case", _case_params())
def test_full_jacobian_equals_reduced_systems(case, monkeypatch):
    # Small stacks take Newton steps and adjoints with the full Jacobian J,
    # larger ones with the reduced systems; the zoo's other tests see
    # mostly the first. Forced one way, then the other, on the same SCS
    # points: the refined outputs agree to the refinement's accuracy
    # (both stop at relative KKT residuals of 1e-12, or accept 1e-9 after
    # six steps: 1e-8 covers the latter times the conditioning) and the
    # gradients, direct solves of equivalent systems, to 1e-8 (the
    # regularized solves of singular systems differ by about 1e-10 times
    # the conditioning).
    import optlayer.reduced

    problem, params, variables = case.build()
    rng = _rng("full_vs_reduced", case.name)
    values = make_inputs(case, rng, 3)
    results = {}
    for which in ("full", "reduced"):
        _force_system(monkeypatch, which)
        built = _count_structures(monkeypatch)
        assembled = []
        original = optlayer.reduced.full_jacobian
        monkeypatch.setattr(
            optlayer.reduced, "full_jacobian",
            lambda *a: assembled.append(1) or original(*a))
        layer = optlayer.Layer(problem, params, variables, warm_start=False,
                               **case.layer_kwargs)
        layer._cold_newton = False
        outputs, state = layer.solve(*values)
        cotangents = _random_cotangents(layer, 3, _rng("cot", case.name))
        grads = layer.adjoint(values, state, cotangents)
        if which == "reduced":
            assert built or not layer.refine, "reduced systems not used"
            assert not assembled
        else:
            assert assembled, "the full Jacobian was not used"
        results[which] = (outputs, grads, built)
        monkeypatch.undo()
    full, reduced = results["full"], results["reduced"]
    for k, (g, w) in enumerate(zip(full[0], reduced[0])):
        _assert_close(g, w, 1e-8, f"output {k}")
    for i, (g, w) in enumerate(zip(full[1], reduced[1])):
        _assert_close(g, w, 1e-8, f"gradient {i}")


def test_full_jacobian_falls_back_to_reduced_systems(monkeypatch):
    # Where the full Jacobian gives no answer (NaN: a system that its
    # regularized solve cannot satisfy), Newton steps and adjoints take
    # the reduced systems; results equal the default path's.
    import optlayer.reduced

    case = get_case("socp")
    values = make_inputs(case, _rng("full_fallback"), 3)
    layer = optlayer.Layer(*case.build(), warm_start=False)
    layer._cold_newton = False
    want, state = layer.solve(*values)
    cotangents = _random_cotangents(layer, 3, _rng("full_fallback_cot"))
    want_grads = layer.adjoint(values, state, cotangents)

    _force_system(monkeypatch, "full")
    built = _count_structures(monkeypatch)
    failed = []

    def no_answer(M, rhs, tol, flags=None, rounds=1):
        failed.append(1)
        return np.full(rhs.shape, np.nan)

    monkeypatch.setattr(optlayer.reduced, "solve_checked", no_answer)
    got, state = layer.solve(*values)
    grads = layer.adjoint(values, state, cotangents)
    assert failed and built
    for k, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, 1e-8, f"output {k}")   # as in the test above
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        _assert_close(g, w, 1e-8, f"gradient {i}")


def test_small_stacks_take_the_full_jacobian(monkeypatch):
    # The default choice: one small SOCP takes the full Jacobian in both
    # directions (no reduced system is built); a large batch of them the
    # reduced systems.
    import optlayer.reduced

    case = get_case("socp")
    layer = optlayer.Layer(*case.build(), warm_start=False)
    layer._cold_newton = False
    n, m = layer.compiled.n, layer.compiled.m
    large = int(optlayer.reduced.FULL_WORK / (n + m) ** 3) + 1
    assert optlayer.reduced.use_full(1, n, m)
    assert not optlayer.reduced.use_full(large, n, m)
    for batch, expect_reduced in ((1, False), (large, True)):
        built = _count_structures(monkeypatch)
        values = make_inputs(case, _rng("small_full", batch), batch)
        _, state = layer.solve(*values)
        layer.adjoint(values, state,
                      _random_cotangents(layer, batch, _rng("c", batch)))
        assert bool(built) == expect_reduced, (batch, len(built))
        monkeypatch.undo()


def _interpolate(a, b, t):
    # Convex combinations keep nonnegative, symmetric and PSD values so.
    return [(1 - t) * x + t * y for x, y in zip(a, b)]


@pytest.mark.parametrize("case", _case_params())
def test_warm_start_matches_cold_start(case):
    # Warm starts (the default) begin each call with Newton steps from the
    # previous call's solution; they must give the cold-start answer, both
    # for a nearby call (the training-loop case) and for unrelated values.
    problem, params, variables = case.build()
    warm = optlayer.Layer(problem, params, variables, **case.layer_kwargs)
    cold = optlayer.Layer(problem, params, variables, warm_start=False,
                          **case.layer_kwargs)
    rng = _rng("warm", case.name)
    first = make_inputs(case, rng, 4)
    other = make_inputs(case, rng, 4)
    warm(*first)
    # Both are polished to relative KKT residuals below 1e-11, which bounds
    # the outputs' difference by about 1e-11 times the conditioning of
    # these small programs: 1e-9. Gradients pass through one more linear
    # solve (conditioning up to about 1e2 on the degenerate LP cases): 1e-7.
    for values in (_interpolate(first, other, 0.01), other, first):
        got = warm(*values)
        want = cold(*values)
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, 1e-9, f"output {k}")
        cot = _random_cotangents(warm, 4, rng)
        for k, (g, w) in enumerate(zip(warm.vjp(values, cot),
                                       cold.vjp(values, cot))):
            _assert_close(g, w, 1e-7, f"gradient {k}")


@pytest.mark.parametrize("name", ["relu", "qp", "socp", "lasso"])
def test_warm_start_skips_the_solver_for_nearby_values(name, monkeypatch):
    # In a training loop the parameters move little between calls: Newton
    # steps from the last solution then solve every element, SCS none.
    import optlayer.solve

    case = get_case(name)
    layer = optlayer.Layer(*case.build(), **case.layer_kwargs)
    rng = _rng("warm_skip", name)
    first = make_inputs(case, rng, 8)
    layer(*first)
    calls = []
    monkeypatch.setattr(optlayer.solve, "solve_one",
                        lambda *a, **k: calls.append(1))
    monkeypatch.setattr(optlayer.solve.Workspace, "solve",
                        lambda *a, **k: calls.append(1))
    nearby = _interpolate(first, make_inputs(case, rng, 8), 1e-3)
    outputs = layer(*nearby)
    assert calls == []
    # Accepted warm answers have KKT residuals below 1e-11: 1e-9 leaves
    # the programs' conditioning room, as for the zoo comparison above.
    cold = optlayer.Layer(*case.build(), warm_start=False,
                          **case.layer_kwargs)
    monkeypatch.undo()
    for g, w in zip(outputs, cold(*nearby)):
        _assert_close(g, w, 1e-9, "output")


def test_warm_start_ignores_other_batch_sizes():
    case = get_case("qp")
    layer = optlayer.Layer(*case.build())
    rng = _rng("warm_sizes")
    layer(*make_inputs(case, rng, 4))
    values = make_inputs(case, rng, 3)
    (got,) = layer(*values)
    (want,) = optlayer.Layer(*case.build(), warm_start=False)(*values)
    _assert_close(got, want, 1e-9, "output")   # both refined, as above


def test_refinement_handles_non_unique_auxiliary_variables(
        linear_system, monkeypatch):
    # ||x|| <= 5 is inactive at the solution, so the epigraph variable that
    # CVXPY introduces for it may take any value up to 5: the optimality
    # conditions' Jacobian is singular. Newton steps then solve a
    # regularized system (the full Jacobian plus delta I, or the reduced
    # quasi-definite one) and still converge; no element needs SCS a
    # second time, and x (unique) matches CVXPY with SCS at 1e-12
    # (Clarabel reports these as optimal_inaccurate, about 1e-7 off).
    rng = _rng("non_unique")
    x = cp.Variable(6)
    c = cp.Parameter(6)
    A = cp.Parameter((8, 6))
    problem = cp.Problem(cp.Minimize(c @ x),
                         [cp.norm(A @ x + 0.1, 2) <= 1, cp.norm(x, 2) <= 5])
    layer = optlayer.Layer(problem, [c, A], [x], warm_start=False)
    resolves = []
    original = optlayer.Layer._resolve

    def counting(self, *args, **kwargs):
        resolves.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(optlayer.Layer, "_resolve", counting)
    cs = rng.normal(size=(8, 6))
    As = rng.normal(size=(8, 8, 6)) + 3 * np.eye(8, 6)
    (got,) = layer(cs, As)
    assert resolves == []
    for k in range(8):
        c.value, A.value = cs[k], As[k]
        problem.solve(solver=cp.SCS, eps_abs=1e-12, eps_rel=1e-12,
                      max_iters=200_000)
        assert problem.status == cp.OPTIMAL
        assert np.linalg.norm(x.value) < 4.5   # the second norm is inactive
        # Both reach KKT residuals near 1e-12; they agree to ~1e-13.
        _assert_close(got[k], x.value, 1e-9, f"element {k}")


@pytest.mark.parametrize("batch", [None, 20])
def test_gradient_at_a_norm_bound_of_zero_warns_that_it_is_not_unique(
        batch):
    # ||x|| <= r at r = 0 leaves the single point x = 0: the optimality
    # conditions are singular in the direction r moves, and the gradient
    # in r (0 here) is not the one-sided derivative (about 1.4 for r > 0).
    rng = _rng("norm_bound_zero")
    x = cp.Variable(4)
    a = cp.Parameter(4)
    r = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(a @ x + cp.norm(x - 1, 2)),
                         [cp.norm(x, 2) <= r])
    layer = optlayer.Layer(problem, [a, r], [x])
    av = 3 * rng.normal(size=4)
    if batch is None:
        values, cot = [av, np.array(0.0)], [np.ones(4)]
        match = r"The gradient of the problem is not unique"
    else:
        # Every other element at r = 0 (the reduced systems' path).
        values = [np.tile(av, (batch, 1)),
                  np.where(np.arange(batch) % 2 == 0, 0.0, 1.0)]
        cot = [np.ones((batch, 4))]
        match = (r"The gradient of batch element\(s\) "
                 rf"\[{', '.join(map(str, range(0, batch, 2)))}\] is not "
                 r"unique")
    with pytest.warns(RuntimeWarning, match=match):
        layer.vjp(values, cot)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        layer.vjp([av, np.array(1e-6)], [np.ones(4)])


def test_outputs_on_a_face_of_optima_warn_that_they_are_not_unique():
    # min (a'x - b)^2 over a box: every x of the box with a'x = b is
    # optimal. x itself differs between optimal points (its gradient is
    # not a derivative: a warning); a'x = b is the same at all of them
    # (no warning, and its gradient in b is exactly 1).
    x = cp.Variable(3)
    a = cp.Parameter(3)
    b = cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.square(a @ x - b)),
                         [x >= -1, x <= 1])
    layer = optlayer.Layer(problem, [a, b], [x])
    av, bv = np.array([1.0, 1.0, 0.5]), np.array(0.3)
    with pytest.warns(RuntimeWarning, match="requested outputs of the "
                      "problem are not unique"):
        layer.vjp([av, bv], [np.array([1.0, 0.0, 0.0])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, gb = layer.vjp([av, bv], [av])
    # 1e-9: the solution's KKT residual is about 1e-12; the adjoint's
    # regularized solve of the singular system adds a few orders.
    _assert_close(gb, 1.0, 1e-9, "gradient of a'x in b")
    # Batched: only the elements on a face are named (b = 5 is beyond
    # the box's reach: the unique optimum is its corner).
    values = [np.tile(av, (3, 1)), np.array([0.3, 5.0, -0.2])]
    with pytest.warns(RuntimeWarning, match=r"batch element\(s\) \[0, 2\] "
                      "are not unique"):
        layer.vjp(values, [np.tile([1.0, 0.0, 0.0], (3, 1))])


@pytest.mark.parametrize("n", [150, 300])
def test_larger_programs_are_checked_for_non_unique_outputs(n):
    # The face of optima above in n dimensions, where the adjoint is
    # sparse (n + m + 1 = 3 n + 1 > 400): the null directions come from a
    # sparse LU. An inactive norm1 bound (non-unique epigraph variables)
    # stays quiet, with the exact gradient of x = a.
    rng = _rng("larger_face", n)
    x = cp.Variable(n)
    a = cp.Parameter(n)
    b = cp.Parameter()
    problem = cp.Problem(cp.Minimize(cp.square(a @ x - b)),
                         [x >= -1, x <= 1])
    layer = optlayer.Layer(problem, [a, b], [x])
    av = rng.uniform(0.5, 1.0, n)
    with pytest.warns(RuntimeWarning, match="requested outputs of the "
                      "problem are not unique"):
        layer.vjp([av, np.array(0.3)], [np.eye(n)[0]])
    bounded = cp.Problem(cp.Minimize(cp.sum_squares(x - a)),
                         [cp.norm1(x) <= 10.0 * n])
    layer = optlayer.Layer(bounded, [a], [x])
    w = rng.normal(size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        (grad,) = layer.vjp([av], [w])
    # 1e-8: x = a is refined to about 1e-12, and the singular system (the
    # epigraph variables) is solved regularized, losing a few orders.
    _assert_close(grad, w, 1e-8, "gradient of x = a")


def test_duals_of_redundant_constraints_warn_that_they_are_not_unique():
    # The same hyperplane as an equality and an inequality: only the sum
    # of their multipliers is determined. One of them alone is not unique
    # (a warning); the sum is (at the vertex x = e0 of min c'x over the
    # simplex, -c0: gradient (-1, 0, 0)).
    x = cp.Variable(3)
    c = cp.Parameter(3)
    eq, ineq = cp.sum(x) == 1, cp.sum(x) <= 1
    problem = cp.Problem(cp.Minimize(c @ x), [x >= 0, eq, ineq])
    layer = optlayer.Layer(problem, [c], [eq.dual_variables[0],
                                          ineq.dual_variables[0]])
    cv = np.array([1.0, 1.5, 2.0])
    with pytest.warns(RuntimeWarning, match="requested outputs of the "
                      "problem are not unique"):
        layer.vjp([cv], [np.array(1.0), np.array(0.0)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (grad,) = layer.vjp([cv], [np.array(1.0), np.array(1.0)])
    assert not [w for w in caught if "requested outputs" in str(w.message)]
    # 1e-8: as above, a singular system solved regularized from a point
    # refined to about 1e-12.
    _assert_close(grad, [-1.0, 0.0, 0.0], 1e-8, "gradient of the sum")


def test_null_direction_gradients_find_the_null_space_of_singular_systems():
    # At r = 0, ||x|| <= r leaves one point: J is singular, and the null
    # direction found must satisfy J' z ~ 0 and move the gradient in b;
    # at r = 1 J is nonsingular and nothing counts as a null direction.
    import optlayer.adjoint as adj
    from optlayer import cones, reduced

    x = cp.Variable(3)
    a = cp.Parameter(3)
    r = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(a @ x + cp.norm(x - 1, 2)),
                         [cp.norm(x, 2) <= r])
    layer = optlayer.Layer(problem, [a, r], [x], warm_start=False)
    cp_ = layer.compiled
    found = []
    for rv in (0.0, 1.0):
        values = layer._as_arrays([np.array([0.3, -1.0, 2.0]),
                                   np.array(rv)])
        _, state = layer.solve(*values)
        X, Y, S = state
        _, _, theta = layer._prepare(values)
        Av = layer._data(theta)[0]
        dA, db, dc, dP, in_null = adj.null_direction_gradients(
            Av, cp_.A_indices, layer._A_cols, X, Y, S, cp_.dims)
        found.append(bool(in_null[0]))
        if in_null[0]:
            # Rebuild J' and check the direction: db = -z's second part.
            Ad = reduced.dense_A(Av, cp_.A_indices, layer._A_cols,
                                 cp_.m, cp_.n)
            D = cones.dproject_batch_dense(Y - S, cp_.dims, dual=True)
            Jt = np.swapaxes(reduced.full_jacobian(Ad, D), 1, 2)
            z = np.concatenate([-dc, -db], axis=1)
            assert np.linalg.norm(z) > 0.5       # unit vector, rescaled
            # Two inverse-iteration steps at shift 1e-10: J' z ~ 1e-10.
            assert np.abs(reduced.bmv(Jt, z)).max() <= adj.NULL_TOL
    assert found == [True, False]


def test_adjoint_handles_non_unique_auxiliary_variables(
        linear_system, monkeypatch):
    # The same singular optimality conditions in the backward pass: J' r = g
    # has many solutions, but all give the same gradient (dF/dtheta maps
    # into the range of J). The regularized solve (full or reduced) must be
    # used (no bordered fallback), agree with the bordered minimum-norm
    # answer, and match central finite differences.
    import optlayer.adjoint

    rng = _rng("non_unique_adjoint")
    x = cp.Variable(6)
    c = cp.Parameter(6)
    A = cp.Parameter((8, 6))
    problem = cp.Problem(cp.Minimize(c @ x),
                         [cp.norm(A @ x + 0.1, 2) <= 1, cp.norm(x, 2) <= 5])
    layer = optlayer.Layer(problem, [c, A], [x], warm_start=False)
    values = [rng.normal(size=(4, 6)),
              rng.normal(size=(4, 8, 6)) + 3 * np.eye(8, 6)]
    _, state = layer.solve(*values)
    cotangents = _random_cotangents(layer, 4, rng)
    calls = []
    bordered = optlayer.adjoint.adjoint_bordered

    def spy(*args):
        calls.append(args[0].shape[0])
        return bordered(*args)

    monkeypatch.setattr(optlayer.adjoint, "adjoint_bordered", spy)
    with warnings.catch_warnings():
        # The gradient is unique: no "not unique" warning.
        warnings.simplefilter("error", RuntimeWarning)
        got = layer.adjoint(values, state, cotangents)
    assert calls == [], "the regularized system was not used"
    monkeypatch.setattr(optlayer.adjoint, "adjoint_dense", bordered)
    want = layer.adjoint(values, state, cotangents)
    # Both are solutions of the same consistent system, the first one
    # regularized by 1e-10 relative: 1e-8 covers that times conditioning.
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, 1e-8, f"gradient {i}")
    monkeypatch.undo()
    for _ in range(3):
        direction = [rng.normal(size=v.shape) for v in values]
        fd = _finite_difference(layer, values, direction, cotangents)
        analytic = sum(float(np.sum(g * d)) for g, d in zip(got, direction))
        assert abs(fd - analytic) <= FD_RTOL * max(1.0, abs(analytic)), (
            f"analytic {analytic:.9g}, finite difference {fd:.9g}")


def test_warm_start_after_a_boundary_call_matches_cold():
    # Maximize entropy with x0 <= p: at p = 0 the bound sits on the
    # exponential cone's boundary (its multiplier is infinite). The next
    # call, p = 1e-6, must not be led astray by that solution: Newton steps
    # from it are rejected, and SCS then starts from scratch.
    x = cp.Variable(4)
    p = cp.Parameter(nonneg=True)
    bound = x[0] <= p
    problem = cp.Problem(cp.Maximize(cp.sum(cp.entr(x))),
                         [cp.sum(x) == 1, bound])
    outputs = [x, bound.dual_variables[0]]
    warm = optlayer.Layer(problem, [p], outputs)
    cold = optlayer.Layer(problem, [p], outputs, warm_start=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # p = 0 itself is degenerate
        warm(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xw, dw = warm(1e-6)
        xc, dc = cold(1e-6)
    # x = (p, (1 - p)/3, ...), multiplier log((1 - p) / (3 p)).
    exact_dual = np.log((1 - 1e-6) / 3e-6)
    assert abs(xw[0] - 1e-6) < 1e-12 and abs(xc[0] - 1e-6) < 1e-12
    assert abs(dw - exact_dual) < 1e-6 * exact_dual
    assert abs(dc - exact_dual) < 1e-6 * exact_dual


def test_explicit_warm_start_of_the_wrong_size_is_named():
    case = get_case("qp")
    layer = optlayer.Layer(*case.build())
    rng = _rng("warm_size_error")
    _, state = layer.solve(*make_inputs(case, rng, 2))
    n = layer.compiled.n
    with pytest.raises(ValueError, match=rf"warm_start x has shape \(2, {n}\); "
                       rf"expected \(3, {n}\) for this call's batch size 3"):
        layer.solve(*make_inputs(case, rng, 3), warm_start=state)


def test_warm_started_scs_that_fails_is_solved_again_cold(monkeypatch):
    # Without refinement SCS itself is warm-started from the previous call;
    # an element it does not solve from there is solved from scratch, with
    # no warning and the cold answer.
    import optlayer.solve

    case = get_case("socp")
    rng = _rng("warm_scs_retry")
    first, second = make_inputs(case, rng, 3), make_inputs(case, rng, 3)
    layer = optlayer.Layer(*case.build(), refine=False)
    layer(*first)
    original_one = optlayer.solve.solve_one
    original_ws = optlayer.solve.Workspace.solve
    warm_calls = []

    def failing_when_warm(result, warm):
        if warm is None:
            return result
        warm_calls.append(1)
        return (*result[:3], optlayer.solve.SOLVED_INACCURATE,
                "solved_inaccurate")

    monkeypatch.setattr(
        optlayer.solve, "solve_one",
        lambda A, b, c, cone, options, warm=None: failing_when_warm(
            original_one(A, b, c, cone, options, warm), warm))
    monkeypatch.setattr(
        optlayer.solve.Workspace, "solve",
        lambda self, b, c, warm=None: failing_when_warm(
            original_ws(self, b, c, warm), warm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer(*second)
    assert len(warm_calls) == 3
    monkeypatch.undo()
    want = optlayer.Layer(*case.build(), refine=False,
                          warm_start=False)(*second)
    # Two SCS runs at eps 1e-10 from the same (cold) start: the retried
    # answer is the cold one up to SCS's tolerance times the conditioning.
    for g, w in zip(got, want):
        _assert_close(g, w, 1e-8, "output")


@pytest.mark.parametrize("name", ["qp", "socp", "sdp", "entropy"])
def test_refinement_falls_back_to_bordered_steps(name, monkeypatch):
    # Where the reduced system gives no step (NaN: e.g. a second-order cone
    # point without strict complementarity), refinement takes the Newton
    # step of the bordered homogeneous system, or, for a quadratic
    # objective (which that system does not have, the qp case), the full
    # Jacobian's regularized step; with only that, it still polishes SCS's
    # point and the results equal the default path's. (The full Jacobian,
    # which small programs take first, is switched off.)
    import optlayer.reduced
    import optlayer.refine

    case = get_case(name)
    rng = _rng("bordered_steps", name)
    values = make_inputs(case, rng, 3)
    want = optlayer.Layer(*case.build(), warm_start=False)(*values)
    calls = []
    layer = optlayer.Layer(*case.build(), warm_start=False)
    fallback = "_full_step" if layer.compiled.has_P else "_bordered_step"
    original = getattr(optlayer.refine, fallback)

    def no_reduced_step(*args, **kwargs):
        X, V = args[3], args[4]
        return np.full_like(X, np.nan), np.full_like(V, np.nan)

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(optlayer.reduced, "FULL_SIZE", 0)
    monkeypatch.setattr(optlayer.refine, "_reduced_step", no_reduced_step)
    monkeypatch.setattr(optlayer.refine, fallback, counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer(*values)
    assert calls
    # Both paths stop at a relative KKT residual of 1e-12 (or accept 1e-9
    # after six steps); 1e-8 covers the latter times the conditioning.
    for g, w in zip(got, want):
        _assert_close(g, w, 1e-8, "output")


def test_scs_linear_solver_chosen_by_the_shape_of_A(monkeypatch):
    # The dense backend where its n x n matrix is no larger than A (a
    # dense 100 x 10 A); QDLDL for a sparse A; only for SCS's loose first
    # pass before refinement; the user's own choice always wins. Each
    # layer's answers are CVXPY's, so the backend changes speed only.
    import optlayer.solve

    assert optlayer.solve.linear_solver(1000, 7000) == optlayer.solve.SPARSE
    if optlayer.solve.DENSE is not None:
        assert optlayer.solve.linear_solver(50, 10_000) == \
            optlayer.solve.DENSE
    seen = []
    original = optlayer.solve.solve_one

    def spy(A, b, c, cone, options, warm=None, P=None):
        seen.append(options.get("linear_solver"))
        return original(A, b, c, cone, options, warm, P)

    monkeypatch.setattr(optlayer.solve, "solve_one", spy)
    rng = _rng("linear_solver")
    x = cp.Variable(10)
    A = cp.Parameter((100, 10))
    b = cp.Parameter(100)
    c = cp.Parameter(10)
    problem = cp.Problem(cp.Minimize(c @ x), [A @ x <= b, cp.abs(x) <= 1])
    As = rng.normal(size=(2, 100, 10))
    bs = np.einsum("bmn,bn->bm", As, rng.uniform(-0.5, 0.5, (2, 10))) + 0.5
    cs = rng.normal(size=(2, 10))
    for kwargs, want in [
            # Canonicalized: n = 20 (abs adds 10), nnz(A) = 1050.
            ({}, optlayer.solve.DENSE or optlayer.solve.SPARSE),
            ({"solver_options": {"linear_solver": "qdldl"}}, "qdldl"),
            ({"refine": False}, None)]:
        layer = optlayer.Layer(problem, [A, b, c], [x], warm_start=False,
                               **kwargs)
        layer._cold_newton = False
        seen.clear()
        (got,) = layer(As, bs, cs)
        assert seen and seen[:2] == [want, want], (kwargs, seen)
        for k in range(2):
            A.value, b.value, c.value = As[k], bs[k], cs[k]
            problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12,
                          tol_gap_rel=1e-12, tol_feas=1e-12)
            # 1e-6: Clarabel itself stops near 1e-7 on LPs (see
            # test_cold_newton_is_dropped_where_it_fails); every backend
            # gives optlayer's polished 1e-12 answer either way.
            _assert_close(got[k], x.value, 1e-6, f"{kwargs} element {k}")


def test_sparse_adjoint_of_a_degenerate_program_matches_the_dense_one(
        monkeypatch):
    # Above n + m + 1 = 400 the backward pass factors the bordered system
    # sparsely. Here (an inactive norm constraint among others) that
    # system is singular; SuperLU still returned an answer that passed
    # the residual check, with an arbitrary component that moved the
    # gradient by 2e-2. Such systems are now recognized by their pivots
    # and handed to the dense adjoint; the gradients on the same solver
    # state must agree. (The dense adjoint is checked against finite
    # differences throughout the zoo.)
    import optlayer.adjoint

    rng = np.random.default_rng(5)
    n = 31

    def U(*shape):
        return rng.uniform(-1, 1, shape)

    x0 = U(n)
    x = cp.Variable(n)
    A = cp.Parameter((32, n))
    b = cp.Parameter(32)
    C = U(32, n)
    q = cp.Parameter(32)
    c = rng.uniform(-2, 2, n)
    lo = cp.Parameter(n)
    a = cp.Parameter(n)
    ab = cp.Parameter(n)
    F = cp.Parameter((5, n))
    f0 = U(5)
    e = cp.Parameter(n)
    G = cp.Parameter((57, n))
    g = cp.Parameter(57)
    H = cp.Parameter((56, n))
    Hv = U(56, n)
    h = Hv @ x0 + rng.uniform(0.1, 1, 56)
    Fv, ev = U(5, n), U(n)
    d = np.linalg.norm(Fv @ x0 + f0) - ev @ x0 + rng.uniform(0.1, 1)
    av = rng.uniform(0.3, 2, n) * rng.choice([-1, 1], n)
    Gv = U(57, n)
    problem = cp.Problem(
        cp.Minimize(cp.quad_over_lin(A @ x - b, 1.0)
                    + cp.norm1(C @ x - q) + c @ x),
        [x >= lo, cp.multiply(a, x) <= ab, cp.norm(F @ x + f0) <= e @ x + d,
         G @ x <= g, H @ x <= h, x <= 5, x >= -5])
    params = [A, b, q, lo, a, ab, F, e, G, g, H]
    values = [U(32, n), rng.uniform(-2, 2, 32), rng.uniform(-2, 2, 32),
              x0 - rng.uniform(0.1, 1, n), av,
              av * x0 + rng.uniform(0.1, 1, n), Fv, ev, Gv,
              Gv @ x0 + rng.uniform(0.1, 1, 57), Hv]
    layer = optlayer.Layer(problem, params, [x], warm_start=False)
    cp_ = layer.compiled
    assert cp_.n + cp_.m + 1 > optlayer.adjoint.DENSE_LIMIT
    _, state = layer.solve(*values)
    w = np.random.default_rng(1).standard_normal(n)
    sparse = layer.adjoint(values, state, [w])
    monkeypatch.setattr(optlayer.adjoint, "DENSE_LIMIT", 10_000)
    dense = layer.adjoint(values, state, [w])
    for k, (gs, gd) in enumerate(zip(sparse, dense)):
        _assert_close(gs, gd, 1e-8, f"gradient {k}")


@pytest.mark.parametrize("kind", ["SOC", "ExpCone", "PowCone3D"])
def test_duals_of_explicit_cone_constraints(kind):
    # SOC, ExpCone and PowCone3D constraints have several dual variables
    # (one per argument); each is an output, equal to CVXPY's, and its
    # gradient matches central differences (step 1e-4: truncation error
    # about 1e-8; the duals' own error of about 1e-12 contributes 1e-8 /
    # step; with step 1e-6 that part reaches 1e-6 on the power cone).
    x = cp.Variable(3)
    a = cp.Parameter(3)
    if kind == "SOC":
        con, value = cp.SOC(x[0], x[1:]), np.array([0.5, 1.0, 1.0])
    elif kind == "ExpCone":
        con, value = cp.ExpCone(x[0], x[1], x[2]), np.array([1.0, 1.0, 0.5])
    else:
        con, value = (cp.PowCone3D(x[0], x[1], x[2], 0.4),
                      np.array([0.3, 0.5, 2.0]))
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [con])
    _check_duals(problem, a, value, con, ("explicit_cone_duals", kind), 1e-4)


def _check_duals(problem, a, value, con, key, step):
    """The layer with ``con``'s dual variables as outputs, at ``value`` of
    the parameter ``a`` (3 entries): each dual equals CVXPY's (Clarabel at
    1e-12; 1e-6 covers its accuracy on exponential and power cones) and
    the gradient of a random weighted sum matches central differences of
    the given step. Returns the duals."""
    layer = optlayer.Layer(problem, [a], list(con.dual_variables),
                           warm_start=False)
    got = layer(value)
    a.value = value
    with warnings.catch_warnings():
        # Clarabel calls some power-cone answers inaccurate at 1e-12
        # (PowConeND); they still agree to 1e-6, the tolerance below, and
        # that test also checks a closed form.
        warnings.filterwarnings("ignore", "Solution may be inaccurate")
        problem.solve(solver=cp.CLARABEL, **CLARABEL_OPTIONS)
    for k, dual in enumerate(con.dual_variables):
        _assert_close(got[k], np.reshape(dual.value, np.shape(got[k])),
                      1e-6, f"dual {k}")
    rng = _rng(*key)
    cot = [rng.normal(size=np.shape(g)) for g in got]
    (grad,) = layer.vjp([value], cot)

    def f(v):
        return sum(float(np.sum(c * o)) for c, o in zip(cot, layer(v)))

    fd = np.array([(f(value + step * e) - f(value - step * e)) / (2 * step)
                   for e in np.eye(3)])
    _assert_close(grad, fd, 1e-6, "gradient")
    return got


def _vectorized_cone(kind):
    """A problem with one vectorized cone constraint (several cones in one
    CVXPY constraint), its parameter, a value and the constraint."""
    a = cp.Parameter(3)
    if kind.startswith("SOC"):
        axis = int(kind[-1])
        X = cp.Variable((3, 4) if axis == 0 else (4, 3))
        t = cp.Variable(4)
        con = cp.SOC(t, X, axis=axis)
        coef = cp.reshape(a, (3, 1), order="F") @ np.ones((1, 4))
        A = coef if axis == 0 else coef.T
        problem = cp.Problem(
            cp.Minimize(cp.sum(t) + cp.sum(cp.multiply(A, X))), [con, t <= 1])
    elif kind == "ExpCone":
        x, y, z = cp.Variable(3), cp.Variable(3), cp.Variable(3)
        con = cp.ExpCone(x, y, z)
        problem = cp.Problem(
            cp.Minimize(cp.sum(z) + cp.sum_squares(x - a) + cp.sum_squares(
                y - 1)), [con])
    elif kind == "PowCone3D":
        x, y, z = cp.Variable(3), cp.Variable(3), cp.Variable(3)
        con = cp.PowCone3D(x, y, z, [0.3, 0.5, 0.7])
        problem = cp.Problem(
            cp.Maximize(cp.sum(z) - cp.sum_squares(x - a) - cp.sum_squares(
                y - 1)), [con])
    else:
        W, z = cp.Variable((3, 2)), cp.Variable(2)
        alpha = np.array([[0.2, 0.5], [0.3, 0.25], [0.5, 0.25]])
        con = cp.PowConeND(W, z, alpha, axis=0)
        problem = cp.Problem(cp.Maximize(cp.sum(z) - cp.sum_squares(
            W - cp.reshape(a, (3, 1), order="F") @ np.ones((1, 2)))), [con])
    return problem, a, np.array([1.0, 2.0, 0.5]), con


@pytest.mark.parametrize(
    "kind", ["SOC0", "SOC1", "ExpCone", "PowCone3D", "PowConeND"])
def test_duals_of_vectorized_cone_constraints(kind):
    # One constraint holding several cones lays its dual out cone by cone
    # (each cone's parts together); every dual variable must still be its
    # own part, equal to CVXPY's (Clarabel at 1e-12; 1e-6 covers its
    # accuracy on exponential and power cones). Closed forms: in the SOC
    # problems stationarity in X makes the X-part of the dual equal the
    # objective's coefficient of X; in the others the part paired with
    # sum(z) is 1 (minimized) or -1 (maximized) in every entry.
    # The gradient step 1e-5: truncation about 1e-10, the outputs' error
    # of about 1e-12 adds 1e-7.
    problem, a, value, con = _vectorized_cone(kind)
    got = _check_duals(problem, a, value, con, ("vectorized_cone_duals", kind),
                       1e-5)
    # The closed forms hold at the refined point to its KKT residual,
    # about 1e-12: 1e-9 leaves margin.
    if kind.startswith("SOC"):
        coef = np.outer(value, np.ones(4))
        want = coef if kind == "SOC0" else coef.T
        _assert_close(got[1], want, 1e-9, "X-part")
    else:
        sign = 1.0 if kind == "ExpCone" else -1.0
        _assert_close(got[-1], sign * np.ones(np.shape(got[-1])), 1e-9,
                      "z-part")


def test_blas_runs_on_one_thread_during_a_call(monkeypatch):
    # Solve and adjoint limit BLAS to one thread (see
    # optlayer.layer._blas_single_thread) and restore the previous count
    # afterwards.
    import threadpoolctl

    import optlayer.refine

    def blas_threads():
        return [lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                if lib["user_api"] == "blas"]

    case = get_case("socp")
    layer = optlayer.Layer(*case.build(), warm_start=False)
    values = make_inputs(case, _rng("blas"), 2)
    layer(*values)   # loads and finds the BLAS libraries
    seen = []
    original = optlayer.refine.refine

    def spy(*args, **kwargs):
        seen.append(blas_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(optlayer.refine, "refine", spy)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        if max(before, default=1) < 2:
            pytest.skip("BLAS runs on one thread here already")
        layer(*values)
        assert blas_threads() == before
    assert seen and all(t == [1] * len(before) for t in seen)


# -- quadratic objectives kept quadratic (quadratic_objective=True) ---------


@functools.cache
def _quadratic_layer(name):
    case = get_case(name)
    problem, params, variables = case.build()
    return optlayer.Layer(problem, params, variables,
                          quadratic_objective=True, **case.layer_kwargs)


@functools.cache
def _cone_layer(name):
    """The case's layer in CVXPY's cone form (quadratic_objective=False;
    the default keeps quadratic objectives quadratic)."""
    case = get_case(name)
    problem, params, variables = case.build()
    return optlayer.Layer(problem, params, variables,
                          quadratic_objective=False, **case.layer_kwargs)


# quad_form(x, P) with a parameter P exists only as a quadratic term
# (its cone form is not DPP; see the test below).
QUADRATIC_CASES = [c for c in CASES if _quadratic_layer(c.name).compiled.has_P
                   and "quadratic_only" not in c.tags]


def test_quad_form_of_a_parameter_needs_the_quadratic_objective():
    problem, params, variables = get_case("quad_form_param").build()
    assert optlayer.Layer(problem, params, variables).compiled.has_P
    with pytest.raises(ValueError, match=r"not DPP.*quad_form\(x, P\) "
                                         r"with a parameter P is DPP only "
                                         r"in the objective"):
        optlayer.Layer(problem, params, variables, quadratic_objective=False)
    x = variables[0]
    P, q = params
    in_constraint = cp.Problem(cp.Minimize(q @ x), [cp.quad_form(x, P) <= 1])
    with pytest.raises(ValueError, match="DPP only in the objective"):
        optlayer.Layer(in_constraint, params, variables)


def test_quadratic_cases_exist():
    # The zoo's least-squares, lasso, ReLU, logistic and QP cases keep a
    # quadratic term (by default); linear objectives have none, and
    # neither has the cone form.
    names = {c.name for c in QUADRATIC_CASES}
    assert {"qp", "constrained_lsq", "lasso", "relu"} <= names
    assert "lp" not in names and _layer("qp").compiled.has_P
    assert not _cone_layer("qp").compiled.has_P


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("case", _case_params(QUADRATIC_CASES))
def test_cone_form_forward_matches_cvxpy(case, batch_size):
    # The default keeps these objectives quadratic (the zoo's other tests);
    # here their cone form (quadratic_objective=False).
    layer = _cone_layer(case.name)
    values = make_inputs(case, _rng("qforward", case.name, batch_size),
                         batch_size)
    outputs = layer(*values)
    batch, elements = _elements(layer, values)
    reference = _stack(batch, [reference_solve(case, e) for e in elements])
    for k, (got, want) in enumerate(zip(outputs, reference)):
        _assert_close(got, want, FORWARD_RTOL, f"output {k}")


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("case", _case_params(QUADRATIC_CASES))
def test_cone_form_vjp_matches_finite_differences(case, batch_size):
    layer = _cone_layer(case.name)
    rng = _rng("qfd", case.name, batch_size)
    values = make_inputs(case, rng, batch_size)
    assert_vjp_matches_finite_differences(layer, values, rng)


@pytest.mark.parametrize("case", _case_params(QUADRATIC_CASES))
def test_quadratic_and_cone_forms_agree(case, monkeypatch):
    # The same problem in both forms: outputs agree to the refinement's
    # accuracy and gradients (exact in both) to 1e-8; with the full
    # Jacobian, the reduced systems and the sparse adjoint (every stack
    # forced onto each path in turn).
    import optlayer.adjoint

    rng = _rng("qagree", case.name)
    values = make_inputs(case, rng, 3)
    cone = _cone_layer(case.name)
    outputs, state = cone.solve(*values)
    cotangents = _random_cotangents(cone, 3, rng)
    want = cone.adjoint(values, state, cotangents)
    for which in ("full", "reduced", "sparse"):
        if which == "sparse":
            monkeypatch.setattr(optlayer.adjoint, "DENSE_LIMIT", 0)
        else:
            _force_system(monkeypatch, which)
        layer = _quadratic_layer(case.name)
        got_out, got_state = layer.solve(*values)
        got = layer.adjoint(values, got_state, cotangents)
        for k, (g, w) in enumerate(zip(got_out, outputs)):
            _assert_close(g, w, 1e-8, f"{which}: output {k}")
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, 1e-8, f"{which}: gradient {i}")
        monkeypatch.undo()


def _simplex_projection(a):
    """Euclidean projection of a onto {x >= 0, sum x = 1} (sort-based)."""
    u = np.sort(a)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.flatnonzero(u - css / np.arange(1, a.size + 1) > 0)[-1]
    return np.maximum(a - css[k] / (k + 1), 0.0)


def test_quadratic_objective_solves_large_data_accurately():
    # Projections onto the simplex of points with entries of several
    # thousand. In cone form (quadratic_objective=False) SCS cannot solve
    # them (SolverError, whose message points at the option); kept
    # quadratic (the default) they match the closed form to 1e-10
    # relative, and so does the gradient: dx/da = diag(s) - s s' / |s| on
    # the support s.
    x = cp.Variable(8)
    a = cp.Parameter(8)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)),
                         [x >= 0, cp.sum(x) == 1])
    rng = _rng("large_simplex")
    values = rng.normal(size=(6, 8)) * 3000.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(optlayer.SolverError,
                           match="quadratic_objective=True"):
            optlayer.Layer(problem, [a], [x],
                           quadratic_objective=False)(values)
    layer = optlayer.Layer(problem, [a], [x])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = layer(values)
    want = np.stack([_simplex_projection(v) for v in values])
    # The projection is exact once the support is found (a linear system
    # with an identity-plus-rank-one matrix): the refined point carries
    # only rounding of the data (entries ~3e3, eps 2e-16), so 1e-10 leaves
    # two orders of margin; a cone-form answer is off by 1e-3 or fails.
    _assert_close(got, want, 1e-10, "projection")
    w = rng.normal(size=(6, 8))
    (grad,) = layer.vjp([values], [w])
    for k in range(6):
        s = (want[k] > 0).astype(float)
        J = np.diag(s) - np.outer(s, s) / s.sum()
        _assert_close(grad[k], J.T @ w[k], 1e-10, f"gradient {k}")


def test_parametrized_quadratic_term():
    # p * sum_squares(x) + sum_squares(x - a): P = 2 (1 + p) I depends on
    # the parameter. x = a / (1 + p), dx/da = I / (1 + p),
    # dx/dp = -a / (1 + p)^2; and the same with a parameter-free quadratic
    # form and no constraints at all (m = 0: J = P).
    x = cp.Variable(3)
    a = cp.Parameter(3)
    p = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(p * cp.sum_squares(x) +
                                     cp.sum_squares(x - a)))
    layer = optlayer.Layer(problem, [a, p], [x], quadratic_objective=True)
    assert layer.compiled.has_P
    # Outputs: refined to KKT residuals of about 1e-12 on data of size 1,
    # so 1e-10 leaves a hundredfold margin; gradients come from one more
    # linear solve with J (condition number about 1 + p here), 1e-9.
    rng = _rng("param_quad")
    av, pv = rng.normal(size=(4, 3)), rng.uniform(0.5, 2.0, size=4)
    (got,) = layer(av, pv)
    _assert_close(got, av / (1 + pv)[:, None], 1e-10, "x")
    w = rng.normal(size=(4, 3))
    ga, gp = layer.vjp([av, pv], [w])
    _assert_close(ga, w / (1 + pv)[:, None], 1e-9, "d a")
    _assert_close(gp, -np.einsum("bi,bi->b", w, av) / (1 + pv) ** 2, 1e-9,
                  "d p")

    M = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]])
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, M) + a @ x))
    layer = optlayer.Layer(problem, [a], [x], quadratic_objective=True)
    assert layer.compiled.m == 0
    (got,) = layer(av)
    _assert_close(got, -np.linalg.solve(M, av.T).T, 1e-10, "x (m = 0)")
    (ga,) = layer.vjp([av], [w])
    _assert_close(ga, -np.linalg.solve(M, w.T).T, 1e-9, "d a (m = 0)")


@pytest.mark.parametrize("presolve", [True, False])
@pytest.mark.parametrize("objective", ["zero", "linear"])
def test_problems_the_presolve_empties(presolve, objective):
    # x == k p pins every variable and leaves no constraint: with the
    # presolve no cone program is left, and the solution x = k p has the
    # closed-form gradient k (batched and unbatched).
    x = cp.Variable(4)
    p = cp.Parameter(4)
    k = 1.0 if objective == "zero" else 2.0
    goal = cp.Minimize(0) if objective == "zero" else cp.Minimize(cp.sum(x))
    layer = optlayer.Layer(cp.Problem(goal, [x == k * p]), [p], [x],
                           presolve=presolve)
    value = np.arange(4.0)
    batch = np.stack([value, -value])
    weights = np.array([[1.0, 2, 3, 4], [0, 1, 0, 1]])
    for v, w in [(value, np.ones(4)), (batch, weights)]:
        # With the presolve no program is solved (rounding only); without
        # it the equality-only program is refined to about 1e-12.
        (sol,) = layer(v)
        _assert_close(sol, k * v, 1e-9, "solution")
        (grad,) = layer.vjp([v], [w])
        _assert_close(grad, k * w, 1e-9, "gradient")


def test_presolve_keeps_variables_of_the_quadratic_term():
    # y == b pins y, but y is in the quadratic term: it stays a variable
    # (eliminating it would make c depend on products of parameters). The
    # answer is CVXPY's (x = max(a, b)), and the gradient matches finite
    # differences.
    x = cp.Variable(3)
    y = cp.Variable(3)
    a = cp.Parameter(3)
    b = cp.Parameter(3)
    M = np.diag([2.0, 1.0, 3.0])
    problem = cp.Problem(cp.Minimize(cp.quad_form(y, M) +
                                     cp.sum_squares(x - a)),
                         [y == b, x >= y])
    layer = optlayer.Layer(problem, [a, b], [x, y], quadratic_objective=True)
    plain = optlayer.Layer(problem, [a, b], [x, y], presolve=False,
                           quadratic_objective=True)
    assert layer.compiled.n == plain.compiled.n      # nothing eliminated
    rng = _rng("presolve_quad")
    values = [rng.normal(size=(2, 3)), rng.normal(size=(2, 3))]
    got = layer(*values)
    for k in range(2):
        a.value, b.value = values[0][k], values[1][k]
        problem.solve(cp.CLARABEL, **CLARABEL_OPTIONS)
        _assert_close(got[0][k], x.value, FORWARD_RTOL, "x")
        _assert_close(got[1][k], y.value, FORWARD_RTOL, "y")
    assert_vjp_matches_finite_differences(layer, values, rng)


@pytest.mark.parametrize("case", _case_params(QUADRATIC_CASES))
def test_quadratic_objective_from_the_origin_and_warm_starts(case,
                                                            monkeypatch):
    # The other two ways a call can be solved, in the quadratic form:
    # Newton steps from the origin (forced for this small batch) and from
    # the previous call's solution (nearby values). Both accept only KKT
    # residuals of 1e-11, so they give the cone form's answers to the
    # refinement's accuracy (1e-8, as above).
    import optlayer.layer

    monkeypatch.setattr(optlayer.layer, "_COLD_MIN_WORK", 0)
    monkeypatch.setattr(optlayer.layer, "_COLD_MIN_BATCH", 0)
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables,
                           quadratic_objective=True, **case.layer_kwargs)
    rng = _rng("qorigin", case.name)
    first = make_inputs(case, rng, 3)
    second = _interpolate(first, make_inputs(case, rng, 3), 0.05)
    for values in (first, second):
        got = layer(*values)
        want = _cone_layer(case.name)(*values)
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, 1e-8, f"output {k}")


@pytest.mark.parametrize("case", _case_params(QUADRATIC_CASES))
def test_quadratic_reduced_systems_need_no_fallback(case, monkeypatch):
    # In the quadratic form the reduced systems drop the defining pairs
    # of sum_squares (r = A x - b rows and their r columns) by a Schur
    # complement. Their steps and adjoints must pass the checks against J
    # on their own: no least-squares adjoint, no full-Jacobian step and no
    # second SCS pass (each would hide a wrong elimination behind a
    # correct answer).
    import optlayer.adjoint
    import optlayer.reduced
    import optlayer.refine

    _force_system(monkeypatch, "reduced")
    fallbacks, pairs = [], []

    def forbid(name):
        def spy(*args, **kwargs):
            fallbacks.append(name)
            raise AssertionError(f"{name} was called")
        return spy

    original = optlayer.reduced._defining_pairs

    def counting(*args):
        found = original(*args)
        pairs.append(0 if found is None else found.cols.size)
        return found

    monkeypatch.setattr(optlayer.adjoint, "_adjoint_least_squares",
                        forbid("least-squares adjoint"))
    monkeypatch.setattr(optlayer.refine, "_full_step", forbid("full step"))
    monkeypatch.setattr(optlayer.Layer, "_resolve", forbid("SCS again"))
    monkeypatch.setattr(optlayer.reduced, "_defining_pairs", counting)
    layer = _quadratic_layer(case.name)
    rng = _rng("qpairs", case.name)
    values = make_inputs(case, rng, 3)
    _, state = layer.solve(*values)
    layer.adjoint(values, state, _random_cotangents(layer, 3, rng))
    assert not fallbacks
    if case.name in ("constrained_lsq", "lasso", "relu"):
        assert max(pairs) > 0, "no defining pairs found"


def test_defining_pair_variables_as_outputs(monkeypatch):
    # r == A x - b with sum_squares(r): r's columns and these rows are
    # defining pairs that the reduced systems drop. Asked for as an
    # output, r gets a cotangent, which the elimination must carry (its
    # right-hand side at r's columns). Gradients match finite differences
    # with the reduced systems forced and no fallback; outputs match
    # CVXPY.
    import optlayer.adjoint

    _force_system(monkeypatch, "reduced")

    def no_fallback(*args, **kwargs):
        raise AssertionError("the least-squares adjoint was needed")

    monkeypatch.setattr(optlayer.adjoint, "_adjoint_least_squares",
                        no_fallback)
    x = cp.Variable(3)
    r = cp.Variable(5)
    A = cp.Parameter((5, 3))
    b = cp.Parameter(5)
    c = cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(r) + c @ x),
                         [r == A @ x - b, x >= 0])
    layer = optlayer.Layer(problem, [A, b, c], [x, r],
                           quadratic_objective=True)
    rng = _rng("pair_outputs")
    values = [rng.normal(size=(3, 5, 3)), rng.normal(size=(3, 5)),
              rng.normal(size=(3, 3))]
    got = layer(*values)
    for k in range(3):
        A.value, b.value, c.value = (v[k] for v in values)
        problem.solve(cp.CLARABEL, **CLARABEL_OPTIONS)
        _assert_close(got[0][k], x.value, FORWARD_RTOL, "x")
        _assert_close(got[1][k], r.value, FORWARD_RTOL, "r")
    assert_vjp_matches_finite_differences(layer, values, rng)


def test_quadratic_objective_with_a_shared_workspace():
    # A and P do not depend on the parameters, so one SCS workspace per
    # thread serves every element and only b and c change. Set up with
    # b = c = 0, SCS could not solve this quadratic program after the
    # update (status unknown at the iteration limit); with the first
    # element's data it does, for every element of the batch.
    M = np.array([[27593.66, 22080.31, 9191.91],
                  [22080.31, 38346.85, 17027.27],
                  [9191.91, 17027.27, 9144.84]])
    e = np.array([8560.97, 1421.15, -6526.31])
    x = cp.Variable(3)
    c = cp.Parameter(3)
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, M) + c @ x
                                     + 0.3 * cp.norm2(x - e)))
    layer = optlayer.Layer(problem, [c], [x], quadratic_objective=True)
    assert layer._A_constant
    cs = np.array([-1014.075, -2129.08, 1862.9]) * np.array(
        [[1.0], [0.5], [-2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (got,) = layer(cs)
    (want,) = optlayer.Layer(problem, [c], [x],
                             quadratic_objective=False)(cs)
    # Both forms are refined to relative KKT residuals of about 1e-12 on
    # data of size 4e4; 1e-8 (relative to max(1, |x|)) covers that times
    # the conditioning of M.
    _assert_close(got, want, 1e-8, "x")


def test_badly_scaled_element_is_solved():
    # A norm bound of 4e6 on x (inactive; x = d / (1 + p) for the Huber
    # loss in its quadratic region). In the cone form SCS's 1e-4 point
    # does not polish in six Newton steps and SCS at 1e-10, warm or cold,
    # stops at its iteration limit (how far it gets depends on the
    # machine's floating point); Newton steps continued from SCS's point
    # settle within 15. Both forms give the answer.
    x = cp.Variable(4)
    d = cp.Parameter(4)
    p = cp.Parameter(nonneg=True)
    r = cp.Parameter(nonneg=True)
    problem = cp.Problem(
        cp.Minimize(cp.sum(cp.huber(x - d, 1882.8224974438103))
                    + p * cp.sum_squares(x)),
        [cp.sum_squares(x) <= r])
    values = [np.array([80.97950001948915, -139.8744018544969,
                        -92.96086892165422, 62.239104190607044]),
              2.0084987252137663, 4058125.5274443943]
    want = values[0] / (1 + values[1])
    for quadratic in (False, True):
        layer = optlayer.Layer(problem, [d, p, r], [x],
                               quadratic_objective=quadratic)
        (got,) = layer(*values)
        # SCS's last pass stops at 1e-10 relative to data of size 4e6.
        _assert_close(got, want, 1e-6, f"x (quadratic={quadratic})")


def test_tiny_norm_bound_solved_whatever_the_thread_solved_before():
    # min 1'x s.t. ||x|| <= r: x = -r (1, 1) / sqrt(2). At r = 1e-6 SCS
    # with Anderson acceleration stalls at its iteration limit from
    # scratch, and a workspace shared across elements (A is constant)
    # succeeded or failed depending on the elements solved before it.
    x = cp.Variable(2)
    r = cp.Parameter(nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.sum(x)), [cp.norm(x) <= r])
    values = np.array([1e-6, 1e-6, 1.0, 1e-6])
    want = -values[:, None] * np.ones(2) / np.sqrt(2)
    for n_jobs in (1, 2):
        layer = optlayer.Layer(problem, [r], [x], n_jobs=n_jobs,
                               warm_start=False)
        assert layer._A_constant
        (got,) = layer(values)
        # Absolute: the answers are of size 1e-6 and 1.
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
        (alone,) = layer(np.array(1e-6))
        np.testing.assert_allclose(alone, want[0], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("quadratic", [True, False])
def test_gradient_exact_where_the_system_is_singular_and_ill_conditioned(
        quadratic):
    # An inactive constraint's auxiliary variables make J singular (solved
    # regularized), and a small equality row (e = (0.018, 3e-4)) makes it
    # ill-conditioned as well (singular value 1.7e-6 against a shift of
    # 2e-8): one round of refinement after the regularized solve left the
    # gradient 2.5e-4 off, with no warning. Closed form: x = alpha v with
    # v = (-e2, e1) spanning e's null space, alpha = -v'c / (2 v'Qv).
    Q = np.array([[115.0, 14.0], [14.0, 8.0]])
    c = np.array([4.0, 1.0])
    x = cp.Variable(2)
    e = cp.Parameter((1, 2))
    problem = cp.Problem(cp.Minimize(cp.quad_form(x, Q) + c @ x),
                         [e @ x == 0, cp.sum(cp.inv_pos(x + 11)) <= 5])

    def closed_form(ev):
        v = np.array([-ev[0, 1], ev[0, 0]])
        return -(v @ c) / (2 * v @ Q @ v) * v

    ev = np.array([[0.018, 0.0003]])
    cot = np.array([1.0, 0.0])
    layer = optlayer.Layer(problem, [e], [x],
                           quadratic_objective=quadratic)
    (got,) = layer(ev)
    _assert_close(got, closed_form(ev), 1e-8, "x")
    (g,) = layer.vjp([ev], [cot])
    # The closed form's central difference (step 1e-7 on entries of size
    # 1e-2 and 3e-4: truncation and rounding both near 1e-9 relative).
    want = np.zeros((1, 2))
    for j in range(2):
        d = np.zeros((1, 2))
        d[0, j] = 1e-7
        want[0, j] = (closed_form(ev + d) - closed_form(ev - d)) @ cot / 2e-7
    _assert_close(g, want, 1e-7, "gradient in e")


def test_layer_pickles_after_cvxpy_solved_its_problem():
    # CVXPY keeps solver objects on a problem it solved, some of which do
    # not pickle; the layer's copies must not depend on what the user did
    # with the problem (say, solved it to compare).
    import copy
    import pickle

    x = cp.Variable(2)
    a = cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
    layer = optlayer.Layer(problem, [a], [x])
    a.value = np.array([1.0, -1.0])
    problem.solve(solver=cp.CLARABEL)   # keeps Clarabel's solver object
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        (out,) = twin(np.array([2.0, -3.0]))
        np.testing.assert_allclose(out, [2.0, 0.0], atol=1e-9)
        # The copy's problem still holds the copy's parameters.
        assert twin.problem.parameters()[0] is twin.parameters[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_layer_works_in_a_forked_child_after_using_its_threads():
    # A thread pool inherited through fork has no threads in the child (a
    # DataLoader worker, say): the child must solve, not wait forever.
    import multiprocessing

    c = cp.Parameter(3)
    x = cp.Variable(3)
    problem = cp.Problem(cp.Minimize(c @ x), [x >= -1, x <= 1])
    layer = optlayer.Layer(problem, [c], [x], n_jobs=2, warm_start=False)
    values = np.array([[1.0, -2.0, 0.5], [-1.0, 2.0, -0.5],
                       [0.3, 0.2, -0.1], [2.0, 1.0, 1.0]])
    (expected,) = layer(values)     # the pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child():
        (got,) = layer(values)
        queue.put(got)

    process = context.Process(target=child)
    process.start()
    process.join(60)
    hung = process.is_alive()
    if hung:
        process.kill()
    assert not hung, "the layer hung in the forked child"
    assert process.exitcode == 0
    np.testing.assert_allclose(queue.get(timeout=10), expected, atol=1e-9)


@pytest.mark.parametrize("attributes", [
    {"symmetric": True}, {"PSD": True}, {"NSD": True}, {"diag": True},
    {"sparsity": ([0, 1, 3, 2, 1], [0, 2, 1, 3, 1])},
])
def test_reduced_parameter_maps_found_by_two_probes_equal_the_full_probe(
        attributes, monkeypatch):
    # Parameters that canonicalization replaces by a selection of their
    # entries are mapped from two probes instead of one per entry; the map
    # must be the same.
    from optlayer import compile as compile_module

    S = cp.Parameter((4, 4), **attributes)
    b = cp.Parameter(4)
    x = cp.Variable(4)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(S @ x - b)), [x >= 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sparse .value
        data, chain, _ = problem.get_problem_data(cp.SCS)
    param_prob = data[cp.settings.PARAM_PROB]
    assert compile_module._selection(chain, S) is not None
    fast, _ = compile_module._param_map(chain, [S, b], param_prob)
    monkeypatch.setattr(compile_module, "_selection", lambda *args: None)
    slow, _ = compile_module._param_map(chain, [S, b], param_prob)
    assert fast.shape == slow.shape
    assert abs(fast - slow).max() == 0.0


def _mpc_problem(horizon=10):
    """A soft-constrained MPC problem with n + m + 1 > 400 (the programs
    refined with sparse LUs)."""
    nx, nu = 4, 2
    A = cp.Parameter((nx, nx))
    B = cp.Parameter((nx, nu))
    x0 = cp.Parameter(nx)
    x = cp.Variable((nx, horizon + 1))
    u = cp.Variable((nu, horizon))
    e = cp.Variable((nx, horizon + 1), nonneg=True)
    cost = 0
    constraints = [x[:, 0] == x0]
    for i in range(horizon + 1):
        cost += cp.sum_squares(x[:, i]) + 10 * cp.sum(e[:, i])
        constraints.append(cp.abs(x[:, i]) <= 2 + e[:, i])
        if i < horizon:
            cost += cp.sum_squares(u[:, i])
            constraints += [x[:, i + 1] == A @ x[:, i] + B @ u[:, i],
                            cp.abs(u[:, i]) <= 1]
    return cp.Problem(cp.Minimize(cost), constraints), [A, B, x0], [u]


def test_large_programs_are_refined_with_sparse_steps():
    # n + m + 1 = 573: Newton steps with sparse LUs polish SCS's point
    # (its Jacobian is singular there, so the regularized solve is used).
    # The solution must match Clarabel and, warm-started from a nearby
    # call, a cold solve, both to 1e-9 (the polished relative KKT
    # residual is about 1e-14; before, SCS alone at 1e-10 left 1e-8).
    problem, params, variables = _mpc_problem()
    rng = np.random.default_rng(1)
    values = [np.eye(4) + 0.1 * rng.standard_normal((4, 4)),
              rng.standard_normal((4, 2)), 5 * rng.standard_normal(4)]
    cold = optlayer.Layer(problem, params, variables, warm_start=False)
    warm = optlayer.Layer(problem, params, variables)
    assert cold.compiled.n + cold.compiled.m + 1 > \
        optlayer.adjoint.REFINE_LIMIT
    (u_cold,) = cold(*values)
    for p, v in zip(params, values):
        p.value = v
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                  tol_feas=1e-12)
    np.testing.assert_allclose(u_cold, variables[0].value, atol=1e-9)
    warm(*values)
    for _ in range(3):
        nearby = values[:2] + [values[2] + 1e-7 * rng.standard_normal(4)]
        warm(*nearby)
        (u_warm,) = warm(*values)
        np.testing.assert_allclose(u_warm, u_cold, atol=1e-9)


def test_sparse_refinement_step_equals_the_dense_one():
    # From the same start point, sparse and dense Newton steps follow the
    # same iteration: the same point to rounding (1e-10 over two steps of
    # a well-conditioned small program).
    from optlayer import refine as refine_module
    from optlayer import solve as solve_module

    case = get_case("socp")
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, warm_start=False)
    cp_ = layer.compiled
    values = make_inputs(case, _rng("sparse_step"), None)
    _, _, theta = layer._prepare(layer._as_arrays(values))
    Av, Bv, C, _, _, Pv = layer._data(theta)
    X, Y, S, _, _ = layer._solve_element(Av, Bv, C, Pv, 0,
                                         layer._first_options)
    dense = refine_module.refine(Av, cp_.A_indices, layer._A_cols, Bv, C,
                                 X[None], Y[None], S[None], cp_.dims,
                                 max_steps=2, tol=0.0)
    A = solve_module.assemble_A(Av[0], cp_.A_indices, cp_.A_indptr,
                                (cp_.m, cp_.n))
    sparse = refine_module.refine_sparse(A, Bv[0], C[0], X, Y, S, cp_.dims,
                                         max_steps=2, tol=0.0)
    for k in range(3):
        np.testing.assert_allclose(sparse[k], dense[k][0], atol=1e-10)
    assert sparse[3] <= 1e-12


def test_last_resort_keeps_the_most_accurate_inaccurate_result():
    # Where no SCS run of the last resort solves an element, the
    # inaccurate result closest to optimal (smallest KKT residual) is
    # kept, not the first; a solved one always wins.
    from optlayer import solve as solve_module

    case = get_case("lp")
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, warm_start=False)
    values = make_inputs(case, _rng("best_candidate"), 1)
    _, state = layer.solve(*values)
    _, _, theta = layer._prepare(layer._as_arrays(values))
    Av, Bv, C, _, _, Pv = layer._data(theta)
    X, Y, S = (a[0] for a in state)
    inaccurate = solve_module.SOLVED_INACCURATE
    far = (X + 0.1, Y, S, inaccurate, "far")
    near = (X + 1e-7, Y, S, inaccurate, "near")
    failed = (X, Y, S, -2, "infeasible")
    best = layer._best_candidate(Av, Bv, C, Pv, 0, [far, failed, near])
    assert best[4] == "near"
    solved = (X + 0.1, Y, S, solve_module.SOLVED, "solved")
    best = layer._best_candidate(Av, Bv, C, Pv, 0, [near, solved])
    assert best[4] == "solved"
    assert layer._best_candidate(Av, Bv, C, Pv, 0, [failed])[4] == \
        "infeasible"


def test_residual_with_a_sparse_quadratic_term_equals_the_dense_one():
    from optlayer import reduced as reduced_module
    from optlayer import refine as refine_module

    case = get_case("qp")
    problem, params, variables = case.build()
    layer = optlayer.Layer(problem, params, variables, warm_start=False)
    cp_ = layer.compiled
    assert cp_.has_P
    values = make_inputs(case, _rng("sparse_quadratic"), 3)
    _, (X, Y, S) = layer.solve(*values)
    _, _, theta = layer._prepare(layer._as_arrays(values))
    Av, Bv, C, _, _, Pv = layer._data(theta)
    X = X + 1e-3      # away from the solution: the terms matter
    P = layer._quad(Pv)
    args = (Av, cp_.A_indices, layer._A_cols, Bv, C, X, Y, S)
    dense = refine_module.residual(
        *args, Pq=reduced_module.dense_P(P, cp_.n))
    sparse = refine_module.residual(*args, P=P)
    np.testing.assert_allclose(sparse, dense, rtol=1e-12)
    assert np.all(dense > 1e-6)
