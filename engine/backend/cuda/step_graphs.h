// StepGraphs: CUDA graphs of whole forward steps, one per step shape. A decode step planned on
// the device (a GPU alone, or a group whose exchange is planned on the GPUs) is a few hundred
// small kernels (about 15 a layer) whose launches cost the
// host more than the GPU spends on them at small batches and depth (48 layers of
// Qwen3-30B-A3B). Captured once per shape and replayed, a step is one launch.
//
// A shape (Key) is what the captured launches depend on: the step's token count, the width of
// its block tables and, in a group, the shape of its exchange (whose collectives the graph holds:
// every rank launches its own graph, and the collectives pair up as launched ones do). Everything
// else a step varies (token ids, positions, cache rows, block tables, the routing, the placement's
// tables) lives in device buffers the graph reads, which the backend rewrites before each launch.
// The buffers' addresses are part of the capture: the caller gives a fingerprint of them, and a
// changed fingerprint drops every graph. A graph is bit for bit the eager step it was captured from
// (the same kernels with the same arguments). At most `capacity` graphs are kept; beyond it the
// least recently used one is dropped.
//
// Not thread-safe: the rank's thread owns it, as it owns the rest of the backend's State.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <list>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"

namespace moeserve::engine::cuda {

class StepGraphs {
 public:
  struct Key {
    int tokens = 0;
    int max_blocks = 0;  // the block tables' width
    // A group's exchange of fixed-size blocks (kernels::ExchangeShape; 0 for a GPU alone).
    int exchange_rows = 0;
    int exchange_entries = 0;
    bool operator==(const Key& other) const {
      return tokens == other.tokens && max_blocks == other.max_blocks &&
             exchange_rows == other.exchange_rows && exchange_entries == other.exchange_entries;
    }
  };
  explicit StepGraphs(int capacity) : capacity_(capacity) {}
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  ~StepGraphs() { Clear(); }

  // Launches the step of shape `key` on `stream` from its graph; with none yet, captures
  // `enqueue` (which must put the whole step on `stream` and nothing else: no synchronization,
  // no host copies) into one first. Returns whether it captured. A failed capture leaves no
  // graph and `stream` out of capture, and returns the error: the caller then runs the step
  // without a graph.
  absl::StatusOr<bool> Launch(const Key& key, uint64_t fingerprint, cudaStream_t stream,
                              absl::FunctionRef<absl::Status()> enqueue);
  // Drops every graph (the next step of each shape captures again).
  void Clear();

 private:
  struct Entry {
    Key key;
    cudaGraphExec_t exec = nullptr;
  };
  int capacity_;
  uint64_t fingerprint_ = 0;
  std::list<Entry> graphs_;  // most recently used first
};

}  // namespace moeserve::engine::cuda
