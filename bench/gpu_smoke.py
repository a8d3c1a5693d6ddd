"""A first look at one fused backend on this GPU, before anything is timed.

Runs one backend (and, for triton, one launch route) on a few problems, a
forward with the plan and a forward + backward each, twice, and compares the
refined score, the plan and the gradient with the ``cpu`` backend run on the
same values in float64 (the same per-problem stopping rule and the same
implicit gradient). The bounds are loose on purpose: this is not the test
suite (``pytest -m gpu``) but a guard that catches a backend which crashes,
corrupts memory or returns garbage, so that ``bench/gpu_check.sh`` can leave
it out of the benchmark instead of losing the whole run to it. It also checks
that the route asked for is the one that ran: with ``triton`` (launches from
C++ after each kernel variant's first call) the second call of each problem
must have been launched from C++ and must give bitwise the first call's
results (the same kernel on the same arguments).

    python bench/gpu_smoke.py cuda | triton | triton-python [--device cuda]

One backend per process: a kernel that faults leaves the CUDA context
unusable, and the check of the next backend must not inherit that.
``triton-python`` sets ``OTSEG_TRITON_LAUNCH=python`` before otseg is
imported. ``--device cpu`` runs the same checks on CPU tensors (the ``cpu``
backend; ``triton-python`` under ``TRITON_INTERPRET=1``), so that the script
itself is tested without a GPU (tests/test_bench.py).

Exit status: 0 passed; 1 a wrong result or an error; 3 the triton route asked
for did not run (e.g. the C++ launches were refused: a slower host side, not a
wrong result). A crash gives the signal's status.
"""

import argparse
import os
import sys

ROUTES = ("cpu", "cuda", "triton", "triton-python")

# (name, B, K, M, N, generator, dtype, layout): a converged CLIP-like case, a
# hard one at the benchmark's largest M x N, and an odd-sized half-precision
# one read through a transposed view.
PROBLEMS = (
    ("voc/clip", 2, 20, 1024, 6, "clip", "float32", "contiguous"),
    ("coco/hard", 2, 16, 1024, 8, "hard", "float32", "contiguous"),
    ("odd/bf16", 3, 5, 37, 7, "hard", "bfloat16", "transposed"),
)
SMALL_PROBLEMS = (  # --small: sizes the interpreter runs in seconds
    ("small/clip", 1, 3, 33, 6, "clip", "float32", "contiguous"),
    ("odd/bf16", 2, 3, 17, 5, "hard", "bfloat16", "transposed"),
)
EPS, MAX_ITER, TOL = 0.05, 100, 1e-6
# Largest error allowed, relative to the largest reference value: float32 and
# float64 runs may stop an iteration apart; bfloat16 rounds the outputs.
BOUND = {"float32": 1e-3, "bfloat16": 3e-2}


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("route", choices=ROUTES)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="small problems only (for the CPU interpreter)")
    return parser.parse_args(argv)


def _scores(problem, device):
    import torch

    from otseg.benchmark.generators import Case, make_scores

    name, B, K, M, N, gen, dtype, layout = problem
    # The text embeddings clip scores use; hard scores use only the shape.
    case = Case(name, B, K, M, N, {6: "voc20", 8: "cocostuff171"}.get(N, "voc20"))
    s = make_scores(case, gen, 0).to(getattr(torch, dtype))
    if layout == "transposed":
        return s.transpose(-1, -2).contiguous().to(device).transpose(-1, -2)
    return s.to(device)


