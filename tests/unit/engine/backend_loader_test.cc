// LoadCudaBackend: a missing library and a library without the entry point are refused with
// FAILED_PRECONDITION naming what was tried; the real plugin (where the build has it) loads and
// either reports its GPUs or says that none is visible.
#include "engine/backend/backend_loader.h"

#include <cstdlib>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moeserve::engine {
namespace {

using ::testing::HasSubstr;

class BackendLoaderTest : public ::testing::Test {
 protected:
  void TearDown() override { unsetenv("MOESERVE_CUDA_BACKEND"); }
};

TEST_F(BackendLoaderTest, MissingLibraryIsFailedPreconditionNamingIt) {
  setenv("MOESERVE_CUDA_BACKEND", "/nonexistent/libmoeserve_cuda.so", 1);
  absl::StatusOr<CudaBackend> backend = LoadCudaBackend();
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(backend.status().message(), HasSubstr("could not be loaded"));
  EXPECT_THAT(backend.status().message(), HasSubstr("/nonexistent/libmoeserve_cuda.so"));
}

TEST_F(BackendLoaderTest, LibraryWithoutTheEntryPointIsRefused) {
  setenv("MOESERVE_CUDA_BACKEND", "libm.so.6", 1);
  absl::StatusOr<CudaBackend> backend = LoadCudaBackend();
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(backend.status().message(), HasSubstr("no moeserve_cuda_backend_v1"));
}

TEST_F(BackendLoaderTest, ThePluginLoadsAndReportsItsGpus) {
#ifndef MOESERVE_CUDA_PLUGIN
  GTEST_SKIP() << "this build has no GPU backend plugin";
#else
  setenv("MOESERVE_CUDA_BACKEND", MOESERVE_CUDA_PLUGIN, 1);
  absl::StatusOr<CudaBackend> backend = LoadCudaBackend();
  if (backend.ok()) {
    EXPECT_GT(backend->visible_devices, 0);
    EXPECT_TRUE(static_cast<bool>(backend->factory));
    EXPECT_EQ(backend->library, MOESERVE_CUDA_PLUGIN);
  } else {
    // Loaded, but this machine has no GPU: anything else (an unresolved symbol, a missing
    // library) would be a broken plugin.
    EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(backend.status().message(), "--device cuda: no CUDA device is visible");
  }
#endif
}

}  // namespace
}  // namespace moeserve::engine
