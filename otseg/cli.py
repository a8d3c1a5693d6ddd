"""The ``otseg`` command (also ``python -m otseg``).

    otseg backends                 which backends run here, and what "auto" picks
    otseg bench [--quick] [...]    the benchmark of SPEC section 4 (bench/README.md)
    otseg bench --model [--quick]  one training step of the OTSeg head per backend
"""

import argparse
import os
import sys

# What a run covers unless --cases/--generators/--modes say otherwise, and how
# long each measurement may take (timed calls: budget_s / time of one call, at
# most max_repeats). --quick keeps the run under a minute on a 2-core CPU. On
# the CPU a sub-millisecond call gets up to 200 timed calls: a median of 20
# (0.02 s of a shared machine) moved by tens of percent between runs.
QUICK = dict(cases=["voc"], generators=["clip", "hard"], modes=["converged"], budget_s=0.3, max_repeats=3)
DEFAULTS = {
    "cpu": dict(cases=["voc", "context", "coco"], generators=["clip", "hard"], modes=["converged"], budget_s=2.0,
                max_repeats=200),
    "cuda": dict(cases=["voc", "context", "coco", "coco16"], generators=["clip", "hard"], modes=["converged"],
                 budget_s=0.5, max_repeats=100),
}


def _names(choices, what):
    """An argparse type: a comma-separated list of names out of ``choices``."""

    def parse(text):
        names = [n for n in text.split(",") if n]
        if not names:
            raise argparse.ArgumentTypeError(f"expected {what} names, got {text!r}")
        for n in names:
            if n not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {n!r}; choose from {', '.join(choices)}")
        return names

    return parse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser():
    from .benchmark.generators import CASES, GENERATORS, MODES
    from .benchmark.harness import COMPILE_SCOPES, METHOD_NAMES

    parser = argparse.ArgumentParser(prog="otseg", description="Fused Multi-Prompts Sinkhorn (OTSeg) tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,backends}")
    sub.add_parser("backends", help="list the backends, whether they run here and why not, and what 'auto' picks",
                   description="List the MPS backends, whether they run here and why not, and what 'auto' picks.")

    bench = sub.add_parser(
        "bench", help="time the backends and peers against the reference (bench/README.md)",
        description="Time every available otseg backend and the peers (POT, torch.compile) against the reference "
                    "on the OTSeg problem sizes; print a table, append to OUT/results.jsonl, write OUT/latest.md "
                    "and OUT/latest.png. Lists take comma- or space-separated names.")
    bench.set_defaults(subparser=bench)
    bench.add_argument("--quick", action="store_true",
                       help=f"a short run (under a minute on 2 CPU cores): cases {','.join(QUICK['cases'])}, "
                            f"generators {','.join(QUICK['generators'])}, mode {','.join(QUICK['modes'])}, "
                            f"at most {QUICK['max_repeats']} timed calls")
    lists = (
        ("--cases", CASES, "case", "cases; default on cpu: " + ",".join(DEFAULTS["cpu"]["cases"])
         + "; on cuda: " + ",".join(DEFAULTS["cuda"]["cases"])),
        ("--generators", GENERATORS, "generator", "score generators; default: clip,hard"),
        ("--modes", MODES, "mode", "iteration modes (converged: tol 1e-6, max_iter 100; fixedN: tol 0, "
                                   "max_iter N); default: converged"),
        ("--backends", METHOD_NAMES, "backend", "otseg backends and peers to run (floor, only when named: "
                                                "scores.sum(-1) under the same harness, on a GPU the least a "
                                                "call costs); default: pot, compile and the otseg backends of "
                                                "the device"),
    )
    for flag, choices, what, text in lists:
        bench.add_argument(flag, nargs="+", type=_names(list(choices), what), metavar="NAME",
                           help=f"{text} (from {', '.join(choices)})")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="output folder of results.jsonl, latest.md, latest.png (default: bench/results, "
                            "or bench/results/quick with --quick)")
    bench.add_argument("--repeats", type=_positive_int, metavar="N",
                       help="timed calls per measurement (default: chosen from the warm-up time)")
    bench.add_argument("--threads", type=_positive_int, metavar="N",
                       help="CPU threads of torch and the fused CPU kernel (default: torch's default, one per core); "
                            "on a machine shared with other work, fewer threads give steadier times")
    bench.add_argument("--model", action="store_true",
                       help="instead of the operator benchmark, time one training step of the OTSeg head (relation "
                            "descriptor, MPSA decoder, MPS path, focal+dice losses, backward, AdamW) at B=4, K=171, "
                            "N=8, M=1024, D=512 with the reference and each otseg backend of the device (or "
                            "--backends), and the Sinkhorn share of the step; prints a table, writes no files "
                            "(about 80 s on 2 idle CPU cores; with --quick, small sizes in seconds)")
    bench.add_argument("--no-plot", action="store_true", help="do not draw latest.png")
    bench.add_argument("--seed", type=int, default=0, help="seed of the scores and loss weights (default: 0)")
    bench.add_argument("--compile-scope", choices=COMPILE_SCOPES, default="step",
                       help="torch.compile peer: 'step' compiles one iteration called in a loop (default), "
                            "'loop' the whole unrolled loop (compile time grows with the iterations)")
    return parser


