#include "engine/parallel/overlap_schedule.h"

namespace moeserve::engine::parallel {

absl::Status RunOverlapSchedule(int num_layers, const std::function<bool(int layer)>& is_moe,
                                int num_micro_batches, MicroBatchStages& stages) {
  auto run_layers = [&]() -> absl::Status {
    for (int layer = 0; layer < num_layers; ++layer) {
      const bool moe = is_moe(layer);
      for (int mb = 0; mb < num_micro_batches; ++mb) {
        if (absl::Status s = stages.Attention(layer, mb); !s.ok()) return s;
        absl::Status next = moe ? stages.StartDispatch(layer, mb) : stages.DenseMlp(layer, mb);
        if (!next.ok()) return next;
      }
      if (!moe) continue;
      for (int mb = 0; mb < num_micro_batches; ++mb) {
        if (absl::Status s = stages.Experts(layer, mb); !s.ok()) return s;
      }
      for (int mb = 0; mb < num_micro_batches; ++mb) {
        if (absl::Status s = stages.FinishMoe(layer, mb); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  };
  absl::Status status = run_layers();
  status.Update(stages.DrainExchanges());
  return status;
}

}  // namespace moeserve::engine::parallel
