"""Where a fused GPU call's time goes: the kernels or the host.

For each case and backend, times one forward (and one raw backward op) two
ways on the same inputs: called eagerly, as `otseg bench` does (CUDA events
around the Python call), and replayed from a CUDA graph captured from the
same call, which leaves only the GPU's work. The difference is what the host
adds per call (Python, dispatch, allocation, launches); the graph time is
what a kernel change can improve, and its GB/s is set against the
device-to-device copy bandwidth measured here. The forward is also timed
through ``otseg.ops.mps`` as ``otseg bench`` calls it ("mps eager"): the
Python in front of the operator is the difference from "fwd eager". The triton backend is timed
twice: through its C++ entries (launches from C++ after the first call) and
through its Python operators (every launch through Triton's launcher).

Then, for the triton backend, the same graph times of its raw launches with
each warp count in ``--warps`` (the launchers' ``num_warps``), on the largest
case: which launch configuration this GPU prefers (``_blocks`` in
otseg/ops/mps/triton.py picks one without measuring); and the forward's
variants (``FWD_VARIANTS``: the scores held in registers or reread, with or
without a register cap, with or without the full tile's specialisation), and
how far their outputs are from the default's.
With ``--triton-baseline FILE`` (another version of kernels/mps.py, e.g.
``git show COMMIT:kernels/mps.py > FILE``), that file's forward kernel is
timed against this tree's on every case, in the same process on the same
GPU: a kernel change's speedup without comparing runs on different machines.

Last, the host's side of a forward+backward call through autograd (as the
benchmark makes it) per backend, on the first case: torch.profiler's table of
its CPU-side operators.

    python bench/gpu_profile.py [--cases voc coco coco16] [--warps 2 4 8] [--backends cuda triton]
                                [--triton-baseline FILE] [--no-host-profile] [--out FILE]

Needs a CUDA GPU (bench/gpu_check.sh runs it). Prints a markdown table.
"""

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys

import torch

from otseg import ops
from otseg.ops.mps import triton as tb
from otseg.benchmark.generators import CASES, EPS, make_scores
from otseg.benchmark.measure import copy_bandwidth_gbs, median_ms


# The triton backend's Python operators, whose launches all go through
# Triton's Python launcher: the host's work before C++ launches.
PY_TRITON = "triton (Python launches)"


def _events_ms(fn, repeats=50):
    """Median ms of fn() between two CUDA events, after warm-up calls."""
    for _ in range(4):
        fn()
    return median_ms(fn, "cuda", repeats=repeats)[0]


def _graph_ms(fn, replays=20):
    """Median ms of one call replayed from a CUDA graph (GPU work only)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _events_ms(graph.replay, replays)


def _ops(backend):
    """(forward, backward) callables of one backend's raw operators on [P, M, N].

    "triton": the C++ entries (``otseg::mps_triton``, ``mps_triton_backward``),
    which launch the Triton kernels from C++ once the first call has
    registered them (csrc/triton/launch.h); "triton (Python launches)": the
    Python operators, whose every launch goes through Triton's launcher."""
    if backend == "cuda":
        fwd = lambda s: torch.ops.otseg.mps_forward(s, EPS, 100, 1e-6, False, False)  # noqa: E731
        bwd = torch.ops.otseg.mps_backward
    elif backend == "triton":
        fwd = lambda s: torch.ops.otseg.mps_triton(s, EPS, 100, 1e-6, False)  # noqa: E731
        bwd = torch.ops.otseg.mps_triton_backward
    else:
        fwd = lambda s: torch.ops.otseg.mps_forward_triton(s, EPS, 100, 1e-6, False)  # noqa: E731
        bwd = torch.ops.otseg.mps_backward_triton
    return fwd, bwd


def _flat_scores(case, gen, device="cuda"):
    """A case's scores as contiguous [P, M, N] float32 on the GPU, and the
    bytes a forward must move (read them, write the refined score)."""
    scores = make_scores(case, gen, 0, device).reshape(-1, case.M, case.N).contiguous()
    return scores, scores.numel() * 4 + scores.shape[0] * case.M * 4


