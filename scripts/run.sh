#!/usr/bin/env bash
# The README's run command: installs what is missing, builds, and serves the built-in model
# through all three front doors: gRPC (moeserve.v1.Generation and the KServe v2 inference
# protocol) on 127.0.0.1:50051, the OpenAI API on http://127.0.0.1:8000, metrics on :9400.
# Extra arguments go to `moeserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
# A disaggregated layout: a 2-rank prefill group hands prompts to a 4-rank decode group,
# both expert-parallel with two-micro-batch overlap; it stays responsive on 2 cores.
exec "${MOESERVE_BUILD_DIR:-build}/server/moeserve" serve --model builtin:tiny \
  --prefill-ep 2 --decode-ep 4 --two-batch-overlap "$@"
