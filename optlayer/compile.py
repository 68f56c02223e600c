"""Compile a DPP CVXPY problem once into affine maps to cone-program data.

The compiled problem is a plain record of SciPy sparse matrices and index
arrays. For the stacked parameter vector ``theta`` (each parameter flattened
column-major, in the order the layer was given, with a trailing 1) the cone
program in SCS form

    minimize c'x  subject to  Ax + s = b,  s in K

has data

    c = T_c @ theta,   b = T_b @ theta,   A.data = T_A @ theta,

where ``A`` keeps one fixed CSC sparsity pattern for every ``theta``. The
requested outputs are linear functions of the solver's ``x`` (primal
variables) or ``y`` (dual variables of constraints). Nothing of CVXPY is
needed once this record is built.
"""

import dataclasses
import warnings

import cvxpy as cp
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.lin_ops.lin_op import CONSTANT_ID as _CONSTANT_ID
import numpy as np
import scipy.sparse as sp

from optlayer import presolve as _presolve
from optlayer.cones import ConeDims

# The constraint types whose dual variables can be requested as outputs.
# Their rows in the solver's ``y`` are found from the cone program.
_SYMMETRIC = ("symmetric", "PSD", "NSD")
_DUAL_CONE_TYPES = ("Zero", "NonNeg", "SOC", "SvecPSD", "ExpCone", "PowCone3D")


@dataclasses.dataclass(frozen=True)
class Output:
    """One requested output, ``value = R @ vec`` reshaped to ``shape``.

    Attributes:
        name: a printable name for messages.
        source: ``"x"`` for primal variables, ``"y"`` for dual variables.
        R: sparse (size, n) or (size, m) matrix.
        shape: the CVXPY shape of the output (column-major flattening).
        R_elim: for primal outputs, the sparse (size, n_e) map from the
            eliminated variables ``w`` (see ``optlayer.presolve``).
    """

    name: str
    source: str
    R: sp.csr_matrix
    shape: tuple
    R_elim: sp.csr_matrix | None = None


@dataclasses.dataclass(frozen=True)
class CompiledProblem:
    """A parametrized cone program in SCS form; see the module docstring.

    Attributes:
        n: number of solver variables.
        m: number of constraint rows.
        dims: the cone ``K``.
        param_names: printable names of the parameters, in layer order.
        param_shapes: their CVXPY shapes.
        param_offsets: start of each parameter in ``theta``.
        T_c: sparse (n, p + 1) map to ``c``.
        T_b: sparse (m, p + 1) map to ``b``.
        T_A: sparse (nnz, p + 1) map to the values of ``A``.
        A_indices, A_indptr: the CSC pattern of ``A`` (m by n).
        T_P: sparse (nnz_P, p + 1) map to the values of the objective's
            quadratic term ``P`` (objective (1/2) x'Px + c'x), at
            positions (P_rows, P_cols), both triangles; no rows when the
            objective is linear.
        outputs: the requested outputs.
        objective_offset: sparse (1, p + 1) map to the objective's constant
            (before presolve).
        elim: the variables removed by the presolve; ``b`` of the solved
            problem is ``T_b @ theta - A_e(theta) w(theta)``.
    """

    n: int
    m: int
    dims: ConeDims
    param_names: tuple
    param_shapes: tuple
    param_offsets: tuple
    T_c: sp.csr_matrix
    T_b: sp.csr_matrix
    T_A: sp.csr_matrix
    A_indices: np.ndarray
    A_indptr: np.ndarray
    T_P: sp.csr_matrix
    P_rows: np.ndarray
    P_cols: np.ndarray
    outputs: tuple
    objective_offset: sp.csr_matrix
    elim: _presolve.Elimination

    @property
    def num_params(self):
        """Length of ``theta`` without the trailing 1."""
        return int(self.T_c.shape[1]) - 1

    @property
    def A_is_constant(self):
        """True when ``A`` (and ``P``) do not depend on the parameters."""
        return self.T_A[:, :-1].nnz == 0 and self.T_P[:, :-1].nnz == 0

    @property
    def has_P(self):
        """True when the objective has a quadratic term."""
        return self.T_P.shape[0] > 0