def _flatten(lists):
    return None if lists is None else list(dict.fromkeys(n for names in lists for n in names))


def _backends():
    import torch

    from . import ops

    for status in ops.backends():
        print(status)
    print(f"auto on cpu: {ops.resolve_backend('auto', 'cpu')}")
    if torch.cuda.is_available():
        print(f"auto on cuda: {ops.resolve_backend('auto', 'cuda')} ({torch.cuda.get_device_name()})")
    else:
        print(f"auto on cuda: - (no CUDA device: torch {torch.__version__}, CUDA build {torch.version.cuda})")
    return 0


def _bench(args, command):
    import torch

    from .benchmark import harness

    if args.device == "cuda" and not torch.cuda.is_available():
        args.subparser.error(f"--device cuda: no CUDA device is available (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda})")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from . import ops
        from .benchmark import model

        chosen = _flatten(args.backends)
        if chosen and any(n not in model.BACKEND_NAMES for n in chosen):
            args.subparser.error(f"--model compares otseg backends only ({', '.join(model.BACKEND_NAMES)})")
        try:
            for name in chosen or ():
                ops.resolve_backend(name, args.device)
        except ValueError as exc:
            args.subparser.error(str(exc))
        model.run(quick=args.quick, device=args.device, backends=chosen, repeats=args.repeats, seed=args.seed)
        return 0
    out_dir = args.out or ("bench/results/quick" if args.quick else "bench/results")
    # Before measuring: a folder that cannot be written would lose the run's rows at the end.
    try:
        os.makedirs(out_dir, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        args.subparser.error(f"cannot write the results to {out_dir} ({exc}); choose another folder with --out")
    settings = dict(QUICK if args.quick else DEFAULTS[args.device])
    for key in ("cases", "generators", "modes"):
        chosen = _flatten(getattr(args, key))
        if chosen:
            settings[key] = chosen
    harness.run(
        settings["cases"], settings["generators"], settings["modes"], methods=_flatten(args.backends),
        device=args.device, repeats=args.repeats, budget_s=settings["budget_s"],
        max_repeats=settings["max_repeats"], seed=args.seed, compile_scope=args.compile_scope,
        out_dir=out_dir,
        plot=not args.no_plot, quick=args.quick, command=command,
    )
    return 0


def main(argv=None):
    """Entry point of the ``otseg`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        the exit status.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "backends":
            return _backends()
        return _bench(args, "otseg " + " ".join(argv))
    except BrokenPipeError:
        # The reader went away (e.g. `otseg backends | head`): stop without a
        # traceback, with the status of a process ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
