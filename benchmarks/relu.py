"""The reference workload: a ReLU network made of convex-optimization layers.

Each ReLU layer z = max(Wx + b, 0) is written as the convex problem

    minimize ||z - Wtilde x - b||^2  subject to  z >= 0,  Wtilde = W,

two of them and a linear layer form a network trained with Adam (lr 1e-2)
on random data: by default 25 steps on 300 samples of width 20, i.e. 15,000
solves and 15,000 backward passes per framework.

Every framework starts from the same weights and data, made here once in
NumPy, so their loss curves must coincide. A reference curve is computed in
plain NumPy with the closed-form ReLU and hand-written backpropagation from
the same start. Each framework runs in its own process so that its time and
peak memory are its own.

With ``--compare`` the same training loop is then run with cvxpylayers'
layers instead of optlayer's (``benchmarks/relu_cvxpylayers.py``), on
PyTorch and JAX (cvxpylayers has no TensorFlow layer here), each in its own
process measured the same way. cvxpylayers runs on the chosen frameworks it
supports, or on every one it supports when none of them is chosen (e.g.
``--framework tf``); a framework for which cvxpylayers (or its diffcp
backend) is not importable is skipped with a note. The summary then has a
row per cvxpylayers run, a "speed-up" column for optlayer's rows (the
fastest cvxpylayers wall time of the run over the row's wall time, > 1 means
optlayer is faster) and one line per optlayer framework comparing it with
cvxpylayers on the same framework.

Usage:
    optlayer-relu                       # all installed frameworks
    optlayer-relu --framework torch --steps 5 --plot curves.png
    optlayer-relu --compare             # and cvxpylayers, side by side
"""

import argparse
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

FRAMEWORKS = ("torch", "jax", "tf")
_MODULES = {"torch": "torch", "jax": "jax", "tf": "tensorflow"}
# Frameworks with a cvxpylayers layer, and the worker name of each run.
CVXPYLAYERS_FRAMEWORKS = ("torch", "jax")
_CVXPYLAYERS_PREFIX = "cvxpylayers-"
WORKERS = FRAMEWORKS + tuple(_CVXPYLAYERS_PREFIX + fw
                             for fw in CVXPYLAYERS_FRAMEWORKS)


def relu_problem(input_dim, output_dim):
    """The seed's ReLU problem; returns ``(problem, [W, b, x], [z])``.

    ``z = max(W x + b, 0)`` minimizes ``||z - Wtilde x - b||^2`` subject to
    ``z >= 0`` and ``Wtilde == W``; the copy ``Wtilde`` keeps the product of
    two parameters DPP (the presolve removes it again).
    """
    import cvxpy as cp

    z = cp.Variable(output_dim)
    Wtilde = cp.Variable((output_dim, input_dim))
    W = cp.Parameter((output_dim, input_dim))
    b = cp.Parameter(output_dim)
    x = cp.Parameter(input_dim)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(z - Wtilde @ x - b)),
                         [z >= 0, Wtilde == W])
    return problem, [W, b, x], [z]


def make_problem_data(d=20, h=20, n_samples=300, seed=0):
    """Initial weights and data, as float64 NumPy arrays.

    ReLU weights and biases ~ 1e-3 N(0, 1) as in the reference example; the
    final linear layer uses Glorot-uniform weights and a zero bias.
    """
    rng = np.random.default_rng(seed)
    limit = np.sqrt(6.0 / (h + 1))
    init = {
        "W1": 1e-3 * rng.standard_normal((h, d)),
        "b1": 1e-3 * rng.standard_normal(h),
        "W2": 1e-3 * rng.standard_normal((h, h)),
        "b2": 1e-3 * rng.standard_normal(h),
        "W3": rng.uniform(-limit, limit, size=(1, h)),
        "b3": np.zeros(1),
    }
    X = rng.standard_normal((n_samples, d))
    Y = rng.standard_normal((n_samples, 1))
    return init, X, Y


