"""The NumPy layer: batched forward solve and its vector-Jacobian product."""

import collections.abc
import concurrent.futures
import logging
import math
import os
import threading
import warnings

import numpy as np
import scipy.sparse as sp
import threadpoolctl

from optlayer import adjoint as _adjoint
from optlayer import cones
from optlayer import reduced as _reduced
from optlayer import refine as _refine
from optlayer import solve as _solve
from optlayer import compile as _compile
from optlayer.compile import compile_problem

logger = logging.getLogger("optlayer")

# Attributes of a cvxpy.Parameter that restrict its values.
_DOMAIN_ATTRIBUTES = ("nonneg", "pos", "nonpos", "neg", "diag", "symmetric",
                      "PSD", "NSD", "bounds", "integer", "boolean",
                      "sparsity")
# A refined solution is accepted at this relative KKT residual.
_REFINE_ACCEPT = 1e-9
# Newton steps from the previous call's solution replace the solver only
# where they reach this residual (so warm starts cost no accuracy), within
# this many steps.
_WARM_ACCEPT = 1e-11
_WARM_STEPS = 10
# Without a previous solution, Newton steps from the origin: at most this
# many, and an element whose residual is still above _COLD_GIVE_UP after
# _COLD_CHECK steps stops (it goes to SCS). From the origin the first step
# overshoots (residuals of 1e8 and more) and the next ones recover where
# the method converges (least squares, second-order cones, the seed's
# layers: within 10 to 20 steps); on LPs it typically does not.
_COLD_STEPS = 20
_COLD_CHECK = 3
_COLD_GIVE_UP = 1e4
# ... for batches of at least _COLD_MIN_BATCH elements where batch *
# nnz(A) is at least _COLD_MIN_WORK times (number of cone blocks + 1): a
# stacked Newton step has a fixed cost of about a tenth of a millisecond
# per cone block, while SCS's cost per element grows with nnz(A); for
# small batches 10 to 20 steps cost more than SCS and a few polishing
# steps. (Measured crossovers, with SCS's backend chosen by the shape of
# A: least squares, 1 cone and 5,052 nonzeros, at 16 to 64 elements; the
# seed's ReLU layer, 1 cone and 42 nonzeros, at 128 to 300; a SOCP with 4
# cones and 168 nonzeros above 128.) Programs with a quadratic objective
# (least squares kept quadratic) try them at any batch size: from the
# origin they typically converge in a few steps, and one least-squares
# problem (A 100 x 50, x >= 0) took 3.4 ms that way against 6.3 ms with
# SCS first.
_COLD_MIN_BATCH = 16
_COLD_MIN_WORK = 4000
# Elements that six Newton steps did not refine take up to this many more
# before SCS is run again (a semismooth Newton iteration from a point of
# badly scaled data can take 10 to 20 steps to settle its active set, its
# residual rising above 1e-2 on the way), unless their residual is still
# above _LONG_GIVE_UP after _LONG_CHECK steps.
_LONG_STEPS = 24
_LONG_CHECK = 8
_LONG_GIVE_UP = 1.0
# SCS's tolerance for a second try at elements that did not refine.
_RESOLVE_EPS = 1e-7
# A degenerate element warns where its two one-sided gradients differ by
# more than this, relative to 1 + the largest gradient entry (both are
# exact solutions of nonsingular systems; they agree to about 1e-10 where
# the degeneracy does not matter).
_ONE_SIDED_TOL = 1e-6
# SCS without Anderson acceleration, for a last try.
_NO_ACCELERATION = {"acceleration_lookback": 0}
# Memory for one chunk of the stacked dense adjoint.
_DENSE_CHUNK_BYTES = 64 * 2**20
# Batches of at least _THREADED_DENSE_BATCH programs with m n at least
# _THREADED_DENSE_SIZE refine and differentiate on all threads, others on
# the calling thread (see Layer._dense_jobs).
_THREADED_DENSE_SIZE = 4000
_THREADED_DENSE_BATCH = 64


