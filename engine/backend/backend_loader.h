// Loads the GPU backend at run time. It lives in its own shared library, libmoeserve_cuda.so
// (built where CUDA and NCCL are found), and is loaded only for `--device cuda`: a process that
// computes on the CPU then never maps the CUDA libraries. That matters beyond memory: cuBLAS
// carries about 94 KB of static thread-local storage, which glibc reserves on every thread's
// stack, and the metrics web server creates its threads with 100 KB stacks, so merely linking
// cuBLAS into the server made /metrics fail to start. Libraries loaded later with dlopen use
// dynamic thread-local storage and leave existing threads alone.
//
// Thread-safe (dlopen is); the library stays loaded for the life of the process.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "engine/backend/rank_backend.h"

namespace moeserve::engine {

struct CudaBackend {
  RankBackendFactory factory;
  int visible_devices = 0;
  std::string library;  // the file loaded
};

// Looks for libmoeserve_cuda.so at $MOESERVE_CUDA_BACKEND (a file), beside the executable, in
// ../lib and ../engine relative to it (an install, and the build tree), then on the library
// path. FAILED_PRECONDITION, naming the places searched and dlopen's reason, when none loads.
absl::StatusOr<CudaBackend> LoadCudaBackend();

// Where a group's ranks compute: the CPU backend is built in; a GPU backend comes from the
// plugin's factory (the engine library itself never depends on CUDA).
struct RankBackendChoice {
  RankBackendFactory factory;  // null: the CPU
  int kv_element_bytes = 4;    // bytes per cached value (fp32 on the CPU, bf16 on GPUs)
  std::string device = "cpu";  // for messages
};
// The backend for `--device` `device` ("cpu" or "cuda", which loads the plugin).
absl::StatusOr<RankBackendChoice> ChooseRankBackend(const std::string& device);

// The plugin's entry point, extern "C" so that dlsym finds it by this name. Returns false when
// no CUDA device is usable (`visible_devices` is then 0).
inline constexpr char kCudaBackendEntryPoint[] = "moeserve_cuda_backend_v1";
using CudaBackendEntryPoint = bool (*)(RankBackendFactory* factory, int* visible_devices);

}  // namespace moeserve::engine
