"""Solve a batch of cone programs with SCS in a thread pool."""

import importlib

import numpy as np
import scipy.sparse as sp
import scs

from optlayer.errors import SolverError

# Tight by default: the adjoint differentiates the optimality conditions at
# the returned point, so the gradient is only as accurate as the solution.
# At 1e-10 the gradients of the test problems match central finite
# differences to 1e-6 or better; SCS's own default (1e-4) leaves errors of
# about 1e-3 in outputs and gradients.
DEFAULT_SOLVER_OPTIONS = {
    "eps_abs": 1e-10,
    "eps_rel": 1e-10,
    "eps_infeas": 1e-9,
    "max_iters": 100_000,
    "verbose": False,
}

# With Newton refinement (optlayer.refine) SCS only has to come near the
# active set; refinement then takes the solution to machine accuracy.
REFINED_SOLVER_OPTIONS = {
    "eps_abs": 1e-4,
    "eps_rel": 1e-4,
}

# SCS's first pass goes to this tolerance instead on cones with curved
# blocks (second-order, PSD, exponential, power cones of size 2 or more):
# there Newton steps converge quadratically rather than finishing once the
# active set is found, and a few hundred more SCS iterations (about 0.05
# ms on small programs) save one of the two or three steps from 1e-4
# (each about 0.2 ms, most of it fixed overhead). Measured on one core: a
# 10-variable SOCP with four cones 1.19 -> 0.96 ms per solve, logistic
# regression (exponential cones) 21 -> 16 ms; on LPs SCS's extra
# iterations cost more than they save (2.8 -> 2.9 ms).
CURVED_FIRST_EPS = 1e-6

# SCS's linear-system backends (its setting ``linear_solver``). SCS's own
# default picks MKL's sparse solver where MKL is installed; on the small
# programs of a layer its setup costs more than the solve (a 50-variable LP
# with a dense 200 x 50 A: 16 ms per solve against 8 ms with QDLDL and 5 ms
# with the dense solver; see benchmarks/linear_solvers.py).
DENSE = "cpu_dense"
SPARSE = "qdldl"
try:
    importlib.import_module("scs._scs_dense")
except ImportError:          # an SCS build without its dense backend
    DENSE = None


def linear_solver(n, nnz):
    """SCS's linear-system backend for a program with n variables and nnz
    nonzeros in A: the dense one (it factors an n x n matrix) where that
    matrix has no more entries than A, QDLDL (a sparse LDL factorization of
    the full KKT matrix) otherwise."""
    if DENSE is not None and n * n <= nnz:
        return DENSE
    return SPARSE


# SCS 3 status values.
SOLVED = 1
SOLVED_INACCURATE = 2
# Statuses with a certificate of infeasibility or unboundedness (not
# their inaccurate forms: SCS ends feasible programs it cannot solve, e.g.
# on badly scaled data, "infeasible (inaccurate - reached max_iters)").
CERTIFICATES = (scs.INFEASIBLE, scs.UNBOUNDED)


def check_options(options):
    """Raise ValueError, naming ``solver_options``, if SCS rejects the
    settings (checked once on a one-variable program, so that a misspelt
    or outdated name fails when the layer is built, not at its first
    call)."""
    data = {"A": sp.csc_matrix(np.ones((1, 1))), "b": np.ones(1),
            "c": np.ones(1)}
    try:
        # Quietly: verbose=True is for the layer's solves, not this probe.
        scs.SCS(data, {"l": 1}, **{**options, "verbose": False})
    except (TypeError, ValueError) as exc:
        hint = ""
        if "eps" in options:
            hint = (" SCS 3 has no 'eps' setting: use eps_abs and "
                    "eps_rel.")
        raise ValueError(
            f"solver_options were rejected by SCS: {exc}.{hint}") from exc


def solve_one(A, b, c, cone, options, warm=None, P=None):
    """Solve one cone program; return (x, y, s, status_val, status).

    ``P``: the objective's quadratic term (upper triangle, CSC), if any.
    """
    data = {"A": A, "b": b, "c": c}
    if P is not None:
        data["P"] = P
    solver = scs.SCS(data, cone, **options)
    if warm is not None:
        result = solver.solve(warm_start=True, x=warm[0], y=warm[1],
                              s=warm[2])
    else:
        result = solver.solve()
    info = result["info"]
    return (result["x"], result["y"], result["s"], int(info["status_val"]),
            str(info["status"]))


class Workspace:
    """An SCS workspace for a fixed A, reused across b and c.

    SCS factors its linear system once per workspace; later solves only
    change b and c. A workspace is used by one thread at a time.
    """

    def __init__(self, A, cone, options, P=None, b=None, c=None):
        n = A.shape[1]
        m = A.shape[0]
        # SCS sets its scaling up from the data it starts with. Without a
        # quadratic term b = c = 0 is used (the well-tried choice: one
        # element's b and c can be badly scaled for the others); with
        # one, b = c = 0 left later updates unsolvable (status "unknown",
        # iteration limit), so callers pass their first element's b and c.
        data = {"A": A, "b": np.zeros(m) if b is None else b,
                "c": np.zeros(n) if c is None else c}
        if P is not None:
            data["P"] = P
        self._solver = scs.SCS(data, cone, **options)

    def solve(self, b, c, warm=None):
        """Solve with new b and c; return (x, y, s, status_val, status)."""
        self._solver.update(b=b, c=c)
        if warm is not None:
            result = self._solver.solve(warm_start=True, x=warm[0],
                                        y=warm[1], s=warm[2])
        else:
            # No implicit warm start from this thread's previous element:
            # results must not depend on scheduling.
            result = self._solver.solve(warm_start=False)
        info = result["info"]
        return (result["x"], result["y"], result["s"],
                int(info["status_val"]), str(info["status"]))


