"""Side-by-side benchmark: optlayer against cvxpylayers, same inputs, one run.

Run ``python -m benchmarks.compare`` (all workloads, batches 1, 16, 128,
7 repeats) or ``python -m benchmarks.compare --quick`` (the same batches,
one repeat; one to two minutes on two cores).

After the table comes the cost per batch element: for every workload and
library measured at two batch sizes or more, the least-squares line
``total time = intercept + slope * batch`` through the total times (slope
in ms per element, intercept in ms, the fixed cost of a call), and a
linearity check, ``(t(B_max) / t(B_min)) / (B_max / B_min)``: 1 when the
time is proportional to the batch, below 1 when a fixed cost is amortized
over the larger batch, above 1 when the cost per element grows with the
batch. With one repeat the times are single measurements; the fit inherits
their noise.

Method
------
For every workload and batch size one set of random float64 inputs is drawn
(fixed seed) and shared by every library, so all of them solve exactly the
same problems. For each library:

* **What is timed.** The forward pass is the call of the PyTorch layer on
  fresh leaf tensors (``requires_grad=True``); the backward pass is
  ``loss.backward()`` for ``loss = sum(out * w)``, ``w`` a fixed random
  weight of the output's shape. Building the loss is not timed. The layer
  is constructed (the problem compiled) once per workload, outside the
  timings.
* **Medians.** One untimed warm-up call (forward and backward) comes first,
  then ``--repeats`` timed calls; the table reports the median of each of
  forward, backward and their sum (the total is the median of the per-call
  sums, not the sum of the medians).
* **Peak memory.** One extra, untimed call (forward and backward) under
  ``tracemalloc``; the table reports its peak in MB. ``tracemalloc`` sees
  the allocations made through Python's and NumPy's allocators (NumPy and
  SciPy arrays, Python objects); it does NOT see PyTorch's own tensor
  storage nor the memory that compiled solvers allocate internally. It is a
  comparison of the NumPy-side working set, not of the process's RSS.
* **Reference and error.** Each batch element is solved by CVXPY with
  Clarabel at tight tolerances (``tol_gap_abs = tol_gap_rel = tol_feas =
  1e-12``); where Clarabel reports ``optimal_inaccurate`` (its answers
  then differ from the optimum by up to about 1e-7), by CVXPY with SCS at
  eps 1e-12 if that reports optimal. The error of a library is the
  largest absolute difference between its output and the reference over
  the whole batch.
* **Settings.** optlayer runs through ``optlayer_torch.Layer`` with its
  default options (SCS at eps 1e-10, or, for programs small enough, SCS at
  1e-4 and Newton refinement) except ``warm_start=False``: every timed
  call repeats the warm-up's inputs, which a warm start would answer from
  the previous solution without solving; cold calls measure the solves.
  cvxpylayers, when importable, runs through
  its PyTorch layer with its default options (the diffcp backend, whose SCS
  tolerances are looser). The speed-up column is cvxpylayers' total time
  over optlayer's; the accuracy ratio is cvxpylayers' error over optlayer's
  (both above 1 mean optlayer is faster, resp. more accurate).

Workloads
---------
``lp``    50 variables, 100 inequalities ``A x <= b`` and the box
          ``-1 <= x <= 1``; ``A``, ``b``, ``c`` are parameters (batched).
``nnls``  ``min ||A x - b||^2`` subject to ``x >= 0``, ``A`` 100 x 50 and
          ``b`` parameters (batched).
``socp``  10 variables, ``min c'x`` subject to three constraints
          ``||A_i x + b_i|| <= 1`` and ``||x|| <= 1``; ``c``, ``A_i``,
          ``b_i`` parameters (batched).
``relu``  the seed's ReLU layer 20 -> 20; ``W`` and ``b`` unbatched (shared),
          ``x`` batched; batch 300 only (so it has no per-element fit).
``socp40`` (only when asked for) the ``socp`` workload with 40 cones
          ``||A_i x + b_i|| <= 1`` instead of 3.
"""