def _not_dpp_parts(problem):
    """Which parts of the problem are not DPP, and the smallest
    expressions in them that are not, for the error message."""
    parts = []
    if not problem.objective.is_dcp(dpp=True):
        parts.append("the objective" + _culprits(problem.objective.args))
    for i, con in enumerate(problem.constraints):
        if not con.is_dcp(dpp=True):
            parts.append(f"constraint {i} ({_short(con)})"
                         + _culprits(con.args))
    if not parts:
        return "it is not DPP as a whole"
    return ", ".join(parts) + (" is" if len(parts) == 1 else " are") + \
        " not DPP"


def _short(item, limit=60):
    text = str(item)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _culprits(exprs):
    """' (in: e1, e2)': the smallest subexpressions of ``exprs`` that are
    not DPP though all their arguments are ('' if none is found)."""
    found = []

    def walk(expr):
        if expr.is_dcp(dpp=True):
            return
        bad = [arg for arg in expr.args if not arg.is_dcp(dpp=True)]
        if bad:
            for arg in bad:
                walk(arg)
        elif len(found) < 3:
            found.append(_short(expr))

    for expr in exprs:
        walk(expr)
    return f" (in: {'; '.join(found)})" if found else ""


def _expressions(expr):
    yield expr
    for arg in expr.args:
        yield from _expressions(arg)


def _quad_form_hint(problem):
    """A hint for quad_form(x, P) with a parameter P (not DPP)."""
    roots = [problem.objective.expr] + list(problem.constraints)
    for root in roots:
        for e in _expressions(root):
            if isinstance(e, QuadForm) and \
                    e.args[1].parameters():
                return (" quad_form(x, P) with a parameter P is DPP only "
                        "in the objective with quadratic_objective=True; "
                        "otherwise write it as sum_squares(L @ x) with a "
                        "parameter L "
                        "such that P = L'L (e.g. L = cholesky(P)', or the "
                        "matrix square root of P).")
    return ""


def _name(leaf):
    """A printable name for a CVXPY leaf or constraint."""
    try:
        return leaf.name()
    except (AttributeError, TypeError):
        return str(leaf)


def as_list(items):
    """``items`` as a list; a single CVXPY leaf (a Parameter or Variable
    passed where a list is expected) becomes a list of one. (Iterating
    over a leaf would give its entries instead.)"""
    if isinstance(items, cp.expressions.leaf.Leaf):
        return [items]
    return list(items)


def _dpp_with_quad_form(problem):
    """Whether the problem is DPP once quad_form(x, P) with a parameter P
    counts as DPP, as CVXPY counts it when the quadratic form stays the
    objective's quadratic term (P enters it affinely); only objectives
    qualify (in a constraint it becomes a cone constraint, where it is not
    DPP)."""
    try:
        from cvxpy.utilities.scopes import quad_form_dpp_scope
    except ImportError:  # pragma: no cover - older CVXPY
        return False
    for constraint in problem.constraints:
        for e in _expressions(constraint):
            if isinstance(e, QuadForm) and e.args[1].parameters():
                return False
    with quad_form_dpp_scope():
        return problem.is_dpp()


