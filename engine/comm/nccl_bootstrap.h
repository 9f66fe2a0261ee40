// NCCL bootstrap: how the processes of a group agree on one NCCL unique id before they form
// the NcclCommunicator — the id as text (for flags and environment variables), a shared file
// written by rank 0, or the environment of a launcher. The group itself is formed by
// NcclCommunicator::CreateWithId.
//
// Free functions; thread-safe.
#pragma once

#include <nccl.h>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "engine/comm/nccl_communicator.h"

namespace moeserve::engine::comm {

// Environment variables read by CreateNcclCommunicatorFromEnvironment.
inline constexpr char kRankEnv[] = "MOESERVE_RANK";
inline constexpr char kWorldSizeEnv[] = "MOESERVE_WORLD_SIZE";
inline constexpr char kNcclIdFileEnv[] = "MOESERVE_NCCL_ID_FILE";
// The NCCL unique id itself, as hex (256 characters); used instead of the file when set.
inline constexpr char kNcclIdEnv[] = "MOESERVE_NCCL_ID";
// The CUDA device of this rank; default: rank modulo the number of visible devices.
inline constexpr char kCudaDeviceEnv[] = "MOESERVE_CUDA_DEVICE";

// The NCCL unique id as text (hex), for flags and environment variables, and back.
std::string EncodeNcclUniqueId(const ncclUniqueId& id);
absl::StatusOr<ncclUniqueId> DecodeNcclUniqueId(std::string_view hex);

// Rendezvous through a shared file. The writer (rank 0) writes to a temporary file beside
// `path` and renames it, so readers never see a partial id. Readers poll until the file holds a
// complete id or `timeout` passes (DEADLINE_EXCEEDED). The path must be fresh for each launch of
// the group (e.g. contain the job id): a stale file from an earlier launch would be read as
// the current id, and the ranks would then time out in creation.
absl::Status WriteNcclUniqueIdFile(const std::string& path, const ncclUniqueId& id);
absl::StatusOr<ncclUniqueId> ReadNcclUniqueIdFile(const std::string& path,
                                                  std::chrono::milliseconds timeout);

// One process per GPU: rank 0 creates the NCCL id and publishes it in `id_file`; the other
// ranks read it from there. Uses CUDA device `device`.
absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicatorWithIdFile(
    int rank, int world_size, int device, const std::string& id_file,
    NcclCommunicatorOptions options = {});
// One process per GPU, configured by MOESERVE_RANK, MOESERVE_WORLD_SIZE and either
// MOESERVE_NCCL_ID or MOESERVE_NCCL_ID_FILE (and optionally MOESERVE_CUDA_DEVICE).
absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicatorFromEnvironment(
    NcclCommunicatorOptions options = {});

}  // namespace moeserve::engine::comm
