#include "engine/backend/cuda/cuda_backend_factory.h"

#include <cuda_runtime_api.h>

#include <map>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda/cuda_rank_backend.h"
#include "engine/base/status_macros.h"
#include "engine/comm/nccl_communicator.h"

namespace moeserve::engine::cuda {
namespace {

// A group's NCCL communicators, destroyed together when the last rank's backend goes away.
struct GroupExchange {
  std::vector<std::unique_ptr<comm::NcclCommunicator>> communicators;
  ~GroupExchange() { comm::NcclCommunicator::DestroyAll(communicators); }
};

}  // namespace

int VisibleCudaDevices() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return count;
}

RankBackendFactory MakeCudaBackendFactory() {
  // Exchanges of the groups being built, by group; a rank takes its communicator from there.
  auto exchanges = std::make_shared<
      std::map<const parallel::ExpertParallelGroup*, std::shared_ptr<GroupExchange>>>();
  return [exchanges](
             const RankBackendRequest& request) -> absl::StatusOr<std::unique_ptr<RankBackend>> {
    const int size = request.group->size();
    const int visible = VisibleCudaDevices();
    if (size > visible) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device cuda: a group of ", size, " ranks needs ", size,
                       " GPUs (one per rank); ", visible, " visible"));
    }
    RETURN_IF_ERROR(CheckCudaSupport(request.model->config()));
    std::shared_ptr<GroupExchange>& exchange = (*exchanges)[request.group];
    if (size > 1 && exchange == nullptr) {
      std::vector<int> devices(size);
      std::iota(devices.begin(), devices.end(), 0);
      auto communicators = comm::NcclCommunicator::CreateForDevices(devices);
      if (!communicators.ok()) return communicators.status();
      exchange = std::make_shared<GroupExchange>();
      exchange->communicators = std::move(*communicators);
    }
    CudaRankOptions options;
    options.device = request.rank;
    options.rank = request.rank;
    options.group_size = size;
    options.kv_blocks = request.kv_blocks;
    options.kv_block_size = request.kv_block_size;
    options.max_batch_tokens = request.max_batch_tokens;
    options.background_placement_staging = request.background_placement_staging;
    if (size > 1) {
      options.exchange = exchange->communicators[request.rank].get();
      options.exchange_owner = exchange;
    }
    auto backend =
        CudaRankBackend::Create(*request.model, request.group->placement(request.rank), options);
    if (request.rank == size - 1) exchanges->erase(request.group);  // the group is complete
    if (!backend.ok()) return backend.status();
    return std::unique_ptr<RankBackend>(std::move(*backend));
  };
}

}  // namespace moeserve::engine::cuda
