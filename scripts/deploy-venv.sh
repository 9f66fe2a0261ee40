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
venv=${1:-$root/${MOESERVE_BUILD_DIR:-build}/deploy-venv}
requirements=$root/tests/deploy/requirements.txt
stamp=$venv/.moeserve-requirements
if [[ -x $venv/bin/python ]] && cmp -s "$requirements" "$stamp"; then
  exit 0
fi
echo "deploy-venv: installing $(grep -v '^#' "$requirements" | xargs) into $venv"
/usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