def reference_curve(init, X, Y, steps=25, lr=1e-2, beta1=0.9, beta2=0.999,
                    eps=1e-8):
    """Losses of the closed-form network trained by Adam, in NumPy."""
    params = {k: v.copy() for k, v in init.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    n = X.shape[0]
    losses = []
    for t in range(1, steps + 1):
        a1 = X @ params["W1"].T + params["b1"]
        h1 = np.maximum(a1, 0)
        a2 = h1 @ params["W2"].T + params["b2"]
        h2 = np.maximum(a2, 0)
        out = h2 @ params["W3"].T + params["b3"]
        diff = out - Y
        losses.append(float(np.mean(diff ** 2)))
        # Backpropagation of mean((out - Y)^2).
        g_out = 2.0 * diff / n
        grads = {"W3": g_out.T @ h2, "b3": g_out.sum(axis=0)}
        g_a2 = (g_out @ params["W3"]) * (a2 > 0)
        grads["W2"] = g_a2.T @ h1
        grads["b2"] = g_a2.sum(axis=0)
        g_a1 = (g_a2 @ params["W2"]) * (a1 > 0)
        grads["W1"] = g_a1.T @ X
        grads["b1"] = g_a1.sum(axis=0)
        for k, p in params.items():
            m[k] = beta1 * m[k] + (1 - beta1) * grads[k]
            v[k] = beta2 * v[k] + (1 - beta2) * grads[k] ** 2
            m_hat = m[k] / (1 - beta1 ** t)
            v_hat = v[k] / (1 - beta2 ** t)
            params[k] = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return losses


def train_result(losses, forward_time, backward_time, wall_time,
                 max_output_error, max_grad_error):
    """The dict every framework's ``train`` returns (see ``run_worker``)."""
    return {
        "losses": losses,
        "forward_time": forward_time,
        "backward_time": backward_time,
        "wall_time": wall_time,
        "max_output_error": max_output_error,
        "max_grad_error": max_grad_error,
    }


def installed_frameworks():
    """The frameworks whose packages can be imported here."""
    return [fw for fw in FRAMEWORKS
            if importlib.util.find_spec(_MODULES[fw]) is not None]


def _importable(name):
    """Whether module ``name`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def cvxpylayers_frameworks():
    """The frameworks on which cvxpylayers can run here.

    A framework counts when it, ``cvxpylayers.<framework>`` and diffcp
    (cvxpylayers' default backend) can all be found.
    """
    if not (_importable("cvxpylayers") and _importable("diffcp")):
        return []
    return [fw for fw in CVXPYLAYERS_FRAMEWORKS
            if _importable(_MODULES[fw]) and _importable(f"cvxpylayers.{fw}")]


def _peak_rss_mb():
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(args):
    """Train on one framework in this process; print a JSON result.

    ``args.worker`` is a framework (optlayer's layers) or
    ``cvxpylayers-<framework>`` (cvxpylayers' layers). The peak RSS after
    importing the framework and the layer library is reported as
    "rss_import_mb", the peak at the end as "rss_peak_mb".
    """
    init, X, Y = make_problem_data(args.input_dim, args.width,
                                   args.batch_size, args.seed)
    options = {}
    if args.worker.startswith(_CVXPYLAYERS_PREFIX):
        fw = args.worker[len(_CVXPYLAYERS_PREFIX):]
        importlib.import_module(_MODULES[fw])
        importlib.import_module(f"cvxpylayers.{fw}")
        module = importlib.import_module("benchmarks.relu_cvxpylayers")
        options["framework"] = fw
    else:
        importlib.import_module(_MODULES[args.worker])
        module = importlib.import_module(f"benchmarks.relu_{args.worker}")
    rss_import = _peak_rss_mb()
    log = (lambda s: None) if args.quiet else (
        lambda s: print(f"[{args.worker}] {s}", file=sys.stderr, flush=True))
    result = module.train(init, X, Y, steps=args.steps, lr=args.lr,
                          n_jobs=args.n_jobs, log=log, **options)
    result = {k: (float(v) if isinstance(v, (np.floating, float)) else v)
              for k, v in result.items()}
    result["losses"] = [float(x) for x in result["losses"]]
    result["rss_import_mb"] = rss_import
    result["rss_peak_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _run_framework(fw, args):
    """Run worker ``fw`` (see ``WORKERS``) in a subprocess; its result."""
    cmd = [sys.executable, "-m", "benchmarks.relu", "--worker", fw,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--width", str(args.width), "--input-dim", str(args.input_dim),
           "--seed", str(args.seed), "--lr", str(args.lr)]
    if args.n_jobs:
        cmd += ["--n-jobs", str(args.n_jobs)]
    if args.quiet:
        cmd.append("--quiet")
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {fw} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header])
              for i in range(len(header))]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths))
            for r in rows]
    return "\n".join(out)


def main(argv=None):
    """Run the ReLU example on the chosen frameworks and summarize."""
    parser = argparse.ArgumentParser(
        prog="optlayer-relu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", default="all",
                        help="tf, torch, jax, a comma-separated list, or all "
                             "(default: all installed)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=300,
                        help="number of samples (full-batch training)")
    parser.add_argument("--width", type=int, default=20,
                        help="width of the hidden ReLU layers")
    parser.add_argument("--input-dim", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n-jobs", type=int, default=None,
                        help="solver threads (default: all cores); with "
                             "--compare also diffcp's threads in the "
                             "cvxpylayers runs")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="draw the loss curves (needs matplotlib)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not print the per-step losses")
    parser.add_argument("--compare", action="store_true",
                        help="also train with cvxpylayers' layers (PyTorch, "
                             "JAX; default settings), each in its own "
                             "process, and add their rows and optlayer's "
                             "speed-up to the summary")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    available = installed_frameworks()
    if args.framework == "all":
        chosen = available
    else:
        chosen = [f.strip() for f in args.framework.split(",") if f.strip()]
        for fw in chosen:
            if fw not in FRAMEWORKS:
                parser.error(f"unknown framework {fw!r}; choose from "
                             f"{', '.join(FRAMEWORKS)} or all")
            if fw not in available:
                parser.error(f"{fw} is not installed; pip install "
                             f"'optlayer[{fw}]'")
    if not chosen:
        parser.error("no framework is installed; pip install 'optlayer[all]'")

    init, X, Y = make_problem_data(args.input_dim, args.width,
                                   args.batch_size, args.seed)
    t0 = time.perf_counter()
    reference = reference_curve(init, X, Y, steps=args.steps, lr=args.lr)
    ref_time = time.perf_counter() - t0
    print(f"reference (closed-form ReLU, NumPy): final loss "
          f"{reference[-1]:.12f} in {ref_time:.3f} s")

    results = {}
    for fw in chosen:
        print(f"\n== {fw} ==", flush=True)
        res = _run_framework(fw, args)
        for k, loss in enumerate(res["losses"]):
            print(f"step {k:3d}  loss {loss:.12f}")
        results[fw] = res

    # cvxpylayers, on the chosen frameworks it supports (or all of them).
    others, notes = {}, []
    if args.compare:
        compare_fws, notes = _compare_frameworks(chosen)
        for fw in compare_fws:
            print(f"\n== cvxpylayers/{fw} ==", flush=True)
            try:
                res = _run_framework(_CVXPYLAYERS_PREFIX + fw, args)
            except (RuntimeError, ValueError, IndexError) as exc:
                notes.append(f"note: the cvxpylayers/{fw} run failed ({exc}); "
                             f"its row is skipped.")
                continue
            for k, loss in enumerate(res["losses"]):
                print(f"step {k:3d}  loss {loss:.12f}")
            others[fw] = res

    solves = 2 * args.batch_size * args.steps
    fastest = min((r["wall_time"] for r in others.values()), default=None)
    rows = []
    labelled = [(f"optlayer/{fw}" if args.compare else fw, res, True)
                for fw, res in results.items()]
    labelled += [(f"cvxpylayers/{fw}", res, False)
                 for fw, res in others.items()]
    for label, res, ours in labelled:
        dev = max(abs(a - b) for a, b in zip(res["losses"], reference))
        row = [
            label,
            f"{res['losses'][-1]:.10f}",
            f"{res['wall_time']:.2f}",
            f"{solves / res['wall_time']:.0f}",
            f"{res['forward_time']:.2f}",
            f"{res['backward_time']:.2f}",
            f"{res['rss_peak_mb']:.0f}",
            f"{res['rss_peak_mb'] - res['rss_import_mb']:.0f}",
            f"{res['max_output_error']:.1e}",
            f"{res['max_grad_error']:.1e}",
            f"{dev:.1e}",
        ]
        if args.compare:
            row.append(f"{fastest / res['wall_time']:.2f}"
                       if ours and fastest is not None else "-")
        rows.append(row)
    header = ["framework", "final loss", "wall s", "solves/s", "fwd s",
              "bwd s", "peak MB", "MB over import", "max out err",
              "max grad err", "max |loss-ref|"]
    if args.compare:
        header.append("speed-up")
    print(f"\nsummary: {args.steps} steps, {args.batch_size} samples, "
          f"width {args.width}, {solves} solves and {solves} backward passes "
          f"per framework, {os.cpu_count()} cores")
    print(_table(rows, header))
    if len(results) > 1:
        curves = np.array([r["losses"] for r in results.values()])
        spread = curves.max(axis=0) - curves.min(axis=0)
        between = "optlayer's frameworks'" if args.compare else "frameworks'"
        print(f"largest difference between {between} losses at a step: "
              f"{spread.max():.1e} (step {int(spread.argmax())})")
    if args.compare:
        _print_comparison(results, others, notes)
    if args.plot:
        _plot(args.plot, results, reference, others)
        print(f"loss curves written to {args.plot}")
    return 0


def _compare_frameworks(chosen):
    """cvxpylayers' frameworks for ``--compare`` and notes on those skipped.

    The chosen frameworks that cvxpylayers supports; when there is none
    (e.g. only TensorFlow was chosen), every framework it supports. Of
    those, the ones on which cvxpylayers cannot be imported are skipped.
    """
    wanted = [fw for fw in chosen if fw in CVXPYLAYERS_FRAMEWORKS]
    if not wanted:
        wanted = list(CVXPYLAYERS_FRAMEWORKS)
    importable = cvxpylayers_frameworks()
    if not importable:
        return [], [("note: --compare: cvxpylayers (with its diffcp "
                     "backend) is not importable, so there are no "
                     "cvxpylayers rows; pip install 'optlayer[bench]'")]
    notes = [f"note: --compare: cvxpylayers/{fw} skipped ({_MODULES[fw]} "
             f"or cvxpylayers.{fw} is not importable)"
             for fw in wanted if fw not in importable]
    return [fw for fw in wanted if fw in importable], notes


def _print_comparison(results, others, notes):
    """One line per optlayer framework against cvxpylayers, then notes."""
    print("\noptlayer against cvxpylayers on the same framework "
          "(speed-up = cvxpylayers wall time / optlayer wall time):")
    for fw, res in results.items():
        other = others.get(fw)
        if other is None:
            why = ("cvxpylayers has no layer for it"
                   if fw not in CVXPYLAYERS_FRAMEWORKS else "no cvxpylayers run")
            print(f"  {fw}: optlayer {res['wall_time']:.2f} s; {why}")
            continue
        speed_up = other["wall_time"] / res["wall_time"]
        print(f"  {fw}: optlayer {res['wall_time']:.2f} s, cvxpylayers "
              f"{other['wall_time']:.2f} s, speed-up {speed_up:.2f}")
    if others:
        name, best = min(others.items(), key=lambda kv: kv[1]["wall_time"])
        print(f"the speed-up column divides the fastest cvxpylayers run "
              f"(cvxpylayers/{name}, {best['wall_time']:.2f} s) by each "
              f"optlayer row's wall time.")
    for note in notes:
        print(note)


def _plot(path, results, reference, others=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install "
                         "'optlayer[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(reference, "k-", lw=3, alpha=0.3, label="closed form (NumPy)")
    for (fw, res), style in zip(results.items(), ["o-", "s--", "^:"]):
        ax.plot(res["losses"], style, ms=3, label=f"optlayer ({fw})")
    for (fw, res), style in zip((others or {}).items(), ["x-.", "d-."]):
        ax.plot(res["losses"], style, ms=3, label=f"cvxpylayers ({fw})")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
