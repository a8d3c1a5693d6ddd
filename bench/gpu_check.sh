#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU (no network needed; torch, triton,
# ninja, pybind11, pytest and numpy installed), build otseg for this card only,
# run every GPU test, the operator benchmark (cases voc, coco, coco16; clip and
# hard scores) and the model training step, and write logs and results into
# the folder given as the first argument. Every step has its own time limit,
# and a failing step does not stop the ones after it (the build excepted);
# the quick steps (benchmarks) run before the tests. First, a smoke test runs
# each fused backend (and each Triton launch route) once in its own process
# against the cpu backend in float64 (bench/gpu_smoke.py): a backend that
# fails it is left out of the timing steps, and Triton launches from C++ that
# fail it are replaced by Python launches (OTSEG_TRITON_LAUNCH=python), each
# with a NOTE in summary.txt, so that one broken kernel cannot take the whole
# run with it. Then bench/gpu_errors.py checks that the C++ operators' errors
# reach Python as exceptions (a crash gets its cuda-gdb backtrace). Measured
# on an H100 (2026-11-26, commit 8667a72, before the smoke step): build 107 s,
# operator benchmark 31 s, model step 16 s, profile 20 s, Nsight Compute 18 s,
# GPU tests 101 s; 301 s in all. On an H200 (commit 0b64572): build 118 s,
# smoke 41 s, benchmark 22 s, model 15 s, profile 28 s, Nsight Compute 23 s,
# GPU tests 250 s (each pytest worker then ran torch with 16 threads, which
# made single float64 reference tests take 50-120 s; now one); 504 s in all,
# so the test step now stops by 470 s. On an H200 (commit 4b7bf91, Nsight
# Compute on coco and voc): build 111 s, smoke 42 s, errors 11 s, benchmark
# 21 s, model 14 s, profile 27 s, Nsight Compute 26 s, GPU tests 68 s; 327 s.
# On an H200 (commit aecf88a): build 98 s, smoke 38 s, errors 11 s, benchmark
# 22 s, model 14 s, profile 21 s, Nsight Compute 24 s, GPU tests 61 s; 295 s.
# On an H200 (commit 7f70306, with TRITON_BASELINE): build 112 s, smoke 42 s,
# errors 12 s, benchmark 23 s, model 19 s, profile 30 s, Nsight Compute (coco
# and voc) 25 s, GPU tests 70 s; 341 s. Nsight Compute now adds coco16.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Environment: PYTHON (default python3), MAX_JOBS (build jobs, default: the
# cores), STEPS (default "smoke errors bench model profile ncu tests"; e.g.
# STEPS=tests runs one),
# DEADLINE_S (default 470: seconds from the start by which the test step,
# the last, is stopped; it gets at least 60 s),
# TEST_ARGS (default "tests": the paths pytest -m gpu collects), TEST_K (a
# pytest -k expression; with TEST_ARGS, to rerun a part within a short
# lease), PROFILE_ARGS
# (extra arguments of bench/gpu_profile.py, e.g. "--cases coco16
# --no-host-profile"), TRITON_BASELINE (a file holding another version of
# kernels/mps.py, e.g. `git show COMMIT:kernels/mps.py > FILE` made before
# the copy to the GPU machine: the profile step times its forward kernel
# against this tree's, same process, same GPU) and TRITON_BASELINE_LABEL
# (what the table calls it, e.g. the commit), NCU_CASES (default "coco16 coco voc":
# the cases Nsight Compute profiles),
# BENCH_BACKENDS (default "reference", the fused backends that passed the
# smoke step, of cuda and triton, and "floor", the harness's own cost around
# scores.sum(-1), which bounds every speedup: the torch.compile peer is
# left out here because its compile time, per case and per direction, would
# take a third of the budget), OTSEG_GIT_COMMIT (the commit, recorded in the
# results where the copy has no .git; give it as a literal hash written where
# the commit is known: `$(git rev-parse HEAD)` evaluated on the remote copy
# named a stale commit in the H100 run of ea3ceed).
#
# Files written (at most 8, so that a remote runner can return them all):
# summary.txt (with the smoke test's lines and the profile table), build.log, gpu-tests.log (per test,
# then pytest's own output), bench.log, bench/latest.md, bench/results.jsonl,
# bench-model.log, ncu.txt (Nsight Compute's details of one launch of each
# fused kernel on each of NCU_CASES, bench/gpu_kernels.py; only where ncu is
# installed). Write nothing else under the device tool's $OUT when OUT_DIR is
# inside it: in the H200 run of aecf88a a ninth file (the caller's log) cost
# bench/results.jsonl its place.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# A relative TRITON_BASELINE names a file from where the script was started.
if [[ -n "${TRITON_BASELINE:-}" && "$TRITON_BASELINE" != /* ]]; then TRITON_BASELINE=$PWD/$TRITON_BASELINE; fi
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
steps=${STEPS:-smoke errors bench model profile ncu tests}
status=0
t_start=$(date +%s)
step() { echo "== $(date +%T) (+$(( $(date +%s) - t_start )) s) $*" | tee -a "$out/summary.txt"; }
has_step() { [[ " $steps " == *" $1 "* ]]; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$out/summary.txt"
"$py" - 2>&1 <<'PY' | tee -a "$out/summary.txt"
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "capability", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
      "memory GiB", round(p.total_memory / 2**30, 1))
PY
# A copy made by a remote runner may carry a stale .git: a commit passed in
# (OTSEG_GIT_COMMIT, exported to the benchmark) wins; otherwise git's, and the
# benchmark checks for uncommitted changes itself.
echo "commit ${OTSEG_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" | tee -a "$out/summary.txt"

step "build for this card only"
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
if ! TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout 300 \
    "$py" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  step "BUILD FAILED (see build.log)"; tail -40 "$out/build.log" | tee -a "$out/summary.txt"; exit 1
fi
"$py" -m otseg backends 2>&1 | tee -a "$out/summary.txt"

# The fused backends the timing steps run: those available on this card,
# less any that fails the smoke step.
fused=$("$py" -c "from otseg import ops
print(' '.join(s.name for s in ops.backends() if s.available and 'cuda' in s.devices and s.name != 'reference'))") || {
  status=1; echo "NOTE: listing the available backends failed: the timing steps run the reference only" | tee -a "$out/summary.txt"; }
if has_step smoke; then
  step "smoke test: each fused backend and Triton launch route once, against the cpu backend in float64 (bench/gpu_smoke.py)"
  # One process each, so that a backend that faults (and leaves its CUDA
  # context unusable) or crashes is left out of the timing steps, and says so
  # here, instead of ending them. The GPU tests still run every backend.
  declare -A smoke=([cuda]=0 [triton]=0 [triton-python]=0)
  routes=${fused/triton/triton triton-python}
  for route in $routes; do
    timeout -k 5 120 "$py" bench/gpu_smoke.py "$route" 2>&1 | tee -a "$out/summary.txt"
    smoke[$route]=${PIPESTATUS[0]}
  done
  if [[ ${smoke[cuda]} != 0 ]]; then
    fused=${fused/cuda/}; status=1
    echo "NOTE: the cuda backend failed its smoke test (status ${smoke[cuda]}): left out of the timing steps" | tee -a "$out/summary.txt"
  fi
  if [[ ${smoke[triton]} != 0 && ${smoke[triton-python]} == 0 ]]; then
    export OTSEG_TRITON_LAUNCH=python
    [[ ${smoke[triton]} != 3 ]] && status=1
    echo "NOTE: the triton backend's launches from C++ failed their smoke test (status ${smoke[triton]}; 3: refused, not wrong): the timing steps launch every Triton kernel from Python (OTSEG_TRITON_LAUNCH=python)" | tee -a "$out/summary.txt"
  elif [[ ${smoke[triton]} != 0 ]]; then
    fused=${fused/triton/}; status=1
    echo "NOTE: the triton backend failed its smoke test (status ${smoke[triton]} launched from C++, ${smoke[triton-python]} from Python): left out of the timing steps" | tee -a "$out/summary.txt"
  elif [[ ${smoke[triton-python]} != 0 ]]; then
    status=1
    echo "NOTE: the triton backend's Python launches failed their smoke test (status ${smoke[triton-python]}), its C++ launches passed: the timing steps run it as usual (C++ after each kernel variant's first call)" | tee -a "$out/summary.txt"
  fi
  fused=$(echo $fused)  # trimmed
fi
echo "fused backends timed: ${fused:-none}" | tee -a "$out/summary.txt"

deselect=()
if has_step errors; then
  step "errors of the C++ operators reach Python (bench/gpu_errors.py)"
  # The test step need not run the same probes again.
  deselect=(--deselect tests/test_cuda_kernel.py::test_errors_raised_in_the_cuda_library_reach_python)
  probes=$(mktemp)
  if ! timeout -k 5 150 "$py" bench/gpu_errors.py 2>&1 | tee "$probes" | tee -a "$out/summary.txt"; then
    status=1
    # Where a probe crashed, the stack of the crash (cuda-gdb debugs host
    # code too; there is no gdb on the GPU machines).
    probe=$(grep -m1 "^FAIL .*killed by signal" "$probes" | sed -E 's/^FAIL ([^:]+):.*/\1/')
    if [[ -n "$probe" ]] && command -v cuda-gdb > /dev/null; then
      echo "cuda-gdb backtrace of probe $probe:" | tee -a "$out/summary.txt"
      timeout -k 5 90 cuda-gdb -batch -ex run -ex "bt 16" --args "$py" bench/gpu_errors.py --probe "$probe" 2>&1 \
        | grep -E "^#|signal|Signal" | cut -c1-400 | head -24 | tee -a "$out/summary.txt"
    fi
  fi
  rm -f "$probes"
fi

if has_step bench; then
  step "operator benchmark (otseg bench)"
  # shellcheck disable=SC2086
  timeout -k 10 270 "$py" -m otseg bench --device cuda --cases voc coco coco16 --generators clip hard \
    --backends ${BENCH_BACKENDS:-reference $fused floor} --out "$out/bench" --no-plot \
    > "$out/bench.log" 2>&1 || status=1
  grep -vE "^\[otseg bench\] \[" "$out/bench.log" | tail -40 | tee -a "$out/summary.txt"
fi

if has_step model; then
  step "model training step (otseg bench --model)"
  # shellcheck disable=SC2086
  timeout -k 10 150 "$py" -m otseg bench --model --device cuda --backends reference $fused \
    > "$out/bench-model.log" 2>&1 || status=1
  tail -14 "$out/bench-model.log" | tee -a "$out/summary.txt"
fi
if has_step profile && [[ -n "$fused" ]]; then
  step "kernel or host: eager vs CUDA-graph times (bench/gpu_profile.py)"
  # shellcheck disable=SC2086
  baseline=()
  if [[ -n "${TRITON_BASELINE:-}" && -f "$TRITON_BASELINE" ]]; then
    baseline=(--triton-baseline "$TRITON_BASELINE" --triton-baseline-label "${TRITON_BASELINE_LABEL:-$TRITON_BASELINE}")
  elif [[ -n "${TRITON_BASELINE:-}" ]]; then
    status=1; echo "NOTE: TRITON_BASELINE=$TRITON_BASELINE is not a file: no baseline table" | tee -a "$out/summary.txt"
  fi
  # shellcheck disable=SC2086
  timeout -k 10 180 "$py" bench/gpu_profile.py --backends $fused ${PROFILE_ARGS:-} ${baseline[@]+"${baseline[@]}"} 2>&1 \
    | tee -a "$out/summary.txt" || status=1
fi

if has_step ncu && [[ -n "$fused" ]]; then
  step "Nsight Compute: one launch of each fused kernel on ${NCU_CASES:-coco16 coco voc} (bench/gpu_kernels.py under ncu)"
  ncu=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
  if [[ -n "$ncu" ]]; then
    timeout -k 10 120 "$ncu" --profile-from-start off --clock-control none --kernel-name regex:"mps_(fwd|bwd)_kernel" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "$py" bench/gpu_kernels.py --backends $fused --cases ${NCU_CASES:-coco16 coco voc} > "$out/ncu.txt" 2>&1 || echo "ncu step failed (optional: the check goes on)" | tee -a "$out/summary.txt"
    grep -E "^  [A-Za-z_].*\(|Duration|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|profiled" \
      "$out/ncu.txt" | head -160 | tee -a "$out/summary.txt"
    # Why warps wait, per kernel: the stall reasons over 0.5 cycles an issued
    # instruction (Warp State Statistics' breakdown, in ncu.txt in full).
    awk '/^  [A-Za-z_].*\(/ {print} /issue_stalled/ && $NF+0 > 0.5 {print}' "$out/ncu.txt" \
      | head -160 | tee -a "$out/summary.txt"
  else
    echo "ncu not found: skipped" | tee -a "$out/summary.txt"
  fi
fi

if has_step tests; then
  step "GPU tests (pytest -m gpu)"
  # gpu-tests.log: one line per test as it ends, with its time, and the
  # traceback of each failure (tests/conftest.py), so that a run cut short by
  # the time limit or a crashed worker still says what failed.
  par=()
  "$py" -c "import xdist" 2>/dev/null && par=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
  "$py" -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 150)
  # One inductor compile thread and one torch thread per pytest worker: twelve
  # workers each with a thread or a process per core oversubscribe the CPU
  # many times over (an H200 run of 0b64572, with torch's 16 threads a worker,
  # took 50-120 s for single float64 reference tests).
  rm -f "$out/gpu-tests.log"
  limit=$(( ${DEADLINE_S:-470} - ($(date +%s) - t_start) ))
  (( limit < 60 )) && limit=60
  echo "test step limit: $limit s" | tee -a "$out/summary.txt"
  pytest_log=$(mktemp)
  # The tests run every backend and route, whatever the smoke step found.
  threads=1; [[ " ${par[*]} " == *" -n "* ]] || threads=$(nproc)  # one process: every core
  # shellcheck disable=SC2086
  env -u OTSEG_TRITON_LAUNCH OTSEG_TEST_LOG="$out/gpu-tests.log" TORCHINDUCTOR_COMPILE_THREADS=1 \
    OMP_NUM_THREADS=$threads timeout -k 10 "$limit" \
    "$py" -m pytest -m gpu ${TEST_ARGS:-tests} ${TEST_K:+-k "$TEST_K"} \
    -p no:cacheprovider -p no:benchmark -q -rfEs --durations 25 "${par[@]}" "${deselect[@]}" > "$pytest_log" 2>&1 \
    || status=1
  echo "$(grep -c '^PASSED' "$out/gpu-tests.log") passed, $(grep -c '^FAILED' "$out/gpu-tests.log") failed," \
    "$(grep -c '^SKIPPED' "$out/gpu-tests.log") skipped (gpu-tests.log: per test; skips of a whole module only in pytest's line below)" | tee -a "$out/summary.txt"
  grep '^FAILED' "$out/gpu-tests.log" | head -30 | tee -a "$out/summary.txt"
  tail -3 "$pytest_log" | tee -a "$out/summary.txt"
  { echo; echo "== pytest's own output"; cat "$pytest_log"; } >> "$out/gpu-tests.log"
  rm -f "$pytest_log"
fi

step "done (status $status)"
exit $status
