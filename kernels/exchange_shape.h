// ExchangeShape: the fixed layout of one device-planned expert exchange between the GPUs of a
// group (device_exchange.h plans it, its CPU twins follow it). Every size in it is known to every
// rank before a step's routing exists, so the all-to-all's byte counts never depend on the
// routing: the exchange needs no host round trip and can be part of a CUDA graph.
//
// Per destination GPU a sender reserves one block of block_rows() rows of `hidden` bf16 values:
//   header_rows() rows of int32 header: [0] activation rows sent, [1] entries sent (the true
//       counts, which may exceed the capacities), [2] 1 where the sender's plan overflowed any
//       destination's capacity, [3] unused, then `entries` pairs (local slot, row in the block);
//   `rows` activation rows, one per token that has an expert on that GPU, in token order.
// The combine sends back `entries` rows per GPU, result e of block p for entry e of the header.
// A plain value; thread-safe.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moeserve::kernels {

struct ExchangeShape {
  int ranks = 1;    // GPUs in the group
  int rows = 0;     // activation rows per destination (capacity)
  int entries = 0;  // (token, expert) entries per destination (capacity)
  int hidden = 0;   // bf16 values per row

  static constexpr int kHeaderInts = 4;  // before the entries

  // The shape for batches of up to `max_tokens` tokens a GPU (rounded up to a power of two, so
  // that one shape serves many steps): entries `headroom` times an even share of the pairs plus
  // 8 (small batches' shares vary most), or `fixed_entries` where positive; never more than a
  // token can send one GPU (one entry per expert of its top-k the GPU holds); rows at most the
  // tokens and the entries.
  static ExchangeShape ForBatch(int ranks, int64_t max_tokens, int top_k, int slots_per_rank,
                                int hidden, double headroom, int fixed_entries) {
    int64_t tokens = 1;
    while (tokens < max_tokens) tokens *= 2;
    const int64_t most = tokens * std::min(std::max(top_k, 1), std::max(slots_per_rank, 1));
    int64_t entries = fixed_entries;
    if (entries <= 0) {
      const double even_share = static_cast<double>(tokens) * top_k / std::max(ranks, 1);
      entries = static_cast<int64_t>(std::ceil(headroom * even_share)) + 8;
    }
    entries = std::min(entries, most);
    return {ranks, static_cast<int>(std::min(tokens, entries)), static_cast<int>(entries), hidden};
  }
  constexpr int64_t HeaderInts() const { return kHeaderInts + 2 * static_cast<int64_t>(entries); }
  constexpr int header_rows() const {
    const int64_t row_bytes = 2 * static_cast<int64_t>(hidden);
    return row_bytes > 0 ? static_cast<int>((HeaderInts() * 4 + row_bytes - 1) / row_bytes) : 0;
  }
  constexpr int block_rows() const { return header_rows() + rows; }
  // Rows of the dispatch buffer (every destination's block) and of the combine's.
  constexpr int64_t dispatch_rows() const { return static_cast<int64_t>(ranks) * block_rows(); }
  constexpr int64_t combine_rows() const { return static_cast<int64_t>(ranks) * entries; }
  // Values before destination p's block in the dispatch buffer (where its header starts).
  constexpr int64_t BlockOffset(int p) const {
    return static_cast<int64_t>(p) * block_rows() * hidden;
  }
  // Row of the dispatch buffer that holds activation row r of destination p's block.
  constexpr int64_t DispatchRow(int p, int r) const {
    return static_cast<int64_t>(p) * block_rows() + header_rows() + r;
  }
  // (constexpr members: the kernels call them on the device.)
  constexpr bool operator==(const ExchangeShape& o) const {
    return ranks == o.ranks && rows == o.rows && entries == o.entries && hidden == o.hidden;
  }
};

}  // namespace moeserve::kernels
