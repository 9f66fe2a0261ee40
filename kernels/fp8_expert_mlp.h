// Fp8ExpertMlp: the routed experts' SwiGLU MLP in DeepSeek-V3's FP8 recipe — the FP8 twin of
// ExpertMlp (expert_mlp.h), with rows already grouped by expert:
//   quantize X per 1 x 128 tile                     (one kernel over all experts' rows; rows
//                                                    a dispatch's sender quantized move in place)
//   gate_up[rows of e] = X_q[rows of e] · W_gate_up(e)^T   (block-scaled FP8 GEMM, bf16 out)
//   act = bf16(silu(gate) * up), quantized per 1 x 128     (one fused kernel)
//   Y[rows of e] = act_q[rows of e] · W_down(e)^T           (block-scaled FP8 GEMM, bf16 out)
// Weights e4m3 with 128 x 128 block scales (fp8.h), bf16 in and out, fp32 accumulation. For the
// cuBLASLt strategies each expert's rows are padded to a multiple of 4 (fp8.h); an expert whose
// row count is not one writes its down projection to a scratch buffer, copied to Y at the end.
// The grouped strategy quantizes all rows as one group and writes Y directly.
// One instance per stream; not thread-safe.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/device_array.h"
#include "kernels/fp8_gemm.h"
#include "kernels/fp8_grouped_gemm.h"
#include "kernels/fp8_quantize.h"
#include "kernels/fp8_weight_only_gemm.h"

namespace moeserve::kernels {

// The recipe's SwiGLU MLP on Fp8GroupedGemm, every group in one launch per projection: the input
// rows (fp8_quantize.h: bf16 ones quantized, packed FP8 ones unpacked) as one group, gate_up =
// X_q · W_gate_up^T, act = bf16(silu(gate) * up) quantized, y [rows, hidden] = act_q ·
// W_down^T. The groups, from the host or from the device plan, give each group's rows and
// weights. Scratch: device buffers for Fp8PaddedRows(rows) rows. Shared by Fp8ExpertMlp
// (kGroupedGemm) and DeviceExpertMlp (Fp8Products::kRecipe); compute capability 9.0 only.
struct Fp8GroupedMlpScratch {
  __nv_fp8_e4m3* x_values = nullptr;    // [rows, hidden]
  float* x_scales = nullptr;            // rows * hidden / 128
  __nv_bfloat16* gate_up = nullptr;     // [rows, 2 * intermediate]
  __nv_fp8_e4m3* act_values = nullptr;  // [rows, intermediate]
  float* act_scales = nullptr;          // rows * intermediate / 128
};
absl::Status Fp8GroupedSwiGlu(const Fp8InputRows& x, int rows, const Fp8GemmGroupList& gate_up,
                              const Fp8GemmGroupList& down, int hidden, int intermediate,
                              const Fp8GroupedMlpScratch& scratch, __nv_bfloat16* y,
                              cudaStream_t stream);
absl::Status Fp8GroupedSwiGlu(const Fp8InputRows& x, int rows, const Fp8GemmSlotGroups& gate_up,
                              const Fp8GemmSlotGroups& down, int hidden, int intermediate,
                              const Fp8GroupedMlpScratch& scratch, __nv_bfloat16* y,
                              cudaStream_t stream);

class Fp8ExpertMlp {
 public:
  enum class Strategy {
    kPerExpertGemm,   // the experts' GEMMs one after another on the stream
    kConcurrentGemm,  // spread over side streams (small experts fill the GPU side by side)
    // Each expert's whole MLP (its quantization, gate/up GEMM, SiLU-quantization and down GEMM)
    // in order on one side stream, the experts side by side: one expert's memory-bound
    // quantization runs beside another's compute-bound GEMM, and no expert waits for the
    // slowest one's gate/up before its down projection.
    kPipelinedGemm,
    // Decode: every expert's projection in one launch, the weights dequantized in registers
    // and the activations left in bf16 (fp8_weight_only_gemm.h); for few rows per expert.
    kWeightOnly,
    // Every expert's projection in one launch of the recipe's GEMM on Hopper's warpgroup
    // instructions (fp8_grouped_gemm.h, its tile shape picked by the rows per expert); faster
    // than cuBLASLt's GEMM per expert up to about 128 rows per expert on an H100. Compute
    // capability 9.0 only (grouped_gemm_supported()).
    kGroupedGemm,
  };
  // hidden and intermediate multiples of 128; max_experts <= kMaxFp8RowGroups (fp8_quantize.h).
  static absl::StatusOr<Fp8ExpertMlp> Create(int hidden, int intermediate, int max_rows,
                                             int max_experts, cudaStream_t stream);
  Fp8ExpertMlp(Fp8ExpertMlp&&) noexcept;
  Fp8ExpertMlp& operator=(Fp8ExpertMlp&&) noexcept;
  ~Fp8ExpertMlp();

