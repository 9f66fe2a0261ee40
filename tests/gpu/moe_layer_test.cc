// One MoE layer of builtin:tiny-e256 on the GPU in bf16, composed from the kernels (gate GEMM,
// group-limited top-k, permute, expert MLP, weighted unpermute with the shared expert), against
// the engine's fp32 CPU layer. Measures the bf16 agreement; skipped where no GPU is present.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "engine/model/loader.h"
#include "engine/model/moe.h"
#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"

namespace moeserve::kernels {
namespace {

template <typename T>
T* Upload(const std::vector<T>& host) {
  T* device = nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&device), host.size() * sizeof(T) + 16),
            cudaSuccess);
  EXPECT_EQ(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return device;
}

std::vector<uint16_t> ToBf16(const float* values, size_t count) {
  std::vector<uint16_t> out(count);
  for (size_t i = 0; i < count; ++i) out[i] = FloatToBf16(values[i]);
  return out;
}

__nv_bfloat16* Bf(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

TEST(GpuMoeLayer, Bf16LayerAgreesWithTheFp32CpuLayer) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no GPU";
  auto loaded = engine::LoadModel("builtin:tiny-e256");
  ASSERT_TRUE(loaded.ok());
  const engine::Model& model = *loaded->model;
  const engine::ModelConfig& c = model.config();
  const int layer = 1;  // the first MoE layer
  const engine::MoeWeights& moe = model.weights().layer(layer).moe;
  const int tokens = 256, hidden = c.hidden_size, inter = c.moe_intermediate_size;

  // Inputs: normalized activations, as the layer sees them.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> x(static_cast<size_t>(tokens) * hidden);
  for (auto& v : x) v = normal(rng);

  // fp32 CPU reference (the engine's own code).
  const engine::Routing routing = engine::ComputeRouting(c, moe, x.data(), tokens);
  const std::vector<float> expert_outputs =
      engine::RunRoutedExpertsLocally(moe, routing, x.data(), hidden);
  std::vector<float> shared(static_cast<size_t>(tokens) * hidden);
  engine::RunMlp(moe.shared, x.data(), tokens, hidden, shared.data());
  std::vector<float> reference(static_cast<size_t>(tokens) * hidden);
  engine::CombineExpertOutputs(routing, expert_outputs.data(), shared.data(), hidden,
                               reference.data());

  // bf16 GPU layer.
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cublasHandle_t cublas;
  ASSERT_EQ(cublasCreate(&cublas), CUBLAS_STATUS_SUCCESS);
  cublasSetStream(cublas, stream);
  uint16_t* d_x = Upload(ToBf16(x.data(), x.size()));
  uint16_t* d_gate = Upload(ToBf16(moe.gate, static_cast<size_t>(c.n_routed_experts) * hidden));
  float* d_bias = Upload(std::vector<float>(moe.e_score_correction_bias,
                                            moe.e_score_correction_bias + c.n_routed_experts));
  float* d_logits = Upload(std::vector<float>(static_cast<size_t>(tokens) * c.n_routed_experts));
  const float alpha = 1, beta = 0;
  // logits[T, E] = x · gate^T, bf16 inputs, fp32 output.
  ASSERT_EQ(
      cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, c.n_routed_experts, tokens, hidden, &alpha,
                   d_gate, CUDA_R_16BF, hidden, d_x, CUDA_R_16BF, hidden, &beta, d_logits,
                   CUDA_R_32F, c.n_routed_experts, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      CUBLAS_STATUS_SUCCESS);
  GateOptions options;
  options.num_experts = c.n_routed_experts;
  options.top_k = c.num_experts_per_tok;
  options.num_groups = c.n_group;
  options.topk_groups = c.topk_group;
  options.scaling = static_cast<float>(c.routed_scaling_factor);
  int32_t* d_experts = Upload(std::vector<int32_t>(tokens * options.top_k));
  float* d_weights = Upload(std::vector<float>(tokens * options.top_k));
  ASSERT_TRUE(GateTopK(d_logits, d_bias, tokens, options, d_experts, d_weights, stream).ok());
  std::vector<int32_t> experts(tokens * options.top_k);
  ASSERT_EQ(cudaMemcpy(experts.data(), d_experts, experts.size() * sizeof(int32_t),
                       cudaMemcpyDeviceToHost),
            cudaSuccess);

  // Group the (token, k) rows by expert (the permutation the dispatch would produce).
  std::vector<int64_t> offsets(c.n_routed_experts + 1, 0);
  for (int32_t e : experts) ++offsets[e + 1];
  for (int e = 0; e < c.n_routed_experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
  std::vector<int32_t> source(experts.size()), position(experts.size());
  for (size_t a = 0; a < experts.size(); ++a) {
    const int64_t row = cursor[experts[a]]++;
    source[row] = static_cast<int32_t>(a / options.top_k);
    position[a] = static_cast<int32_t>(row);
  }
  int32_t* d_source = Upload(source);
  int32_t* d_position = Upload(position);
  uint16_t* d_permuted = Upload(std::vector<uint16_t>(experts.size() * hidden));
  ASSERT_TRUE(PermuteRows(Bf(d_x), d_source, Bf(d_permuted), static_cast<int>(experts.size()),
                          hidden, stream)
                  .ok());

  // Expert weights as [gate; up] and down, bf16.
  std::vector<const __nv_bfloat16*> gate_up, down;
  std::vector<void*> owned;
  auto upload_mlp = [&](const engine::MlpWeights& mlp, int intermediate) {
    std::vector<uint16_t> gu = ToBf16(mlp.gate_proj, static_cast<size_t>(intermediate) * hidden);
    std::vector<uint16_t> up = ToBf16(mlp.up_proj, static_cast<size_t>(intermediate) * hidden);
    gu.insert(gu.end(), up.begin(), up.end());
    uint16_t* d_gu = Upload(gu);
    uint16_t* d_down = Upload(ToBf16(mlp.down_proj, static_cast<size_t>(hidden) * intermediate));
    owned.push_back(d_gu);
    owned.push_back(d_down);
    return std::make_pair(static_cast<const __nv_bfloat16*>(Bf(d_gu)),
                          static_cast<const __nv_bfloat16*>(Bf(d_down)));
  };
  for (int e = 0; e < c.n_routed_experts; ++e) {
    auto [gu, d] = upload_mlp(moe.experts[e], inter);
    gate_up.push_back(gu);
    down.push_back(d);
  }
  uint16_t* d_expert_out = Upload(std::vector<uint16_t>(experts.size() * hidden));
  auto mlp = ExpertMlp::Create(hidden, inter, static_cast<int>(experts.size()), c.n_routed_experts,
                               stream);
  ASSERT_TRUE(mlp.ok());
  ASSERT_TRUE(mlp->Run(Bf(d_permuted), offsets, gate_up, down, Bf(d_expert_out),
                       ExpertMlp::Strategy::kGroupedGemm)
                  .ok());
  // Shared expert: one "expert" over all tokens.
  const int shared_inter = inter * c.n_shared_experts;
  auto [shared_gu, shared_down] = upload_mlp(moe.shared, shared_inter);
  uint16_t* d_shared = Upload(std::vector<uint16_t>(static_cast<size_t>(tokens) * hidden));
  auto shared_mlp = ExpertMlp::Create(hidden, shared_inter, tokens, 1, stream);
  ASSERT_TRUE(shared_mlp.ok());
  ASSERT_TRUE(shared_mlp->Run(Bf(d_x), {0, tokens}, {shared_gu}, {shared_down}, Bf(d_shared)).ok());
  uint16_t* d_out = Upload(std::vector<uint16_t>(static_cast<size_t>(tokens) * hidden));
  ASSERT_TRUE(WeightedUnpermute(Bf(d_expert_out), d_position, d_weights, Bf(d_shared), Bf(d_out),
                                tokens, options.top_k, hidden, stream)
                  .ok());
  std::vector<uint16_t> out(static_cast<size_t>(tokens) * hidden);
  ASSERT_EQ(cudaMemcpy(out.data(), d_out, out.size() * sizeof(uint16_t), cudaMemcpyDeviceToHost),
            cudaSuccess);

  // Agreement: tokens routed to the same expert set (bf16 gate logits can flip near ties),
  // and the relative error (max |diff| / max |ref|) over those tokens.
  int same_routing = 0;
  double max_diff = 0, max_ref = 0, sum_sq_diff = 0, sum_sq_ref = 0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<int32_t> a(experts.begin() + t * options.top_k,
                           experts.begin() + (t + 1) * options.top_k);
    std::vector<int32_t> b(routing.experts.begin() + t * options.top_k,
                           routing.experts.begin() + (t + 1) * options.top_k);
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b) continue;
    ++same_routing;
    for (int i = 0; i < hidden; ++i) {
      const double r = reference[static_cast<size_t>(t) * hidden + i];
      const double d = Bf16ToFloat(out[static_cast<size_t>(t) * hidden + i]) - r;
      max_diff = std::max(max_diff, std::fabs(d));
      max_ref = std::max(max_ref, std::fabs(r));
      sum_sq_diff += d * d;
      sum_sq_ref += r * r;
    }
  }
  const double routing_agreement = static_cast<double>(same_routing) / tokens;
  const double max_relative = max_diff / max_ref;
  const double rms_relative = std::sqrt(sum_sq_diff / sum_sq_ref);
  std::printf(
      "bf16 MoE layer vs fp32: same experts for %.1f%% of tokens; on those, max |diff| / "
      "max |ref| = %.2e, rms relative = %.2e\n",
      100 * routing_agreement, max_relative, rms_relative);
  EXPECT_GE(routing_agreement, 0.9);
  EXPECT_LT(max_relative, 3e-2);
  EXPECT_LT(rms_relative, 1e-2);
  for (void* p : owned) cudaFree(p);
  cudaFree(d_x);
  cudaFree(d_gate);
  cudaFree(d_bias);
  cudaFree(d_logits);
  cudaFree(d_experts);
  cudaFree(d_weights);
  cudaFree(d_source);
  cudaFree(d_position);
  cudaFree(d_permuted);
  cudaFree(d_expert_out);
  cudaFree(d_shared);
  cudaFree(d_out);
  cublasDestroy(cublas);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace moeserve::kernels
