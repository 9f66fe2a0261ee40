#!/usr/bin/env bash
# Configures and builds moeserve into build/ (Release with debug info). Extra arguments go to
# CMake, e.g. -DMOESERVE_CUDA=OFF or -DMOESERVE_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
BUILD_DIR="${MOESERVE_BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" > /dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