  // Whether kGroupedGemm runs on this instance's device.
  bool grouped_gemm_supported() const { return grouped_gemm_supported_; }

  // `offsets` (host, experts + 1 entries) splits X [offsets.back(), hidden] by expert;
  // gate_up[e] is [2I, H] (gate rows then up rows), down[e] is [H, I], both on the device.
  // With `x_rows` (device, offsets.back() entries), X's row i is x's row x_rows[i]: the permute
  // into expert order happens inside the activation quantization, which reads each row where it
  // is (the GEMM strategies only; kWeightOnly reads X's rows in order, INVALID_ARGUMENT).
  // kGroupedGemm where unsupported: FAILED_PRECONDITION.
  absl::Status Run(const __nv_bfloat16* x, const std::vector<int64_t>& offsets,
                   const std::vector<Fp8Weight>& gate_up, const std::vector<Fp8Weight>& down,
                   __nv_bfloat16* y, Strategy strategy = Strategy::kPerExpertGemm,
                   const int32_t* x_rows = nullptr);
  // The same from input rows of either form (fp8_quantize.h): packed FP8 rows, quantized by a
  // dispatch's sender, take the place of the activation quantization and give the same bits as
  // their bf16 rows would. The GEMM strategies only (kWeightOnly reads bf16 rows in expert
  // order, INVALID_ARGUMENT otherwise).
  absl::Status Run(const Fp8InputRows& x, const std::vector<int64_t>& offsets,
                   const std::vector<Fp8Weight>& gate_up, const std::vector<Fp8Weight>& down,
                   __nv_bfloat16* y, Strategy strategy);

 private:
  static constexpr int kSideStreams = 4;
  Fp8ExpertMlp() = default;
  absl::Status RunWeightOnly(const __nv_bfloat16* x, const std::vector<int64_t>& offsets,
                             const std::vector<Fp8Weight>& gate_up,
                             const std::vector<Fp8Weight>& down, __nv_bfloat16* y);
  absl::Status RunPipelined(const Fp8InputRows& x, const Fp8RowGroups& groups,
                            const std::vector<Fp8Weight>& gate_up,
                            const std::vector<Fp8Weight>& down, __nv_bfloat16* y);
  // Where expert e's down projection writes: Y itself when its rows are a multiple of 4, else
  // y_padded_ (a GEMM writes whole groups of 4 rows; see Run); `unaligned` records the latter.
  __nv_bfloat16* DownOutput(const Fp8RowGroups& groups, int e, __nv_bfloat16* y, bool& unaligned);
  // The scratch of the padded rows from `padded_row` on: a group's block of each buffer (every
  // group's padded rows and 1 x 128 scales stand alone, fp8_quantize.h).
  Fp8GroupedMlpScratch ScratchAt(int64_t padded_row);
  absl::Status Fork();  // side streams wait for stream_
  absl::Status Join();  // stream_ waits for the side streams
  absl::Status RunGroupedGemm(const Fp8InputRows& x, const std::vector<int64_t>& offsets,
                              const std::vector<Fp8Weight>& gate_up,
                              const std::vector<Fp8Weight>& down, __nv_bfloat16* y);
  void Release();

  int hidden_ = 0, intermediate_ = 0, max_rows_ = 0, max_experts_ = 0;
  bool grouped_gemm_supported_ = false;
  cudaStream_t stream_ = nullptr;
  std::vector<Fp8BlockGemm> gemms_;  // [0] on stream_, then one per side stream
  cudaStream_t side_streams_[kSideStreams] = {};
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t joins_[kSideStreams] = {};
  DeviceArray<__nv_fp8_e4m3> x_values_;    // [padded rows, H]
  DeviceArray<float> x_scales_;            // padded rows * H / 128
  DeviceArray<__nv_bfloat16> gate_up_;     // [padded rows, 2I]
  DeviceArray<__nv_fp8_e4m3> act_values_;  // [padded rows, I]
  DeviceArray<float> act_scales_;          // padded rows * I / 128
  DeviceArray<__nv_bfloat16> y_padded_;    // [padded rows, H], for experts of unaligned rows
  DeviceArray<__nv_bfloat16> act_;         // [rows, I] (kWeightOnly)
  std::unique_ptr<Fp8WeightOnlyGroups> weight_only_groups_;  // a launch's groups (kWeightOnly)
  // A launch's groups (kGroupedGemm): the experts' rows with their gate/up and down weights.
  std::unique_ptr<Fp8GemmGroupList> grouped_gate_up_, grouped_down_;
};

}  // namespace moeserve::kernels