import argparse
import statistics
import time
import tracemalloc
import warnings

import cvxpy as cp
import numpy as np
import torch

import optlayer_torch
from benchmarks.relu import relu_problem

try:  # optional: only needed for the comparison rows
    from cvxpylayers.torch import CvxpyLayer
except ImportError:  # pragma: no cover - depends on the environment
    CvxpyLayer = None

REFERENCE_OPTIONS = {
    "tol_gap_abs": 1e-12,
    "tol_gap_rel": 1e-12,
    "tol_feas": 1e-12,
    "max_iter": 500,
}
FALLBACK_TOLERANCES = (1e-12, 1e-11, 1e-10, 1e-9)
RELU_BATCH = 300
WORKLOADS = ("lp", "nnls", "socp", "relu")
# Run only when named in --workloads.
EXTRA_WORKLOADS = ("socp40",)
ALL_WORKLOADS = WORKLOADS + EXTRA_WORKLOADS


# ----------------------------------------------------------------------------
# Workloads: each builds (problem, parameters, variables) and samples inputs.
# ----------------------------------------------------------------------------

def build_lp(n=50, m=100):
    """LP: min c'x s.t. A x <= b, -1 <= x <= 1 (the box keeps it bounded)."""
    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    c = cp.Parameter(n)
    problem = cp.Problem(cp.Minimize(c @ x), [A @ x <= b, x >= -1, x <= 1])
    return problem, [A, b, c], [x]


def sample_lp(rng, batch, n=50, m=100):
    """Strictly feasible instances: b = A x0 + slack with x0 inside the box."""
    A = rng.standard_normal((batch, m, n))
    x0 = rng.uniform(-0.5, 0.5, (batch, n))
    b = np.einsum("bmn,bn->bm", A, x0) + rng.uniform(0.1, 1.0, (batch, m))
    c = rng.standard_normal((batch, n))
    return [A, b, c]


def build_nnls(n=50, m=100):
    """Nonnegative least squares: min ||A x - b||^2 s.t. x >= 0."""
    x = cp.Variable(n)
    A = cp.Parameter((m, n))
    b = cp.Parameter(m)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)), [x >= 0])
    return problem, [A, b], [x]


def sample_nnls(rng, batch, n=50, m=100):
    """Tall A (full column rank), so the solution is unique."""
    return [rng.standard_normal((batch, m, n)), rng.standard_normal((batch, m))]


def build_socp(n=10, k=3, r=5):
    """SOCP: min c'x s.t. ||A_i x + b_i|| <= 1 (i < k), ||x|| <= 1."""
    x = cp.Variable(n)
    c = cp.Parameter(n)
    As = [cp.Parameter((r, n)) for _ in range(k)]
    bs = [cp.Parameter(r) for _ in range(k)]
    constraints = [cp.norm(A @ x + b, 2) <= 1 for A, b in zip(As, bs)]
    constraints.append(cp.norm(x, 2) <= 1)
    problem = cp.Problem(cp.Minimize(c @ x), constraints)
    return problem, [c, *As, *bs], [x]


def sample_socp(rng, batch, n=10, k=3, r=5):
    """||b_i|| <= 0.5 keeps x = 0 strictly feasible."""
    c = rng.standard_normal((batch, n))
    As = [rng.standard_normal((batch, r, n)) for _ in range(k)]
    bs = []
    for _ in range(k):
        v = rng.standard_normal((batch, r))
        bs.append(0.5 * v / np.linalg.norm(v, axis=1, keepdims=True)
                  * rng.uniform(0.2, 1.0, (batch, 1)))
    return [c, *As, *bs]


def build_relu(n_in=20, n_out=20):
    """The seed's ReLU problem (Wtilde keeps it DPP)."""
    return relu_problem(n_in, n_out)


