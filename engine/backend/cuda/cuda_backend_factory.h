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

// FAILED_PRECONDITION (from the factory) when a group needs more GPUs than are visible.
RankBackendFactory MakeCudaBackendFactory();

// Visible CUDA devices (0 when there is no driver or no GPU).
int VisibleCudaDevices();

}  // namespace moeserve::engine::cuda
