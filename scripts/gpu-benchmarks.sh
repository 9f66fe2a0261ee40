#!/usr/bin/env bash
# Runs moeserve's GPU benchmarks on a GPU host, prints their tables and keeps their logs:
#   experts   moeserve-expert-bench (expert SwiGLU at DeepSeek-V3 shapes against the card's
#             measured limits) and the PyTorch baselines of kernels/bench/expert_bench_torch.py
#   dispatch  engine/bench/run_dispatch_bench.sh: dispatch/combine against raw NCCL
#             all-to-all of the same bytes, two-batch overlap, Chrome traces
#   serving   `moeserve serve --model builtin:v3-bench --device cuda --ep N` for N = 1, 2, 4, 8
#             (those that fit the visible GPUs) under moeserve-loadgen: output tokens/s per
#             GPU, TTFT and inter-token latency percentiles at several concurrency levels
#
#   scripts/gpu-benchmarks.sh OUT_DIR [experts] [dispatch] [serving]     (default: all three)
#
# Binaries come from $MOESERVE_BIN_DIR (a flat folder, e.g. a bundle made with
# engine/bench/run_dispatch_bench.sh --bundle) or the build tree $MOESERVE_BUILD_DIR (default:
# build). Serving flags: $SERVING_CONCURRENCY (default "1 8 32 64"), $SERVING_PROMPT_TOKENS
# (128), $SERVING_MAX_TOKENS (128), $SERVING_EP (default "1 2 4 8"; a layout of 2 or more GPUs
# also runs with --two-batch-overlap unless $SERVING_OVERLAP is 0), $SERVING_TRACE_STEPS
# (default none: with K, each server writes a Chrome trace of K working steps after
# $SERVING_TRACE_SKIP, default 300, into OUT_DIR/trace-LAYOUT/). NVLink multicast stays off.
set -euo pipefail

[[ $# -ge 1 ]] || { sed -n '2,19p' "$0" >&2; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(experts dispatch serving)
root=$(cd "$(dirname "$0")/.." && pwd)
build=${MOESERVE_BUILD_DIR:-$root/build}
export NCCL_NVLS_ENABLE=0

find_binary() {  # name subdir
  if [[ -n ${MOESERVE_BIN_DIR:-} ]]; then echo "$MOESERVE_BIN_DIR/$1"; else echo "$build/$2/$1"; fi
}

gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
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
    dispatch)
      echo "## Dispatch / combine" | tee -a "$out/summary.md"
      "$root/engine/bench/run_dispatch_bench.sh" "$out/dispatch" | tee -a "$out/summary.md"
      ;;
    serving)
      echo "## Serving builtin:v3-bench" | tee -a "$out/summary.md"
      server=$(find_binary moeserve server)
      loadgen=$(find_binary moeserve-loadgen clients)
      header=1
      for ep in ${SERVING_EP:-1 2 4 8}; do
        (( ep <= gpus )) || continue
        overlaps=("")
        (( ep > 1 )) && [[ ${SERVING_OVERLAP:-1} == 1 ]] && overlaps+=("--two-batch-overlap")
        for overlap in "${overlaps[@]}"; do
          name="ep$ep${overlap:+-overlap}"
          port=$((50200 + ep + ${#overlap}))
          trace=()
          if [[ -n ${SERVING_TRACE_STEPS:-} ]]; then
            trace=(--trace-dir "$out/trace-$name" --trace-steps "$SERVING_TRACE_STEPS"
              --trace-skip-steps "${SERVING_TRACE_SKIP:-300}")
          fi
          # shellcheck disable=SC2086
          "$server" serve --model builtin:v3-bench --device cuda --ep "$ep" $overlap "${trace[@]}" \
            --host 127.0.0.1 --port "$port" --metrics-port -1 --kv-cache-mib 8192 \
            --max-batch-tokens 1024 --max-running-requests 128 >"$out/serve-$name.log" 2>&1 &
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
          if ! "$loadgen" --target "127.0.0.1:$port" --connect-timeout 600 --gpus "$ep" \
            --label "EP$ep${overlap:+ + overlap} ($ep x $card)" \
            --concurrency ${SERVING_CONCURRENCY:-1 8 32 64} \
            --prompt-tokens "${SERVING_PROMPT_TOKENS:-128}" \
            --max-tokens "${SERVING_MAX_TOKENS:-128}" >"$out/serving-$name.md" 2>&1; then
            echo "$name: load generator failed (see serving-$name.md, serve-$name.log)" >&2
          fi
          kill -TERM "$pid" 2>/dev/null || true
          wait "$pid" || true
          if (( header )); then cat "$out/serving-$name.md"; header=0;
          else tail -n +3 "$out/serving-$name.md"; fi | tee -a "$out/summary.md"
        done
      done
      ;;
    *) echo "unknown part $part (experts, dispatch, serving)" >&2; exit 2 ;;
  esac
done