def _check_arguments(problem, parameters, variables,
                     quadratic_objective=True):
    """Raise ValueError with a remedy for every malformed argument."""
    if not isinstance(problem, cp.Problem):
        raise ValueError(
            f"problem must be a cvxpy.Problem, got {type(problem).__name__}."
        )
    if problem.is_mixed_integer():
        names = ", ".join(f"'{_name(v)}'" for v in problem.variables()
                          if v.attributes.get("boolean")
                          or v.attributes.get("integer"))
        raise ValueError(
            f"Integer or boolean variables ({names}) are not supported: "
            "the solution of a mixed-integer program is piecewise constant "
            "in the parameters, with no useful gradient. Relax them to "
            "continuous variables (with bounds such as 0 <= x <= 1)."
        )
    if not problem.is_dcp():
        if problem.is_dgp():
            raise ValueError(
                "The problem is a geometric program (DGP: problem.is_dgp() "
                "is True) but not DCP; optlayer takes DCP problems only. "
                "Change variables to their logarithms (x = exp(u)) and take "
                "logarithms of the objective and constraints to write it as "
                "a convex problem (the change CVXPY makes for gp=True).")
        if problem.is_dqcp():
            raise ValueError(
                "The problem is quasiconvex (DQCP: problem.is_dqcp() is "
                "True) but not DCP; optlayer takes DCP problems only "
                "(quasiconvex problems are solved by bisection over convex "
                "ones, whose solution map it does not differentiate).")
        raise ValueError(
            "The problem is not DCP (disciplined convex programming): its "
            "objective or constraints are not convex as written (for "
            "example, maximizing a convex function), so it cannot be a "
            "convex optimization layer. problem.is_dcp() must return True."
        )
    complex_leaves = [leaf for leaf in problem.parameters()
                      + problem.variables() if leaf.is_complex()]
    if complex_leaves:
        names = ", ".join(f"'{_name(leaf)}'" for leaf in complex_leaves)
        raise ValueError(
            f"Complex parameters or variables ({names}) are not supported; "
            "write the problem in terms of their real and imaginary parts "
            "as separate real parameters and variables."
        )
    if not problem.is_dpp() and not (
            quadratic_objective and _dpp_with_quad_form(problem)):
        raise ValueError(
            "The problem is not DPP (disciplined parametrized programming): "
            f"{_not_dpp_parts(problem)}. Rewrite it so that parameters "
            "enter affinely and only where an atom accepts a variable "
            "(not, e.g., as the denominator of quad_over_lin or an "
            "exponent); a product of parameters can be one new "
            "parameter, or split by a variable pinned to a factor times "
            "the rest (y == q * x, then p * y); problem.is_dcp(dpp=True) "
            "must return True."
            + _quad_form_hint(problem)
        )
    parameters = as_list(parameters)
    variables = as_list(variables)
    problem_params = problem.parameters()
    if not problem_params:
        raise ValueError(
            "The problem has no parameters, so the layer would have no "
            "inputs. Declare the data that should vary as cvxpy.Parameter."
        )
    seen = set()
    for i, param in enumerate(parameters):
        if not isinstance(param, cp.Parameter):
            raise ValueError(
                f"parameters[{i}] must be a cvxpy.Parameter, "
                f"got {type(param).__name__}."
            )
        if param.id in seen:
            raise ValueError(
                f"Parameter '{_name(param)}' is listed twice in parameters "
                f"(again at position {i}); list each parameter once."
            )
        seen.add(param.id)
    ids = {p.id for p in problem_params}
    missing = [p for p in problem_params if p.id not in seen]
    if missing:
        names = ", ".join(f"'{_name(p)}'" for p in missing)
        raise ValueError(
            f"The problem's parameter(s) {names} are missing from "
            "parameters; pass every parameter of the problem, in the order "
            "the layer should take them."
        )
    for i, param in enumerate(parameters):
        if param.id not in ids:
            raise ValueError(
                f"parameters[{i}] '{_name(param)}' does not appear in the "
                "problem; pass only the problem's parameters."
            )
    if not variables:
        raise ValueError("variables is empty; request at least one output.")
    problem_vars = {v.id for v in problem.variables()}
    for i, var in enumerate(variables):
        if isinstance(var, cp.Variable) and \
                _owning_constraint(problem, var) is None:
            if var.id not in problem_vars:
                raise ValueError(
                    f"variables[{i}] '{_name(var)}' does not appear in the "
                    "problem; request only the problem's variables or the "
                    "dual variables of its constraints."
                )
        elif _owning_constraint(problem, var) is None:
            raise ValueError(
                f"variables[{i}] must be a cvxpy.Variable of the problem or "
                "a dual variable of one of its constraints "
                "(constraint.dual_variables[0]), "
                f"got {type(var).__name__} '{_name(var)}'."
            )
    return parameters, variables