def _err(actual, expected):
    """max |actual - expected| / max |expected| (both taken to float64 CPU)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-30))


def _run(backend, x, w):
    """(score, plan, n_iter, grad) of one forward with the plan and one
    forward + backward of the loss (score * w).sum()."""
    import torch

    from otseg import ops

    with torch.no_grad():
        score, plan, info = ops.mps(x, EPS, MAX_ITER, TOL, return_plan=True, return_info=True,
                                    backend=backend, check_finite=False)
    xg = x.detach().clone().requires_grad_(True)  # the clone keeps the layout (dense strides)
    s2 = ops.mps(xg, EPS, MAX_ITER, TOL, backend=backend, check_finite=False)
    (s2.float() * w).sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()  # an asynchronous fault surfaces here, not in the next problem
    if info.backend != backend:
        raise AssertionError(f"asked for {backend}, ran {info.backend}")
    return score, plan, info.n_iter, xg.grad


def main(argv=None):
    args = _parse(argv)
    route = args.route
    if route == "triton-python":
        os.environ["OTSEG_TRITON_LAUNCH"] = "python"  # before otseg reads it
    if args.device == "cpu" and route.startswith("triton"):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from otseg import ops

    backend = "triton" if route.startswith("triton") else route
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_smoke.py --device cuda needs a CUDA GPU")
    status = ops.backends()
    if not any(s.name == backend and s.available for s in status):
        print(f"gpu_smoke {route}: backend {backend} is not available: "
              f"{next((s for s in status if s.name == backend), 'unknown backend')}")
        return 1
    tb = None
    if backend == "triton":
        from otseg.ops.mps import triton as tb

        print(f"gpu_smoke {route}: triton launch route {tb.launch_stats()['route']}")
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    failures = 0
    for problem in SMALL_PROBLEMS if args.small else PROBLEMS:
        name, dtype = problem[0], problem[6]
        x = _scores(problem, args.device)
        w = torch.randn(x.shape[:-1], generator=torch.Generator().manual_seed(2)).to(args.device)
        try:
            first = _run(backend, x, w)
            second = _run(backend, x, w)
            ref_x = x.detach().double().cpu()
            ref = _run("cpu", ref_x, w.double().cpu())
            errs = {what: _err(a, r) for what, a, r in zip(("score", "plan", "grad"),
                                                            (second[0], second[1], second[3]),
                                                            (ref[0], ref[1], ref[3]))}
            iters = (float(second[2].float().mean()), float(ref[2].float().mean()))
            same = all(torch.equal(a, b) for a, b in zip(first, second))
        except Exception as exc:  # noqa: BLE001  (report the problem and go on to the next)
            failures += 1
            print(f"FAIL {route} {name} {dtype}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        bound = BOUND[dtype]
        bad = [k for k, e in errs.items() if not e <= bound]
        # Two calls of one backend on the same input must agree bitwise; for
        # the triton route the second is the C++ launch of the first's kernel.
        if not same:
            bad.append("the two calls differ")
        failures += bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {route} {name} {dtype} {tuple(x.shape)} on {where}: "
              + ", ".join(f"{k} err {e:.1e}" for k, e in errs.items())
              + f" (bound {bound:.0e}); iterations mean {iters[0]:.2f} (float64 cpu {iters[1]:.2f}); "
              f"calls bitwise equal: {same}" + (f"  <- {'; '.join(bad)}" if bad else ""))
    if failures:
        print(f"gpu_smoke {route}: FAILED on {failures} problem(s)")
        return 1
    if tb is not None:
        stats = tb.launch_stats()
        print(f"gpu_smoke {route}: launch_stats {stats}")
        if stats["cpp_failed"]:
            print(f"gpu_smoke {route}: FAILED: {stats['cpp_failed']} launch(es) from C++ failed")
            return 1
        want_cpp = route == "triton" and args.device == "cuda"
        ran_cpp = stats["cpp_forward"] > 0 and stats["cpp_backward"] > 0
        if want_cpp and not ran_cpp:
            print(f"gpu_smoke {route}: the C++ launch route did not run (route {stats['route']})")
            return 3
        if not want_cpp and (stats["cpp_forward"] or stats["cpp_backward"]):
            print(f"gpu_smoke {route}: launches went through C++ although {route} asks for Python")
            return 1
    print(f"gpu_smoke {route}: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
