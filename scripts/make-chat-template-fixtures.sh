#!/usr/bin/env bash
# Regenerates tests/fixtures/chat_templates/expected.json with Hugging Face transformers' own
# apply_chat_template (installed from PyPI into $MOESERVE_BUILD_DIR/venv-fixtures, kept apart
# from the test venv because it is large). Not part of the test run: the renderings are
# committed, and the tests compare moeserve's renderer against them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/${MOESERVE_BUILD_DIR:-build}/venv-fixtures
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import transformers' 2>/dev/null; then
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check transformers==5.23.0
fi
"$venv/bin/python" "$root/tests/fixtures/chat_templates/make_expected.py"