def _owning_constraint(problem, var):
    """The constraint of ``problem`` whose dual variable ``var`` is."""
    for constraint in problem.constraints:
        for dual in constraint.dual_variables:
            if dual is var:
                return constraint
    return None


def _forward_value(chain, param, value):
    """The reduced parameters' values for ``param``'s value (raveled in
    column-major order), through every reduction of ``chain``."""
    values = {param.id: value}
    for reduction in chain.reductions:
        values = reduction.param_forward(values)
    return {pid: np.asarray(v, dtype=float).ravel(order="F")
            for pid, v in values.items()}


def _selection(chain, param):
    """How the reductions map ``param`` when they only select its entries
    (the upper triangle of a symmetric matrix, a diagonal, a sparsity
    pattern): for each reduced parameter, the index of the entry each of
    its entries comes from (-1 for a constant zero); None when the map is
    not such a selection.

    Two probes decide: the values 1, 2, ..., size name the entries, and
    random values check that the outputs are those entries' values.
    """
    size = param.size
    names = _forward_value(chain, param, np.arange(
        1.0, size + 1.0).reshape(param.shape, order="F"))
    check = np.random.default_rng(0).uniform(1.0, 2.0, size)
    checked = _forward_value(chain, param,
                             check.reshape(param.shape, order="F"))
    if names.keys() != checked.keys():
        return None
    selected = {}
    for pid, value in names.items():
        src = np.rint(value).astype(np.int64) - 1
        if (not np.array_equal(src + 1.0, value) or src.size == 0
                or src.min() < -1 or src.max() >= size):
            return None
        expect = np.where(src >= 0, check[np.maximum(src, 0)], 0.0)
        if not np.array_equal(checked[pid], expect):
            return None
        selected[pid] = src
    return selected


def _param_map(chain, parameters, param_prob):
    """Sparse map S from the layer's theta to the canonical parameter vector.

    Most parameters reach the cone program unchanged (an identity block).
    Parameters with dimension-reducing attributes (symmetric, PSD, diag,
    a sparsity pattern) are replaced by smaller ones during
    canonicalization; the reductions' ``param_forward`` gives the (linear)
    map. Where it selects entries (see :func:`_selection`) two probes give
    it; otherwise it is probed column by column (size^2 work).
    """
    sizes = [p.size for p in parameters]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    rows, cols, vals = [], [], []
    for param, offset in zip(parameters, offsets[:-1]):
        symmetric = any(param.attributes.get(a) for a in _SYMMETRIC)
        if not symmetric and param.id in param_prob.param_id_to_col:
            # Kept as it is by canonicalization: the identity on its block.
            col = param_prob.param_id_to_col[param.id]
            rows.extend(col + np.arange(param.size))
            cols.extend(offset + np.arange(param.size))
            vals.extend(np.ones(param.size))
            continue
        selected = _selection(chain, param)
        if selected is not None:
            # Entry k of a reduced parameter is entry src[k] of this one
            # (its symmetric part's, for a symmetric one).
            for pid, src in selected.items():
                col = param_prob.param_id_to_col[pid]
                k = np.flatnonzero(src >= 0)
                e = src[k]
                if symmetric:
                    rows_ = param.shape[0]
                    e_t = (e % rows_) * rows_ + e // rows_
                    k, e = np.concatenate([k, k]), np.concatenate([e, e_t])
                    weight = np.full(k.size, 0.5)
                else:
                    weight = np.ones(k.size)
                rows.extend(col + k)
                cols.extend(offset + e)
                vals.extend(weight)
            continue
        for k in range(param.size):
            delta = np.zeros(param.size)
            delta[k] = 1.0
            delta = delta.reshape(param.shape, order="F")
            if symmetric:
                # The layer reads a symmetric parameter through its
                # symmetric part, so its gradient is symmetric too.
                delta = (delta + delta.T) / 2
            deltas = {param.id: delta}
            for reduction in chain.reductions:
                deltas = reduction.param_forward(deltas)
            for pid, value in deltas.items():
                col = param_prob.param_id_to_col[pid]
                value = np.asarray(value, dtype=float).ravel(order="F")
                nz = np.flatnonzero(value)
                rows.extend(col + nz)
                cols.extend(np.full(nz.size, offset + k))
                vals.extend(value[nz])
    total = param_prob.total_param_size
    const_col = param_prob.param_id_to_col[_CONSTANT_ID] \
        if _CONSTANT_ID in param_prob.param_id_to_col else total
    rows.append(const_col)
    cols.append(offsets[-1])
    vals.append(1.0)
    S = sp.csr_matrix(
        (vals, (rows, cols)), shape=(total + 1, offsets[-1] + 1)
    )
    return S, tuple(int(o) for o in offsets[:-1])


