#!/usr/bin/env bash
# Runs one libFuzzer target as a test: first every committed regression input of the target
# (tests/fuzz/regressions/NAME/, crashes found earlier, which must stay fixed), then fuzzing for
# a bounded time from the committed seeds (tests/fuzz/corpus/NAME/) plus what earlier runs in
# this build found. A crash fails the test and leaves its input in ARTIFACT_DIR: fix the bug,
# then commit the input under tests/fuzz/regressions/NAME/.
# Usage: run_fuzzer.sh FUZZER NAME SECONDS ARTIFACT_DIR   (MOESERVE_FUZZ_SECONDS overrides SECONDS)
set -euo pipefail
fuzzer=$1
name=$2
seconds=${MOESERVE_FUZZ_SECONDS:-$3}
artifacts=$4
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$artifacts/$name" "$artifacts/$name.corpus"
shopt -s nullglob
regressions=("$here/regressions/$name"/*)
if ((${#regressions[@]} > 0)); then
  "$fuzzer" -runs=1 -timeout=10 -rss_limit_mb=2048 "${regressions[@]}"
fi
"$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$artifacts/$name/" "$artifacts/$name.corpus" "$here/corpus/$name"
