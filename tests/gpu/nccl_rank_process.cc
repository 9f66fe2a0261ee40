// One rank of an NCCL group in its own process, as a deployment runs one process per GPU:
// configured only by the environment (MOESERVE_RANK, MOESERVE_WORLD_SIZE, MOESERVE_NCCL_ID or
// MOESERVE_NCCL_ID_FILE, MOESERVE_CUDA_DEVICE). It joins the group, checks an all-reduce and an
// all-to-all-v whose contents every rank can predict, and exits 0, or prints why and exits 1.
// The optional argument is the group's timeout in seconds (default 60). Started by
// nccl_processes_test.cc.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "engine/comm/nccl_bootstrap.h"
#include "engine/comm/nccl_communicator.h"

namespace {

using moeserve::engine::comm::CreateNcclCommunicatorFromEnvironment;
using moeserve::engine::comm::NcclCommunicator;
using moeserve::engine::comm::NcclCommunicatorOptions;
using moeserve::engine::comm::ReduceOp;

// What rank `from` sends to rank `to`: to + 1 values of from * 100 + to.
std::vector<int32_t> Message(int from, int to) {
  return std::vector<int32_t>(to + 1, from * 100 + to);
}

int Fail(const char* what, const absl::Status& status) {
  std::fprintf(stderr, "%s: %s\n", what, status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  NcclCommunicatorOptions options;
  options.timeout = std::chrono::seconds(argc > 1 ? std::atoi(argv[1]) : 60);
  auto made = CreateNcclCommunicatorFromEnvironment(options);
  if (!made.ok()) return Fail("join the group", made.status());
  NcclCommunicator& comm = **made;
  const int rank = comm.rank();
  const int size = comm.size();

  int64_t rank_sum = rank;
  if (auto s = comm.AllReduce(&rank_sum, 1, ReduceOp::kSum); !s.ok()) return Fail("all-reduce", s);
  if (rank_sum != int64_t{size} * (size - 1) / 2) {
    std::fprintf(stderr, "all-reduce: sum of ranks %lld\n", static_cast<long long>(rank_sum));
    return 1;
  }

  std::vector<int32_t> send, expected;
  std::vector<int64_t> send_bytes(size), receive_bytes(size);
  for (int peer = 0; peer < size; ++peer) {
    const std::vector<int32_t> out = Message(rank, peer), in = Message(peer, rank);
    send.insert(send.end(), out.begin(), out.end());
    expected.insert(expected.end(), in.begin(), in.end());
    send_bytes[peer] = static_cast<int64_t>(out.size() * sizeof(int32_t));
    receive_bytes[peer] = static_cast<int64_t>(in.size() * sizeof(int32_t));
  }
  std::vector<int32_t> received(expected.size(), -1);
  if (auto s = comm.AllToAllV(send.data(), send_bytes, received.data(), receive_bytes); !s.ok()) {
    return Fail("all-to-all-v", s);
  }
  if (received != expected) {
    std::fprintf(stderr, "all-to-all-v: rank %d received the wrong values\n", rank);
    return 1;
  }
  std::printf("rank %d of %d: ok\n", rank, size);
  return 0;
}