def _forward_outputs(scores):
    """Outputs of a raw triton forward of [P, M, N] scores, no plan: (score,
    None, f, g, n_iter)."""
    P, M, N = scores.shape
    return (scores.new_empty(P, M), None, scores.new_empty(P, M), scores.new_empty(P, N),
            torch.empty(P, dtype=torch.int32, device=scores.device))


def _warp_sweep(case_name, generators, warps, copy):
    """Graph times (us) of the triton backend's raw launches per warp count."""
    case = CASES[case_name]
    blocks = tb._blocks(case.M, case.N)
    lines = [
        f"triton launches on {case_name} [M={case.M}, N={case.N}] by warp count (defaults: forward "
        f"{blocks.fwd_warps}, backward {blocks.bwd_warps}); the forward's variant is the launchers' at every count "
        f"(HOLD_S={tb.FWD_HOLD_S}, maxnreg {tb.FWD_MAXNREG} up to 12 warps, none above); graph times in us, GB/s of "
        "the forward as above.",
        "",
        "| scores | warps | fwd graph | fwd GB/s (% copy) | bwd graph |",
        "|---|---|---|---|---|",
    ]
    for gen in generators:
        scores, nbytes = _flat_scores(case, gen)
        P = scores.shape[0]
        score, _, f, g, n_iter = _forward_outputs(scores)
        ds = torch.randn(P, case.M, device="cuda")
        grad = torch.empty_like(scores)
        for w in warps:
            try:
                fwd = lambda: tb.launch_forward(scores, EPS, 100, 1e-6, score, None, f, g, n_iter, num_warps=w)  # noqa: E731
                fg = _graph_ms(fwd) * 1e3
                bwd = lambda: tb.launch_backward(ds, None, scores, f, g, EPS, grad, num_warps=w)  # noqa: E731
                bg = _graph_ms(bwd) * 1e3
            except Exception as exc:  # noqa: BLE001  (report and go on)
                lines.append(f"| {gen} | {w} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]} | | |")
                continue
            gbs = nbytes / (fg * 1e-6) / 1e9
            lines.append(f"| {gen} | {w} | {fg:.1f} | {gbs:.0f} ({gbs / copy:.0%}) | {bg:.1f} |")
    return lines


# Triton forward variants on the largest case: (HOLD_S, register cap), the
# default first (otseg/ops/mps/triton.py, FWD_HOLD_S and FWD_MAXNREG). With
# the scores reread (HOLD_S=False) a thread of 1024 x 8 needs 198 registers
# on sm_90 (bench/triton_sass.py), 2 problems of 4 warps an SM; capped at 168
# (no spills, statically) it fits 3, at 128 (120 B of spills) 4; the scores
# held, 255 registers. Third: the full tile's specialisation (EVEN_M,
# EVEN_N where the shape fills the tile: True, launch_forward's default) or
# not (False: the masks at run time, the same outputs bitwise).
FWD_VARIANTS = ((tb.FWD_HOLD_S, tb.FWD_MAXNREG, True), (True, None, True), (False, None, True), (False, 128, True),
                (True, 168, True), (tb.FWD_HOLD_S, tb.FWD_MAXNREG, False))


def _differences(want, got):
    """How two forwards' outputs (score, f, g, n_iter) differ: the largest
    difference of the float outputs, each relative to the largest magnitude
    of that output (+1; 0 when they are bitwise the same), and, as text, the
    problems whose iteration counts differ ("0", or "k of P, by up to d").
    Kept apart: a count one apart on one problem (a stopping test that falls
    the other side of tol after a rounding) is not a difference of values,
    and as one it read 1/(iterations + 1), 1.7e-2 on the hard scores."""
    worst, iters = 0.0, "0"
    for a, b in zip(want, got):
        if not a.is_floating_point():
            d = (a.long() - b.long()).abs()
            k = int((d > 0).sum())
            iters = "0" if k == 0 else f"{k} of {d.numel()}, by up to {int(d.max())}"
            continue
        a, b = a.double(), b.double()
        worst = max(worst, float((a - b).abs().max()) / (float(a.abs().max()) + 1.0))
    return worst, iters


