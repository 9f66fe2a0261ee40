#!/usr/bin/env bash
# Runs moeserve's GPU benchmarks on a GPU host, prints their tables and keeps their logs:
#   experts   moeserve-expert-bench (expert SwiGLU at DeepSeek-V3 shapes against the card's
#             measured limits) and the PyTorch baselines of kernels/bench/expert_bench_torch.py
#   attention moeserve-attention-bench (MLA decode attention at DeepSeek-V3's shape against the
#             copy bandwidth: sequences x context, whole and split contexts)
#   linear    moeserve-linear-bench (DeepSeek-V3's dense projections: bf16 against FP8, the
#             weight-only kernel and the quantize + cuBLASLt recipe, by row count)
#   dispatch  engine/bench/run_dispatch_bench.sh: dispatch/combine against raw NCCL
#             all-to-all of the same bytes, two-batch overlap, Chrome traces
#   serving   `moeserve serve --model builtin:v3-bench --device cuda --ep N` for N = 1, 2, 4, 8
#             (those that fit the visible GPUs) under moeserve-loadgen: output tokens/s per
#             GPU, TTFT and inter-token latency percentiles at several concurrency levels
#   processes the same load on the same EP group run three ways, one after the other: one
#             process (`serve --ep N`), one process per GPU (`moeserve node` with N ranks and
#             `moeserve frontend`), and one process per GPU as 2 "nodes" of N/2 (each node's
#             ranks with their own NCCL_HOSTID, NCCL between the nodes over sockets)
#
#   scripts/gpu-benchmarks.sh OUT_DIR [experts] [attention] [linear] [dispatch] [serving]
#                             [processes]  (default: experts attention linear dispatch serving)
#
# Binaries come from $MOESERVE_BIN_DIR (a flat folder, e.g. a bundle made with
# engine/bench/run_dispatch_bench.sh --bundle) or the build tree $MOESERVE_BUILD_DIR (default:
# build). Serving flags: $SERVING_CONCURRENCY (default "1 8 32 64"; "8 64" for processes),
# $SERVING_PROMPT_TOKENS (128), $SERVING_MAX_TOKENS (128), $SERVING_EP (default "1 2 4 8";
# "2 4 8" for processes; a layout of 2 or more GPUs also runs with --two-batch-overlap unless
# $SERVING_OVERLAP is 0, and once more per value of $SERVING_EXCHANGE_MAX_CTAS with
# --gpu-exchange-max-ctas), $SERVING_TRACE_STEPS (default none: with K, each server writes a
# Chrome trace of K working steps after $SERVING_TRACE_SKIP, default 300, into
# OUT_DIR/trace-LAYOUT/),
# $SERVING_MODEL (builtin:v3-bench), $SERVING_DEVICE (cuda; cpu runs the same layouts on the
# CPU, where $BENCH_GPUS stands for the GPU count), $SERVING_KV_MIB (8192), $SERVING_FLAGS (more
# serve flags, e.g. "--gpu-cuda-graphs off"); the processes part
# listens on ports from $BENCH_BASE_PORT (50300); the load generator waits up to
# $BENCH_CONNECT_TIMEOUT seconds (900) for a server to load. NVLink multicast stays off.
set -euo pipefail

