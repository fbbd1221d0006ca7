#!/usr/bin/env bash
# The GLUE study behind docs/results/budget.md, allocation.md and compare.md: every run is one
# `fedlease run --config configs/glue4.yaml` with the overrides listed in jobs.txt, PARALLEL runs
# at a time (one GPU holds many: a MiniLM run is host-bound). The groups:
#   alloc6-*, alloc8-*, alloc8paper-*  FedLEASE warm-up only (rounds=0) on a 6-client, 3-task
#       and an 8-client, 4-task mix, seeds 1-5, adapters kept for the allocation
#       (studies/allocation_table.py); alloc8paper: the paper's AdamW warm-up; alloc8lr02:
#       warm-up lr 0.02; alloc8w2: two warm-up rounds; alloc6avg, alloc8avg: B averaged over
#       the warm-up's steps (warmup_average_b); alloc8qqp: the 8-client mix with QQP's sample
#       (150 examples per client) in RTE's place, seeds 1-10
#   budget-*   a local LoRA per task (one client per task), evaluated after every epoch, at
#       250 / 500 / 1000 examples (lr 3e-3) and 1000 at lr 1e-3 and 1e-2; budget-central: one
#       client per task with the federation's data for that task (4 x 1000, RTE 1244), 4 epochs
#       at lr 3e-3 and 6 at lr 1e-3
#   compare/<method>-seed<s>  the ten methods, seeds 1 and 2: the runs `fedlease compare
#       --config configs/glue4.yaml --seeds 1,2 $EXTRA` reuses to write compare.json (at the
#       config's lr 1e-3; compare.md's finished table ran them with EXTRA="... --set lr=3e-3")
#   compare3/<method>-seed<s>  the same on the 12 clients of the three tasks that a lone client
#       learns (SST-2, QNLI, MRPC, four clients each; `fedlease compare ... --set clients=$m12`)
#
#   studies/glue_study.sh OUT_DIR [PARALLEL]
#
# EXTRA: overrides appended to every run (e.g. "--set device=cuda --set precision=fp32
# --set threads=1"); DEADLINE_S: seconds after which no run starts and running ones are
# interrupted (their completed rounds stay in metrics.jsonl); ONLY: a regex of job names.
set -uo pipefail
out=${1:?usage: studies/glue_study.sh OUT_DIR [PARALLEL]}
par=${2:-2}
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
jobs=$out/jobs.txt
: >"$jobs"
add() { echo "$*" >>"$jobs"; }

m6="[sst2,sst2,mrpc,mrpc,qnli,qnli]"
m8="[sst2,sst2,qnli,qnli,mrpc,mrpc,rte,rte]"
mq="[sst2,sst2,qnli,qnli,mrpc,mrpc,qqp,qqp]"
m12="[sst2,sst2,sst2,sst2,qnli,qnli,qnli,qnli,mrpc,mrpc,mrpc,mrpc]"
warm="--set rounds=0 --set test_samples=50"
paper="--set warmup_optimizer=adamw --set warmup_lr=3e-3 --set warmup_class_balanced=false --set warmup_dropout=true"
one="--set method=local --set clients=[sst2,qnli,mrpc,rte] --set test_samples=1000 --set warmup_rounds=0 --set seed=1"
# short runs that the results need first, then the longest, then the rest
for s in 1 2 3 4 5; do
  add "alloc6-seed$s --set clients=$m6 $warm --set seed=$s"
  add "alloc8-seed$s --set clients=$m8 $warm --set seed=$s"
done
add "budget-central $one --set train_samples=4000 --set rounds=4 --set lr=3e-3"
add "budget-local-n1000 $one --set train_samples=1000 --set rounds=8 --set lr=3e-3"
for m in fedlease local fedit fedsa_lora feddpa ffa_lora ifca fedlease_topk fedlease_fixed_k \
  fedlease_random; do
  for s in 1 2; do add "compare/$m-seed$s --set method=$m --set seed=$s"; done
done
for m in fedlease local ifca feddpa fedsa_lora fedit fedlease_random ffa_lora fedlease_topk \
  fedlease_fixed_k; do
  for s in 1 2; do add "compare3/$m-seed$s --set method=$m --set seed=$s --set clients=$m12"; done
done
for n in 500 250; do
  add "budget-local-n$n $one --set train_samples=$n --set rounds=8 --set lr=3e-3"
done
add "budget-local-n1000-lr1e-3 $one --set train_samples=1000 --set rounds=8 --set lr=1e-3"
add "budget-local-n1000-lr1e-2 $one --set train_samples=1000 --set rounds=8 --set lr=1e-2"
add "budget-central-lr1e-3 $one --set train_samples=4000 --set rounds=6 --set lr=1e-3"
for s in 1 2 3 4 5; do
  add "alloc8paper-seed$s --set clients=$m8 $warm --set seed=$s $paper"
  add "alloc8lr02-seed$s --set clients=$m8 $warm --set seed=$s --set warmup_lr=0.02"
  add "alloc8w2-seed$s --set clients=$m8 $warm --set seed=$s --set warmup_rounds=2"
done
for s in 1 2 3 4 5; do
  add "alloc8avg-seed$s --set clients=$m8 $warm --set seed=$s --set warmup_average_b=true"
  add "alloc6avg-seed$s --set clients=$m6 $warm --set seed=$s --set warmup_average_b=true"
done
for s in 1 2 3 4 5 6 7 8 9 10; do
  add "alloc8qqp-seed$s --set clients=$mq $warm --set seed=$s"
done
if [ -n "${ONLY:-}" ]; then
  grep -E "^(${ONLY})( |$)" "$jobs" >"$jobs.only" || true
  mv "$jobs.only" "$jobs"
fi

start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-100000000}))
export out py deadline EXTRA="${EXTRA:-}"
one_job() {
  name=$1
  shift
  left=$((deadline - $(date +%s)))
  if [ "$left" -lt 30 ]; then
    echo "$name skipped (deadline)" >>"$out/status.txt"
    return 0
  fi
  mkdir -p "$out/runs/$(dirname "$name")" "$out/logs/$(dirname "$name")"
  t=$(date +%s)
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=20 "$left" $py -m fedlease run --config configs/glue4.yaml \
    --output "$out/runs/$name" --no-progress "$@" $EXTRA >"$out/logs/$name.log" 2>&1
  echo "$name rc=$? ${t}-$(date +%s)" >>"$out/status.txt"
}
export -f one_job
xargs -P "$par" -L 1 bash -c 'one_job "$@"' _ <"$jobs"
echo "all done in $(($(date +%s) - start)) s" >>"$out/status.txt"
