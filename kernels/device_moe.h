// The routed experts of a small step (decode) planned and computed on the GPU, with no host
// round trip between the gate and the experts:
//   PlanSlots        which local slot serves each (token, expert) pair — replica
//                    `token % count` of the expert, ExpertPlacement::ChooseSlot's rule with the
//                    token as key — and the slots' row groups: offsets [slots + 1], the token of
//                    every grouped row, the grouped row of every pair; the slots' row counts are
//                    added to a load counter the host reads once per step.
//   DeviceGroupedGemm y[r] = x[source(r)] · W_slot(r)^T for every grouped row r, on tensor cores
//                    (mma.sync, bf16 in, fp32 accumulation, bf16 out). W is bf16, or e4m3 with
//                    128 x 128 block scales (fp8.h), widened exactly to bf16 and scaled once per
//                    128 x 128 block in fp32. Weights stream through a ring of shared-memory
//                    stages (cp.async), so a step reads only the chosen experts' weights, each
//                    once per 16 rows, at close to the memory's bandwidth.
//   DeviceExpertMlp  both projections of the SwiGLU MLP with SiLU · up between them; FP8 weights
//                    either widened as above or in DeepSeek-V3's recipe (Fp8Products).
// A row's result does not depend on which rows share its slot or where it sits among them (each
// output's sum runs in the same order for every row), so the plan's order inside a slot, which
// atomics decide, does not change a bit of the output.
// Raw device pointers, sizes and a stream; thread-safe as far as CUDA streams are; needs
// compute capability 8.0 or later. CPU twins: PlanSlotsTwin (cpu_twins.h) for the plan,
// GroupedLinearTwin and Fp8WeightOnlyGemmTwin for the products.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_quantize.h"

namespace moeserve::kernels {

// A step's plan on the device (PlanSlots writes it).
struct DeviceSlotPlan {
  const int32_t* offsets = nullptr;  // [slots + 1]: rows of slot s are [offsets[s], offsets[s+1])
  const int32_t* source_rows = nullptr;  // [rows]: the x row of each grouped row; null: row r
  int slots = 0;
  // At least the number of slots with rows (e.g. the rows' total, tokens * top_k, known on the
  // host), or -1: blocks are launched for that many busy slots, not for every slot.
  int busy_slot_bound = -1;
};

// Where each expert's replicas are: slots replica_slots[replica_begin[e] .. replica_begin[e+1])
// (ExpertPlacement::replicas of one layer, all on this GPU).
struct DeviceReplicaTable {
  const int32_t* replica_begin = nullptr;  // [experts + 1]
  const int32_t* replica_slots = nullptr;
  int experts = 0;
};

// experts [tokens * top_k] (GateTopK's output, every id in [0, table.experts)) -> offsets
// [slots + 1], source_rows [tokens * top_k] (the token of each grouped row), positions
// [tokens * top_k] (the grouped row of each pair, what WeightedUnpermute reads) and
// load[s] += rows of slot s. tokens * top_k <= kMaxPlannedPairs, slots <= kMaxPlannedSlots.
inline constexpr int kMaxPlannedPairs = 8192;
inline constexpr int kMaxPlannedSlots = 2048;
absl::Status PlanSlots(const int32_t* experts, int tokens, int top_k,
                       const DeviceReplicaTable& table, int slots, int32_t* offsets,
                       int32_t* source_rows, int32_t* positions, int32_t* load,
                       cudaStream_t stream);

// The weights of every slot of a layer, as device arrays of per-slot pointers (slot s at [s]).
struct DeviceSlotWeights {
  const __nv_bfloat16* const* bf16 = nullptr;  // [n, k] per slot; or
  const Fp8Weight* fp8 = nullptr;              // e4m3 [n, k] and block scales per slot
};

// y [rows, n] (grouped order) = x[source rows] · W^T per slot; x [*, k], k % 128 == 0,
// n % 8 == 0. A slot's rows go in passes of 16, each reading the slot's weight once.
absl::Status DeviceGroupedGemm(const __nv_bfloat16* x, const DeviceSlotPlan& plan,
                               const DeviceSlotWeights& weights, int n, int k, __nv_bfloat16* y,
                               cudaStream_t stream);

// Shared memory a DeviceGroupedGemm block needs (above the default 48 KiB; the GPU's opt-in
// maximum per block must reach it).
size_t DeviceGroupedGemmSharedBytes();

// Whether DeviceGroupedGemm takes these widths.
inline bool DeviceGroupedGemmSupports(int n, int k) {
  return n > 0 && k > 0 && n % 8 == 0 && k % 128 == 0;
}

class DeviceExpertMlp {
 public:
  // How FP8 weights multiply (bf16 weights take DeviceGroupedGemm either way).
  enum class Fp8Products {
    // DeviceGroupedGemm: the weights widened exactly to bf16, the activations left in bf16.
    kWidenedWeights,
    // DeepSeek-V3's recipe: the activations quantized per 1 x 128 tile, the block-scaled FP8
    // products on Hopper's warpgroup instructions (fp8_grouped_gemm.h), compute capability
    // 9.0 only (Fp8GroupedGemmSupported; Fp8GroupedSwiGlu in fp8_expert_mlp.h). Reads the
    // weights closer to the memory's bandwidth.
    kRecipe,
  };
  // max_rows: grouped rows of one call (tokens * top_k). kRecipe where the device cannot run
  // it: FAILED_PRECONDITION.
  static absl::StatusOr<DeviceExpertMlp> Create(int hidden, int intermediate, int max_rows,
                                                cudaStream_t stream,
                                                Fp8Products fp8 = Fp8Products::kWidenedWeights);

  // y [rows, hidden] in grouped order = SwiGLU of each slot's rows of x [*, hidden], with
  // gate_up [2I, H] (gate rows, then up rows) and down [H, I] per slot. `rows` is the plan's
  // total (known on the host: tokens * top_k).
  absl::Status Run(const __nv_bfloat16* x, const DeviceSlotPlan& plan, int rows,
                   const DeviceSlotWeights& gate_up, const DeviceSlotWeights& down,
                   __nv_bfloat16* y);

 private:
  int hidden_ = 0, intermediate_ = 0, max_rows_ = 0;
  Fp8Products fp8_ = Fp8Products::kWidenedWeights;
  cudaStream_t stream_ = nullptr;
  DeviceArray<__nv_bfloat16> gate_up_;     // [max_rows rounded up to 4, 2I] (kRecipe's layout)
  DeviceArray<__nv_bfloat16> activation_;  // [max_rows, I]
  // kRecipe: the rows and the SwiGLU output quantized (values, 1 x 128 scales; fp8.h).
  DeviceArray<__nv_fp8_e4m3> x_values_, activation_values_;
  DeviceArray<float> x_scales_, activation_scales_;
};

}  // namespace moeserve::kernels
