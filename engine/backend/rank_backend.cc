#include "engine/backend/rank_backend.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/base/status_macros.h"

namespace moeserve::engine {
namespace {

// Checks that `block_table` covers `num_tokens` positions of `rows`.
absl::Status CheckCovered(const KvRows& rows, const std::vector<int32_t>& block_table,
                          int num_tokens) {
  if (num_tokens < 0 || rows.BlocksFor(num_tokens) > static_cast<int>(block_table.size())) {
    return absl::InternalError(absl::StrCat("KV handoff: ", num_tokens, " tokens need ",
                                            rows.BlocksFor(num_tokens), " blocks, the table has ",
                                            block_table.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CpuRankBackend::ExportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                      std::vector<std::byte>& out) {
  RETURN_IF_ERROR(CheckCovered(rows_, block_table, num_tokens));
  const size_t row_bytes = sizeof(float) * rows_.row_dim();
  out.resize(static_cast<size_t>(rows_.num_layers()) * num_tokens * row_bytes);
  std::byte* at = out.data();
  for (int layer = 0; layer < rows_.num_layers(); ++layer) {
    for (int p = 0; p < num_tokens; ++p, at += row_bytes) {
      std::memcpy(at, rows_.RowAt(layer, block_table, p), row_bytes);
    }
  }
  return absl::OkStatus();
}

absl::Status CpuRankBackend::ImportKv(const std::vector<int32_t>& block_table, int num_tokens,
                                      std::span<const std::byte> rows) {
  RETURN_IF_ERROR(CheckCovered(rows_, block_table, num_tokens));
  const size_t row_bytes = sizeof(float) * rows_.row_dim();
  if (rows.size() != static_cast<size_t>(rows_.num_layers()) * num_tokens * row_bytes) {
    return absl::InternalError(absl::StrCat("KV handoff: ", rows.size(), " bytes for ", num_tokens,
                                            " tokens of ", rows_.num_layers(), " layers"));
  }
  const std::byte* at = rows.data();
  for (int layer = 0; layer < rows_.num_layers(); ++layer) {
    for (int p = 0; p < num_tokens; ++p, at += row_bytes) {
      std::memcpy(rows_.RowAt(layer, block_table, p), at, row_bytes);
    }
  }
  return absl::OkStatus();
}

}  // namespace moeserve::engine