def _primal_output(chain, param_prob, var, n):
    """The sparse map from the solver's x to the user's variable ``var``."""
    inner = {}
    for vid, col in param_prob.var_id_to_col.items():
        inner[vid] = (col, param_prob.id_to_var[vid])
    if var.id in inner and inner[var.id][1].shape == var.shape:
        col = inner[var.id][0]
        R = sp.csr_matrix(
            (np.ones(var.size), (np.arange(var.size),
                                 col + np.arange(var.size))),
            shape=(var.size, n),
        )
        return R
    # The variable was replaced during canonicalization; find the inner
    # variables that the reductions map back onto it and probe the map.
    rows, cols, vals = [], [], []
    for vid, (col, inner_var) in inner.items():
        for k in range(inner_var.size):
            delta = np.zeros(inner_var.size)
            delta[k] = 1.0
            dvars = {vid: delta.reshape(inner_var.shape, order="F")}
            for reduction in reversed(chain.reductions):
                dvars = reduction.var_forward(dvars)
            if var.id not in dvars:
                break
            value = dvars[var.id]
            if sp.issparse(value):        # diagonal variables map to a
                value = value.toarray()   # sparse matrix
            value = np.asarray(value, dtype=float)
            value = np.reshape(value, var.size, order="F")
            nz = np.flatnonzero(value)
            rows.extend(nz)
            cols.extend(np.full(nz.size, col + k))
            vals.extend(value[nz])
    if not rows and var.size:
        raise ValueError(
            f"Variable '{_name(var)}' was eliminated during canonicalization "
            "and cannot be recovered as an output."
        )
    return sp.csr_matrix((vals, (rows, cols)), shape=(var.size, n))


def _constraint_rows(param_prob):
    """Map inner constraint id -> (type name, first row, number of rows)."""
    rows = {}
    offset = 0
    for ctype, constraints in param_prob.constr_map.items():
        for constraint in constraints:
            size = constraint.size
            rows[constraint.id] = (ctype.__name__, offset, size)
            offset += size
    return rows, offset


def _dual_part(constraint, var, value):
    """The entries of ``var``, one of ``constraint``'s dual variables, in
    CVXPY's dual value of the constraint, flattened column-major.

    Cone constraints with several dual variables (SOC, ExpCone, PowCone3D,
    PowConeND) get one array for all of them from CVXPY's inversion, laid
    out cone by cone (a vectorized SOC or ExpCone interleaves its parts);
    the constraint's own ``save_dual_value`` splits it, as it does after a
    CVXPY solve. The dual variables' values are restored afterwards.
    """
    duals = constraint.dual_variables
    if len(duals) > 1:
        saved = [dual.value for dual in duals]
        try:
            constraint.save_dual_value(np.asarray(value, dtype=float))
            value = var.value
        except Exception as exc:
            raise ValueError(
                f"The dual variable of constraint '{constraint}' cannot be "
                "recovered from the cone program.") from exc
        finally:
            for dual, old in zip(duals, saved):
                dual.save_value(old)
    if value is None or np.size(value) != var.size:
        raise ValueError(
            f"The dual variable of constraint '{constraint}' cannot be "
            "recovered from the cone program.")
    return np.reshape(np.asarray(value, dtype=float), var.size, order="F")


