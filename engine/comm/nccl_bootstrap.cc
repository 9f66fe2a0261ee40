#include "engine/comm/nccl_bootstrap.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine::comm {
namespace {

absl::StatusOr<int> ParseEnvironmentInt(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr) return absl::InvalidArgumentError(absl::StrCat(name, " is not set"));
  int value = 0;
  if (!absl::SimpleAtoi(text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat(name, "='", text, "' is not an integer"));
  }
  return value;
}

}  // namespace

std::string EncodeNcclUniqueId(const ncclUniqueId& id) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * sizeof(id.internal));
  for (char c : id.internal) {
    const auto byte = static_cast<unsigned char>(c);
    hex.push_back(kDigits[byte >> 4]);
    hex.push_back(kDigits[byte & 15]);
  }
  return hex;
}

absl::StatusOr<ncclUniqueId> DecodeNcclUniqueId(std::string_view hex) {
  ncclUniqueId id{};
  if (hex.size() != 2 * sizeof(id.internal)) {
    return absl::InvalidArgumentError(
        absl::StrCat("an NCCL id is ", 2 * sizeof(id.internal), " hex digits, got ", hex.size()));
  }
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < sizeof(id.internal); ++i) {
    const int high = nibble(hex[2 * i]), low = nibble(hex[2 * i + 1]);
    if (high < 0 || low < 0) {
      return absl::InvalidArgumentError("an NCCL id must consist of hex digits");
    }
    id.internal[i] = static_cast<char>(high * 16 + low);
  }
  return id;
}

absl::Status WriteNcclUniqueIdFile(const std::string& path, const ncclUniqueId& id) {
  const std::string temporary = absl::StrCat(path, ".tmp.", getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(id.internal, sizeof(id.internal));
    out.flush();
    if (!out) {
      return absl::UnavailableError(
          absl::StrCat("cannot write the NCCL id to ", temporary, ": ", std::strerror(errno)));
    }
  }
  // rename() is atomic: readers see either no file or the whole id.
  if (std::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    std::remove(temporary.c_str());
    return absl::UnavailableError(
        absl::StrCat("cannot publish the NCCL id as ", path, ": ", std::strerror(error)));
  }
  return absl::OkStatus();
}

absl::StatusOr<ncclUniqueId> ReadNcclUniqueIdFile(const std::string& path,
                                                  std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      ncclUniqueId id{};
      in.read(id.internal, sizeof(id.internal));
      if (in.gcount() == static_cast<std::streamsize>(sizeof(id.internal))) return id;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("no NCCL id appeared in ", path, " within ", timeout.count(),
                       " ms; is rank 0 running, and do all ranks see the same file system?"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicatorWithIdFile(
    int rank, int world_size, int device, const std::string& id_file,
    NcclCommunicatorOptions options) {
  ncclUniqueId id{};
  if (rank == 0) {
    if (ncclResult_t result = ncclGetUniqueId(&id); result != ncclSuccess) {
      return absl::UnavailableError(
          absl::StrCat("ncclGetUniqueId failed: ", ncclGetErrorString(result)));
    }
    RETURN_IF_ERROR(WriteNcclUniqueIdFile(id_file, id));
  } else {
    auto read = ReadNcclUniqueIdFile(id_file, options.timeout);
    if (!read.ok()) return read.status();
    id = *read;
  }
  return NcclCommunicator::CreateWithId(rank, world_size, device, id, options);
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateNcclCommunicatorFromEnvironment(
    NcclCommunicatorOptions options) {
  auto rank = ParseEnvironmentInt(kRankEnv);
  if (!rank.ok()) return rank.status();
  auto world_size = ParseEnvironmentInt(kWorldSizeEnv);
  if (!world_size.ok()) return world_size.status();
  int device = 0;
  if (std::getenv(kCudaDeviceEnv) != nullptr) {
    auto parsed = ParseEnvironmentInt(kCudaDeviceEnv);
    if (!parsed.ok()) return parsed.status();
    device = *parsed;
  } else {
    int device_count = 0;
    if (cudaGetDeviceCount(&device_count) != cudaSuccess || device_count < 1) {
      return absl::FailedPreconditionError("no CUDA device is visible");
    }
    device = *rank % device_count;
  }
  if (const char* hex = std::getenv(kNcclIdEnv); hex != nullptr) {
    auto id = DecodeNcclUniqueId(hex);
    if (!id.ok())
      return absl::InvalidArgumentError(absl::StrCat(kNcclIdEnv, ": ", id.status().message()));
    return NcclCommunicator::CreateWithId(*rank, *world_size, device, *id, options);
  }
  const char* id_file = std::getenv(kNcclIdFileEnv);
  if (id_file == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("set ", kNcclIdEnv, " or ", kNcclIdFileEnv, " to form the NCCL group"));
  }
  return CreateNcclCommunicatorWithIdFile(*rank, *world_size, device, id_file, options);
}

}  // namespace moeserve::engine::comm
