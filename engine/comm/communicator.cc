#include "engine/comm/communicator.h"

namespace moeserve::engine::comm {

absl::Status Communicator::AllToAllCounts(std::span<const int64_t> send, std::span<int64_t> recv) {
  std::vector<int64_t> bytes(size(), sizeof(int64_t));
  return AllToAllV(send.data(), bytes, recv.data(), bytes);
}

}  // namespace moeserve::engine::comm
