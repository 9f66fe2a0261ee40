#!/usr/bin/env bash
# Builds the container images from deploy/container/: moeserve:VERSION (CPU, Debian 12) and
# moeserve-cuda:VERSION (CUDA 13, Ubuntu 24.04, with the GPU backend plugin), with docker,
# podman or buildah, whichever is found first (or --tool). VERSION is the CMake project version
# (what `moeserve --version` prints).
#
#   scripts/build-images.sh [--cpu|--cuda] [--tool docker|podman|buildah] [--version V]
#                           [--cuda-architectures "90;100"] [--push REGISTRY] [--save DIR]
#
# --push REGISTRY   also tags REGISTRY/moeserve:VERSION (and -cuda) and pushes them.
# --save DIR        writes DIR/moeserve-VERSION.tar (and moeserve-cuda-VERSION.tar), image
#                   archives to load on nodes where no registry is reachable:
#                     ctr -n k8s.io images import moeserve-0.1.0.tar      (containerd nodes)
#                     kind load image-archive moeserve-0.1.0.tar          (kind)
#                     docker load -i moeserve-0.1.0.tar / podman load -i ...
#                   The manifests (deploy/k8s/) use imagePullPolicy IfNotPresent, so a loaded
#                   image is used as it is (docs/deploy.md, "Images").
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

build_cpu=1
build_cuda=1
tool=""
version=""
registry=""
save_dir=""
cuda_architectures="90"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) build_cuda=0; shift ;;
    --cuda) build_cpu=0; shift ;;
    --tool) tool="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --push) registry="${2%/}"; shift 2 ;;
    --save) save_dir="$2"; shift 2 ;;
    --cuda-architectures) cuda_architectures="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-images: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [[ -z "$version" ]]; then
  version=$(sed -n 's/^project(moeserve VERSION \([0-9][0-9.]*\).*/\1/p' CMakeLists.txt)
fi
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+([.-][0-9A-Za-z.-]+)?$ ]]; then
  echo "build-images: cannot tell the version (got '${version}'); pass --version" >&2
  exit 2
fi

if [[ -z "$tool" ]]; then
  for candidate in docker podman buildah; do
    if command -v "$candidate" > /dev/null; then tool="$candidate"; break; fi
  done
fi
case "$tool" in
  docker|podman|buildah) ;;
  "") echo "build-images: no docker, podman or buildah found; install one (docs/deploy.md)" >&2
      exit 2 ;;
  *) echo "build-images: --tool must be docker, podman or buildah, not ${tool}" >&2; exit 2 ;;
esac

build() {  # IMAGE DOCKERFILE [BUILD_ARG...]
  local image="$1" dockerfile="$2"; shift 2
  local build_args=()
  for argument in "$@"; do build_args+=(--build-arg "$argument"); done
  echo "build-images: ${tool} building ${image} from ${dockerfile}" >&2
  if [[ "$tool" == buildah ]]; then
    buildah bud --layers -f "$dockerfile" -t "$image" "${build_args[@]}" .
  else
    "$tool" build -f "$dockerfile" -t "$image" "${build_args[@]}" .
  fi
}

push() {  # IMAGE
  local target="${registry}/$1"
  echo "build-images: pushing ${target}" >&2
  "$tool" tag "$1" "$target"
  "$tool" push "$target"
}

save() {  # IMAGE NAME
  local archive="${save_dir}/$2-${version}.tar"
  echo "build-images: writing ${archive}" >&2
  case "$tool" in
    docker) docker save -o "$archive" "$1" ;;
    podman) podman save --format docker-archive -o "$archive" "$1" ;;
    buildah) buildah push "$1" "docker-archive:${archive}:$1" ;;
  esac
}

images=()
if [[ "$build_cpu" == 1 ]]; then
  build "moeserve:${version}" deploy/container/Dockerfile
  images+=("moeserve")
fi
if [[ "$build_cuda" == 1 ]]; then
  build "moeserve-cuda:${version}" deploy/container/Dockerfile.cuda \
    "CUDA_ARCHITECTURES=${cuda_architectures}"
  images+=("moeserve-cuda")
fi
if [[ -n "$save_dir" ]]; then mkdir -p "$save_dir"; fi
for name in "${images[@]}"; do
  if [[ -n "$registry" ]]; then push "${name}:${version}"; fi
  if [[ -n "$save_dir" ]]; then save "${name}:${version}" "$name"; fi
done
echo "build-images: built ${images[*]/%/:${version}}" >&2