class Layer:
    """A parametrized convex problem as a differentiable function.

    The layer maps parameter values to the solution of ``problem`` and, by
    :meth:`vjp` or :meth:`adjoint`, gradients of a loss on that solution back
    to the parameters. It is compiled once, here; calls only touch NumPy,
    SciPy and SCS.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: every ``cvxpy.Parameter`` of the problem, each once; the
            layer takes their values in this order.
        variables: the outputs: ``cvxpy.Variable`` objects of the problem or
            dual variables of its constraints
            (``constraint.dual_variables[0]``).
        solver_options: settings passed to SCS, over the defaults
            ``optlayer.solve.DEFAULT_SOLVER_OPTIONS`` (eps_abs = eps_rel =
            1e-10, max_iters = 100000): tight, because gradients are only as
            accurate as the solution they are taken at. With refinement
            and the default limits, an element that SCS's last, tight
            pass leaves inaccurate (iteration limit) is a failure unless
            its relative KKT residual is at most 1e-6 (then a warning);
            without refinement, or if max_iters, time_limit_secs, eps_abs
            or eps_rel are set here, inaccurate elements only warn. With
            refinement, SCS's loose first pass uses the backend for its
            linear systems (``linear_solver``) that suits A: the dense one
            where n * n <= nnz(A), QDLDL otherwise; a ``linear_solver``
            given here is used instead.
        n_jobs: threads for the batch (default None, or -1: the number
            of CPUs).
        warm_start: start each call from the previous call's solution when
            the batch size is unchanged (default True). With refinement on,
            Newton steps from there usually solve every element without
            SCS (in a training loop parameters move little between calls);
            an element they do not solve to a relative KKT residual of
            1e-11 goes to SCS as usual, so results agree with a cold start
            to about 1e-12. Without refinement, SCS itself is warm-started.
            Where the solution is not unique, any optimal point may be
            returned (with or without warm starts), and which one can
            depend on earlier calls; so can its gradient.
        presolve: eliminate variables pinned by an equality to an affine
            function of the parameters before solving (see
            ``optlayer.presolve``); the results are the same either way.
        refine: polish each solution by Newton steps on the cone program's
            residual map (``optlayer.refine``) to a relative KKT residual of
            about 1e-12: stacked dense steps for programs with n + m + 1
            <= 400, a sparse LU per step and element for larger ones
            (which do not start Newton steps from the origin and do not
            extrapolate warm starts). SCS then only needs to reach 1e-4
            (the default eps_abs/eps_rel in this mode; its first pass goes
            to 1e-6 on cones with curved blocks); an element that does
            not refine takes more Newton steps, then is solved again by
            SCS from there at 1e-7 and refined, and if that fails too,
            solved at 1e-10.
        quadratic_objective: keep a quadratic objective (sum_squares,
            quad_form, ...) as the quadratic term of the cone program
            (SCS's P; default True). With False, CVXPY's cone form is
            solved instead, where sum_squares(r) becomes a second-order
            cone constraint on an epigraph variable of size ||r||^2,
            which SCS cannot solve accurately once r is of size 100 or
            more (such elements raise SolverError). The quadratic form
            has one more variable and equality per residual entry; the
            Newton and backward systems eliminate them again, and
            without a start point Newton steps from the origin are
            tried first at any batch size (they usually solve least
            squares without SCS).

    Inputs and batching: each value has the parameter's shape (unbatched,
    shared by the whole batch) or one more leading dimension (batched). All
    batched values must have the same batch size (a batch size of 1
    broadcasts). Outputs carry the batch dimension if any input does.

    Example:
        >>> x = cp.Variable(2)
        >>> a = cp.Parameter(2)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
        >>> layer = optlayer.Layer(prob, [a], [x])
        >>> (sol,) = layer(np.array([1.0, -1.0]))      # ~ [1, 0]
        >>> (grad,) = layer.vjp([np.array([1.0, -1.0])], [np.ones(2)])

    Raises:
        ValueError: at construction, if the problem is not DPP or the
            parameters or variables do not match the problem; at call time,
            for values of the wrong shape, non-finite values, or values
            outside a parameter's declared domain.
        optlayer.SolverError: if any solve in the batch fails.
    """

    def __init__(self, problem, parameters, variables, *,
                 solver_options=None, n_jobs=None, warm_start=True,
                 presolve=True, refine=True, quadratic_objective=True):
        for name, flag in (("warm_start", warm_start), ("presolve", presolve),
                           ("refine", refine),
                           ("quadratic_objective", quadratic_objective)):
            _check_flag(name, flag)
        solver_options = _check_solver_options(solver_options)
        self.problem = problem
        self.parameters = tuple(_compile.as_list(parameters))
        self.variables = tuple(_compile.as_list(variables))
        self.compiled = compile_problem(problem, self.parameters,
                                        self.variables, presolve=presolve,
                                        quadratic_objective=quadratic_objective)
        # Whether the solver's matrix A is the same for every theta.
        cp_ = self.compiled
        N = cp_.n + cp_.m + 1
        self.refine = bool(refine)
        # Larger programs take Newton steps one element at a time, with a
        # sparse LU.
        self._sparse_refine = self.refine and N > _adjoint.REFINE_LIMIT
        options = dict(_solve.DEFAULT_SOLVER_OPTIONS)
        if self.refine:
            options.update(_solve.REFINED_SOLVER_OPTIONS)
        options.update(solver_options or {})
        _solve.check_options(options)
        self.solver_options = options
        # SCS's first, loose pass before refinement uses the backend for
        # its linear systems that suits the shape of A (unless the user
        # chose one). Its tight passes keep SCS's default backend: with
        # the dense or QDLDL backends SCS missed 1e-10 on some test
        # programs that it reaches with the default.
        self._first_options = dict(options)
        if self.refine and "linear_solver" not in (solver_options or {}):
            self._first_options["linear_solver"] = _solve.linear_solver(
                cp_.n, cp_.A_indices.size)
        if self.refine and _is_curved(cp_.dims) and not set(
                solver_options or {}) & {"eps_abs", "eps_rel"}:
            for key in ("eps_abs", "eps_rel"):
                self._first_options[key] = _solve.CURVED_FIRST_EPS
        # Whether the user limited SCS (inaccurate results then only warn).
        self._user_limits = bool(set(solver_options or {}) & {
            "max_iters", "time_limit_secs", "eps_abs", "eps_rel"})
        self.quadratic_objective = bool(quadratic_objective)
        self.n_jobs = _check_n_jobs(n_jobs)
        self.warm_start = bool(warm_start)
        self._last_solution = None
        self._previous_solution = None
        # Whether Newton steps from the origin solve this problem; None
        # until the first call without a start point has tried.
        self._cold_newton = False if self._sparse_refine else None
        self._data_cache = None
        self._last_layout = None
        self._pool = None
        self._local = threading.local()
        cp_ = self.compiled
        self._cone = cp_.dims.to_scs()
        self._cone_blocks = sum(1 for _ in cones._blocks(cp_.dims))
        self._A_constant = cp_.A_is_constant and cp_.m > 0 and cp_.n > 0
        # Column of each value of A (its row is compiled.A_indices).
        self._A_cols = np.repeat(np.arange(cp_.n), np.diff(cp_.A_indptr))
        elim = cp_.elim
        nnz_e = elim.Ae_rows.size
        # Scatter matrices for the bilinear term A_e(theta) w(theta).
        self._to_rows = sp.csr_matrix(
            (np.ones(nnz_e), (elim.Ae_rows, np.arange(nnz_e))),
            shape=(cp_.m, nnz_e))
        self._to_cols = sp.csr_matrix(
            (np.ones(nnz_e), (np.arange(nnz_e), elim.Ae_cols)),
            shape=(nnz_e, elim.size))
        # Transposes for the backward pass, made once (SciPy would make
        # them on every product of a dense array with a sparse matrix).
        self._T_t = tuple(_transposed(M) for M in (
            elim.T_Ae, elim.W_map, self._to_rows, self._to_cols))
        # The maps theta -> (A values, b, c, P values) stacked, one product
        # each way (the backward's transposed), and where each part starts.
        stacked = sp.vstack([cp_.T_A, cp_.T_b, cp_.T_c, cp_.T_P],
                            format="csr")
        self._T_data = stacked
        self._T_data_t = _transposed(stacked)
        self._data_splits = np.cumsum([cp_.T_A.shape[0], cp_.T_b.shape[0],
                                       cp_.T_c.shape[0]])
        # Candidate defining pairs of a quadratic objective.
        self._pairs = (_reduced.pair_candidates(
            cp_.A_indices, self._A_cols, cp_.P_rows, cp_.P_cols, cp_.n,
            cp_.dims.zero) if cp_.has_P else None)
        self._param_sizes = tuple(int(np.prod(shape, dtype=int))
                                  for shape in cp_.param_shapes)
        # Parameters whose declared attributes restrict their values.
        self._domain_checked = tuple(
            i for i, p in enumerate(self.parameters)
            if any(p.attributes.get(a) for a in _DOMAIN_ATTRIBUTES))
        self._R_t = tuple(
            (_transposed(out.R),
             _transposed(out.R_elim) if out.source == "x" and elim.size
             else None)
            for out in cp_.outputs)
        logger.debug("compiled problem: n=%d, m=%d, %d parameter entries",
                     cp_.n, cp_.m, cp_.num_params)

    # -- shapes ----------------------------------------------------------

    @property
    def param_shapes(self):
        """The parameters' shapes (unbatched), in input order."""
        return self.compiled.param_shapes

    @property
    def output_shapes(self):
        """The outputs' shapes (unbatched), in output order."""
        return tuple(o.shape for o in self.compiled.outputs)

    def state_shapes(self, batch_size):
        """Shapes of the arrays returned as ``state`` by :meth:`solve`."""
        n, m = self.compiled.n, self.compiled.m
        return ((batch_size, n), (batch_size, m), (batch_size, m))

    def batch_size(self, *values):
        """The batch size of the inputs, or None if none is batched.

        Validates the shapes exactly like a call would.
        """
        values = self._as_arrays(values)
        return self._batch_layout(values)[0]

    # -- public calls ----------------------------------------------------

    def __call__(self, *values):
        """Solve for the given parameter values; return the outputs."""
        return self.solve(*values)[0]

    def solve(self, *values, warm_start=None):
        """Solve the batch.

        Args:
            *values: one array per parameter.
            warm_start: optional ``state`` of an earlier call with the same
                batch size to start from.

        Returns:
            ``(outputs, state)``: ``outputs`` is a tuple with one array per
            requested variable; ``state`` is the tuple ``(x, y, s)`` of the
            solver's primal-dual solution, each of shape (batch, size), which
            :meth:`adjoint` takes back.
        """
        with _blas_single_thread():
            return self._solve(values, warm_start)

    def _solve(self, values, warm_start):
        values = self._as_arrays(values)
        batch, batched, theta = self._prepare(values)
        if batch == 0:
            # An empty batch: empty outputs, nothing to solve.
            cp_ = self.compiled
            state = tuple(np.zeros(shape) for shape in self.state_shapes(0))
            return tuple(np.zeros((0,) + out.shape)
                         for out in cp_.outputs), state
        Av, Bv, C, w, _, Pv = self._data(theta)
        if warm_start is None and self.warm_start:
            last = self._last_solution
            if last is not None and last[0].shape[0] == batch:
                warm_start = last
                prev = self._previous_solution
                if self.refine and prev is not None and \
                        prev[0].shape[0] == batch:
                    warm_start = self._extrapolate(Av, Bv, C, Pv, prev,
                                                   last)
        X, Y, S = self._solve_batch(Av, Bv, C, Pv, batched, warm_start)
        if self.warm_start:
            self._previous_solution = self._last_solution
            self._last_solution = (X, Y, S)
        outputs = self._recover(X, Y, w, batched)
        return outputs, (X, Y, S)

    def adjoint(self, values, state, cotangents, needs_grad=None):
        """Gradients of the parameters from cotangents of the outputs.

        Args:
            values: the parameter values the state was computed at.
            state: the ``state`` returned by :meth:`solve`.
            cotangents: one array (or None for zero) per output, shaped like
                the outputs.
            needs_grad: optional booleans, one per parameter; parameters
                marked False get None instead of a gradient.

        Returns:
            A tuple with one gradient per parameter, shaped like its input
            value (summed over the batch for unbatched inputs).
        """
        if needs_grad is not None:
            needs_grad = list(needs_grad)
            if len(needs_grad) != len(self.parameters):
                raise ValueError(
                    f"needs_grad has {len(needs_grad)} entries; expected "
                    f"{len(self.parameters)}, one per parameter "
                    f"({', '.join(self.compiled.param_names)}).")
        with _blas_single_thread():
            return self._adjoint(values, state, cotangents, needs_grad)

    def _adjoint(self, values, state, cotangents, needs_grad):
        values = self._as_arrays(values)
        batch, batched, theta = self._prepare(values)
        cp_ = self.compiled
        X, Y, S = self._check_state(state, batch, "state")
        if not all(np.isfinite(a).all() for a in (X, Y, S)):
            raise ValueError(
                "state has NaN or infinite entries; pass the state that "
                "solve() returned for these values.")
        if len(cotangents) != len(cp_.outputs):
            raise ValueError(
                f"Expected {len(cp_.outputs)} cotangent(s), one per output "
                f"({', '.join(out.name for out in cp_.outputs)}; None for "
                f"zero), got {len(cotangents)}.")
        gx = np.zeros((batch, cp_.n))
        gy = np.zeros((batch, cp_.m))
        gw = np.zeros((batch, cp_.elim.size))
        for k, (out, cot) in enumerate(zip(cp_.outputs, cotangents)):
            if cot is None:
                continue
            cot = np.asarray(cot, dtype=np.float64)
            expected = ((batch,) + out.shape) if batched else out.shape
            if cot.shape != expected:
                raise ValueError(
                    f"Cotangent {k} for output '{out.name}' has shape "
                    f"{cot.shape}; expected {expected}."
                )
            flat = _vec_f(cot, batched).reshape(batch, out.R.shape[0])
            R_t, R_elim_t = self._R_t[k]
            if out.source == "x":
                gx += _times(flat, R_t)
                if cp_.elim.size:
                    gw += _times(flat, R_elim_t)
            else:
                gy += _times(flat, R_t)
        gs = np.zeros_like(gy)
        if batch == 0:
            return self._split_gradient(np.zeros((0, theta.shape[1])),
                                        values, 0, needs_grad)

        Av, Bv, C, w, vals_e, Pv = self._data(theta)

        N = cp_.n + cp_.m + 1
        if N == 1:
            # The presolve eliminated every variable and no constraint is
            # left: the outputs depend on the parameters only through the
            # eliminated variables (their cotangents are in gw).
            dA, db, dc = (np.zeros((batch, 0)) for _ in range(3))
            dP = np.zeros((batch, Pv.shape[1]))
        elif N <= _adjoint.DENSE_LIMIT:
            # Stacked dense solves, in chunks of bounded memory.
            step = max(1, int(_DENSE_CHUNK_BYTES // (8 * (N + 1) ** 2)))
            step = min(step, -(-batch // self._dense_jobs(batch)))
            rows, cols = cp_.A_indices, self._A_cols

            singular = np.zeros(batch, dtype=bool)

            def chunk(lo):
                sl = slice(lo, lo + step)
                return _adjoint.adjoint_dense(
                    Av[sl], rows, cols, Bv[sl], C[sl], X[sl], Y[sl], S[sl],
                    gx[sl], gy[sl], gs[sl], cp_.dims, P=self._quad(Pv[sl]),
                    flags=singular[sl])

            results = self._map(chunk, range(0, batch, step))
            dA, db, dc, dP = (np.concatenate([r[k] for r in results])
                              for k in range(4))
            # Known limit: checked by stacked dense solves up to n + m =
            # 100; above, a sparse LU per singular element would cost
            # about four times the whole adjoint (a batch of 128 40-cone
            # SOCPs, n + m = 343, all singular from harmless epigraph
            # variables: 76 -> 340 ms), so those are not checked.
            if singular.any() and cp_.n + cp_.m <= _reduced.FULL_SIZE:
                self._warn_not_unique(
                    np.flatnonzero(singular), Av, Pv, X, Y, S, w, vals_e,
                    batched, (gx, gy, gs))
        else:
            def one(i):
                A = _solve.assemble_A(Av[i], cp_.A_indices, cp_.A_indptr,
                                      (cp_.m, cp_.n))
                P = self._quad(Pv[i])
                return _adjoint.adjoint_one(A, Bv[i], C[i], X[i], Y[i],
                                            S[i], gx[i], gy[i], gs[i],
                                            cp_.dims, P=P)

            results = self._map(one, range(batch))
            dA, db, dc, dP = (np.stack([r[k] for r in results])
                              for k in range(4))
            # Checked here at any size: the adjoint of a singular element
            # already cost a dense fallback or LSQR, more than the check.
            singular = np.array([r[4] for r in results], dtype=bool)
            if singular.any():
                self._warn_not_unique(
                    np.flatnonzero(singular), Av, Pv, X, Y, S, w, vals_e,
                    batched, (gx, gy, gs))
        dtheta = self._theta_gradient(dA, db, dc, dP, w, vals_e, gw)
        degenerate = np.flatnonzero(cones.degenerate_elements(Y, S, cp_.dims))
        if degenerate.size and N <= _adjoint.DENSE_LIMIT:
            degenerate = self._one_sided_differ(
                degenerate, Av, Bv, C, Pv, X, Y, S, gx, gy, gs, w, vals_e,
                gw, dtheta)
        self._warn_degenerate(degenerate, batched)
        return self._split_gradient(dtheta, values, batch, needs_grad)

    def _one_sided_differ(self, which, Av, Bv, C, Pv, X, Y, S, gx, gy, gs,
                          w, vals_e, gw, dtheta):
        """The elements of ``which`` (degenerate solutions) whose gradient
        changes when every degenerate part takes its other one-sided
        derivative (``cones.flip_degenerate``). Where it does not, the
        degeneracy does not reach the requested gradient (e.g. the
        non-unique epigraph variables of an inactive norm1 bound, one of
        whose constraints sits at 0 with a zero multiplier)."""
        cp_ = self.compiled
        dA, db, dc, dP = _adjoint.adjoint_other_side(
            Av[which], cp_.A_indices, self._A_cols, Bv[which], C[which],
            X[which], Y[which], S[which], gx[which], gy[which], gs[which],
            cp_.dims, P=self._quad(Pv[which]))
        other = self._theta_gradient(dA, db, dc, dP, w[which],
                                     vals_e[which], gw[which])
        here = dtheta[which]
        size = 1.0 + np.abs(here).max(axis=1, initial=0.0)
        return which[np.abs(other - here).max(axis=1, initial=0.0)
                     > _ONE_SIDED_TOL * size]

    def _theta_gradient(self, dA, db, dc, dP, w, vals_e, gw):
        """The gradient in theta from those in the cone data (and ``gw``,
        the cotangents of eliminated variables)."""
        T_Ae_t, W_map_t, rows_t, cols_t = self._T_t
        dtheta = _times(np.concatenate([dA, db, dc, dP], axis=1),
                        self._T_data_t)
        if self.compiled.elim.size:
            # Chain rule through b = T_b theta - A_e(theta) w(theta).
            dbe = _times(db, rows_t)               # db at each A_e value
            d_vals = -dbe * (self._to_cols @ w.T).T
            gw = gw - _times(dbe * vals_e, cols_t)
            dtheta = dtheta + _times(d_vals, T_Ae_t) + _times(gw, W_map_t)
        return np.asarray(dtheta)

    def _warn_not_unique(self, which, Av, Pv, X, Y, S, w, vals_e, batched,
                         cotangents):
        """Warn where the outputs or the gradient are not unique, at
        elements ``which`` whose Jacobian J of the residual map was
        singular (see ``adjoint.null_direction_gradients``).

        Outputs: where the cotangents (gx, gy, gs) weigh a direction of
        null(J), J' r = g has no solution: the requested outputs differ
        between optimal points (a face of optimal solutions, multipliers
        shared by redundant constraints). Gradient: J' r = g has the
        solutions r + null(J'), and the gradient moves with them unless
        the parameters' derivative of the data is orthogonal to null(J')
        (a non-unique auxiliary variable, say the epigraph variable of an
        inactive norm bound, is harmless on both counts)."""
        cp_ = self.compiled
        N = cp_.n + cp_.m
        # Stacked dense solves for small programs; large ones (sparse
        # adjoint) one element at a time, with a sparse LU.
        dense = N <= _reduced.FULL_SIZE
        step = (max(1, int(_DENSE_CHUNK_BYTES // (8 * 3 * N * N)))
                if dense else 1)
        rng = np.random.default_rng(0)
        gx, gy, gs = cotangents
        bad, faces = [], []
        for lo in range(0, which.size, step):
            idx = which[lo:lo + step]
            if dense:
                dA, db, dc, dP, in_null, face = \
                    _adjoint.null_direction_gradients(
                        Av[idx], cp_.A_indices, self._A_cols, X[idx],
                        Y[idx], S[idx], cp_.dims, self._quad(Pv[idx]), rng,
                        gx[idx], gy[idx], gs[idx])
            else:
                i = int(idx[0])
                dA, db, dc, dP, in_null, face = \
                    _adjoint.null_direction_gradients_sparse(
                        _solve.assemble_A(Av[i], cp_.A_indices,
                                          cp_.A_indptr, (cp_.m, cp_.n)),
                        X[i], Y[i], S[i], gx[i], gy[i], gs[i], cp_.dims,
                        self._quad(Pv[i]), rng)
            moves = self._theta_gradient(
                dA, db, dc, dP, w[idx], vals_e[idx],
                np.zeros((idx.size, cp_.elim.size)))
            scale = 1.0 + np.maximum(np.abs(X[idx]).max(axis=1, initial=0.0),
                                     np.abs(Y[idx]).max(axis=1, initial=0.0))
            moved = (np.abs(moves).max(axis=1, initial=0.0)
                     > _adjoint.NULL_TOL * scale)
            faces.extend(int(i) for i in idx[face])
            bad.extend(int(i) for i in idx[in_null & moved & ~face])

        def where(elements):
            return (f"batch element(s) {elements[:20]}" if batched
                    else "the problem")

        if faces:
            warnings.warn(
                f"The requested outputs of {where(faces)} are not unique "
                "or not differentiable: the optimality conditions are "
                "singular along a direction in which these outputs move. "
                "Typically other optimal points have other values of them "
                "(a face of optimal solutions, or multipliers shared by "
                "redundant constraints; the values returned are one such "
                "point, which can depend on earlier calls), or the "
                "solution is degenerate (e.g. a power of a norm fitted "
                "exactly). Their gradient is not a derivative.",
                RuntimeWarning, stacklevel=4)
        if bad:
            warnings.warn(
                f"The gradient of {where(bad)} is not unique: the "
                "optimality conditions are singular there in a direction "
                "the parameters move (e.g. a constraint that leaves a "
                "single point, such as norm(x) <= r at r = 0). The "
                "solution map has no derivative there; the gradient "
                "returned is one of many.",
                RuntimeWarning, stacklevel=4)

    def _warn_degenerate(self, bad, batched):
        """Warn where the solution is degenerate (the elements ``bad``; see
        ``cones.degenerate_elements``): the solution map has no derivative
        there, and the gradient returned is one of its one-sided
        derivatives or not a derivative at all."""
        if bad.size == 0:
            return
        where = (f"batch element(s) {bad.tolist()[:20]}" if batched
                 else "the problem")
        warnings.warn(
            f"The solution of {where} is degenerate: a constraint is active "
            "with a zero multiplier, or a norm sits at zero (a cone's "
            "apex). The solution map is not differentiable there; the "
            "gradient may be any one-sided derivative, or wrong. Perturb "
            "the parameters, or write the problem so the optimum is not at "
            "such a point (e.g. sum_squares instead of a norm fitted "
            "exactly).", RuntimeWarning, stacklevel=3)

    def vjp(self, values, cotangents):
        """Solve, then return the gradients for ``cotangents``."""
        _, state = self.solve(*values)
        return self.adjoint(values, state, cotangents)

    # -- internals -------------------------------------------------------

    def _data(self, theta):
        """Cone data for the batch: (A values, b, c, w, A_e values, P
        values).

        The last result is kept: the backward pass of a call asks for the
        same theta again (checked entry by entry).
        """
        cached = self._data_cache
        if cached is not None and cached[0].shape == theta.shape and \
                np.array_equal(cached[0], theta):
            return cached[1]
        data = self._compute_data(theta)
        self._data_cache = (theta, data)
        return data

    def _compute_data(self, theta):
        cp_ = self.compiled
        data = np.ascontiguousarray(np.asarray(self._T_data @ theta.T).T)
        Av, Bv, C, Pv = np.split(data, self._data_splits, axis=1)
        elim = cp_.elim
        batch = theta.shape[0]
        if elim.size:
            w = np.asarray(elim.W_map @ theta.T).T
            vals_e = np.asarray(elim.T_Ae @ theta.T).T
            contrib = vals_e * (self._to_cols @ w.T).T
            Bv = Bv - (self._to_rows @ contrib.T).T
        else:
            w = np.zeros((batch, 0))
            vals_e = np.zeros((batch, elim.T_Ae.shape[0]))
        return Av, Bv, C, w, vals_e, Pv

    def _dense_jobs(self, batch):
        """Threads for the stacked dense work (refinement, adjoint).

        Its many small NumPy operations hold the GIL between them (NumPy
        keeps it for small arrays), so threads mostly wait for each other:
        for small programs two threads were slower than one at any batch
        size (the seed's ReLU layer, m n = 882: refinement 13 ms vs 18 ms
        per 300 elements; a 4-cone SOCP, m n = 462: 5 ms vs 10 ms per
        128), for larger ones only from about 64 elements on (least
        squares, m n = 7,752: 1.5 times slower at 4 to 16 elements, even
        at 64, 1.2 times faster at 128; an LP, m n = 10,000: 1.8 times
        faster at 128). SCS runs on all threads in any case.
        """
        cp_ = self.compiled
        if (cp_.m * cp_.n >= _THREADED_DENSE_SIZE
                and batch >= _THREADED_DENSE_BATCH):
            return self.n_jobs
        return 1

    def _map(self, fn, items):
        items = list(items)
        # BLAS is limited to one thread by solve and adjoint (see
        # _blas_single_thread): threads inside the workers would only
        # compete with them.
        if self.n_jobs <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        pool = self._pool
        if pool is None or pool[1] != os.getpid():
            with _POOL_LOCK:
                # Two threads calling at once make one pool between them.
                # A pool inherited through fork (a DataLoader worker, say)
                # has no threads in the child: the child makes its own.
                if self._pool is None or self._pool[1] != os.getpid():
                    self._pool = (concurrent.futures.ThreadPoolExecutor(
                        self.n_jobs), os.getpid())
                pool = self._pool
        return list(pool[0].map(fn, items))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_local"] = None
        state["_data_cache"] = None
        # The problem without what CVXPY keeps after its own solves (solver
        # objects, some of which cannot be pickled): the same objective
        # and constraints, so its parameters and variables are still the
        # layer's.
        problem = self.problem
        state["problem"] = type(problem)(problem.objective,
                                         problem.constraints)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _solve_element(self, Av, Bv, C, Pv, i, options, start=None):
        """SCS on element i with its own workspace, from ``start`` (x, y,
        s) or from scratch; returns solve_one's result."""
        return _solve.solve_one(self._A_matrix(Av[i]), Bv[i], C[i],
                                self._cone, options, start,
                                self._P_matrix(Pv, i))

    def _A_matrix(self, values):
        """A with these values, for one SCS solve: the calling thread's
        CSC matrix with A's pattern, its values replaced (a thread reuses
        it only after its previous solve has returned). SciPy's
        constructor and SCS's check of the index order on a new matrix
        cost about 30 microseconds per solve."""
        A = getattr(self._local, "A", None)
        if A is None:
            cp_ = self.compiled
            A = _solve.assemble_A(np.zeros(cp_.A_indices.size),
                                  cp_.A_indices, cp_.A_indptr,
                                  (cp_.m, cp_.n))
            A.has_sorted_indices  # noqa: B018 - computed once, kept
            self._local.A = A
        A.data = np.ascontiguousarray(values, dtype=np.float64)
        return A

    def _quad(self, Pv):
        """The quadratic term (a ``reduced.Quadratic``) for refine and
        adjoint, or None without one."""
        if not self.compiled.has_P:
            return None
        return _reduced.Quadratic(Pv, self.compiled.P_rows,
                                  self.compiled.P_cols, self._pairs)

    def _P_matrix(self, Pv, i):
        """Element i's P for SCS (upper triangle), or None."""
        if not self.compiled.has_P:
            return None
        cp_ = self.compiled
        return _solve.assemble_P(Pv[i], cp_.P_rows, cp_.P_cols, cp_.n)

    def _solve_batch(self, Av, Bv, C, Pv, batched, warm_start):
        cp_ = self.compiled
        batch = C.shape[0]
        options = self._first_options
        cone = self._cone
        X = np.zeros((batch, cp_.n))
        Y = np.zeros((batch, cp_.m))
        S = np.zeros((batch, cp_.m))
        if cp_.m == 0:
            return self._solve_unconstrained(Av, Bv, C, Pv, X, Y, S, batched)
        todo = np.arange(batch)
        warm = None
        if warm_start is not None:
            warm = self._check_state(warm_start, batch)
            if self.refine:
                # Newton steps from the previous solution often reach full
                # accuracy without the solver; only the rest go to SCS,
                # from scratch: a point that Newton steps could not use
                # (say, the solution of very different parameters) can
                # also keep SCS from converging.
                Xr, Yr, Sr, res = self._refine_chunks(Av, Bv, C, Pv, *warm,
                                                      max_steps=_WARM_STEPS)
                done = res <= _WARM_ACCEPT
                X[done], Y[done], S[done] = Xr[done], Yr[done], Sr[done]
                todo = np.flatnonzero(~done)
                warm = None
                logger.debug("warm-started refinement solved %d of %d",
                             batch - todo.size, batch)
        elif (self.refine and self._cold_newton is not False
              and (cp_.has_P or (
                  batch >= _COLD_MIN_BATCH
                  and batch * cp_.A_indices.size
                  >= _COLD_MIN_WORK * (self._cone_blocks + 1)))):
            # No start point: Newton steps from the origin, SCS for the
            # elements they do not solve. A problem on which they solve
            # fewer than half of the first batch is not tried again.
            zeros = (np.zeros((batch, cp_.n)), np.zeros((batch, cp_.m)),
                     np.zeros((batch, cp_.m)))
            Xr, Yr, Sr, res = self._refine_chunks(
                Av, Bv, C, Pv, *zeros, max_steps=_COLD_STEPS,
                give_up=(_COLD_CHECK, _COLD_GIVE_UP))
            done = res <= _WARM_ACCEPT
            X[done], Y[done], S[done] = Xr[done], Yr[done], Sr[done]
            todo = np.flatnonzero(~done)
            if self._cold_newton is None:
                self._cold_newton = bool(2 * done.sum() >= batch)
            logger.debug("refinement from the origin solved %d of %d",
                         batch - todo.size, batch)

        def warm_for(i):
            if warm is None:
                return None
            return tuple(np.array(w[i]) for w in warm)

        if self._A_constant:
            # One SCS workspace per thread keeps the factorization of A;
            # each element only updates b and c.
            A = _solve.assemble_A(Av[0], cp_.A_indices, cp_.A_indptr,
                                  (cp_.m, cp_.n))
            local = self._local

            def one(i):
                workspace = getattr(local, "workspace", None)
                if workspace is None:
                    quad = cp_.has_P
                    workspace = _solve.Workspace(
                        A, cone, options, self._P_matrix(Pv, 0),
                        Bv[i] if quad else None, C[i] if quad else None)
                    local.workspace = workspace
                return workspace.solve(Bv[i], C[i], warm_for(i))
        else:
            def one(i):
                return self._solve_element(Av, Bv, C, Pv, i, options,
                                           warm_for(i))

        if todo.size == 0:
            return X, Y, S
        # Known limit: cold calls solve each element with SCS (about 1 ms
        # for tiny programs, about 9 ms for a 50-variable LP whose A is a
        # parameter); they are not batched. Warm calls avoid it.
        results = self._map(one, todo)
        if warm is not None:
            # SCS warm-started from the previous call: what it does not
            # solve is solved again from scratch.
            again = [k for k, r in enumerate(results)
                     if r[3] != _solve.SOLVED]
            if again:
                warm = None
                redo = self._map(one, todo[again])
                for k, r in zip(again, redo):
                    results[k] = r
        if self._A_constant:
            # A shared workspace carries SCS's adapted scaling from one
            # element to the next: an element it fails on is solved again
            # by a workspace of its own, so that whether an element fails
            # does not depend on which elements a thread solved before.
            again = [k for k, r in enumerate(results) if r[3] not in (
                _solve.SOLVED, _solve.SOLVED_INACCURATE)]
            if again:
                redo = self._map(
                    lambda i: self._solve_element(Av, Bv, C, Pv, i, options),
                    todo[again])
                for k, r in zip(again, redo):
                    results[k] = r
        X[todo] = np.stack([r[0] for r in results]).reshape(-1, cp_.n)
        Y[todo] = np.stack([r[1] for r in results]).reshape(-1, cp_.m)
        S[todo] = np.stack([r[2] for r in results]).reshape(-1, cp_.m)
        # Without refinement the user's SCS settings decide: inaccurate
        # elements (say, of a deliberately low max_iters) only warn.
        if not self.refine:
            _solve.check_statuses([r[3] for r in results],
                                  [r[4] for r in results], batched,
                                  indices=todo, batch_size=batch,
                                  quadratic_objective=self.quadratic_objective)
            return X, Y, S
        # Elements SCS's first pass failed on are reported together with
        # those that fail after refinement (one error naming all of them).
        failed = _solve.failures([r[3] for r in results],
                                 [r[4] for r in results], indices=todo)
        if failed:
            todo = todo[~np.isin(todo, list(failed))]
        if todo.size:
            sub = (Av[todo], Bv[todo], C[todo], Pv[todo])
            Xr, Yr, Sr = self._refine(*sub, X[todo], Y[todo], S[todo],
                                      todo, failed)
            X[todo], Y[todo], S[todo] = Xr, Yr, Sr
        if failed:
            raise _solve.solver_error(failed, batched, batch,
                                      self.quadratic_objective)
        return X, Y, S

    def _solve_unconstrained(self, Av, Bv, C, Pv, X, Y, S, batched):
        """A program without constraints (SCS needs at least one): with a
        quadratic objective, the solution of P x = -c, one Newton step
        from the origin; without a solution (P singular and c not in its
        range, or no quadratic term) the program is unbounded."""
        Xr, Yr, Sr, res = self._refine_chunks(Av, Bv, C, Pv, X, Y, S)
        bad = np.flatnonzero(~(res <= _REFINE_ACCEPT))
        if bad.size:
            raise _solve.solver_error(
                {int(i): "unbounded (no constraints, and P x = -c has no "
                 "solution)" for i in bad}, batched, X.shape[0])
        return Xr, Yr, Sr

    def _check_state(self, state, batch, what="warm_start"):
        """The arrays of a ``state`` for this batch size, or ValueError
        (``what``: the argument's name in the message)."""
        names = ("x", "y", "s")
        if not isinstance(state, (list, tuple)) or len(state) != 3:
            raise ValueError(
                f"{what} must be the state (x, y, s) returned by "
                f"solve(); got {type(state).__name__}.")
        shapes = self.state_shapes(batch)
        if all(isinstance(w, np.ndarray) and w.dtype == np.float64
               and w.shape == shape for w, shape in zip(state, shapes)):
            return list(state)
        arrays = []
        for name, w, shape in zip(names, state, shapes):
            w = np.asarray(w, dtype=np.float64)
            if w.size != int(np.prod(shape)):
                raise ValueError(
                    f"{what} {name} has shape {w.shape}; expected "
                    f"{shape} for this call's batch size {batch}.")
            arrays.append(w.reshape(shape))
        return arrays

    def _extrapolate(self, Av, Bv, C, Pv, prev, last):
        """The better, per element, of the last solution and its linear
        extrapolation from the one before (parameters that moved by similar
        steps in the last two calls, as in a training loop with momentum,
        tend to move on in the same direction). Larger programs (sparse
        refinement) keep the last solution."""
        if self._sparse_refine:
            return last
        dims = self.compiled.dims
        rows, cols = self.compiled.A_indices, self._A_cols
        X1, V1 = last[0], last[1] - last[2]
        Xe = 2.0 * X1 - prev[0]
        Ve = 2.0 * V1 - (prev[1] - prev[2])
        Ye = cones.project_batch(Ve, dims, dual=True)
        Se = Ye - Ve

        cp_ = self.compiled
        Ad = (_reduced.dense_A(Av, rows, cols, cp_.m, cp_.n)
              if cp_.m and cp_.n else None)

        shared = _reduced.is_shared(Av)
        Pq = _reduced.dense_P(self._quad(Pv), cp_.n)

        def res(X, Y, S):
            return np.maximum(
                _refine.residual(Av, rows, cols, Bv, C, X, Y, S, Ad, shared,
                                 Pq),
                _refine._cone_residual(Y, S, dims))

        better = res(Xe, Ye, Se) < res(*last)
        pick = better[:, None]
        return (np.where(pick, Xe, last[0]), np.where(pick, Ye, last[1]),
                np.where(pick, Se, last[2]))

    def _refine_chunks(self, Av, Bv, C, Pv, X, Y, S, max_steps=6,
                       give_up=None):
        """Refine the batch in chunks on the thread pool (larger programs
        element by element, with sparse LUs)."""
        cp_ = self.compiled
        batch = X.shape[0]
        if self._sparse_refine:
            def one(i):
                A = _solve.assemble_A(Av[i], cp_.A_indices, cp_.A_indptr,
                                      (cp_.m, cp_.n))
                P = self._quad(Pv[i:i + 1])
                if P is not None:
                    P = P._replace(values=P.values[0])
                return _refine.refine_sparse(
                    A, Bv[i], C[i], X[i], Y[i], S[i], cp_.dims,
                    max_steps=max_steps, give_up=give_up, P=P)

            results = self._map(one, range(batch))
            shapes = ((batch, cp_.n), (batch, cp_.m), (batch, cp_.m),
                      (batch,))
            return tuple(np.array([r[k] for r in results]).reshape(shape)
                         for k, shape in enumerate(shapes))
        rows, cols = cp_.A_indices, self._A_cols
        N = cp_.n + cp_.m + 1
        step = max(1, int(_DENSE_CHUNK_BYTES // (8 * 3 * (N + 1) ** 2)))
        step = min(step, -(-batch // self._dense_jobs(batch)))

        def chunk(lo):
            sl = slice(lo, lo + step)
            return _refine.refine(Av[sl], rows, cols, Bv[sl], C[sl], X[sl],
                                  Y[sl], S[sl], cp_.dims,
                                  max_steps=max_steps, give_up=give_up,
                                  P=self._quad(Pv[sl]))

        results = self._map(chunk, range(0, batch, step))
        return tuple(np.concatenate([r[k] for r in results])
                     for k in range(4))

    def _refine(self, Av, Bv, C, Pv, X, Y, S, indices, failures):
        """Newton-polish the batch; re-solve what does not refine.

        An element whose Newton steps do not converge (typically SCS's
        point did not yet show the active set) is solved again by SCS from
        there at a medium tolerance and refined once more; what still fails
        is solved at the tight tolerance, with the usual status checks:
        elements that fail them are added to ``failures`` (batch index ->
        status) under their ``indices``.
        """
        batch = X.shape[0]
        X, Y, S, res = self._refine_chunks(Av, Bv, C, Pv, X, Y, S)
        failed = np.flatnonzero(~(res <= _REFINE_ACCEPT))
        if failed.size:
            failed = self._refine_longer(Av, Bv, C, Pv, X, Y, S, failed)
        if failed.size:
            logger.info("refinement left %d of %d elements above %.0e; "
                        "solving them again from there",
                        failed.size, batch, _REFINE_ACCEPT)
            sub = self._resolve(Av, Bv, C, Pv, X, Y, S, failed,
                                _RESOLVE_EPS)
            if sub is not None:
                Xf, Yf, Sf, resf = self._refine_chunks(
                    Av[failed], Bv[failed], C[failed], Pv[failed], *sub,
                    max_steps=_LONG_STEPS,
                    give_up=(_LONG_CHECK, _LONG_GIVE_UP))
                done = resf <= _REFINE_ACCEPT
                ok = failed[done]
                X[ok], Y[ok], S[ok] = Xf[done], Yf[done], Sf[done]
                failed = failed[~done]
        if failed.size:
            logger.info("%d of %d elements solved again at tight tolerance",
                        failed.size, batch)
            tight = _solve.DEFAULT_SOLVER_OPTIONS["eps_abs"]
            # Each element's point so far is a candidate too (where every
            # SCS run below ends inaccurate, it may be the best).
            candidates = [[(X[i].copy(), Y[i].copy(), S[i].copy(),
                            _solve.SOLVED_INACCURATE,
                            "refinement did not converge")] for i in failed]
            results = self._resolve(Av, Bv, C, Pv, X, Y, S, failed, tight,
                                    raw=True)
            for k, r in enumerate(results):
                candidates[k].append(r)
            # From a point SCS could not finish from, a cold start
            # sometimes does (badly scaled data).
            again = [k for k, r in enumerate(results)
                     if r[3] != _solve.SOLVED]
            if again:
                cold = self._resolve(Av, Bv, C, Pv, X, Y, S, failed[again],
                                     tight, raw=True, warm=False)
                for k, r in zip(again, cold):
                    candidates[k].append(r)
            # SCS's Anderson acceleration occasionally stalls it (a norm
            # bound of 1e-6: 100,000 iterations with it, 400 without; a
            # degenerate 1,000-variable LP: KKT residual 0.1 with it, 2e-9
            # without).
            again = [k for k, c in enumerate(candidates)
                     if all(r[3] != _solve.SOLVED for r in c)]
            if again:
                plain = self._resolve(Av, Bv, C, Pv, X, Y, S, failed[again],
                                      tight, raw=True, warm=False,
                                      extra=_NO_ACCELERATION)
                for k, r in zip(again, plain):
                    candidates[k].append(r)
            results = [self._best_candidate(Av, Bv, C, Pv, i, c)
                       for i, c in zip(failed, candidates)]
            for i, r in zip(failed, results):
                X[i], Y[i], S[i] = r[0], r[1], r[2]
            # The last resort: an inaccurate answer here is accepted (with
            # a warning) only if it nearly satisfies the optimality
            # conditions; nearly infeasible programs end here with points
            # that violate their constraints.
            status_vals = [r[3] for r in results]
            failures.update(_solve.failures(
                status_vals, [r[4] for r in results],
                indices=np.asarray(indices)[failed],
                residuals=None if self._user_limits else
                self._inaccurate_residuals(
                    Av[failed], Bv[failed], C[failed], Pv[failed], X[failed],
                    Y[failed], S[failed], status_vals)))
            _solve.warn_inaccurate(
                [i for i, v in zip(np.asarray(indices)[failed], status_vals)
                 if v == _solve.SOLVED_INACCURATE and int(i) not in failures],
                stacklevel=6)
        return X, Y, S

    def _refine_longer(self, Av, Bv, C, Pv, X, Y, S, failed):
        """More Newton steps for the elements ``failed`` (updated in X, Y,
        S where they refine); returns those that still do not."""
        Xf, Yf, Sf, resf = self._refine_chunks(
            Av[failed], Bv[failed], C[failed], Pv[failed], X[failed],
            Y[failed], S[failed], max_steps=_LONG_STEPS,
            give_up=(_LONG_CHECK, _LONG_GIVE_UP))
        done = resf <= _REFINE_ACCEPT
        ok = failed[done]
        X[ok], Y[ok], S[ok] = Xf[done], Yf[done], Sf[done]
        return failed[~done]

    def _best_candidate(self, Av, Bv, C, Pv, i, candidates):
        """Of element i's results (x, y, s, status, text): the first SCS
        solved, else the inaccurate one with the smallest KKT residual
        (the SCS runs of the last resort can end far apart), else the
        last one (failed statuses)."""
        solved = [r for r in candidates if r[3] == _solve.SOLVED]
        if solved:
            return solved[0]
        inaccurate = [r for r in candidates
                      if r[3] == _solve.SOLVED_INACCURATE]
        if not inaccurate:
            return candidates[-1]
        sl = slice(i, i + 1)
        residuals = [self._inaccurate_residuals(
            Av[sl], Bv[sl], C[sl], Pv[sl], r[0][None], r[1][None],
            r[2][None], [r[3]])[0] for r in inaccurate]
        logger.debug("element %d: residuals of its inaccurate results %s",
                     i, residuals)
        best = int(np.argmin(residuals))
        if not self._user_limits and residuals[best] > \
                _solve.INACCURATE_LIMIT:
            # None is accepted: a certificate of infeasibility or
            # unboundedness that one of the runs found says more than the
            # residual (a program infeasible by 1e-4 ends inaccurate at
            # the medium tolerance, infeasible at the tight one).
            certified = [r for r in candidates if r[3] in _solve.CERTIFICATES]
            if certified:
                return certified[-1]
        return inaccurate[best]

    def _inaccurate_residuals(self, Av, Bv, C, Pv, X, Y, S, status_vals):
        """Relative KKT residuals (with the distance of y and s from their
        cones) of the elements SCS reported as inaccurate; 0 for others."""
        status_vals = np.asarray(status_vals)
        out = np.zeros(status_vals.size)
        k = np.flatnonzero(status_vals == _solve.SOLVED_INACCURATE)
        if k.size == 0:
            return out
        cp_ = self.compiled
        kkt = _refine.residual(Av[k], cp_.A_indices, self._A_cols, Bv[k],
                               C[k], X[k], Y[k], S[k], P=self._quad(Pv[k]))
        scale = 1.0 + np.maximum(np.abs(Y[k]).max(axis=1, initial=0.0),
                                 np.abs(S[k]).max(axis=1, initial=0.0))
        cone = _refine._cone_residual(Y[k], S[k], cp_.dims) / scale
        out[k] = np.maximum(kkt, cone)
        return out

    def _resolve(self, Av, Bv, C, Pv, X, Y, S, which, eps, raw=False,
                 warm=True, extra=None):
        """SCS from (X, Y, S) (from scratch if not ``warm``) at tolerance
        ``eps`` for the elements ``which``: the raw results if ``raw``,
        else stacked (X, Y, S), or None if any of them failed (the tight
        pass then reports it). ``extra``: settings that replace the
        user's (unless the user set them)."""
        cp_ = self.compiled
        # The user's settings, but SCS's own tolerances at most eps.
        options = dict(extra or {})
        options.update(self.solver_options)
        for key in ("eps_abs", "eps_rel"):
            options[key] = min(options[key], eps)

        def one(i):
            start = (X[i], Y[i], S[i]) if warm else None
            return self._solve_element(Av, Bv, C, Pv, i, options, start)

        results = self._map(one, which)
        if raw:
            return results
        if any(r[3] not in (_solve.SOLVED, _solve.SOLVED_INACCURATE)
               for r in results):
            return None
        sizes = (cp_.n, cp_.m, cp_.m)
        return tuple(np.stack([r[k] for r in results]).reshape(
            len(results), size) for k, size in enumerate(sizes))

    def _recover(self, X, Y, w, batched):
        outputs = []
        batch = X.shape[0]
        for out in self.compiled.outputs:
            source = X if out.source == "x" else Y
            flat = (out.R @ source.T).T
            if out.source == "x" and self.compiled.elim.size:
                flat = flat + (out.R_elim @ w.T).T
            outputs.append(_unvec_f(flat, out.shape, batch, batched))
        return tuple(outputs)

    def _as_arrays(self, values):
        if len(values) == 1 and isinstance(values[0], (list, tuple)) and \
                len(self.parameters) != 1:
            values = tuple(values[0])
        if len(values) != len(self.parameters):
            names = ", ".join(self.compiled.param_names)
            raise ValueError(
                f"Expected {len(self.parameters)} parameter values "
                f"({names}), got {len(values)}."
            )
        arrays = []
        for i, value in enumerate(values):
            if type(value) is np.ndarray and value.dtype == np.float64:
                arrays.append(value)  # the common case, nothing to check
                continue
            name = self.compiled.param_names[i]
            if value is None:
                raise ValueError(f"Parameter {i} '{name}': the value is "
                                 "None; pass an array or a number.")
            if sp.issparse(value):
                raise ValueError(
                    f"Parameter {i} '{name}': sparse matrices are not "
                    "accepted as values; pass value.toarray().")
            try:
                complex_ = np.iscomplexobj(value)
            except (TypeError, ValueError):
                complex_ = False  # the conversion below reports it
            if complex_:
                dtype = getattr(value, "dtype", None)
                raise complex_value_error(i, name, None if dtype is None
                                          else str(dtype))
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"Parameter {i} '{name}': value of type "
                    f"{type(value).__name__} cannot be converted to a float "
                    f"array ({exc})."
                ) from exc
            arrays.append(arr)
        return arrays

    def _batch_layout(self, values):
        """Validate shapes; return (batch size or None, batched flags)."""
        shapes = tuple(v.shape for v in values)
        # Calls usually repeat the previous call's shapes.
        last = self._last_layout
        if last is not None and last[0] == shapes:
            batched, batch, flags = last[1]
        else:
            batched, batch, flags = self.shape_layout(*shapes)
            flags = tuple(flags)
            self._last_layout = (shapes, (batched, batch, flags))
        return (batch if batched else None), flags

    def shape_layout(self, *shapes):
        """Validate input shapes, as a call would, without values.

        Args:
            *shapes: one shape per parameter: a tuple of ints, where a
                dimension may be None when it is not known yet (symbolic
                shapes of a traced or compiled graph).

        Returns:
            ``(batched, batch, flags)``: whether any input carries a batch
            dimension; the batch size (1 when all batched inputs have
            batch 1; None when batched but every batch dimension other
            than 1 is unknown); and one flag per input, True if batched.

        Raises:
            ValueError: naming the parameter, its shape as given (with
                None for unknown dimensions) and the expected shapes, or
                the batched inputs whose batch sizes disagree.
        """
        names = self.compiled.param_names
        if len(shapes) != len(names):
            raise ValueError(
                f"Expected {len(names)} parameter values "
                f"({', '.join(names)}), got {len(shapes)}.")
        flags = []
        sizes = {}
        for i, (shape, expected) in enumerate(zip(shapes, self.param_shapes)):
            shape = tuple(None if d is None else int(d) for d in shape)
            if _fits(shape, expected):
                flags.append(False)
            elif len(shape) == len(expected) + 1 and _fits(shape[1:],
                                                          expected):
                flags.append(True)
                sizes[i] = shape[0]
            else:
                raise ValueError(
                    f"Parameter {i} '{names[i]}' has shape {shape}; "
                    f"expected {expected} (unbatched) or (batch, "
                    f"{', '.join(map(str, expected))}) (batched)."
                    .replace(", )", ")").replace("(batch)", "(batch,)")
                )
        distinct = set(sizes.values()) - {1, None}
        if len(distinct) > 1:
            listing = ", ".join(f"'{names[i]}' (position {i}): {b}"
                                for i, b in sizes.items())
            raise ValueError(
                "Batched parameters disagree on the batch size: "
                f"{listing}. Use one batch size (1 broadcasts)."
            )
        if not sizes:
            return False, None, flags
        if distinct:
            return True, distinct.pop(), flags
        return True, (None if None in sizes.values() else 1), flags

    def _prepare(self, values):
        """Validate values; return (batch, batched, theta (batch, p + 1))."""
        batch, flags = self._batch_layout(values)
        batched = batch is not None
        batch = 1 if batch is None else batch
        cp_ = self.compiled
        theta = np.empty((batch, cp_.num_params + 1))
        for arr, flag, offset, size in zip(values, flags, cp_.param_offsets,
                                           self._param_sizes):
            # A batch of one (or an unbatched value) broadcasts.
            theta[:, offset:offset + size] = _vec_f(arr, flag)
        theta[:, -1] = 1.0
        if not np.isfinite(theta).all():
            self._report_non_finite(values, flags)
        names = cp_.param_names
        for i in self._domain_checked:
            _check_domain(i, names[i], self.parameters[i], values[i],
                          flags[i])
        return batch, batched, theta

    def _report_non_finite(self, values, flags):
        """ValueError naming the first parameter with NaN or infinite
        entries (and its batch elements)."""
        names = self.compiled.param_names
        for i, arr in enumerate(values):
            if np.all(np.isfinite(arr)):
                continue
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            where = ""
            if flags[i]:
                elems = np.flatnonzero(~np.all(
                    np.isfinite(arr.reshape(arr.shape[0], -1)), axis=1))
                where = f" in batch element(s) {elems.tolist()[:20]}"
            raise ValueError(
                f"Parameter {i} '{names[i]}' has {bad} NaN or infinite "
                f"entr{'y' if bad == 1 else 'ies'}{where}."
            )

    def _split_gradient(self, dtheta, values, batch, needs_grad):
        cp_ = self.compiled
        grads = []
        for i, (arr, shape, offset, size) in enumerate(
                zip(values, cp_.param_shapes, cp_.param_offsets,
                    self._param_sizes)):
            if needs_grad is not None and not needs_grad[i]:
                grads.append(None)
                continue
            g = dtheta[:, offset:offset + size]
            if arr.shape == shape:
                if g.shape[0] != 1:
                    g = g.sum(axis=0, keepdims=True)
                grads.append(_unvec_f(g, shape, 1, False))
            else:
                if arr.shape[0] != batch:
                    g = g.sum(axis=0, keepdims=True)
                grads.append(_unvec_f(g, shape, g.shape[0], True))
        return tuple(grads)


_BLAS_LIBRARIES = None
_POOL_LOCK = threading.Lock()


def _reset_pool_lock():
    """A new lock in a forked child (another thread may have held the
    parent's at the fork, and nothing would release it there)."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_lock)


class _blas_single_thread:
    """A context limiting BLAS libraries to one thread each, for a whole
    solve or adjoint. (OpenBLAS's thread count is process-wide. The stacked
    products are small, so BLAS threads gain little even on the calling
    thread, and when another process keeps a core busy their spin-waits
    stall every call: 16 least-squares elements, 35 ms alone, took 6 s
    beside a busy process.) It sets the libraries' thread counts directly:
    threadpoolctl's own context inspects every library on each entry,
    about 10 microseconds, a noticeable part of a small call."""

    def __enter__(self):
        global _BLAS_LIBRARIES
        if _BLAS_LIBRARIES is None:
            # Found on first use, after the BLAS libraries are loaded.
            _BLAS_LIBRARIES = threadpoolctl.ThreadpoolController().select(
                user_api="blas").lib_controllers
        self._restore = []
        for lib in _BLAS_LIBRARIES:
            threads = lib.num_threads
            if threads != 1:
                lib.set_num_threads(1)
                self._restore.append((lib, threads))
        return self

    def __exit__(self, *exc):
        for lib, threads in self._restore:
            lib.set_num_threads(threads)
        return False


def _is_curved(dims):
    """Whether the cone has a block that is not a half-line (a second-order
    or PSD cone of size 2 or more, an exponential or power cone)."""
    return (any(k >= 2 for k in dims.soc) or any(k >= 2 for k in dims.psd)
            or dims.exp > 0 or len(dims.power) > 0)


def _fits(shape, expected):
    """Whether ``shape`` (None for unknown dimensions) can be ``expected``."""
    return len(shape) == len(expected) and all(
        d is None or d == e for d, e in zip(shape, expected))


def _vec_f(arr, batched):
    """Flatten column-major, per batch element if batched."""
    if batched:
        # Column-major over the whole array keeps each element's entries
        # together, in that element's column-major order.
        return arr.reshape((arr.shape[0], math.prod(arr.shape[1:])),
                           order="F")
    return arr.reshape(-1, order="F")


def _unvec_f(flat, shape, batch, batched):
    """Inverse of _vec_f: (batch, size) -> (batch,) + shape or shape."""
    if len(shape) <= 1:
        # Column-major and row-major orders agree.
        out = np.ascontiguousarray(flat).reshape((batch,) + tuple(shape))
        return out if batched else out[0]
    rev = tuple(reversed(shape))
    out = flat.reshape((batch,) + rev)
    out = out.transpose((0,) + tuple(range(len(shape), 0, -1)))
    out = np.ascontiguousarray(out)
    return out if batched else out[0]


def _check_domain(i, name, param, arr, batched):
    """ValueError if values fall outside the parameter's declared domain,
    naming the offending batch elements of batched values."""
    attrs = param.attributes
    mats = arr if batched else arr[None]
    flat = mats.reshape(mats.shape[0], int(np.prod(mats.shape[1:])))

    def where(bad):
        if not batched:
            return ""
        elements = np.flatnonzero(bad)
        more = "" if elements.size <= 10 else f" (and {elements.size - 10} more)"
        return (f" in batch element(s) "
                f"{', '.join(map(str, elements[:10]))}{more}")

    checks = {
        "nonneg": (lambda a: a >= 0, "nonnegative"),
        "pos": (lambda a: a > 0, "positive"),
        "nonpos": (lambda a: a <= 0, "nonpositive"),
        "neg": (lambda a: a < 0, "negative"),
    }
    for attr, (ok, word) in checks.items():
        if attrs.get(attr):
            good = ok(flat)
            if not np.all(good):
                worst = flat[~good].flat[0]
                raise ValueError(
                    f"Parameter {i} '{name}' is declared {attr}=True but has "
                    f"entries that are not {word} (e.g. {worst:g})"
                    f"{where(~good.all(axis=1))}."
                )
    if attrs.get("integer") or attrs.get("boolean"):
        kind = "boolean" if attrs.get("boolean") else "integer"
        good = flat == np.round(flat)
        if kind == "boolean":
            good &= (flat == 0) | (flat == 1)
        if not np.all(good):
            worst = flat[~good].flat[0]
            allowed = "0 or 1" if kind == "boolean" else "integers"
            raise ValueError(
                f"Parameter {i} '{name}' is declared {kind}=True but has "
                f"entries that are not {allowed} (e.g. {worst:g})"
                f"{where(~good.all(axis=1))}.")
    bounds = attrs.get("bounds")
    if bounds is not None:
        shape = mats.shape[1:]
        # Values from float32 (or float16, bfloat16) tensors may round
        # past a bound (0.1f > 0.1): half an ulp of slack for them.
        slack = _rounding(flat)
        for bound, side, sign in ((bounds[0], "lower", 1.0),
                                  (bounds[1], "upper", -1.0)):
            if bound is None:
                continue
            limit = np.broadcast_to(np.asarray(bound, dtype=np.float64),
                                    shape).reshape(-1)
            good = sign * (flat - limit) >= -slack * np.abs(limit)
            if not np.all(good):
                k = np.argwhere(~good)[0]
                raise ValueError(
                    f"Parameter {i} '{name}' has entries outside its "
                    f"declared bounds (e.g. {flat[k[0], k[1]]:g} against "
                    f"the {side} bound {limit[k[1]]:g})"
                    f"{where(~good.all(axis=1))}.")
    if attrs.get("diag") and mats.ndim >= 3:
        off = ~np.eye(mats.shape[-1], dtype=bool)
        size = np.abs(mats[:, off]).max(axis=1, initial=0.0)
        if np.any(size > 0):
            raise ValueError(
                f"Parameter {i} '{name}' is declared diag=True but has "
                f"nonzero entries off the diagonal (largest "
                f"{size.max():.3g}){where(size > 0)}; pass a diagonal "
                "matrix.")
    pattern = getattr(param, "sparse_idx", None)
    if attrs.get("sparsity") is not None and pattern is not None:
        outside = np.ones(mats.shape[1:], dtype=bool)
        outside[tuple(np.asarray(ix) for ix in pattern)] = False
        size = np.abs(mats[:, outside]).max(axis=1, initial=0.0)
        if np.any(size > 0):
            first = np.argwhere(outside & (np.abs(mats[np.argmax(size > 0)])
                                           > 0))[0]
            raise ValueError(
                f"Parameter {i} '{name}' is declared with a sparsity "
                f"pattern but has nonzero entries outside it (e.g. at "
                f"{tuple(int(k) for k in first)}; largest {size.max():.3g})"
                f"{where(size > 0)}; pass zeros there (entries outside the "
                "pattern are not part of the problem).")
    if any(attrs.get(a) for a in ("symmetric", "PSD", "NSD")):
        scale = 1.0 + np.abs(flat).max(axis=1, initial=0.0)
        # Values that a narrower format represents exactly most likely
        # came from tensors of that format: their rounding is about 1e-7
        # (float32) or 1e-3 (float16, bfloat16), not 1e-16, relative.
        rounding = _rounding(flat)
        tol = (max(1e-5, 16 * rounding) if rounding else 1e-9) * scale
        asym = np.abs(mats - np.swapaxes(mats, -1, -2)).reshape(
            mats.shape[0], -1).max(axis=1, initial=0.0)
        kind = next(a for a in ("PSD", "NSD", "symmetric") if attrs.get(a))
        if np.any(asym > tol):
            raise ValueError(
                f"Parameter {i} '{name}' is declared {kind}=True but its "
                f"value is not symmetric (max |X - X'| = {asym.max():.3g})"
                f"{where(asym > tol)}."
            )
        if kind in ("PSD", "NSD"):
            eig = np.linalg.eigvalsh((mats + np.swapaxes(mats, -1, -2)) / 2)
            if kind == "PSD":
                extreme, word = eig.min(axis=-1), "smallest"
                bad = extreme < -tol
            else:
                extreme, word = eig.max(axis=-1), "largest"
                bad = extreme > tol
            if np.any(bad):
                value = extreme[bad][0]
                raise ValueError(
                    f"Parameter {i} '{name}' is declared {kind}=True but its "
                    f"value has {word} eigenvalue {value:.3g}{where(bad)}."
                )


def _rounding(flat):
    """Half an ulp, relative, of the narrowest floating format that holds
    every value of ``flat`` exactly: bfloat16 (2^-8), float16 (2^-11) or
    float32 (2^-24); 0 if only float64 does. (Values converted from
    tensors of those formats carry that much rounding.)"""
    single = flat.astype(np.float32)
    if not np.array_equal(single, flat):
        return 0.0
    if not np.any(single.view(np.uint32) & 0xFFFF):
        return 2.0 ** -8
    with np.errstate(over="ignore"):
        if np.array_equal(flat.astype(np.float16), flat):
            return 2.0 ** -11
    return 2.0 ** -24


def complex_value_error(i, name, dtype=None):
    """The error for a complex value given for parameter i (the adapters
    raise it too, before their own conversion would drop the imaginary
    part)."""
    what = f" (dtype {dtype})" if dtype else ""
    return ValueError(
        f"Parameter {i} '{name}' is complex{what}; optlayer takes real "
        "values (pass the real and imaginary parts as separate real "
        "parameters).")


def _transposed(M):
    """M' in CSR form."""
    return sp.csr_matrix(M.T)


def _times(D, M_t):
    """D @ M for a dense (batch, k) D, given M' (CSR), as a dense array."""
    return np.asarray(M_t @ D.T).T


def _check_flag(name, value):
    """ValueError unless ``value`` is a boolean (or 0 or 1)."""
    if not (isinstance(value, (bool, np.bool_)) or (
            isinstance(value, (int, np.integer)) and value in (0, 1))):
        raise ValueError(f"{name} must be True or False; got {value!r}.")


def _check_solver_options(options):
    """The SCS settings as a dict ({} for None), or ValueError."""
    if options is None:
        return {}
    if not isinstance(options, collections.abc.Mapping):
        raise ValueError(
            "solver_options must be a dict of SCS settings, e.g. "
            f"{{'max_iters': 1000}}; got {type(options).__name__}.")
    return dict(options)


def _check_n_jobs(n_jobs):
    """The thread count: n_jobs, or every CPU for None or -1."""
    valid = (isinstance(n_jobs, (int, np.integer))
             and not isinstance(n_jobs, bool)
             and (n_jobs >= 1 or n_jobs == -1))
    if n_jobs is not None and not valid:
        raise ValueError(
            f"n_jobs must be a positive integer, or None or -1 for every "
            f"CPU; got {n_jobs!r}.")
    if n_jobs is None or n_jobs == -1:
        return os.cpu_count() or 1
    return int(n_jobs)