def sample_relu(rng, batch, n_in=20, n_out=20):
    """W, b unbatched (shared across the batch), x batched."""
    W = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    b = 0.1 * rng.standard_normal(n_out)
    return [W, b, rng.standard_normal((batch, n_in))]


BUILDERS = {
    "lp": (build_lp, sample_lp),
    "nnls": (build_nnls, sample_nnls),
    "socp": (build_socp, sample_socp),
    "relu": (build_relu, sample_relu),
    "socp40": (lambda: build_socp(k=40),
               lambda rng, batch: sample_socp(rng, batch, k=40)),
}


# ----------------------------------------------------------------------------
# Reference, timing, memory.
# ----------------------------------------------------------------------------

def element(values, params, i):
    """The i-th batch element of ``values`` (unbatched values are shared)."""
    return [v[i] if v.ndim == len(p.shape) + 1 else v
            for v, p in zip(values, params)]


def reference(builder, values, batch):
    """Per-element CVXPY + Clarabel solutions at tight tolerances.

    An element on which Clarabel stalls at 1e-12 (it does on some ReLU
    instances, whose optimal value is near zero) is solved again with the
    tolerances of ``FALLBACK_TOLERANCES`` in turn.

    Returns:
        (solutions, loosest, replaced): an array of shape
        (batch, *output_shape) for the single output, the loosest tolerance
        that was needed, and how many elements Clarabel reported as
        inaccurate and SCS at 1e-12 (as optimal) replaced.
    """
    problem, params, variables = builder()
    out = []
    loosest = REFERENCE_OPTIONS["tol_feas"]
    replaced = 0
    for i in range(batch):
        for p, v in zip(params, element(values, params, i)):
            p.value = v
        for tol in FALLBACK_TOLERANCES:
            options = dict(REFERENCE_OPTIONS, tol_gap_abs=tol, tol_gap_rel=tol,
                           tol_feas=tol)
            try:
                with warnings.catch_warnings():
                    # "Inaccurate" at these tolerances is still far tighter
                    # than either library: keep it rather than abort.
                    warnings.simplefilter("ignore")
                    problem.solve(solver=cp.CLARABEL, **options)
            except cp.error.SolverError:
                continue
            if problem.status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
                break
        else:
            raise RuntimeError(f"reference solve failed on element {i}")
        loosest = max(loosest, tol)
        value = np.array(variables[0].value, dtype=np.float64)
        if problem.status == cp.OPTIMAL_INACCURATE:
            # Clarabel's "inaccurate" answers can be off by 1e-7; SCS at
            # 1e-12 (through CVXPY, independent of optlayer) replaces them
            # when it reports an optimal solution.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    problem.solve(solver=cp.SCS, eps_abs=1e-12,
                                  eps_rel=1e-12, max_iters=200_000)
                except cp.error.SolverError:
                    pass
            if problem.status == cp.OPTIMAL:
                value = np.array(variables[0].value, dtype=np.float64)
                replaced += 1
        out.append(value)
    return np.stack(out), loosest, replaced


def one_call(layer, values, weight):
    """Forward then backward on fresh leaves; returns (fwd s, bwd s, out)."""
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for v in values]
    t0 = time.perf_counter()
    (out,) = layer(*tensors)
    t1 = time.perf_counter()
    loss = (out * weight).sum()
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, out.detach().numpy()


def measure(layer, values, weight, repeats):
    """Warm-up, timed repeats, one tracemalloc call; returns a result dict."""
    one_call(layer, values, weight)
    fwd, bwd, tot = [], [], []
    out = None
    for _ in range(repeats):
        f, b, out = one_call(layer, values, weight)
        fwd.append(f)
        bwd.append(b)
        tot.append(f + b)
    # Separate call: tracemalloc slows allocation, so it stays out of timing.
    tracemalloc.start()
    try:
        one_call(layer, values, weight)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"fwd": statistics.median(fwd), "bwd": statistics.median(bwd),
            "total": statistics.median(tot), "peak_mb": peak / 2**20,
            "out": out}


