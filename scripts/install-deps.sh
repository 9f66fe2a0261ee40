#!/usr/bin/env bash
# Installs everything moeserve needs to build, run and test on Debian 12: compiler, CMake,
# Ninja, gRPC/protobuf, Abseil, prometheus-cpp, OpenBLAS, GoogleTest, CLI11, nlohmann-json,
# libcurl, ICU (Unicode regexes for tokenizers), spdlog (logs), Gloo (collectives between CPU
# rank processes), clang-16 (thread-safety analysis, and with libFuzzer and the sanitizer runtimes
# the fuzz targets), Prometheus (for the EPLB loop tests), NumPy (for the reference checks),
# cpp-httplib (the OpenAI HTTP front door), libpython3 and Jinja2 (chat templates, rendered by
# Jinja2 itself in an embedded interpreter), python3-venv (the real OpenAI and Triton clients the
# tests drive the server with, installed from PyPI by scripts/python-venv.sh) and OpenSSL
# (certificates for the TLS tests), and kubectl (Debian's kubernetes-client: `kubectl kustomize`
# renders the deployment manifests in the tests).
# Idempotent: does nothing when every package is already installed.
#
#   scripts/install-deps.sh [--build-only]
# --build-only installs only what compiling the binaries needs, without the test tools: the
# container images' build stages use it (deploy/container/).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc protobuf-compiler libprotobuf-dev grpc-proto
  libabsl-dev prometheus-cpp-dev libopenblas-dev libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcurl4-openssl-dev curl libicu-dev libspdlog-dev
  libgloo-dev clang-16
  prometheus python3 python3-numpy python3-yaml python3-grpcio python3-grpc-tools
  libcpp-httplib-dev libpython3-dev python3-jinja2 python3-venv
  openssl libfuzzer-16-dev libclang-rt-16-dev
  kubernetes-client
)
# Test tools only: left out by --build-only.
TEST_ONLY_PACKAGES=(
  libgtest-dev libgmock-dev libbenchmark-dev curl clang-16 prometheus python3-numpy python3-yaml
  python3-grpcio python3-grpc-tools python3-venv openssl libfuzzer-16-dev libclang-rt-16-dev
  kubernetes-client
)
if [[ "${1:-}" == "--build-only" ]]; then
  build_packages=()
  for package in "${PACKAGES[@]}"; do
    [[ " ${TEST_ONLY_PACKAGES[*]} " == *" ${package} "* ]] || build_packages+=("$package")
  done
  PACKAGES=("${build_packages[@]}")
fi

missing=()
for package in "${PACKAGES[@]}"; do
  # Any kubectl will do (Debian's kubernetes-client, or one from Kubernetes' own packages, which
  # would conflict with it).
  if [[ "$package" == kubernetes-client ]] && command -v kubectl > /dev/null; then continue; fi
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