def _dual_output(chain, inverse_data, param_prob, problem, var, m, n):
    """The sparse map from the solver's y to a constraint's dual variable."""
    constraint = _owning_constraint(problem, var)
    cid = constraint.id
    for reduction in chain.reductions:
        cid = getattr(reduction, "cons_id_map", {}).get(cid, cid)
    rows_of, total = _constraint_rows(param_prob)
    if total != m or cid not in rows_of:
        raise ValueError(
            f"The dual variable of constraint '{constraint}' cannot be "
            "located in the canonical cone program."
        )
    ctype, start, size = rows_of[cid]
    if ctype not in _DUAL_CONE_TYPES:
        raise ValueError(
            f"Dual variables of {ctype} constraints are not supported "
            f"(constraint '{constraint}')."
        )
    # Recovery is linear in y: probe CVXPY's own inversion with unit
    # vectors on this constraint's rows.
    rows, cols, vals = [], [], []
    for k in range(size):
        y = np.zeros(m)
        y[start + k] = 1.0
        result = {
            "x": np.zeros(n), "y": y, "s": np.zeros(m),
            "info": {"status_val": 1, "solve_time": 0.0, "setup_time": 0.0,
                     "iter": 0, "pobj": 0.0},
        }
        solution = chain.invert(result, inverse_data)
        value = solution.dual_vars.get(constraint.id)
        if value is None:
            raise ValueError(
                f"The dual variable of constraint '{constraint}' cannot be "
                "recovered from the cone program."
            )
        value = _dual_part(constraint, var, value)
        nz = np.flatnonzero(value)
        rows.extend(nz)
        cols.extend(np.full(nz.size, start + k))
        vals.extend(value[nz])
    return sp.csr_matrix((vals, (rows, cols)), shape=(var.size, m))


