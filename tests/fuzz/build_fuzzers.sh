#!/usr/bin/env bash
# Configures and builds the libFuzzer targets (tests/fuzz/CMakeLists.txt) with clang into
# BUILD_DIR; incremental after the first run. Run by ctest's fuzz_build.
# Usage: build_fuzzers.sh BUILD_DIR CLANGXX
set -euo pipefail
build_dir=$1
clangxx=$2
here=$(cd "$(dirname "$0")" && pwd)
cmake -S "$here" -B "$build_dir" -G Ninja -DCMAKE_CXX_COMPILER="$clangxx" > "$build_dir.configure.log" 2>&1 ||
  { cat "$build_dir.configure.log"; exit 1; }
cmake --build "$build_dir" -j "$(nproc)"
