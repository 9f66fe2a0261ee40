// The entry point of libmoeserve_cuda.so, the GPU backend loaded at run time by
// engine/backend/backend_loader.h.
#include "engine/backend/backend_loader.h"
#include "engine/backend/cuda/cuda_backend_factory.h"

extern "C" __attribute__((visibility("default"))) bool moeserve_cuda_backend_v1(
    moeserve::engine::RankBackendFactory* factory, int* visible_devices) {
  *visible_devices = moeserve::engine::cuda::VisibleCudaDevices();
  if (*visible_devices == 0) return false;
  *factory = moeserve::engine::cuda::MakeCudaBackendFactory();
  return true;
}

// The loader names the symbol by this constant; a rename on either side fails to compile.
static_assert(sizeof(moeserve::engine::kCudaBackendEntryPoint) ==
              sizeof("moeserve_cuda_backend_v1"));
