"""One launch of each fused GPU kernel, for Nsight Compute to read.

Runs, on each case given, the forward and the backward operator of each fused GPU
backend (cuda, triton) once per score generator, after untimed warm-up calls
made under ``torch.cuda.profiler`` off, so that a profiler started with
``--profile-from-start off`` sees exactly these launches (2 per backend and
generator and case) and none of the warm-up's or the Triton compile's:

    ncu --profile-from-start off --kernel-name regex:"mps_(fwd|bwd)_kernel" \\
        --section SpeedOfLight --section Occupancy ... python bench/gpu_kernels.py

``bench/gpu_check.sh`` runs it under ncu when ncu is on the PATH: where the
time of a kernel goes (memory or compute throughput against the peak,
occupancy and what limits it, registers, warp stalls), which the event and
CUDA-graph times of ``gpu_profile.py`` cannot say.

    python bench/gpu_kernels.py [--cases coco voc] [--generators clip hard] [--backends cuda triton]
"""

import argparse
import sys

import torch
from gpu_profile import _ops  # the raw (forward, backward) operators of a backend

from otseg import ops
from otseg.benchmark.generators import CASES, EPS, make_scores

BACKENDS = ("cuda", "triton")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["coco"], choices=sorted(CASES))
    parser.add_argument("--generators", nargs="+", default=["clip", "hard"])
    parser.add_argument("--backends", nargs="*", choices=BACKENDS, default=list(BACKENDS),
                        help="the fused backends to profile (default: both)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU")
    available = {s.name for s in ops.backends() if s.available and "cuda" in s.devices}
    for case_name in args.cases:
        case = CASES[case_name]
        for gen in args.generators:
            scores = make_scores(case, gen, 0, "cuda").reshape(-1, case.M, case.N).contiguous()
            ds = torch.randn(scores.shape[:-1], device="cuda")
            for backend in args.backends:
                if backend not in available:
                    print(f"{backend}: not available here, skipped", flush=True)
                    continue
                fwd, bwd = _ops(backend)
                for _ in range(2):  # warm-up (and the Triton compile), not profiled
                    _, _, f, g, _ = fwd(scores)
                    bwd(ds, None, scores, f, g, EPS)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                _, _, f, g, n_iter = fwd(scores)
                bwd(ds, None, scores, f, g, EPS)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"{case_name}/{gen}/{backend}: profiled one forward ({n_iter.float().mean().item():.1f} "
                      f"iterations on average, {scores.shape[0]} problems of {case.M} x {case.N}) and one backward",
                      flush=True)


if __name__ == "__main__":
    main()