def make_layers(builder, with_cvxpylayers):
    """One layer per library, each on its own fresh copy of the problem."""
    layers = {"optlayer": optlayer_torch.Layer(*builder(), warm_start=False)}
    if with_cvxpylayers:
        problem, params, variables = builder()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers["cvxpylayers"] = CvxpyLayer(problem, parameters=params,
                                               variables=variables)
    return layers


def run(workloads, batch_sizes, repeats, seed=0):
    """Benchmark every (workload, batch); returns a list of row dicts."""
    rows = []
    for name in workloads:
        builder, sampler = BUILDERS[name]
        layers = make_layers(builder, CvxpyLayer is not None)
        sizes = [RELU_BATCH] if name == "relu" else batch_sizes
        for batch in sizes:
            rng = np.random.default_rng([seed, batch, ALL_WORKLOADS.index(name)])
            values = sampler(rng, batch)
            ref, ref_tol, replaced = reference(builder, values, batch)
            weight = torch.tensor(rng.standard_normal(ref.shape),
                                  dtype=torch.float64)
            for lib, layer in layers.items():
                row = {"workload": name, "library": lib, "batch": batch,
                       "ref_tol": ref_tol, "ref_scs": replaced}
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = measure(layer, values, weight, repeats)
                except Exception as exc:  # noqa: BLE001 - report, go on
                    row["failed"] = f"{type(exc).__name__}: {exc}"[:60]
                else:
                    row.update(res)
                    row["err"] = float(np.max(np.abs(res.pop("out") - ref)))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------

def ratio(num, den):
    """num / den for the table; 'inf' when den is zero."""
    if den == 0:
        return "inf" if num > 0 else "1.00"
    value = num / den
    return f"{value:.2f}" if value < 1000 else f"{value:.1e}"


def format_table(rows):
    """The results as a fixed-width text table (one line per row)."""
    head = (f"{'workload':<8} {'library':<11} {'batch':>5} {'fwd s':>9} "
            f"{'bwd s':>9} {'total s':>9} {'peak MB':>8} {'max err':>9} "
            f"{'speed-up':>8} {'acc ratio':>9}")
    lines = [head, "-" * len(head)]
    by_key = {(r["workload"], r["batch"], r["library"]): r for r in rows}
    for r in rows:
        key = (r["workload"], r["batch"])
        if "failed" in r:
            lines.append(f"{r['workload']:<8} {r['library']:<11} "
                         f"{r['batch']:>5} FAILED {r['failed']}")
            continue
        speed = acc = "-"
        other = by_key.get(key + ("optlayer",))
        if (r["library"] == "cvxpylayers" and other is not None
                and "failed" not in other):
            # Ratios sit on the cvxpylayers row: > 1 means optlayer wins.
            speed = ratio(r["total"], other["total"])
            acc = ratio(r["err"], other["err"])
        lines.append(
            f"{r['workload']:<8} {r['library']:<11} {r['batch']:>5} "
            f"{r['fwd']:>9.4f} {r['bwd']:>9.4f} {r['total']:>9.4f} "
            f"{r['peak_mb']:>8.2f} {r['err']:>9.1e} {speed:>8} {acc:>9}")
    return "\n".join(lines)


def fit_cost_per_element(rows):
    """Least-squares ``total = intercept + slope * batch`` per workload/library.

    Only rows that did not fail count; a (workload, library) pair needs two
    distinct batch sizes or more.

    Returns:
        A list of dicts with "workload", "library", "batches" (sorted),
        "slope" and "intercept" (seconds per element, seconds) and
        "scaling" = (t(B_max) / t(B_min)) / (B_max / B_min).
    """
    groups = {}
    for r in rows:
        if "failed" not in r:
            groups.setdefault((r["workload"], r["library"]), []).append(
                (r["batch"], r["total"]))
    fits = []
    for (workload, library), points in groups.items():
        points.sort()
        batches = np.array([b for b, _ in points], dtype=float)
        times = np.array([t for _, t in points])
        if len(np.unique(batches)) < 2:
            continue
        slope, intercept = np.polyfit(batches, times, 1)
        growth = batches[-1] / batches[0]
        fits.append({"workload": workload, "library": library,
                     "batches": [int(b) for b in batches],
                     "slope": float(slope), "intercept": float(intercept),
                     "scaling": float(times[-1] / times[0] / growth)})
    return fits


