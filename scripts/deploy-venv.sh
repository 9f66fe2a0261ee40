#!/usr/bin/env bash
# Creates (or refreshes) the Python virtual environment of the deployment checks: the tools
# pinned in tests/deploy/requirements.txt (kubernetes-validate, checkov, hadolint), apart from
# build/venv because checkov pins many packages of its own. Debian's python3 and its venv
# module come from scripts/install-deps.sh. Idempotent: does nothing when the environment
# already holds exactly these requirements. The deploy tests' fixture runs it.
#
#   scripts/deploy-venv.sh [VENV_DIR]      (default: $MOESERVE_BUILD_DIR/deploy-venv)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
exec "$root/scripts/python-venv.sh" "${1:-$root/${MOESERVE_BUILD_DIR:-build}/deploy-venv}" \
  "$root/tests/deploy/requirements.txt"
