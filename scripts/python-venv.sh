#!/usr/bin/env bash
# Creates (or refreshes) the Python virtual environment the front-door tests run in, with the
# real clients from PyPI pinned in tests/python/requirements.txt (the `openai` SDK and
# `tritonclient[grpc]`). Debian's python3 (3.11) and its venv module come from
# scripts/install-deps.sh. Idempotent: does nothing when the environment already holds exactly
# these requirements.
#
#   scripts/python-venv.sh [VENV_DIR [REQUIREMENTS]]
#     (defaults: $MOESERVE_BUILD_DIR/venv, i.e. build/venv, and tests/python/requirements.txt;
#     scripts/deploy-venv.sh gives the deployment checks' own)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/${MOESERVE_BUILD_DIR:-build}/venv}
requirements=${2:-$root/tests/python/requirements.txt}
stamp=$venv/.moeserve-requirements
if [[ -x $venv/bin/python ]] && cmp -s "$requirements" "$stamp"; then
  exit 0
fi
echo "$(basename "$0" .sh): installing $(grep -v '^#' "$requirements" | xargs) into $venv"
/usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
