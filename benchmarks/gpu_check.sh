#!/usr/bin/env bash
# One command for any machine with a GPU: installs the package (with its CUDA extension) into the
# current Python, runs the CUDA-relevant tests with a per-test timeout, and benchmarks the layer
# at the four reference shapes in bf16; every output goes to OUT_DIR:
#   env.txt, install.log, tests.txt, kernel_resources.txt, layer_<shape>.json, layer.md,
#   gpu_check.log
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Without a GPU the same steps run on the CPU at tiny shapes (Triton in its interpreter), which
# checks the script itself. FEDLEASE_SKIP_INSTALL=1 uses the installed package as it is.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/gpu_check.log"; }
started=$(date +%s)

if [ "${FEDLEASE_SKIP_INSTALL:-0}" != 1 ]; then
  log "installing (pip install --no-deps --no-build-isolation -e .)"
  if ! $py -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    log "install failed: see install.log"; exit 1
  fi
fi
gpu=$($py -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$gpu" != 1 ]; then export TRITON_INTERPRET=1; fi
$py - >"$out/env.txt" 2>&1 <<'PY'
import platform, torch
from fedlease.ops import available_backends
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "peft", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"cc {p.major}.{p.minor}",
          f"{p.multi_processor_count} SMs")
print("backends on cuda:", available_backends("cuda") if torch.cuda.is_available() else "-")
print("backends on cpu:", available_backends("cpu"))
PY
cat "$out/env.txt" | tee -a "$out/gpu_check.log"

log "tests (per-test timeout 120 s)"
timeout 300 $py -m pytest -q -p no:cacheprovider --per-test-timeout 120 \
  tests/test_triton_backend.py tests/test_cpp_backend.py tests/test_op.py \
  tests/test_op_linear.py tests/test_layer.py >"$out/tests.txt" 2>&1
echo "pytest exit code: $?" >>"$out/tests.txt"
tail -n 3 "$out/tests.txt" | tee -a "$out/gpu_check.log"

log "kernel resources on this GPU's architecture (registers, spills)"
arch=$($py -c "import torch; p = torch.cuda.get_device_properties(0); print(p.major * 10 + p.minor)" 2>/dev/null || echo 90)
env -u TRITON_INTERPRET $py benchmarks/kernel_resources.py --arch "$arch" >"$out/kernel_resources.txt" 2>&1
tail -n 1 "$out/kernel_resources.txt" | tee -a "$out/gpu_check.log"

log "layer benchmark"
if [ "$gpu" = 1 ]; then
  shapes=("4096 4096 8 4 16384" "4096 4096 8 8 16384" "1024 1024 8 4 16384" "384 384 4 4 8192")
  bench_args=(--device cuda --dtype bfloat16 --reps 20 --warmup 5)
else
  shapes=("64 64 8 4 256" "64 64 8 8 256" "48 32 4 4 128")
  bench_args=(--device cpu --dtype float32 --reps 2 --warmup 1)
fi
for s in "${shapes[@]}"; do
  read -r d_in d_out rank experts tokens <<<"$s"
  name="layer_${d_in}x${d_out}_r${rank}_m${experts}_t${tokens}"
  $py benchmarks/bench_layer.py "${bench_args[@]}" --d-in "$d_in" --d-out "$d_out" \
    --rank "$rank" --experts "$experts" --tokens "$tokens" --json >"$out/$name.json" \
    2>>"$out/gpu_check.log" || log "bench $name failed"
done
$py benchmarks/layer_table.py "$out"/layer_*.json >"$out/layer.md" && cat "$out/layer.md"

log "done in $(($(date +%s) - started)) s"
