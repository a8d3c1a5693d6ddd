"""Do the C++ operators' errors reach Python on this machine, or crash it?

GPU runs ended the process with SIGSEGV where the cuda backend's backward
raised on a wrongly shaped gradient (H100 runs of 41c01fa and 8667a72, H200
run of 0b64572; the backtrace was inside c10::str formatting the message's
two shapes), and, once shapes were formatted as strings, where the forward
raised on max_iter = 0 (H200 run of 1ce472b: std::ostream inserting an
integer; csrc/common/checks.h, OTSEG_CHECK, says more). Each probe below
calls one operator that must raise, in a child process of its own, and
reports how the child ended: the Python exception it raised, or the signal
that killed it. The probes differ in what the message formats (integers,
floats, shapes, text only) and where the operator runs (CUDA or CPU
tensors), so that a crash points at its cause.

    python bench/gpu_errors.py               # every probe (at once), one line each
    python bench/gpu_errors.py --probe NAME  # run one probe in this process
                                             # (e.g. under cuda-gdb)

Exit status 0 when every probe raised the Python exception it should, 1
otherwise.
tests/test_cuda_kernel.py runs it on a GPU.
"""

import argparse
import subprocess
import sys
import time

# name -> (device, the exception it must raise, code run after `import torch,
# otseg` with `dev` and `x`, a [2, 10, 4] float32 tensor on that device).
PROBES = {
    # The shape check of the upstream gradient (csrc/common/checks.h): its
    # message formats two shapes.
    "cuda-backward-bad-gradient-shape": ("cuda", "RuntimeError", "torch.ops.otseg.mps_backward(torch.ones(2, 9, device=dev), None, x, "
                                                 "torch.zeros(2, 10, device=dev), torch.zeros(2, 4, device=dev), 0.05)"),
    # The same check on CPU tensors, in a process whose CUDA is initialised.
    "cpu-backward-bad-gradient-shape": ("cpu", "RuntimeError", "torch.ops.otseg.mps_backward(torch.ones(2, 9), None, x, "
                                               "torch.zeros(2, 10), torch.zeros(2, 4), 0.05)"),
    # A message that formats one integer (max_iter).
    "cuda-forward-bad-max-iter": ("cuda", "RuntimeError", "torch.ops.otseg.mps_forward(x, 0.05, 0, 0.0, False, False)"),
    # A message that formats a float (eps).
    "cuda-forward-bad-eps": ("cuda", "RuntimeError", "torch.ops.otseg.mps_forward(x, -1.0, 10, 0.0, False, False)"),
    # A message with a dtype name only.
    "cuda-forward-float64": ("cuda", "TypeError", "torch.ops.otseg.mps_forward(x.double(), 0.05, 10, 0.0, False, True)"),
    # Raised after the kernel, reading the NaN flag on the host.
    "cuda-forward-nan": ("cuda", "ValueError", "x[1, 2, 3] = float('nan'); torch.ops.otseg.mps_forward(x, 0.05, 10, 0.0, False, True)"),
    # The same shape check through the triton backend's C++ entry (checked
    # in Python first).
    "triton-backward-bad-gradient-shape": ("cuda", "ValueError", "torch.ops.otseg.mps_triton_backward(torch.ones(2, 9, device=dev), "
                                                   "None, x, torch.zeros(2, 10, device=dev), "
                                                   "torch.zeros(2, 4, device=dev), 0.05)"),
}


def run_probe(name):
    """Run one probe here: print the exception it raised; exit 0 when it is
    the one expected, 1 when another or none was raised."""
    import importlib

    import torch

    importlib.import_module("otseg")  # registers the operators

    device, expected, code = PROBES[name]
    torch.cuda.init()  # every probe in a process whose CUDA is initialised
    scope = {"torch": torch, "dev": device, "x": torch.rand(2, 10, 4, device=device)}
    try:
        exec(code, scope)  # noqa: S102  (fixed probe code)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"{type(exc).__name__}: {first[:160]}", flush=True)
        return 0 if type(exc).__name__ == expected else 1
    print(f"returned without an error (expected {expected})", flush=True)
    return 1


def run_all(names=None, timeout=120):
    """Each probe in a child process of its own, all at once, within
    ``timeout`` seconds in all: {name: (ok, how it ended)}."""
    deadline = time.monotonic() + timeout
    children = {name: subprocess.Popen([sys.executable, __file__, "--probe", name], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
                for name in names or PROBES}
    results = {}
    for name, child in children.items():
        try:
            stdout, stderr = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            results[name] = (False, f"no answer in {timeout} s")
            continue
        last = (stdout.strip().splitlines() or [""])[-1]
        if child.returncode < 0:
            results[name] = (False, f"killed by signal {-child.returncode}; stderr: {stderr.strip()[-300:]}")
        elif child.returncode != 0:
            results[name] = (False, f"exit status {child.returncode}: {last or stderr.strip()[-300:]}")
        else:
            results[name] = (True, last)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", choices=sorted(PROBES), help="run this probe in this process")
    args = parser.parse_args(argv)
    if args.probe:
        return run_probe(args.probe)
    results = run_all()
    for name, (ok, how) in results.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {how}", flush=True)
    return 0 if all(ok for ok, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
