#!/usr/bin/env bash
# Serves the built-in model as a small cluster of processes on this machine, the layout of a
# multi-node deployment in miniature:
#   - a prefill group of 2 rank processes (one node of 2 ranks),
#   - a decode group of 4 rank processes (2 nodes of 2 ranks), Gloo between the ranks of a group,
#   - `moeserve frontend` on 127.0.0.1:PORT (default 50051; OpenAI HTTP on :8000, metrics on
#     :9400), which routes each request to the least-loaded prefill rank and hands the prefilled
#     sequence to a decode rank.
# Every rank is its own process (`moeserve rank --group-size 4 --rank 3 ... --group decode` in
# `ps`), started by its node's supervisor (`moeserve node`). This script plays the
# orchestrator: when a node supervisor exits (one of its ranks died, so its group failed), it
# starts that node again and the group re-forms with a new epoch; the front end routes to it
# again once it serves. Kill a rank to watch it happen:
#   pkill -9 -f 'moeserve rank .*--rank 3 .*--group decode'
# Ctrl-C or SIGTERM stops everything.
#
# Usage: scripts/run-cluster.sh [--port P] [frontend flags...]
# Ranks listen on 127.0.0.1:51100 and up (MOESERVE_CLUSTER_BASE_PORT), their /metrics on
# 51200 and up.
set -euo pipefail
cd "$(dirname "$0")/.."

port=50051
frontend_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --port=*) port="${1#--port=}"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) frontend_args+=("$1"); shift ;;
  esac
done

scripts/build.sh
moeserve="${MOESERVE_BUILD_DIR:-build}/server/moeserve"
base="${MOESERVE_CLUSTER_BASE_PORT:-51100}"
metrics_base=$((base + 100))
prefill_leader="127.0.0.1:${base}"
decode_leader="127.0.0.1:$((base + 10))"

# Runs one node supervisor, and runs it again whenever it exits, until this script stops.
supervise_node() {
  local name="$1"; shift
  local child=""
  trap '[[ -n "$child" ]] && kill -TERM "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM INT
  while true; do
    "$moeserve" node "$@" &
    child=$!
    local code=0
    wait "$child" || code=$?
    echo "run-cluster: ${name} exited with code ${code}; starting it again (its group re-forms)" >&2
    sleep 1
  done
}

pids=()
stop_all() {
  trap - TERM INT
  echo "run-cluster: stopping" >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit 0
}
trap stop_all TERM INT

supervise_node "prefill node 0" --ranks-per-node 2 --num-nodes 1 --node-index 0 \
  --port "$base" --metrics-port "$metrics_base" \
  -- --group prefill --leader "$prefill_leader" --model builtin:tiny &
pids+=($!)
for node in 0 1; do
  supervise_node "decode node ${node}" --ranks-per-node 2 --num-nodes 2 --node-index "$node" \
    --port $((base + 10 + 2 * node)) --metrics-port $((metrics_base + 10 + 2 * node)) \
    -- --group decode --leader "$decode_leader" --model builtin:tiny &
  pids+=($!)
done

"$moeserve" frontend --port "$port" \
  --group "prefill=${prefill_leader}" --group "decode=${decode_leader}" \
  "${frontend_args[@]}" &
pids+=($!)
frontend_pid=$!
code=0
wait "$frontend_pid" || code=$?
echo "run-cluster: the front end exited with code ${code}" >&2
stop_all
