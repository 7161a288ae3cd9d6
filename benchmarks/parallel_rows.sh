#!/usr/bin/env bash
# Run several benchmarks/quality.py processes at once on one GPU (one process leaves it mostly idle),
# each with its own results file, then merge them here with `quality.py --merge`.
#
#   bash benchmarks/parallel_rows.sh DATA RESULTS_DIR BUDGET_S PLAN_FILE
#
# PLAN_FILE: one process a line, "NAME quality.py-arguments", e.g.
#   pass_s1 --setting all --seeds 1 --targets 0.1 --methods pass
# Backbones are trained first (both settings at once) into $WORKDIR (default /tmp/w) and shared.
set -u
data=$1; out=$2; budget=$3; plan=$4
work=${WORKDIR:-/tmp/w}; mkdir -p "$out" "$work"
q=(python3 benchmarks/quality.py --data "$data" --workdir "$work" --pretrain-lr 0.4)
start=$(date +%s)
for s in all shifted; do "${q[@]}" --pretrain-only --setting $s --results "$out/pretrain_$s.json" > "$out/pretrain_$s.log" 2>&1 & done
wait
left=$(( budget - ($(date +%s) - start) ))
while read -r name args; do
  [ -z "$name" ] && continue
  # shellcheck disable=SC2086  # the plan's arguments are meant to split
  "${q[@]}" $args --time-budget "$left" --results "$out/$name.json" > "$out/$name.log" 2>&1 &
done < "$plan"
wait
echo "done in $(( $(date +%s) - start )) s"
grep -h "macs " "$out"/*.log
