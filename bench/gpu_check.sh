#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU (no network needed; torch, triton,
# ninja, pytest and numpy installed), build otseg for this card only, run every
# GPU test, the operator benchmark and the model step, and write logs and results into the folder given
# as the first argument. Budget: about 8 minutes.
#
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
status=0
step() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }

step "device"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$py" - > "$out/env.txt" 2>&1 <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
cat "$out/env.txt" | tee -a "$out/summary.txt"
git rev-parse HEAD >> "$out/summary.txt" 2>/dev/null || true

step "build for this card only"
arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
if ! TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16} timeout 240 "$py" -m pip install --no-build-isolation --no-deps -e . \
    > "$out/build.log" 2>&1; then
  step "BUILD FAILED (see build.log)"; tail -30 "$out/build.log" | tee -a "$out/summary.txt"; exit 1
fi
"$py" -c "import otseg; [print(b) for b in otseg.ops.backends()]" 2>&1 | tee -a "$out/summary.txt"

step "GPU tests"
timeout 180 "$py" -m pytest -q -m "gpu" tests -p no:cacheprovider --junitxml="$out/gpu-tests.xml" \
  > "$out/gpu-tests.log" 2>&1 || status=1
tail -5 "$out/gpu-tests.log" | tee -a "$out/summary.txt"

step "benchmark"
timeout 240 otseg bench --device cuda --cases voc,coco,coco16 --generators clip,hard --out "$out/bench" --no-plot \
  > "$out/bench.log" 2>&1 || status=1
tail -40 "$out/bench.log" | tee -a "$out/summary.txt"
step "model training step (otseg bench --model)"
timeout 120 otseg bench --model --device cuda > "$out/bench-model.log" 2>&1 || status=1
tail -12 "$out/bench-model.log" | tee -a "$out/summary.txt"
step "done (status $status)"
exit $status
