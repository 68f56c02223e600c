"""SCS's linear-system backends on the programs optlayer hands it.

Run ``python -m benchmarks.linear_solvers``. For the generic workloads of
``benchmarks.compare`` (per-element A, as optlayer compiles them) and for
random sparse LPs of several shapes, it times one SCS solve per element at
the tolerance of optlayer's first pass (eps 1e-4) with each backend: SCS's
default ("auto", which takes MKL's sparse solver where MKL is installed),
QDLDL and the dense one, and prints the median time per solve, the median
iteration count and the backend that ``optlayer.solve.linear_solver``
picks. Single-threaded; medians over the elements (and two rounds).

The choice applies to SCS's loose first pass before refinement, so only
to programs small enough to refine (n + m + 1 <= 400); larger programs are
solved at SCS's tight tolerance with its default backend.
"""

import argparse
import time

import numpy as np
import scipy.sparse as sp
import scs

import optlayer
from optlayer import solve as _solve
from benchmarks import compare

BACKENDS = ("auto", _solve.SPARSE, _solve.DENSE)


def workload_programs(name, count, rng):
    """(A, b, c, cone) of ``count`` elements of a compare.py workload."""
    problem, params, variables = getattr(compare, f"build_{name}")()
    layer = optlayer.Layer(problem, params, variables, warm_start=False)
    values = getattr(compare, f"sample_{name}")(rng, count)
    _, _, theta = layer._prepare(layer._as_arrays(values))
    Av, Bv, C, _, _ = layer._data(theta)
    cp_ = layer.compiled
    shape = (cp_.m, cp_.n)
    return [(_solve.assemble_A(Av[i], cp_.A_indices, cp_.A_indptr, shape),
             Bv[i], C[i], layer._cone) for i in range(count)]


def sparse_lp(m, n, density, rng):
    """min c'x s.t. A x <= b, -1 <= x <= 1, A random sparse, feasible."""
    A = sp.random(m, n, density=density, random_state=rng, format="csc")
    A = sp.vstack([A, sp.eye(n), -sp.eye(n)]).tocsc()
    b = A @ rng.uniform(-0.5, 0.5, n) + rng.uniform(0.1, 1.0, A.shape[0])
    return A, b, rng.standard_normal(n), {"l": A.shape[0]}


def time_backend(programs, backend):
    times, iters = [], []
    for _ in range(2):
        for A, b, c, cone in programs:
            start = time.perf_counter()
            solver = scs.SCS({"A": A, "b": b, "c": c}, cone, verbose=False,
                             eps_abs=1e-4, eps_rel=1e-4,
                             linear_solver=backend)
            result = solver.solve()
            times.append(time.perf_counter() - start)
            iters.append(result["info"]["iter"])
    return 1e3 * float(np.median(times)), int(np.median(iters))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16,
                        help="elements per workload")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [(f"{name} (compare.py)",
              workload_programs(name, args.count, rng))
             for name in ("lp", "nnls", "socp")]
    # Sparse programs within the refinement limit (n + m + 1 <= 400).
    for m, n, density in [(50, 100, 0.05), (150, 60, 0.1), (300, 30, 0.1)]:
        cases.append((f"sparse LP {m}x{n}, density {density}",
                      [sparse_lp(m, n, density, rng)
                       for _ in range(max(1, args.count // 8))]))
    backends = [b for b in BACKENDS if b is not None]
    head = f"{'program':34} {'n':>5} {'nnz(A)':>7} " + " ".join(
        f"{b + ' ms':>14}" for b in backends) + "  picked"
    print(head)
    print("-" * len(head))
    for label, programs in cases:
        A = programs[0][0]
        cells = []
        for backend in backends:
            ms, it = time_backend(programs, backend)
            cells.append(f"{ms:9.2f} ({it:3d})")
        picked = _solve.linear_solver(A.shape[1], A.nnz)
        print(f"{label:34} {A.shape[1]:5d} {A.nnz:7d} " + " ".join(cells)
              + f"  {picked}")
    print("\nms = median time of one SCS solve (setup included) at eps "
          "1e-4, (iterations) median count; picked = the backend optlayer "
          "uses for its first pass.")


if __name__ == "__main__":
    main()
