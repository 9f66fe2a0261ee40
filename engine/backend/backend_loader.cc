#include "engine/backend/backend_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moeserve::engine {

absl::StatusOr<CudaBackend> LoadCudaBackend() {
  constexpr char kLibrary[] = "libmoeserve_cuda.so";
  std::vector<std::string> candidates;
  if (const char* explicit_path = std::getenv("MOESERVE_CUDA_BACKEND")) {
    candidates.push_back(explicit_path);
  } else {
    std::error_code error;
    const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", error);
    if (!error) {
      const std::filesystem::path dir = exe.parent_path();
      for (const auto& place : {dir, dir / ".." / "lib", dir / ".." / "engine"}) {
        candidates.push_back((place / kLibrary).lexically_normal().string());
      }
    }
    candidates.push_back(kLibrary);  // the dynamic loader's own search path
  }
  std::vector<std::string> failures;
  for (const std::string& candidate : candidates) {
    void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      failures.push_back(dlerror());
      continue;
    }
    auto entry = reinterpret_cast<CudaBackendEntryPoint>(dlsym(handle, kCudaBackendEntryPoint));
    if (entry == nullptr) {
      failures.push_back(absl::StrCat(candidate, ": no ", kCudaBackendEntryPoint));
      dlclose(handle);
      continue;
    }
    CudaBackend backend;
    backend.library = candidate;
    if (!entry(&backend.factory, &backend.visible_devices)) {
      return absl::FailedPreconditionError("--device cuda: no CUDA device is visible");
    }
    return backend;
  }
  return absl::FailedPreconditionError(
      absl::StrCat("--device cuda: the GPU backend (", kLibrary,
                   ") could not be loaded; it is built only where CUDA and NCCL are found. Tried: ",
                   absl::StrJoin(failures, "; ")));
}

absl::StatusOr<RankBackendChoice> ChooseRankBackend(const std::string& device) {
  RankBackendChoice choice;
  if (device == "cpu") return choice;
  if (device != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda, got `", device, "`"));
  }
  absl::StatusOr<CudaBackend> cuda = LoadCudaBackend();
  if (!cuda.ok()) return cuda.status();
  choice.factory = std::move(cuda->factory);
  choice.kv_element_bytes = 2;  // bf16 rows
  choice.device = "cuda";
  return choice;
}

}  // namespace moeserve::engine