[[ $# -ge 1 ]] || { sed -n '2,36p' "$0" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(experts attention linear dispatch serving)
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOESERVE_BUILD_DIR:-$root/build}
export NCCL_NVLS_ENABLE=0

find_binary() {  # name subdir
  if [[ -n ${MOESERVE_BIN_DIR:-} ]]; then echo "$MOESERVE_BIN_DIR/$1"; else echo "$build/$2/$1"; fi
}

device=${SERVING_DEVICE:-cuda}
model=${SERVING_MODEL:-builtin:v3-bench}
if [[ $device == cuda ]]; then
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
  gpus=${BENCH_GPUS:-1}
  card="CPU ($(nproc) cores)"
fi
engine_flags=(--model "$model" --device "$device" --kv-cache-mib "${SERVING_KV_MIB:-8192}"
  --max-batch-tokens 1024 --max-running-requests 128)
# shellcheck disable=SC2206
engine_flags+=(${SERVING_FLAGS:-})

# run_load NAME PORT GPUS LABEL CONCURRENCY...: moeserve-loadgen against 127.0.0.1:PORT (which
# may still be loading) into OUT/serving-NAME.md; appends its table (its header only the first
# time, as $header says) to the summary.
run_load() {
  local name=$1 port=$2 gpus_used=$3 label=$4
  shift 4
  if ! "$(find_binary moeserve-loadgen clients)" --target "127.0.0.1:$port" \
    --connect-timeout "${BENCH_CONNECT_TIMEOUT:-900}" \
    --gpus "$gpus_used" --label "$label" --concurrency "$@" \
    --prompt-tokens "${SERVING_PROMPT_TOKENS:-128}" \
    --max-tokens "${SERVING_MAX_TOKENS:-128}" >"$out/serving-$name.md" 2>&1; then
    echo "$name: load generator failed (see serving-$name.md and the logs)" >&2
    return 0
  fi
  local skip=1
  (( header )) || skip=3
  header=0
  tail -n +"$skip" "$out/serving-$name.md" | tee -a "$out/summary.md"
}

# stop PID...: SIGTERM, then wait (node supervisors stop their ranks).
stop() {
  kill -TERM "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}
echo "# moeserve GPU benchmarks: $gpus x $card, $(date -u +%Y-%m-%d)" | tee "$out/summary.md"

for part in "${parts[@]}"; do
  case $part in
    experts)
      echo "## Expert compute" | tee -a "$out/summary.md"
      "$(find_binary moeserve-expert-bench kernels)" | tee "$out/experts.txt" | tee -a "$out/summary.md"
      if python3 -c 'import torch' 2>/dev/null; then
        python3 "$root/kernels/bench/expert_bench_torch.py" | tee "$out/experts_torch.txt" |
          tee -a "$out/summary.md"
      else
        echo "(PyTorch not installed: no PyTorch baseline)" | tee -a "$out/summary.md"
      fi
      ;;
    linear)
      echo "## Dense projections, bf16 and FP8" | tee -a "$out/summary.md"
      "$(find_binary moeserve-linear-bench kernels)" | tee "$out/linear.txt" |
        tee -a "$out/summary.md"
      ;;
    attention)
      echo "## MLA decode attention" | tee -a "$out/summary.md"
      "$(find_binary moeserve-attention-bench kernels)" | tee "$out/attention.txt" |
        tee -a "$out/summary.md"
      ;;
    dispatch)
      echo "## Dispatch / combine" | tee -a "$out/summary.md"
      "$root/engine/bench/run_dispatch_bench.sh" "$out/dispatch" | tee -a "$out/summary.md"
      ;;
    serving)
      echo "## Serving $model" | tee -a "$out/summary.md"
      server=$(find_binary moeserve server)
      header=1
      for ep in ${SERVING_EP:-1 2 4 8}; do
        (( ep <= gpus )) || continue
        overlaps=("")
        if (( ep > 1 )) && [[ ${SERVING_OVERLAP:-1} == 1 ]]; then
          overlaps+=("--two-batch-overlap")
          for ctas in ${SERVING_EXCHANGE_MAX_CTAS:-}; do
            overlaps+=("--two-batch-overlap --gpu-exchange-max-ctas $ctas")
          done
        fi
        for overlap in "${overlaps[@]}"; do
          name="ep$ep${overlap:+-overlap}"
          what="EP$ep${overlap:+ + overlap}"
          if [[ $overlap =~ max-ctas\ ([0-9]+) ]]; then
            name+="-ctas${BASH_REMATCH[1]}"
            what+=", ${BASH_REMATCH[1]} CTAs"
          fi
          port=$((50200 + ep + ${#overlap}))
          trace=()
          if [[ -n ${SERVING_TRACE_STEPS:-} ]]; then
            trace=(--trace-dir "$out/trace-$name" --trace-steps "$SERVING_TRACE_STEPS"
              --trace-skip-steps "${SERVING_TRACE_SKIP:-300}")
          fi
          # shellcheck disable=SC2086
          "$server" serve "${engine_flags[@]}" --ep "$ep" $overlap "${trace[@]}" \
            --host 127.0.0.1 --port "$port" --metrics-port -1 >"$out/serve-$name.log" 2>&1 &
          pid=$!
          # Wait for the server's ready line (it generates and uploads the weights first); give
          # up if it exits.
          until grep -q "moeserve: serving" "$out/serve-$name.log"; do
            if ! kill -0 "$pid" 2>/dev/null; then
              echo "$name: the server exited:" >&2
              tail -5 "$out/serve-$name.log" >&2
              continue 2
            fi
            sleep 1
          done
          # shellcheck disable=SC2086
          run_load "$name" "$port" "$ep" "$what ($ep x $card)" \
            ${SERVING_CONCURRENCY:-1 8 32 64}
          stop "$pid"
        done
      done
      ;;
    processes)
      echo "## One process against one process per GPU ($model)" | tee -a "$out/summary.md"
      server=$(find_binary moeserve server)
      header=1
      for ep in ${SERVING_EP:-2 4 8}; do
        (( ep >= 2 && ep <= gpus && ep % 2 == 0 )) || continue
        for layout in threads processes two-nodes; do
          name="$layout-ep$ep"
          port=$((${BENCH_BASE_PORT:-50300} + 40 * ep))
          leader=$((port + 1))  # rank i of the group listens on leader + i
          pids=()
          case $layout in
            threads)
              "$server" serve "${engine_flags[@]}" --ep "$ep" --host 127.0.0.1 --port "$port" \
                --metrics-port -1 --http-port -1 >"$out/$name.log" 2>&1 &
              pids+=($!)
              label="EP$ep, one process"
              ;;
            processes|two-nodes)
              nodes=1
              [[ $layout == two-nodes ]] && nodes=2
              per_node=$((ep / nodes))
              for ((node = 0; node < nodes; ++node)); do
                env_for_node=()
                if [[ $layout == two-nodes ]]; then
                  # Two hosts to NCCL: no P2P or shared memory between the halves, sockets
                  # on loopback instead of a network.
                  env_for_node=(NCCL_HOSTID="moeserve-bench-node$node" NCCL_NET=Socket
                    NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1)
                fi
                env "${env_for_node[@]}" "$server" node --ranks-per-node "$per_node" \
                  --num-nodes "$nodes" --node-index "$node" --port $((leader + node * per_node)) \
                  -- --group mixed --leader "127.0.0.1:$leader" "${engine_flags[@]}" \
                  >"$out/$name-node$node.log" 2>&1 &
                pids+=($!)
              done
              "$server" frontend --port "$port" --http-port -1 --metrics-port -1 \
                --group "mixed=127.0.0.1:$leader" >"$out/$name-frontend.log" 2>&1 &
              pids+=($!)
              label="EP$ep, a process per rank"
              [[ $layout == two-nodes ]] && label="EP$ep, a process per rank, 2 nodes"
              ;;
          esac
          # shellcheck disable=SC2086
          run_load "$name" "$port" "$ep" "$label ($ep x $card)" ${SERVING_CONCURRENCY:-8 64}
          stop "${pids[@]}"
        done
      done
      ;;
    *) echo "unknown part $part (experts, attention, dispatch, serving, processes)" >&2; exit 2 ;;
  esac
done
