#!/usr/bin/env bash
# Run several benchmarks/quality.py processes at once on the GPUs of one machine (one process leaves
# an H200 mostly idle), each with its own results file, merged afterwards with `quality.py --merge`.
#
#   bash benchmarks/parallel_rows.sh DATA RESULTS_DIR BUDGET_S PLAN_FILE
#
# PLAN_FILE, one process a line: "NAME GPU quality.py-arguments", e.g.
#   pass_s1 0 --setting all --seeds 1 --targets 0.1 --methods pass
# A line "---" waits for every process started so far; "--- N" only for those on GPU N (later lines
# of other GPUs start when it returns, so order the file by when work may start). Each process writes
# RESULTS_DIR/NAME.{json,log} and gets --time-budget = what is left of BUDGET_S when it starts.
# Backbones go to $WORKDIR (default /tmp/w), shared by all: train them in a first phase (--pretrain-only).
set -u
data=$1; out=$2; budget=$3; plan=$4
work=${WORKDIR:-/tmp/w}; mkdir -p "$out" "$work"
start=$(date +%s)
declare -A pids  # GPU -> its processes
while read -r name gpu args || [ -n "$name" ]; do
  case "$name" in
    ''|'#'*) continue ;;
    ---) if [ -z "$gpu" ]; then wait; pids=(); else wait ${pids[$gpu]:-}; pids[$gpu]=""; fi; continue ;;
  esac
  left=$(( budget - ($(date +%s) - start) ))
  echo "[$(( $(date +%s) - start )) s] $name on GPU $gpu"
  # shellcheck disable=SC2086  # the plan's arguments are meant to split (and globs to expand)
  CUDA_VISIBLE_DEVICES=$gpu python3 benchmarks/quality.py --data "$data" --workdir "$work" --pretrain-lr 0.4 \
    $args --time-budget "$left" --results "$out/$name.json" > "$out/$name.log" 2>&1 &
  pids[$gpu]="${pids[$gpu]:-} $!"
done < "$plan"
wait
echo "done in $(( $(date +%s) - start )) s"
grep -h "macs \|speed-up\|FAILED\|Error" "$out"/*.log