def _forward_variants(case_name, generators, copy, device="cuda", timer=None):
    """Graph times of the triton forward's variants (``FWD_VARIANTS``) at the
    default warp count: which one this GPU prefers. ``device``, ``timer``
    (ms of a callable; default the CUDA-graph time): for testing on the CPU
    interpreter."""
    timer = timer or _graph_ms
    case = CASES[case_name] if isinstance(case_name, str) else case_name
    lines = [
        f"triton forward on {case.name} [M={case.M}, N={case.N}] by variant: the scores held in registers "
        "(HOLD_S) or reread, a register cap (maxnreg) that fits more problems on an SM, and the full tile's "
        "specialisation (EVEN_M, EVEN_N: auto where the shape fills the tile, or off); the first row is the "
        "default (FWD_HOLD_S, FWD_MAXNREG, auto); graph times in us, GB/s as above.",
        "",
        "| scores | HOLD_S | maxnreg | full tile | fwd graph | fwd GB/s (% copy) | iterations differ from the default "
        "| max difference from the default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gen in generators:
        scores, nbytes = _flat_scores(case, gen, device)
        first = None
        for hold, maxnreg, full in FWD_VARIANTS:
            out = _forward_outputs(scores)
            tile = "auto" if full else "off"
            try:
                fwd = lambda: tb.launch_forward(scores, EPS, 100, 1e-6, *out, hold_scores=hold, maxnreg=maxnreg,  # noqa: E731
                                                full_tile=full)
                fg = timer(fwd) * 1e3
            except Exception as exc:  # noqa: BLE001  (report and go on)
                lines.append(f"| {gen} | {hold} | {maxnreg} | {tile} | failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]} | | | |")
                continue
            results = [t for t in out if t is not None]
            if first is None:
                iters, same = "-", "-"
            else:
                worst, iters = _differences(first, results)
                same = f"{worst:.1e}"
            first = first or results
            gbs = nbytes / (fg * 1e-6) / 1e9
            lines.append(f"| {gen} | {hold} | {maxnreg} | {tile} | {fg:.1f} | {gbs:.0f} ({gbs / copy:.0%}) | {iters} "
                         f"| {same} |")
    return lines


def _in_turns(case_names, generators, copy, variants, call, timer, device="cuda"):
    """Table rows timing two variants of a forward in the same process, in
    two turns (the better of each, so that drift hits both), per case and
    generator: the two graph times, the speedup (first / second), the
    second's GB/s, the problems whose iteration counts differ and the
    outputs' largest difference (``_differences``; 0: bitwise the same). ``call(scores, variant)`` runs
    one variant and returns its outputs (tensors)."""
    rows = []
    for case_name in case_names:
        case = CASES[case_name] if isinstance(case_name, str) else case_name
        for gen in generators:
            scores, nbytes = _flat_scores(case, gen, device)
            times, outs = {v: [] for v in variants}, {}
            try:
                for _ in range(2):
                    for v in variants:
                        times[v].append(timer(lambda: call(scores, v)) * 1e3)
                        outs[v] = call(scores, v)
            except Exception as exc:  # noqa: BLE001  (report and go on)
                rows.append(f"| {case.name} | {gen} | failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160]} | | | | | |")
                continue
            first, second = (min(times[v]) for v in variants)
            gbs = nbytes / (second * 1e-6) / 1e9
            worst, iters = _differences(*(outs[v] for v in variants))
            rows.append(f"| {case.name} | {gen} | {first:.1f} | {second:.1f} | {first / second:.2f}x "
                        f"| {gbs:.0f} ({gbs / copy:.0%}) | {iters} | {worst:.1e} |")
    return rows


def _load_kernel(path, name="_mps_fwd_kernel"):
    """The Triton kernel ``name`` of a kernels/mps.py-like file, loaded as a
    module of its own (the file imports torch and triton only)."""
    spec = importlib.util.spec_from_file_location("otseg_kernel_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _baseline_forward(case_names, generators, copy, path, label=None, device="cuda", timer=None):
    """Graph times of the triton forward kernel of this tree against the one
    in ``path`` (another version of kernels/mps.py), same launch arguments
    and variant, in turns on each case; the speedup is baseline / this, and
    the outputs' largest difference (relative, as in ``_forward_variants``).
    ``device``, ``timer``: for testing on the CPU interpreter."""
    kernels = {"baseline": _load_kernel(path), "this": None}

    def call(scores, which):
        out = _forward_outputs(scores)
        tb.launch_forward(scores, EPS, 100, 1e-6, *out, kernel=kernels[which])
        return [t for t in out if t is not None]

    return [
        f"triton forward: this tree's kernel against {label or path}'s (same launch arguments and variant; graph "
        "times in us, the better of two turns each; speedup = baseline / this).",
        "",
        "| case | scores | baseline | this | speedup | this GB/s (% copy) | iterations differ | max difference |",
        "|---|---|---|---|---|---|---|---|",
        *_in_turns(case_names, generators, copy, ("baseline", "this"), call, timer or _graph_ms, device=device),
    ]


def _host_profile(case_name, backends, calls=20):
    """Where the host's time of a forward+backward call goes, per backend: the
    benchmark's call (``ops.mps`` with autograd, loss ``(score * w).sum()``)
    under torch.profiler, its CPU-side operators by total time."""
    from torch.profiler import ProfilerActivity, profile

    case = CASES[case_name]
    scores = make_scores(case, "clip", 0, "cuda")
    weight = torch.randn(case.shape[:-1], device="cuda")
    lines = []
    for backend in backends:
        x = scores.detach().clone().requires_grad_(True)

        def fwd_bwd():
            x.grad = None
            score = ops.mps(x, EPS, 100, 1e-6, backend=backend, check_finite=False)
            (score * weight).sum().backward()

        eager = _events_ms(fwd_bwd) * 1e3
        # An unrecorded profiler session first: the first one's set-up (its
        # activity buffers) would otherwise sit in the table.
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            fwd_bwd()
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fwd_bwd()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60)
        lines += ["", f"host profile: {case_name} / clip / {backend}, forward + backward through autograd "
                  f"(eager {eager:.1f} us a call); {calls} calls under torch.profiler:", "```", table, "```"]
        # The Python functions of the raw forward operator's call (the
        # Triton launcher is Python), by their own time.
        fwd, _ = _ops(backend)
        flat = scores.reshape(-1, case.M, case.N)
        stats = io.StringIO()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fwd(flat)
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(18)
        lines += ["", f"cProfile of 200 raw forward calls ({backend}), by own time:", "```",
                  "\n".join(stats.getvalue().strip().splitlines()[-24:]), "```"]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["voc", "coco", "coco16"])
    parser.add_argument("--generators", nargs="+", default=["clip", "hard"])
    parser.add_argument("--warps", nargs="*", type=int, default=[2, 4, 8],
                        help="warp counts of the triton sweep (none: no sweep)")
    parser.add_argument("--no-host-profile", dest="host_profile", action="store_false",
                        help="skip the torch.profiler tables of a forward+backward call (first case)")
    parser.add_argument("--backends", nargs="*", choices=("cuda", "triton"), default=["cuda", "triton"],
                        help="the fused backends to time, where available (default: both; triton also through its "
                             "Python launches)")
    parser.add_argument("--triton-baseline", metavar="FILE",
                        help="another version of kernels/mps.py whose forward kernel is timed against this tree's "
                             "on every case (e.g. from `git show COMMIT:kernels/mps.py`)")
    parser.add_argument("--triton-baseline-label", metavar="NAME",
                        help="what to call the baseline in the table (default: its path)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.triton_baseline and not os.path.isfile(args.triton_baseline):
        parser.error(f"--triton-baseline: no such file: {args.triton_baseline}")
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py needs a CUDA GPU")
    copy = copy_bandwidth_gbs("cuda")
    backends = [s.name for s in ops.backends()
                if s.available and "cuda" in s.devices and s.name in args.backends]
    if "triton" in backends:
        backends.append(PY_TRITON)
    lines = [
        f"GPU {torch.cuda.get_device_name()}, copy bandwidth {copy:.0f} GB/s (read + write); times in us, "
        "medians; mps eager: otseg.ops.mps(scores [B, K, M, N], check_finite=False) as `otseg bench` calls it; "
        "fwd/bwd eager: the raw operator's Python call between CUDA events; graph: the same call replayed from a "
        "CUDA graph (GPU work only); host = eager - graph; GB/s: read S + write the refined score, over the graph "
        "time.",
        "",
        "| case | scores | backend | mps eager | fwd eager | fwd graph | fwd host | fwd GB/s (% copy) | bwd eager "
        "| bwd graph |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case_name in args.cases:
        case = CASES[case_name]
        for gen in args.generators:
            scores4d = make_scores(case, gen, 0, "cuda")
            scores = scores4d.reshape(-1, case.M, case.N).contiguous()
            nbytes = scores.numel() * 4 + scores.shape[0] * case.M * 4
            for backend in backends:
                try:
                    fwd, bwd = _ops(backend)
                    _, _, f, g, _ = fwd(scores)
                    ds = torch.randn(scores.shape[:-1], device="cuda")
                    fe = _events_ms(lambda: fwd(scores)) * 1e3
                    # The same forward as `otseg bench` calls it: through
                    # ops.mps (checks, backend choice) on the 4-D scores.
                    me = (_events_ms(lambda: ops.mps(scores4d, EPS, 100, 1e-6, backend=backend, return_info=True,
                                                     check_finite=False)) * 1e3
                          if backend != PY_TRITON else None)
                    fg = _graph_ms(lambda: fwd(scores)) * 1e3
                    be = _events_ms(lambda: bwd(ds, None, scores, f, g, EPS)) * 1e3
                    bg = _graph_ms(lambda: bwd(ds, None, scores, f, g, EPS)) * 1e3
                except Exception as exc:  # noqa: BLE001  (report and go on)
                    lines.append(f"| {case_name} | {gen} | {backend} | failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]} |")
                    continue
                gbs = nbytes / (fg * 1e-6) / 1e9
                mps_cell = "-" if me is None else f"{me:.1f}"
                lines.append(f"| {case_name} | {gen} | {backend} | {mps_cell} | {fe:.1f} | {fg:.1f} | {fe - fg:.1f} | "
                             f"{gbs:.0f} ({gbs / copy:.0%}) | {be:.1f} | {bg:.1f} |")
    if "triton" in backends:
        lines += ["", f"triton launches in this run (otseg.ops.mps.triton.launch_stats()): {tb.launch_stats()}"]
        if args.warps:
            lines += ["", *_warp_sweep(args.cases[-1], args.generators, args.warps, copy)]
        lines += ["", *_forward_variants(args.cases[-1], args.generators, copy)]
        if args.triton_baseline:
            lines += ["", *_baseline_forward(args.cases, args.generators, copy, args.triton_baseline,
                                             args.triton_baseline_label)]
    if args.host_profile:
        try:
            lines += _host_profile(args.cases[0], [b for b in backends if b != PY_TRITON])
        except Exception as exc:  # noqa: BLE001  (the tables above still print)
            lines += ["", f"host profile failed: {type(exc).__name__}: {exc}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
