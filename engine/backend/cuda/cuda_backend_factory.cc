#include "engine/backend/cuda/cuda_backend_factory.h"

#include <cuda_runtime_api.h>

#include <map>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/backend/cuda/cuda_rank_backend.h"
#include "engine/base/status_macros.h"
#include "engine/comm/nccl_bootstrap.h"
#include "engine/comm/nccl_communicator.h"
#include "spdlog/spdlog.h"

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

namespace {

CudaRankOptions RankOptions(const RankBackendRequest& request, int device) {
  CudaRankOptions options;
  options.device = device;
  options.rank = request.rank;
  options.group_size = request.group->size();
  options.kv_blocks = request.kv_blocks;
  options.kv_block_size = request.kv_block_size;
  options.max_batch_tokens = request.max_batch_tokens;
  options.background_placement_staging = request.background_placement_staging;
  options.keep_fp8_experts = request.keep_fp8_experts;
  options.keep_fp8_dense = request.keep_fp8_dense;
  options.fp8_dispatch = request.fp8_dispatch;
  options.device_planned_moe = request.device_planned_moe;
  options.device_planned_exchange = request.device_planned_exchange;
  options.exchange_entries_capacity = request.exchange_entries_capacity;
  options.cuda_graphs = request.cuda_graphs;
  return options;
}

// How the group's collectives are bound, for the log.
std::string CtaBoundText(int max_ctas) {
  return max_ctas > 0 ? absl::StrCat("at most ", max_ctas, " CTAs per collective")
                      : std::string("NCCL chooses the CTAs per collective");
}

// A rank that is a process of its own: its GPU, and an NCCL communicator with the group's other
// processes, formed through the group's rendezvous (rank 0 publishes the NCCL id).
absl::StatusOr<std::unique_ptr<RankBackend>> CreateProcessRank(const RankBackendRequest& request,
                                                               int visible) {
  const int size = request.group->size();
  if (visible < 1) return absl::FailedPreconditionError("--device cuda: no GPU is visible");
  const int device = request.cuda_device >= 0 ? request.cuda_device : request.rank % visible;
  if (device >= visible) {
    return absl::FailedPreconditionError(
        absl::StrCat("--device cuda: GPU ", device, " is not visible (", visible, " visible)"));
  }
  CudaRankOptions options = RankOptions(request, device);
  if (size > 1) {
    if (request.rendezvous == nullptr) {
      return absl::InvalidArgumentError("a GPU rank process needs its group's rendezvous");
    }
    const std::string key = request.rendezvous_prefix + "/nccl-id";
    const std::chrono::milliseconds timeout = request.group->options().collective_timeout;
    ncclUniqueId id{};
    if (request.rank == 0) {
      if (ncclResult_t result = ncclGetUniqueId(&id); result != ncclSuccess) {
        return absl::UnavailableError(
            absl::StrCat("ncclGetUniqueId failed: ", ncclGetErrorString(result)));
      }
      RETURN_IF_ERROR(request.rendezvous->Set(key, comm::EncodeNcclUniqueId(id)));
    } else {
      ASSIGN_OR_RETURN(std::string hex, request.rendezvous->Get(key, timeout));
      ASSIGN_OR_RETURN(id, comm::DecodeNcclUniqueId(hex));
    }
    comm::NcclCommunicatorOptions nccl;
    nccl.timeout = timeout;
    nccl.max_ctas = request.exchange_max_ctas;
    ASSIGN_OR_RETURN(std::shared_ptr<comm::NcclCommunicator> exchange,
                     comm::NcclCommunicator::CreateWithId(request.rank, size, device, id, nccl));
    spdlog::info("moeserve: rank {} of {} joined its group's NCCL exchange on GPU {} ({})",
                 request.rank, size, device, CtaBoundText(nccl.max_ctas));
    options.exchange = exchange.get();
    options.exchange_owner = exchange;
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<CudaRankBackend> backend,
      CudaRankBackend::Create(*request.model, request.group->placement(request.rank), options));
  return std::unique_ptr<RankBackend>(std::move(backend));
}

}  // namespace

RankBackendFactory MakeCudaBackendFactory(CudaBackendFactoryOptions factory_options) {
  // Exchanges of the groups being built, by group; a rank takes its communicator from there.
  auto exchanges = std::make_shared<
      std::map<const parallel::ExpertParallelGroup*, std::shared_ptr<GroupExchange>>>();
  return [exchanges, factory_options](
             const RankBackendRequest& request) -> absl::StatusOr<std::unique_ptr<RankBackend>> {
    const int size = request.group->size();
    const int visible = VisibleCudaDevices();
    RETURN_IF_ERROR(CheckCudaSupport(request.model->config()));
    if (request.group->local_ranks().size() < static_cast<size_t>(size)) {
      return CreateProcessRank(request, visible);
    }
    const bool sharing = size > visible && factory_options.ranks_share_gpus && visible > 0;
    if (size > visible && !sharing) {
      return absl::FailedPreconditionError(
          absl::StrCat("--device cuda: a group of ", size, " ranks needs ", size,
                       " GPUs (one per rank); ", visible, " visible"));
    }
    if (sharing) {
      // No NCCL between ranks on one GPU: CudaRankOptions::exchange stays null.
      auto backend = CudaRankBackend::Create(*request.model, request.group->placement(request.rank),
                                             RankOptions(request, request.rank % visible));
      if (!backend.ok()) return backend.status();
      return std::unique_ptr<RankBackend>(std::move(*backend));
    }
    std::shared_ptr<GroupExchange>& exchange = (*exchanges)[request.group];
    if (size > 1 && exchange == nullptr) {
      std::vector<int> devices(size);
      std::iota(devices.begin(), devices.end(), 0);
      comm::NcclCommunicatorOptions nccl;
      nccl.max_ctas = request.exchange_max_ctas;
      auto communicators = comm::NcclCommunicator::CreateForDevices(devices, nccl);
      if (!communicators.ok()) return communicators.status();
      exchange = std::make_shared<GroupExchange>();
      exchange->communicators = std::move(*communicators);
      spdlog::info("moeserve: {} GPUs formed their group's NCCL exchange ({})", size,
                   CtaBoundText(nccl.max_ctas));
    }
    CudaRankOptions options = RankOptions(request, request.rank);
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
