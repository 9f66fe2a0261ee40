// Fuzzes --placement files: bounded JSON, then ExpertPlacement::FromJson against a shape taken
// from the first three bytes, and the replica lookups of whatever it accepts.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "base/bounded_json.h"
#include "engine/placement/expert_placement.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  moeserve::engine::PlacementShape shape;
  shape.num_layers = 1 + data[0] % 4;
  shape.num_logical = 1 + data[1] % 16;
  shape.num_physical = shape.num_logical + data[2] % 8;
  shape.num_ranks = 1 + data[2] % 4;
  absl::StatusOr<nlohmann::json> json = moeserve::base::ParseBoundedJson(
      std::string_view(reinterpret_cast<const char*>(data) + 3, size - 3));
  if (!json.ok()) return 0;
  absl::StatusOr<moeserve::engine::ExpertPlacement> placement =
      moeserve::engine::ExpertPlacement::FromJson(*json, shape);
  if (!placement.ok()) return 0;
  for (int layer = 0; layer < placement->num_layers(); ++layer) {
    for (int expert = 0; expert < placement->num_logical(); ++expert) {
      const int32_t slot = placement->ChooseSlot(layer, expert, layer * 31 + expert);
      if (placement->phy2log(layer)[slot] != expert) __builtin_trap();
    }
  }
  return 0;
}
