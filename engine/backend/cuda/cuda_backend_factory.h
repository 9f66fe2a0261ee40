// The GPU backend's RankBackendFactory: rank r of a group runs on CUDA device r (choose the
// devices with CUDA_VISIBLE_DEVICES). For a group of several ranks it first creates the group's
// NCCL communicators (one process driving several GPUs, a thread per rank) for the dispatch and
// combine of activations; each rank's CudaRankBackend keeps them alive.
//
// The returned factory may be called from one thread at a time (the engine builds its groups
// sequentially).
#pragma once

#include "engine/backend/rank_backend.h"

namespace moeserve::engine::cuda {

struct CudaBackendFactoryOptions {
  // A group of more ranks than visible GPUs shares them (rank r on GPU r % visible), and its
  // ranks exchange activations through pinned host memory instead of NCCL (which puts one rank
  // on a GPU). Slow, but the same math: for tests of expert parallelism on one GPU. The server
  // never asks for it.
  bool ranks_share_gpus = false;
};

// FAILED_PRECONDITION (from the factory) when a group needs more GPUs than are visible (unless
// its ranks may share them).
RankBackendFactory MakeCudaBackendFactory(CudaBackendFactoryOptions options = {});

// Visible CUDA devices (0 when there is no driver or no GPU).
int VisibleCudaDevices();

}  // namespace moeserve::engine::cuda