# An inaccurate SCS result (iteration limit) whose relative KKT residual
# is above this is a failure, not an answer: nearly infeasible programs
# end there with points that violate their constraints.
INACCURATE_LIMIT = 1e-6


def check_statuses(status_vals, statuses, batched, indices=None,
                   batch_size=None, residuals=None,
                   quadratic_objective=False):
    """Raise SolverError for failed elements, warn for inaccurate ones.

    Args:
        status_vals, statuses: SCS's status value and text per element.
        batched: whether the call had a batch dimension (for the message).
        indices: the batch index of each element (default 0, 1, ...).
        batch_size: the size of the whole batch (default: len(statuses)).
        residuals: optional relative KKT residual per element; inaccurate
            elements above ``INACCURATE_LIMIT`` then count as failed.
        quadratic_objective: the layer keeps its objective quadratic (for
            the message's hint).
    """
    failed = failures(status_vals, statuses, indices, residuals)
    batch_size = len(statuses) if batch_size is None else batch_size
    if failed:
        raise solver_error(failed, batched, batch_size, quadratic_objective)
    status_vals = np.asarray(status_vals)
    if indices is None:
        indices = np.arange(status_vals.size)
    warn_inaccurate(np.asarray(indices)[status_vals == SOLVED_INACCURATE],
                    stacklevel=5)


def warn_inaccurate(elements, stacklevel):
    """The RuntimeWarning for batch elements SCS left inaccurate (none
    for an empty list)."""
    import warnings

    elements = [int(i) for i in elements]
    if elements:
        warnings.warn(
            "SCS returned an inaccurate solution for batch element(s) "
            f"{elements[:20]}; outputs and gradients may be inaccurate. "
            "Raise max_iters (or time_limit_secs, if set) in "
            "solver_options.",
            RuntimeWarning, stacklevel=stacklevel)


def failures(status_vals, statuses, indices=None, residuals=None):
    """The failed elements as a dict batch index -> status text (see
    :func:`check_statuses` for the arguments)."""
    status_vals = np.asarray(status_vals)
    if indices is None:
        indices = np.arange(status_vals.size)
    # SCS leaves the text empty when it cannot tell the status.
    statuses = [_status_text(s) for s in statuses]
    if residuals is not None:
        residuals = np.asarray(residuals)
        too_far = (status_vals == SOLVED_INACCURATE) & ~(
            residuals <= INACCURATE_LIMIT)
        for k in np.flatnonzero(too_far):
            statuses[k] = (f"{statuses[k]}, relative KKT residual "
                           f"{residuals[k]:.1e}")
        status_vals = np.where(too_far, -1, status_vals)
    bad = (status_vals != SOLVED) & (status_vals != SOLVED_INACCURATE)
    return {int(i): statuses[k] for k, i in
            zip(np.flatnonzero(bad), np.asarray(indices)[bad])}


def _status_text(status):
    """SCS's status text, "unknown" where SCS left it empty."""
    text = str(status).strip()
    if not text or text.startswith("("):
        text = ("unknown " + text).strip()
    return text


def solver_error(failed, batched, batch_size, quadratic_objective=False):
    """The SolverError for ``failed`` (batch index -> status text)."""
    order = sorted(failed)
    if batched:
        listing = ", ".join(f"{i}: {failed[i]}" for i in order[:20])
        more = "" if len(order) <= 20 else f" (and {len(order) - 20} more)"
        what = (f"{len(order)} of {batch_size} batch elements "
                f"(element: status) {listing}{more}")
    else:
        what = f"the problem: {failed[order[0]]}"
    hint = ""
    # Inaccurate ends: SCS's inaccurate statuses, and the points where
    # Newton refinement did not converge (kept where they were the most
    # accurate of an element's results).
    if any("inaccurate" in failed[i] or "did not converge" in failed[i]
           for i in order):
        hint = (" Inaccurate statuses on a feasible problem usually mean "
                "badly scaled data: squared norms (sum_squares, quad_form) "
                "of quantities of size 100 or more become cone "
                "constraints on their squares that SCS cannot solve "
                "accurately. ")
        if quadratic_objective:
            hint += ("Those of the objective are kept quadratic already "
                     "(quadratic_objective=True); in constraints, and for "
                     "other badly scaled data, rescale the parameters to "
                     "about 1.")
        else:
            hint += ("In the objective, construct the layer with "
                     "quadratic_objective=True, which keeps them "
                     "quadratic; elsewhere, rescale such parameters to "
                     "about 1.")
    return SolverError(
        f"The solver failed on {what}. "
        "Check that the parameter values give a feasible, bounded "
        "problem; for 'solved_inaccurate' or iteration limits, raise "
        "max_iters or loosen eps_abs/eps_rel in solver_options." + hint,
        elements=order,
        statuses=[failed[i] for i in order],
    )


def assemble_A(values, indices, indptr, shape):
    """A CSC matrix with a fixed pattern and the given values."""
    return sp.csc_matrix((values, indices, indptr), shape=shape)


def assemble_P(values, rows, cols, n):
    """The upper triangle of P (CSC), as SCS takes it, from its values at
    (rows, cols) (both triangles)."""
    upper = rows <= cols
    return sp.csc_matrix((values[upper], (rows[upper], cols[upper])),
                         shape=(n, n))