def format_fits(fits):
    """The cost-per-element section as text (empty when there is no fit)."""
    if not fits:
        return ""
    title = ("cost per batch element: least-squares fit of the total time, "
             "total = intercept + slope * batch")
    head = (f"{'workload':<8} {'library':<11} {'batches':>10} "
            f"{'slope ms/elem':>13} {'intercept ms':>12} {'scaling':>7}")
    lines = [title, head, "-" * len(head)]
    for f in fits:
        batches = ",".join(str(b) for b in f["batches"])
        lines.append(f"{f['workload']:<8} {f['library']:<11} {batches:>10} "
                     f"{1e3 * f['slope']:>13.3f} "
                     f"{1e3 * f['intercept']:>12.2f} {f['scaling']:>7.2f}")
    lines.append("scaling = (t(B_max) / t(B_min)) / (B_max / B_min): 1 = time "
                 "proportional to the batch, < 1 = fixed cost amortized, > 1 "
                 "= cost per element grows with the batch.")
    return "\n".join(lines)


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(
        description="optlayer vs cvxpylayers: forward/backward time, "
                    "peak NumPy-side memory, error vs a Clarabel reference.")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of "
                             f"{','.join(ALL_WORKLOADS)} (default: "
                             f"{','.join(WORKLOADS)})")
    parser.add_argument("--batch-sizes", default="1,16,128",
                        help="comma-separated batch sizes (relu always "
                             f"uses {RELU_BATCH})")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed calls per measurement (median)")
    parser.add_argument("--quick", action="store_true",
                        help="batches 1,16,128 and one repeat")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w]
    unknown = sorted(set(args.workloads) - set(ALL_WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from "
                     f"{ALL_WORKLOADS}")
    if args.quick:
        args.batch_sizes, args.repeats = "1,16,128", 1
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and batch sizes must be positive")
    return args


def main(argv=None):
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    start = time.perf_counter()
    rows = run(args.workloads, args.batch_sizes, args.repeats, args.seed)
    print(format_table(rows))
    print(f"\nmedian of {args.repeats} timed call(s) after one warm-up; "
          "peak MB = tracemalloc peak (NumPy/Python allocations only) over "
          "one forward+backward; max err = max |out - CVXPY/Clarabel "
          "(tol 1e-12)|; speed-up = cvxpylayers total / optlayer total; "
          "acc ratio = cvxpylayers err / optlayer err.")
    fits = format_fits(fit_cost_per_element(rows))
    if fits:
        print(f"\n{fits}")
    loose = sorted({(r["workload"], r["batch"], r["ref_tol"]) for r in rows
                    if r["ref_tol"] > REFERENCE_OPTIONS["tol_feas"]})
    for name, batch, tol in loose:
        print(f"note: {name} batch {batch}: Clarabel stalled at 1e-12 on some "
              f"elements; they were solved at tolerance {tol:.0e}.")
    scs_refs = sorted({(r["workload"], r["batch"], r["ref_scs"])
                       for r in rows if r.get("ref_scs")})
    for name, batch, count in scs_refs:
        print(f"note: {name} batch {batch}: Clarabel reported {count} "
              "element(s) optimal_inaccurate; the reference there is SCS at "
              "eps 1e-12.")
    if CvxpyLayer is None:
        print("cvxpylayers is not installed: optlayer rows only. Install it "
              "with  pip install 'optlayer[bench]'")
    print(f"wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
