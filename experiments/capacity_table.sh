#!/usr/bin/env bash
# The capacity table of docs/memory_capacity.md: every Memory Manager baseline (and, with
# RL_MANAGER set, the RL manager) at one budget, the same frozen Answer Agent, then one
# comparison (compare.md/.json, an F1-per-category bar chart and an op-distribution PNG).
#
#   ANSWER=runs/grpo_answer/best RL_MANAGER=runs/grpo_memory_budget/best \
#       bash experiments/capacity_table.sh 32 runs/cap32
#   ANSWER=... bash experiments/capacity_table.sh 16 runs/cap16 add_all_refuse -- \
#       --config.max_conversations=4 --config.conversation_sampling=random
#
# Arguments: SLOTS (memories per speaker), OUT (one workdir per row under it), then the
# baselines (default: all but add_all_fifo, whose banks equal add_all_lru's when every op is an
# ADD), then after "--" flags passed to every evaluate.py run. The RL row uses the baseline
# RL_FORM (default prompted_budget_mask, the form the episode task trains). A finished row is
# not re-run (evaluate.py resumes from its workdir; delete OUT/ROW to redo it).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
SLOTS=$1; OUT=$2; shift 2
ROWS=(); EXTRA=()
while [[ $# -gt 0 ]]; do
  if [[ $1 == -- ]]; then shift; EXTRA=("$@"); break; fi
  ROWS+=("$1"); shift
done
[[ ${#ROWS[@]} -gt 0 ]] || ROWS=(add_all_refuse add_all_lru merge_similar skip_similar
                                 prompted_budget prompted_budget_mask oracle)
CONFIG=experiments/configs/evaluate_locomo_capacity.py
PY=${PYTHON:-python}
COMMON=(--config.memory.num_slots="$SLOTS" --config.progress=False)
[[ -z ${ANSWER:-} ]] || COMMON+=(--config.checkpoint="$ANSWER")

run_row() {  # NAME BASELINE [flags...]
  local name=$1 baseline=$2; shift 2
  if [[ -f $OUT/$name/results.json ]]; then echo "== $name: done ($OUT/$name)"; return; fi
  echo "== $name ($SLOTS slots per speaker)"
  "$PY" experiments/evaluate.py --config="$CONFIG:$baseline" --workdir="$OUT/$name" \
    "${COMMON[@]}" "$@" "${EXTRA[@]}"
}

PAIRS=()
for b in "${ROWS[@]}"; do run_row "$b" "$b"; PAIRS+=("$b=$OUT/$b"); done
if [[ -n ${RL_MANAGER:-} ]]; then
  run_row rl_manager "${RL_FORM:-prompted_budget_mask}" \
    --config.memory.manager_checkpoint="$RL_MANAGER"
  PAIRS+=("rl_manager=$OUT/rl_manager")
fi
"$PY" experiments/compare.py "${PAIRS[@]}" --out="$OUT" --ops_png="$OUT/ops.png" \
  --title="Memory Manager baselines at $SLOTS memories per speaker"
