#!/usr/bin/env bash
# The image scripts: valid bash (shellcheck-clean where shellcheck is installed), the version
# build-images.sh tags is the binaries' own, and runtime-packages.sh finds, with versions, the
# packages that hold every library the built binaries load.
#
# Usage: check_image_scripts.sh REPO MOESERVE MOESERVE_EPLB
set -uo pipefail
repo="$1" moeserve="$2" eplb="$3"
failed=0 passed=0
check() {  # DESCRIPTION COMMAND...
  local description="$1"; shift
  if output=$("$@" 2>&1); then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    echo "FAIL ${description}:"
    while IFS= read -r line; do echo "    ${line}"; done <<< "$output"
  fi
}
scripts=("$repo/scripts/build-images.sh" "$repo/deploy/container/runtime-packages.sh"
         "$repo/scripts/deploy-venv.sh" "$repo/scripts/install-deps.sh")
for script in "${scripts[@]}"; do
  check "bash -n $(basename "$script")" bash -n "$script"
done
if command -v shellcheck > /dev/null; then
  check "shellcheck" shellcheck "${scripts[@]}" "$0"
fi

cmake_version=$(sed -n 's/^project(moeserve VERSION \([0-9][0-9.]*\).*/\1/p' "$repo/CMakeLists.txt")
binary_version=$("$moeserve" --version | grep -o '[0-9][0-9.]*' | head -1)
check "moeserve --version (${binary_version}) is the CMake project version (${cmake_version})" \
  test "$binary_version" = "$cmake_version"
# Without a container tool the script says so and exits 2 (not 0, and not a bash error).
empty=$(mktemp -d)
ln -s "$(command -v sed)" "$empty/sed"
ln -s "$(command -v dirname)" "$empty/dirname"
PATH="$empty" "$BASH" "$repo/scripts/build-images.sh" --cpu > "$empty/out" 2>&1
code=$?
check "build-images.sh without docker/podman/buildah exits 2 with a message (got ${code})" \
  grep -q "no docker, podman or buildah" "$empty/out"
check "build-images.sh exit code" test "$code" = 2
rm -rf "$empty"

packages=$("$repo/deploy/container/runtime-packages.sh" "$moeserve" "$eplb" -- python3-jinja2 2>&1)
check "runtime-packages.sh on the built binaries" test $? = 0
for package in libgrpc++ libprotobuf libopenblas libicu libpython3 libgloo python3-jinja2; do
  check "runtime-packages.sh lists ${package}=VERSION" grep -q "^${package}[0-9a-z.-]*=" <<< "$packages"
done

echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
