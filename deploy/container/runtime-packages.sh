#!/usr/bin/env bash
# Prints the Debian/Ubuntu packages (as `name=version`) that hold the shared libraries the given
# binaries load, plus any package names given after `--`. The images' build stages run it on
# what they built, and their runtime stages install exactly that list, at the versions the
# binaries were linked against (same distribution and snapshot in both stages).
#
#   deploy/container/runtime-packages.sh BINARY... [-- EXTRA_PACKAGE...]
set -euo pipefail

binaries=()
extra=()
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "--" ]]; then shift; extra=("$@"); break; fi
  binaries+=("$1"); shift
done

packages=("${extra[@]}")
# Libraries ldd resolves; "not found" ones (libcuda.so.1, which the NVIDIA container runtime
# mounts from the host driver) are skipped.
while read -r library; do
  resolved=$(readlink -f "$library")
  owner=""
  # usrmerge: dpkg may record /lib/... where the loader found /usr/lib/..., or the symlink's
  # path rather than its target.
  for candidate in "$library" "$resolved" "${library#/usr}" "${resolved#/usr}" "/usr${library}"; do
    if owner=$(dpkg-query -S "$candidate" 2> /dev/null); then break; fi
  done
  if [[ -z "$owner" ]]; then
    echo "runtime-packages: no package holds $library" >&2
    exit 1
  fi
  packages+=("${owner%%:*}")
done < <(for binary in "${binaries[@]}"; do ldd "$binary"; done |
           awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u)

printf '%s\n' "${packages[@]}" | sort -u | while read -r package; do
  dpkg-query -W -f='${Package}=${Version}\n' "$package"
done
