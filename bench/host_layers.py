"""The host's work in each layer of a fused-backend call, without a GPU.

Times calls of the ``cpu`` backend on a tiny problem (scores [1, 1, 8, 2],
whose kernel work is negligible), so that what is timed is the host's part,
layer by layer:

- ``mps(...)`` as users call it, with its checks and backend choice
  remembered from the first call (the default), and with them redone on
  every call (``forget_resolutions()`` first: what every call cost before
  they were remembered);
- the operator ``otseg::mps_forward`` alone: with scores that require a
  gradient (an autograd node is built), without (no node), and in inference
  mode (no autograd kernel at all);
- a forward + backward as ``otseg bench`` makes it, and a plain torch
  operator for scale.

Rows are interleaved, medians of ``--rounds``. The same Python and dispatch
code runs before every GPU launch (bench/gpu_profile.py measures it there).

    python bench/host_layers.py [--calls 5000] [--rounds 7]
"""

import argparse
import importlib
import statistics
import sys
import time

import torch

from otseg.ops import mps

dispatch = importlib.import_module("otseg.ops.mps")


def _us_per_call(fn, calls):
    for _ in range(calls // 20):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if not any(s.name == "cpu" and s.available for s in dispatch.backends()):
        sys.exit("needs the cpu backend (the C++ extension otseg._C)")
    x = torch.rand(1, 1, 8, 2)
    xg = x.clone().requires_grad_()
    w = torch.randn(1, 1, 8)
    op = torch.ops.otseg.mps_forward.default

    def checked_every_call():
        dispatch.forget_resolutions()
        mps(x, backend="cpu", check_finite=False)

    def inference():
        with torch.inference_mode():
            op(x, 0.05, 100, 1e-6, False, False)

    def forward_backward():
        xg.grad = None
        (mps(xg, backend="cpu", check_finite=False) * w).sum().backward()

    rows = {
        "mps(backend='cpu'), scores without grad": lambda: mps(x, backend="cpu", check_finite=False),
        "the same, checks and backend choice redone every call": checked_every_call,
        "mps(backend='cpu'), scores with grad": lambda: mps(xg, backend="cpu", check_finite=False),
        "otseg::mps_forward, scores with grad (autograd node)": lambda: op(xg, 0.05, 100, 1e-6, False, False),
        "otseg::mps_forward, scores without grad": lambda: op(x, 0.05, 100, 1e-6, False, False),
        "otseg::mps_forward in inference mode": inference,
        "mps with grad + (score * w).sum().backward()": forward_backward,
        "torch.add(x, 1), for scale": lambda: torch.add(x, 1),
    }
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            times[name].append(_us_per_call(fn, args.calls))
    print(f"host work per call of the cpu backend on scores [1, 1, 8, 2], by layer; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} rounds of {args.calls} calls, in us")
    print()
    print("| call | us |")
    print("|---|---|")
    for name in rows:
        print(f"| {name} | {statistics.median(times[name]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
