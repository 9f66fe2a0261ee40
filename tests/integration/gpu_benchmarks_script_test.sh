#!/usr/bin/env bash
# scripts/gpu-benchmarks.sh's `processes` part, run on the CPU with builtin:tiny so that the
# script a multi-GPU host runs is known to work before device time is spent on it: one process,
# one process per rank behind `moeserve frontend`, and 2 "nodes" of rank processes must each
# serve the load and print a row with tokens per second.
#   gpu_benchmarks_script_test.sh ROOT BUILD_DIR OUT_DIR
set -euo pipefail
root=$1 build=$2 out=$3
rm -rf "$out"
# Ports below the ephemeral range, so that no client connection holds one by chance.
base=$((20000 + RANDOM % 8000))
MOESERVE_BUILD_DIR=$build SERVING_DEVICE=cpu SERVING_MODEL=builtin:tiny BENCH_GPUS=2 \
  SERVING_EP=2 SERVING_CONCURRENCY=4 SERVING_KV_MIB=64 SERVING_PROMPT_TOKENS=16 \
  SERVING_MAX_TOKENS=16 BENCH_BASE_PORT=$base BENCH_CONNECT_TIMEOUT=60 \
  "$root/scripts/gpu-benchmarks.sh" "$out" processes
status=0
for layout in "EP2, one process" "EP2, a process per rank (" "EP2, a process per rank, 2 nodes"; do
  # | LABEL | native | 4 | 16 | output tok/s | ...: a row with a positive rate.
  if ! grep -F "| $layout" "$out/summary.md" | grep -Eq '\| native \| 4 \| 16 \| [1-9][0-9]* \|'; then
    echo "FAIL: no row for \"$layout\" with tokens per second in $out/summary.md" >&2
    status=1
  fi
done
if (( status )); then
  cat "$out/summary.md" >&2
  tail -n 5 "$out"/*.log >&2
fi
exit $status