def compile_problem(problem, parameters, variables, presolve=True,
                    quadratic_objective=True):
    """Compile ``problem`` into a :class:`CompiledProblem`.

    Args:
        problem: a DPP ``cvxpy.Problem``.
        parameters: all of the problem's parameters, each once, in the order
            the layer takes their values.
        variables: the outputs: variables of the problem or dual variables
            of its constraints (``constraint.dual_variables[0]``).
        presolve: eliminate variables pinned by equalities to affine
            functions of the parameters (see ``optlayer.presolve``).
        quadratic_objective: keep the objective's quadratic part as SCS's
            quadratic term P instead of CVXPY's cone form (second-order
            cones on epigraph variables).

    Raises:
        ValueError: naming what to change, if the problem is not DPP, the
            parameters are not exactly the problem's, or an output is not
            part of the problem.
    """
    parameters, variables = _check_arguments(problem, parameters, variables,
                                             quadratic_objective)
    not_dpp = ValueError(
        "CVXPY compiles this problem as not DPP for a cone solver, although "
        "problem.is_dpp() is True (a parameter inside a quadratic form, "
        "such as quad_form(x - p, P), is one such case). Rewrite it so "
        "that parameters enter affinely, e.g. expand quad_form(x - p, P) "
        "into quad_form(x, P) - 2 (P @ p) @ x.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data, chain, inverse_data = problem.get_problem_data(
                cp.SCS,
                solver_opts={"use_quad_obj": bool(quadratic_objective)}
            )
        except cp.error.ParameterError as exc:
            raise not_dpp from exc
        except cp.error.SolverError as exc:
            hint = ""
            if not problem.constraints and problem.objective.expr.is_affine():
                hint = (" The objective is affine and there are no "
                        "constraints: the problem is unbounded (or its "
                        "objective constant); add the constraints that "
                        "bound it.")
            raise ValueError(
                f"CVXPY cannot compile this problem for the cone solver "
                f"SCS ({exc}).{hint}") from exc
        except Exception as exc:
            callbacks = [(i, p) for i, p in enumerate(parameters)
                         if isinstance(p, cp.CallbackParam)]
            if not callbacks:
                raise
            names = ", ".join(f"{i} '{p.name()}'" for i, p in callbacks)
            raise ValueError(
                f"CVXPY failed compiling the problem ({type(exc).__name__}: "
                f"{exc}); it evaluates the callbacks of CallbackParam "
                f"parameter(s) {names} while compiling, before their inputs "
                "may have values. The layer takes every "
                "parameter's value as an input and never uses the "
                "callback: declare it as a cp.Parameter of the same shape "
                "(and compute its value where you call the layer), or give "
                "the callback's inputs values before building the "
                "layer.") from exc
    if any("not DPP" in str(w.message) for w in caught):
        raise not_dpp
    for w in caught:       # anything else CVXPY had to say
        if "Reading from a sparse CVXPY expression" in str(w.message):
            continue       # CVXPY reading its own sparse parameters
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    param_prob = data[cp.settings.PARAM_PROB]
    n = int(param_prob.x.size)
    try:
        S, offsets = _param_map(chain, parameters, param_prob)
    except KeyError as exc:
        # CVXPY kept no map for a parameter: it compiled the problem as
        # not DPP (possibly earlier, with its result cached).
        raise not_dpp from exc

    # Objective: rows 0..n-1 of q are c, row n is the constant offset.
    Tq = sp.csr_matrix(param_prob.q) @ S
    T_c = sp.csr_matrix(Tq[:n])
    T_offset = sp.csr_matrix(Tq[n:n + 1])

    # Constraints: param_prob.A @ theta is [A_cvx | b_cvx] flattened
    # column-major, with constraints A_cvx x + b_cvx in K. SCS form
    # A x + s = b has A = -A_cvx, b = b_cvx.
    # Only its nonzero rows are mapped: it has m (n + 1) rows, over 1e8
    # for a program with 1e4 variables and constraints.
    A_coo = sp.coo_matrix(param_prob.A)
    m = A_coo.shape[0] // (n + 1)
    live, compact = np.unique(A_coo.row, return_inverse=True)
    T_live = sp.csr_matrix(sp.csr_matrix(
        (A_coo.data, (compact.ravel(), A_coo.col)),
        shape=(live.size, A_coo.shape[1])) @ S)
    in_b = live >= n * m
    b_part = sp.coo_matrix(T_live[np.flatnonzero(in_b)])
    T_b = sp.csr_matrix((b_part.data, (live[in_b][b_part.row] - n * m,
                                       b_part.col)),
                        shape=(m, S.shape[1]))
    TA = sp.csr_matrix(-T_live[np.flatnonzero(~in_b)])
    TA.eliminate_zeros()
    kept = np.flatnonzero(np.diff(TA.indptr))    # drop cancelled entries
    pattern = live[~in_b][kept]                  # column-major positions
    T_A = sp.csr_matrix(TA[kept])
    rows, cols = pattern % m, pattern // m

    # Quadratic objective (1/2) x'Px: param_prob.P @ theta is the full
    # symmetric n x n matrix, flattened column-major.
    # (Only its nonzero rows are kept: n^2 rows would not fit for large n.)
    TP_coo = sp.coo_matrix(param_prob.P) if param_prob.P is not None \
        else sp.coo_matrix((0, S.shape[0]))
    P_pattern, compact = np.unique(TP_coo.row, return_inverse=True)
    T_P = sp.csr_matrix(sp.csr_matrix(
        (TP_coo.data, (compact.ravel(), TP_coo.col)),
        shape=(P_pattern.size, S.shape[0])) @ S)
    live = np.flatnonzero(np.diff(T_P.indptr))   # drop cancelled entries
    T_P, P_pattern = sp.csr_matrix(T_P[live]), P_pattern[live]
    P_rows, P_cols = P_pattern % n, P_pattern // n

    dims = ConeDims.from_scs(_scs_cone_dict(param_prob.cone_dims))
    if dims.size != m:
        raise ValueError(
            "Internal error: cone dimensions do not match the constraint "
            f"rows ({dims.size} != {m})."
        )

    raw_outputs = []
    for var in variables:
        if _owning_constraint(problem, var) is None:
            R = _primal_output(chain, param_prob, var, n)
            raw_outputs.append((_name(var), "x", R, tuple(var.shape)))
        else:
            R = _dual_output(chain, inverse_data, param_prob, problem, var,
                             m, n)
            raw_outputs.append((_name(var), "y", R, tuple(var.shape)))

    p1 = T_A.shape[1]
    if presolve:
        protected = set()
        for _, source, R, _ in raw_outputs:
            if source == "y":
                protected.update(np.flatnonzero(np.diff(
                    sp.csc_matrix(R).indptr)).tolist())
        # Variables of the quadratic objective stay (eliminating them
        # would make c depend on products of parameters).
        pinned, pin_rows = _presolve.find_pinned(
            n, dims.zero, T_b, T_A, rows, cols, protected,
            protected_cols=set(P_cols.tolist()))
    else:
        pinned, pin_rows = {}, []
    if pinned:
        elim, T_b, T_A, rows, cols = _presolve.eliminate(
            n, m, T_b, T_A, rows, cols, pinned, pin_rows)
        T_c = sp.csr_matrix(T_c[elim.keep_cols])
        new_col = np.full(n, -1, dtype=np.int64)
        new_col[elim.keep_cols] = np.arange(elim.keep_cols.size)
        P_rows, P_cols = new_col[P_rows], new_col[P_cols]
        dims = dataclasses.replace(dims, zero=dims.zero - len(pin_rows))
        n, m = elim.keep_cols.size, elim.keep_rows.size
    else:
        elim = _presolve.no_elimination(n, m, p1)

    outputs = []
    for name, source, R, shape in raw_outputs:
        R = sp.csc_matrix(R)
        if source == "x":
            outputs.append(Output(name, "x", sp.csr_matrix(R[:, elim.keep_cols]),
                                  shape,
                                  sp.csr_matrix(R[:, elim.elim_cols])))
        else:
            outputs.append(Output(name, "y", sp.csr_matrix(R[:, elim.keep_rows]),
                                  shape, None))

    # CSC pattern of the kept A, values ordered column by column.
    order = np.lexsort((rows, cols))
    T_A = sp.csr_matrix(T_A[order])
    rows, cols = rows[order], cols[order]
    A_indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(A_indptr, cols + 1, 1)
    A_indptr = np.cumsum(A_indptr)
    A_indices = rows.astype(np.int64)

    return CompiledProblem(
        n=n,
        m=m,
        dims=dims,
        param_names=tuple(_name(p) for p in parameters),
        param_shapes=tuple(tuple(p.shape) for p in parameters),
        param_offsets=offsets,
        T_c=T_c,
        T_b=T_b,
        T_A=T_A,
        A_indices=A_indices,
        A_indptr=A_indptr,
        T_P=T_P,
        P_rows=P_rows.astype(np.int64),
        P_cols=P_cols.astype(np.int64),
        outputs=tuple(outputs),
        objective_offset=T_offset,
        elim=elim,
    )


def _scs_cone_dict(cone_dims):
    """SCS's cone dictionary for CVXPY's cone dimensions."""
    return {
        "z": int(cone_dims.zero),
        "l": int(cone_dims.nonneg),
        "q": [int(q) for q in cone_dims.soc],
        "s": [int(s) for s in cone_dims.psd],
        "ep": int(cone_dims.exp),
        "p": [float(a) for a in cone_dims.p3d],
    }
