#!/usr/bin/env bash
# Runs clang's thread-safety analysis over every source that uses Abseil's annotated mutexes
# (ABSL_GUARDED_BY and friends) and fails on any finding, so that a member annotated as guarded
# is never read or written without its lock. GCC, which builds moeserve, ignores the
# annotations; this check is what makes them true.
#
# Usage: check_thread_safety.sh SOURCE_ROOT BUILD_DIR
set -euo pipefail
root=$1
build=$2
clang=$(command -v clang++-16 || command -v clang++ || true)
if [[ -z $clang ]]; then
  echo "check_thread_safety: clang++ not found (scripts/install-deps.sh installs clang-16)" >&2
  exit 1
fi
cd "$root"
mapfile -t sources < <(grep -rl --include='*.cc' 'absl/synchronization/mutex.h\|ABSL_GUARDED_BY' \
  engine server eplb clients | sort)
headers=$(grep -rl --include='*.h' 'ABSL_GUARDED_BY' engine server eplb clients | sort)
# Guarded members are private, so the sources that define their classes (which include the
# annotated headers) are the ones to check.
for header in $headers; do
  while IFS= read -r user; do sources+=("$user"); done < <(grep -rl --include='*.cc' \
    "#include \"$header\"" engine server eplb clients || true)
done
mapfile -t sources < <(printf '%s\n' "${sources[@]}" | sort -u | grep -v '/cuda/')
failed=0
for source in "${sources[@]}"; do
  if ! "$clang" -std=c++20 -fsyntax-only -Wthread-safety -Werror=thread-safety \
      -Wno-unknown-warning-option -I. -I"$build/proto/gen" \
      -I/usr/include/x86_64-linux-gnu/openblas-pthread "$source"; then
    failed=1
  fi
done
echo "thread-safety analysis: ${#sources[@]} sources checked"
exit $failed
