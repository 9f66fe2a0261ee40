#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs the whole suite
# through ctest (unit, integration and reference checks; GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
cd "${MOESERVE_BUILD_DIR:-build}"
ctest --output-on-failure --timeout 900 -j "$(nproc)" "$@"
