#!/usr/bin/env bash
# Runs the NCCL communicator GPU test and moeserve-dispatch-bench on a GPU host and writes their
# logs, the test's XML report and the Chrome traces into OUT_DIR.
#
#   engine/bench/run_dispatch_bench.sh OUT_DIR
#       on the GPU host. Finds the binaries in $MOESERVE_BIN_DIR (a flat folder, e.g. a bundle
#       made below), else in $MOESERVE_BUNDLE, else in the build tree $MOESERVE_BUILD_DIR
#       (default: build). $MOESERVE_BUNDLE, if set, goes first on LD_LIBRARY_PATH (the libraries
#       the host lacks: absl, ...). Extra benchmark flags: $DISPATCH_BENCH_ARGS.
#       With 4 or more GPUs the benchmark also runs on 2 of them.
#
#   engine/bench/run_dispatch_bench.sh --bundle BUNDLE_DIR [BUILD_DIR]
#       on the build machine: copies both binaries and the shared libraries they need that a
#       CUDA host does not provide (everything but glibc, libstdc++/libgcc, CUDA and NCCL).
#
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): the hosts' GPUs are shared.
set -euo pipefail

readonly TEST_BINARY=gpu_nccl_communicator_test
readonly BENCH_BINARY=moeserve-dispatch-bench

usage() {
  sed -n '2,18p' "$0" >&2
  exit 2
}

make_bundle() {
  local bundle_dir=$1 build_dir=${2:-${MOESERVE_BUILD_DIR:-build}}
  mkdir -p "$bundle_dir"
  local binaries=("$build_dir/tests/gpu/$TEST_BINARY" "$build_dir/engine/$BENCH_BINARY")
  for binary in "${binaries[@]}"; do
    [[ -x $binary ]] || { echo "missing $binary (build it first)" >&2; exit 1; }
    cp -f "$binary" "$bundle_dir/"
    ldd "$binary" | awk '$3 ~ /^\// {print $3}' | while read -r library; do
      case "$(basename "$library")" in
        libc.so* | libm.so* | libdl.so* | libpthread.so* | librt.so* | ld-linux* | \
          libstdc++.so* | libgcc_s.so* | libcuda.so* | libcudart.so* | libcublas*.so* | \
          libnccl.so* | libnvidia*) ;;
        *) cp -fL "$library" "$bundle_dir/" ;;
      esac
    done
  done
  cp -f "$0" "$bundle_dir/"
  echo "bundle in $bundle_dir:"
  ls -la "$bundle_dir"
}

find_binary() {
  local name=$1 subdir=$2
  local candidates=()
  [[ -n ${MOESERVE_BIN_DIR:-} ]] && candidates+=("$MOESERVE_BIN_DIR/$name")
  [[ -n ${MOESERVE_BUNDLE:-} ]] && candidates+=("$MOESERVE_BUNDLE/$name")
  candidates+=("${MOESERVE_BUILD_DIR:-build}/$subdir/$name")
  for candidate in "${candidates[@]}"; do
    if [[ -f $candidate && -x $candidate ]]; then
      echo "$candidate"
      return
    fi
  done
  echo "cannot find $name (looked at ${candidates[*]}): set MOESERVE_BIN_DIR," \
    "MOESERVE_BUNDLE or MOESERVE_BUILD_DIR" >&2
  exit 1
}

[[ $# -ge 1 ]] || usage
if [[ $1 == --bundle ]]; then
  [[ $# -ge 2 ]] || usage
  make_bundle "$2" "${3:-}"
  exit 0
fi
[[ $1 == -* ]] && usage

out_dir=$1
mkdir -p "$out_dir"
export NCCL_NVLS_ENABLE=0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
if [[ -n ${MOESERVE_BUNDLE:-} ]]; then
  export LD_LIBRARY_PATH="$MOESERVE_BUNDLE${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
test_binary=$(find_binary "$TEST_BINARY" tests/gpu)
bench_binary=$(find_binary "$BENCH_BINARY" engine)

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi -L || true
  nvidia-smi topo -m || true
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  ldd "$bench_binary" | grep -E "nccl|cudart|cublas|not found" || true
} >"$out_dir/environment.txt" 2>&1
cat "$out_dir/environment.txt"
num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)

status=0
echo "== $TEST_BINARY"
timeout 900 "$test_binary" --gtest_output="xml:$out_dir/nccl_communicator_test.xml" \
  2>&1 | tee "$out_dir/nccl_communicator_test.log" || status=1

# shellcheck disable=SC2086  # DISPATCH_BENCH_ARGS is a list of flags
run_bench() {
  local label=$1
  shift
  echo "== $BENCH_BINARY ($label)"
  timeout 1200 "$bench_binary" "$@" ${DISPATCH_BENCH_ARGS:-} \
    2>&1 | tee "$out_dir/dispatch_bench_$label.log" || status=1
}
run_bench all_gpus --trace "$out_dir/dispatch_trace_all_gpus.json"
if ((num_gpus >= 4)); then
  run_bench 2_gpus --gpus 2 --trace "$out_dir/dispatch_trace_2_gpus.json"
fi

echo "== results in $out_dir (status $status)"
ls -la "$out_dir"
exit "$status"
