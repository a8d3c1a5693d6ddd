"""Host work of one call of the triton backend, without a GPU.

Runs ``otseg.ops.mps(..., backend="triton")`` on a tiny CPU problem in
Triton's interpreter with the kernel launches replaced by no-ops, so that what
is timed is the host's part of a call: argument checks, backend choice,
operator dispatch, allocation and autograd. Compares the backend's entry with
its autograd glue in C++ (``otseg::mps_triton``) against the same operators
glued in Python (``mps_forward_triton`` with ``register_autograd``), for a
forward and for a forward + backward, interleaved, medians of ``--rounds``.

    python bench/host_overhead.py [--calls 2000] [--rounds 5]

Under the interpreter every operator call costs a few microseconds more than
without it (Triton's interpreter is imported); ``bench/host_layers.py`` times
the layers of a call without it.

A GPU host runs the same Python and dispatch code (with ``triton_op`` in
place of the interpreter's ``custom_op``), plus the real launches.
"""

import argparse
import os
import statistics
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
from host_layers import _us_per_call  # noqa: E402  (bench/, beside this script)

from otseg.ops import mps  # noqa: E402
from otseg.ops.mps import triton as tb  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not tb.available or not tb.interpreted:
        sys.exit(f"needs Triton's interpreter: {tb.error}")
    if not hasattr(torch.ops.otseg, "mps_triton"):
        sys.exit("needs the C++ extension (otseg._C) with otseg::mps_triton")
    tb.launch_forward = lambda *a, **k: None
    tb.launch_backward = lambda *a, **k: None
    x = torch.rand(1, 1, 8, 2)
    xg = x.clone().requires_grad_()
    w = torch.randn(1, 1, 8)

    def forward():
        mps(x, backend="triton", check_finite=False)

    def forward_backward():
        (mps(xg, backend="triton", check_finite=False) * w).sum().backward()

    entries = {"C++ (otseg::mps_triton)": torch.ops.otseg.mps_triton.default,
               "Python (mps_forward_triton)": torch.ops.otseg.mps_forward_triton.default}
    times = {(e, what): [] for e in entries for what in ("forward", "forward+backward")}
    try:
        for _ in range(args.rounds):
            for name, entry in entries.items():
                tb._entry = entry
                times[name, "forward"].append(_us_per_call(forward, args.calls))
                times[name, "forward+backward"].append(_us_per_call(forward_backward, args.calls))
    finally:
        tb._entry = torch.ops.otseg.mps_triton.default
    print(f"host work per call of mps(backend='triton'), kernels replaced by no-ops; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds of {args.calls} calls, in us")
    print()
    print("| autograd glue | forward | forward+backward |")
    print("|---|---|---|")
    for name in entries:
        print(f"| {name} | {statistics.median(times[name, 'forward']):.1f} | "
              f"{statistics.median(times[name, 'forward+backward']):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
