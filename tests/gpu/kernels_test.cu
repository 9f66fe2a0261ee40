// GPU kernels against their CPU twins on random inputs. Skipped where no GPU is present.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu_twins.h"
#include "kernels/expert_mlp.h"
#include "kernels/kernels.h"
#include "kernels/mla.h"
#include "kernels/sampling.h"
#include "tests/gpu/device_copies.h"

namespace moeserve::kernels {
namespace {

using testing::DeviceMemory;
using testing::RandomBf16;
using testing::RelativeError;
using testing::ToDevice;
using testing::ToHost;

__nv_bfloat16* Bf(uint16_t* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

// Widths the 16-byte chunks take (7168, DeepSeek-V3's hidden; 1536, its q-LoRA rank; 8192, the
// most they take) and do not (100; 9216, past the chunks' reach), out of place and in place.
TEST(GpuKernels, RmsNormMatchesTwin) {
  REQUIRE_GPU();
  const int rows = 37;
  for (const int dim : {7168, 1536, 8192, 100, 9216}) {
    SCOPED_TRACE(::testing::Message() << "width " << dim);
    auto x = RandomBf16(static_cast<size_t>(rows) * dim, 1), w = RandomBf16(dim, 2, 0.1f);
    std::vector<uint16_t> expected(x.size());
    RmsNormTwin(x.data(), w.data(), expected.data(), rows, dim, 1e-6f);
    DeviceMemory memory;
    uint16_t *dx = memory.Upload(x), *dw = memory.Upload(w),
             *dout = memory.Allocate<uint16_t>(x.size());
    ASSERT_TRUE(RmsNorm(Bf(dx), Bf(dw), Bf(dout), rows, dim, 1e-6f, nullptr).ok());
    EXPECT_LT(RelativeError(ToHost(dout, x.size()), expected), 1e-2);
    ASSERT_TRUE(RmsNorm(Bf(dx), Bf(dw), Bf(dx), rows, dim, 1e-6f, nullptr).ok());
    EXPECT_EQ(ToHost(dx, x.size()), ToHost(dout, x.size())) << "in place";
  }
}

TEST(GpuKernels, SiluMulMatchesTwin) {
  REQUIRE_GPU();
  const int rows = 53, inter = 2048;
  auto gate_up = RandomBf16(static_cast<size_t>(rows) * 2 * inter, 3);
  std::vector<uint16_t> expected(static_cast<size_t>(rows) * inter);
  SiluMulTwin(gate_up.data(), expected.data(), rows, inter);
  uint16_t *dg = ToDevice(gate_up), *dout = ToDevice(std::vector<uint16_t>(expected.size()));
  ASSERT_TRUE(SiluMul(Bf(dg), Bf(dout), rows, inter, nullptr).ok());
  EXPECT_LT(RelativeError(ToHost(dout, expected.size()), expected), 1e-2);
  cudaFree(dg);
  cudaFree(dout);
}

TEST(GpuKernels, RopeMatchesTwin) {
  REQUIRE_GPU();
  const int rows = 19, heads = 16, dim = 64, max_positions = 4096;
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> uniform(-1, 1);
  std::vector<float> vectors(static_cast<size_t>(rows) * heads * dim),
      cos_table(max_positions * dim / 2), sin_table(cos_table.size());
  for (auto& v : vectors) v = uniform(rng);
  for (size_t i = 0; i < cos_table.size(); ++i) {
    cos_table[i] = std::cos(0.001f * i);
    sin_table[i] = std::sin(0.001f * i);
  }
  std::vector<int32_t> positions(rows);
  for (auto& p : positions) p = static_cast<int32_t>(rng() % max_positions);
  auto expected = vectors;
  RopeInterleavedTwin(expected.data(), positions.data(), cos_table.data(), sin_table.data(), rows,
                      heads, dim);
  float *dv = ToDevice(vectors), *dc = ToDevice(cos_table), *ds = ToDevice(sin_table);
  int32_t* dp = ToDevice(positions);
  ASSERT_TRUE(RopeInterleaved(dv, dp, dc, ds, rows, heads, dim, nullptr).ok());
  auto actual = ToHost(dv, vectors.size());
  for (size_t i = 0; i < actual.size(); ++i) ASSERT_NEAR(actual[i], expected[i], 1e-5) << i;
  cudaFree(dv);
  cudaFree(dc);
  cudaFree(ds);
  cudaFree(dp);
}

// The weighted sum at widths its 16-byte loads take (7168) and do not (100: a partial tile of
// 8 values at the row's end), with and without shared experts, for a decode step's few tokens.
TEST(GpuKernels, WeightedUnpermuteMatchesItsTwinAtAnyWidth) {
  REQUIRE_GPU();
  const int tokens = 3, top_k = 4;
  std::mt19937 rng(12);
  for (const int hidden : {100, 7168}) {
    for (const bool with_shared : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "hidden " << hidden << (with_shared ? ", shared" : ""));
      const int rows = tokens * top_k;
      std::vector<int32_t> position(rows);
      for (int r = 0; r < rows; ++r) position[r] = (r * 5) % rows;  // a permutation (5, 12 coprime)
      std::vector<float> weights(rows);
      for (auto& w : weights) w = std::uniform_real_distribution<float>(0, 1)(rng);
      const auto expert_rows = RandomBf16(static_cast<size_t>(rows) * hidden, 21);
      const auto shared = RandomBf16(static_cast<size_t>(tokens) * hidden, 22);
      std::vector<uint16_t> expected(static_cast<size_t>(tokens) * hidden);
      WeightedUnpermuteTwin(expert_rows.data(), position.data(), weights.data(),
                            with_shared ? shared.data() : nullptr, expected.data(), tokens, top_k,
                            hidden);
      DeviceMemory memory;
      uint16_t* out = memory.Allocate<uint16_t>(expected.size());
      ASSERT_TRUE(WeightedUnpermute(Bf(memory.Upload(expert_rows)), memory.Upload(position),
                                    memory.Upload(weights),
                                    with_shared ? Bf(memory.Upload(shared)) : nullptr, Bf(out),
                                    tokens, top_k, hidden, nullptr)
                      .ok());
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_LT(RelativeError(ToHost(out, expected.size()), expected), 1e-2);
    }
  }
}

TEST(GpuKernels, EmbeddingPermuteAndUnpermuteMatchTwins) {
  REQUIRE_GPU();
  const int vocab = 1000, hidden = 7168, tokens = 33, top_k = 8;
  auto table = RandomBf16(static_cast<size_t>(vocab) * hidden, 5);
  std::mt19937 rng(6);
  std::vector<int32_t> ids(tokens);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % vocab);
  std::vector<uint16_t> embedded(static_cast<size_t>(tokens) * hidden);
  EmbeddingTwin(table.data(), ids.data(), embedded.data(), tokens, hidden);
  uint16_t* dtable = ToDevice(table);
  int32_t* dids = ToDevice(ids);
  uint16_t* dembedded = ToDevice(std::vector<uint16_t>(embedded.size()));
  ASSERT_TRUE(Embedding(Bf(dtable), dids, Bf(dembedded), tokens, hidden, nullptr).ok());
  EXPECT_EQ(ToHost(dembedded, embedded.size()), embedded);

  // Permute each (token, k) into a shuffled order, then combine back with weights.
  const int rows = tokens * top_k;
  std::vector<int32_t> source(rows), position(rows);
  std::vector<int> order(rows);
  for (int i = 0; i < rows; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (int r = 0; r < rows; ++r) {
    source[r] = order[r] / top_k;
    position[order[r]] = r;
  }
  std::vector<uint16_t> permuted(static_cast<size_t>(rows) * hidden);
  PermuteRowsTwin(embedded.data(), source.data(), permuted.data(), rows, hidden);
  int32_t* dsource = ToDevice(source);
  uint16_t* dpermuted = ToDevice(std::vector<uint16_t>(permuted.size()));
  ASSERT_TRUE(PermuteRows(Bf(dembedded), dsource, Bf(dpermuted), rows, hidden, nullptr).ok());
  EXPECT_EQ(ToHost(dpermuted, permuted.size()), permuted);

  std::vector<float> weights(rows);
  for (auto& w : weights) w = std::uniform_real_distribution<float>(0, 1)(rng);
  auto shared = RandomBf16(static_cast<size_t>(tokens) * hidden, 8);
  std::vector<uint16_t> combined(static_cast<size_t>(tokens) * hidden);
  WeightedUnpermuteTwin(permuted.data(), position.data(), weights.data(), shared.data(),
                        combined.data(), tokens, top_k, hidden);
  int32_t* dposition = ToDevice(position);
  float* dweights = ToDevice(weights);
  uint16_t *dshared = ToDevice(shared),
           *dcombined = ToDevice(std::vector<uint16_t>(combined.size()));
  ASSERT_TRUE(WeightedUnpermute(Bf(dpermuted), dposition, dweights, Bf(dshared), Bf(dcombined),
                                tokens, top_k, hidden, nullptr)
                  .ok());
  EXPECT_LT(RelativeError(ToHost(dcombined, combined.size()), combined), 1e-2);
  for (void* p :
       {static_cast<void*>(dtable), static_cast<void*>(dids), static_cast<void*>(dembedded),
        static_cast<void*>(dsource), static_cast<void*>(dpermuted), static_cast<void*>(dposition),
        static_cast<void*>(dweights), static_cast<void*>(dshared), static_cast<void*>(dcombined)}) {
    cudaFree(p);
  }
}

TEST(GpuKernels, GateTopKMatchesTwinForV3AndV2Routing) {
  REQUIRE_GPU();
  for (bool v3 : {true, false}) {
    GateOptions options;
    options.sigmoid = v3;
    options.group_score_top2_sum = v3;
    options.normalize = v3;
    options.scaling = v3 ? 2.5f : 1.0f;
    const int tokens = 128;
    std::mt19937 rng(v3 ? 9 : 10);
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> logits(static_cast<size_t>(tokens) * options.num_experts),
        bias(options.num_experts);
    for (auto& l : logits) l = normal(rng);
    for (auto& b : bias) b = 0.05f * normal(rng);
    std::vector<int32_t> experts(tokens * options.top_k);
    std::vector<float> weights(experts.size());
    GateTopKTwin(logits.data(), v3 ? bias.data() : nullptr, tokens, options, experts.data(),
                 weights.data());
    float *dl = ToDevice(logits), *db = ToDevice(bias), *dw = ToDevice(weights);
    int32_t* de = ToDevice(experts);
    ASSERT_TRUE(GateTopK(dl, v3 ? db : nullptr, tokens, options, de, dw, nullptr).ok());
    EXPECT_EQ(ToHost(de, experts.size()), experts) << (v3 ? "v3" : "v2");
    auto actual = ToHost(dw, weights.size());
    for (size_t i = 0; i < weights.size(); ++i) ASSERT_NEAR(actual[i], weights[i], 1e-5) << i;
    cudaFree(dl);
    cudaFree(db);
    cudaFree(dw);
    cudaFree(de);
  }
}

TEST(GpuKernels, ExpertMlpMatchesTwinWithEveryGemmStrategy) {
  REQUIRE_GPU();
  const int hidden = 256, inter = 128;
  const std::vector<int64_t> offsets = {0, 5, 5, 37, 38, 100};  // includes an empty expert
  const int experts = static_cast<int>(offsets.size()) - 1, rows = static_cast<int>(offsets.back());
  auto x = RandomBf16(static_cast<size_t>(rows) * hidden, 11);
  std::vector<std::vector<uint16_t>> gate_up, down;
  std::vector<const uint16_t*> gate_up_host, down_host;
  std::vector<const __nv_bfloat16*> gate_up_device, down_device;
  for (int e = 0; e < experts; ++e) {
    gate_up.push_back(RandomBf16(static_cast<size_t>(2) * inter * hidden, 20 + e, 0.06f));
    down.push_back(RandomBf16(static_cast<size_t>(hidden) * inter, 40 + e, 0.09f));
    gate_up_host.push_back(gate_up.back().data());
    down_host.push_back(down.back().data());
    gate_up_device.push_back(Bf(ToDevice(gate_up.back())));
    down_device.push_back(Bf(ToDevice(down.back())));
  }
  std::vector<uint16_t> h(static_cast<size_t>(rows) * 2 * inter),
      a(static_cast<size_t>(rows) * inter), expected(static_cast<size_t>(rows) * hidden);
  GroupedLinearTwin(x.data(), gate_up_host, offsets, h.data(), 2 * inter, hidden);
  SiluMulTwin(h.data(), a.data(), rows, inter);
  GroupedLinearTwin(a.data(), down_host, offsets, expected.data(), hidden, inter);
  uint16_t* dx = ToDevice(x);
  uint16_t* dy = ToDevice(std::vector<uint16_t>(expected.size()));
  auto mlp = ExpertMlp::Create(hidden, inter, rows, experts, nullptr);
  ASSERT_TRUE(mlp.ok()) << mlp.status();
  for (auto strategy : {ExpertMlp::Strategy::kPerExpertGemm, ExpertMlp::Strategy::kGroupedGemm,
                        ExpertMlp::Strategy::kConcurrentGemm}) {
    ASSERT_TRUE(mlp->Run(Bf(dx), offsets, gate_up_device, down_device, Bf(dy), strategy).ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LT(RelativeError(ToHost(dy, expected.size()), expected), 2e-2);
  }
}

// MlaPagedAttention on device inputs, with whole contexts per block (no workspace) and with a
// workspace that lets it split contexts, against the twin's `expected` to bf16 rounding.
void ExpectPagedAttentionMatchesTwin(const std::vector<uint16_t>& expected, uint16_t* d_q,
                                     uint16_t* d_cache, const int32_t* d_tables, int max_blocks,
                                     const int32_t* d_sequence, const int32_t* d_positions,
                                     int tokens, int heads, int latent, int rope, int block_size,
                                     float scale) {
  float* d_workspace = nullptr;
  ASSERT_EQ(cudaMalloc(&d_workspace, MlaPagedAttentionWorkspaceBytes(latent)), cudaSuccess);
  for (float* workspace : {static_cast<float*>(nullptr), d_workspace}) {
    SCOPED_TRACE(workspace == nullptr ? "whole contexts" : "split contexts");
    uint16_t* d_out = ToDevice(std::vector<uint16_t>(expected.size(), 0));
    ASSERT_TRUE(MlaPagedAttention(Bf(d_q), Bf(d_cache), d_tables, max_blocks, d_sequence,
                                  d_positions, Bf(d_out), tokens, heads, latent, rope, block_size,
                                  scale, workspace, nullptr)
                    .ok());
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_LT(RelativeError(ToHost(d_out, expected.size()), expected), 1e-2);
  }
  cudaFree(d_workspace);
}

// MLA at DeepSeek-V3's latent sizes (512 + 64) with two sequences whose blocks are scattered
// through the cache, prefill-like (several new tokens) and decode-like (one token at a long
// position).
TEST(GpuKernels, MlaCacheWriteQueryRopeAndPagedAttentionMatchTwins) {
  REQUIRE_GPU();
  const int latent = 512, rope = 64, heads = 10, nope = 128, block_size = 16;
  const int row_dim = latent + rope;
  const int positions_count = 300;
  const int num_blocks = 48;  // 2 sequences x 19 blocks + spare
  std::mt19937 rng(5);
  // Block tables: a random permutation of cache blocks shared out between the sequences.
  std::vector<int32_t> permutation(num_blocks);
  for (int i = 0; i < num_blocks; ++i) permutation[i] = i;
  std::shuffle(permutation.begin(), permutation.end(), rng);
  const int max_blocks = (positions_count + block_size - 1) / block_size;
  std::vector<int32_t> tables(2 * max_blocks);
  for (int i = 0; i < 2 * max_blocks; ++i) tables[i] = permutation[i];
  // Rope tables.
  std::vector<float> cos_table(static_cast<size_t>(positions_count) * rope / 2),
      sin_table(cos_table.size());
  for (int p = 0; p < positions_count; ++p) {
    for (int i = 0; i < rope / 2; ++i) {
      const double angle = p * std::pow(10000.0, -2.0 * i / rope);
      cos_table[p * rope / 2 + i] = static_cast<float>(std::cos(angle));
      sin_table[p * rope / 2 + i] = static_cast<float>(std::sin(angle));
    }
  }
  // Fill the whole cache through the write kernel: every position of both sequences.
  std::vector<int32_t> positions, sequence_of;
  std::vector<int64_t> cache_rows;
  for (int s = 0; s < 2; ++s) {
    for (int p = 0; p < positions_count; ++p) {
      positions.push_back(p);
      sequence_of.push_back(s);
      cache_rows.push_back(static_cast<int64_t>(tables[s * max_blocks + p / block_size]) *
                               block_size +
                           p % block_size);
    }
  }
  const int written = static_cast<int>(positions.size());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> kv_a(static_cast<size_t>(written) * row_dim);
  for (float& v : kv_a) v = normal(rng);
  const std::vector<uint16_t> norm_weight = RandomBf16(latent, 6, 0.1f);
  std::vector<uint16_t> cache(static_cast<size_t>(num_blocks) * block_size * row_dim, 0);
  MlaWriteCacheTwin(kv_a.data(), norm_weight.data(), 1e-6f, positions.data(), cache_rows.data(),
                    cos_table.data(), sin_table.data(), cache.data(), written, latent, rope);
  float* d_kv_a = ToDevice(kv_a);
  uint16_t* d_norm = ToDevice(norm_weight);
  int32_t* d_positions = ToDevice(positions);
  int64_t* d_rows = ToDevice(cache_rows);
  float* d_cos = ToDevice(cos_table);
  float* d_sin = ToDevice(sin_table);
  uint16_t* d_cache = ToDevice(std::vector<uint16_t>(cache.size(), 0));
  ASSERT_TRUE(MlaWriteCache(d_kv_a, Bf(d_norm), 1e-6f, d_positions, d_rows, d_cos, d_sin,
                            Bf(d_cache), written, latent, rope, nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(RelativeError(ToHost(d_cache, cache.size()), cache), 1e-2);

  // Queries: three prefill tokens of sequence 0 at positions 5..7 and one decode token of
  // sequence 1 at the last position.
  const std::vector<int32_t> query_positions = {5, 6, 7, positions_count - 1};
  const std::vector<int32_t> query_sequence = {0, 0, 0, 1};
  const int tokens = static_cast<int>(query_positions.size());
  const std::vector<uint16_t> q =
      RandomBf16(static_cast<size_t>(tokens) * heads * (nope + rope), 7);
  // The latent part of the absorbed query is random here (the GEMM that makes it is cuBLAS's).
  std::vector<uint16_t> q_absorbed =
      RandomBf16(static_cast<size_t>(tokens) * heads * row_dim, 8, 0.05f);
  uint16_t* d_q = ToDevice(q);
  uint16_t* d_q_absorbed = ToDevice(q_absorbed);
  int32_t* d_query_positions = ToDevice(query_positions);
  int32_t* d_query_sequence = ToDevice(query_sequence);
  int32_t* d_tables = ToDevice(tables);
  MlaQueryRopeTwin(q.data(), query_positions.data(), cos_table.data(), sin_table.data(),
                   q_absorbed.data(), tokens, heads, nope, rope, latent);
  ASSERT_TRUE(MlaQueryRope(Bf(d_q), d_query_positions, d_cos, d_sin, Bf(d_q_absorbed), tokens,
                           heads, nope, rope, latent, nullptr)
                  .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  // Equal up to one bf16 rounding step (the GPU may fuse the rotation's multiply-adds).
  EXPECT_LT(RelativeError(ToHost(d_q_absorbed, q_absorbed.size()), q_absorbed), 1e-2);

  const float scale = 0.07f;
  std::vector<uint16_t> expected(static_cast<size_t>(tokens) * heads * latent);
  MlaPagedAttentionTwin(q_absorbed.data(), cache.data(), tables.data(), max_blocks,
                        query_sequence.data(), query_positions.data(), expected.data(), tokens,
                        heads, latent, rope, block_size, scale);
  // The twin's cache (not the kernel's) so that only attention is compared. Without a workspace
  // a block walks a token's whole context; with one, these 4 tokens (one block of heads each)
  // cannot fill a GPU, so their contexts are split (up to 300 / 64 ways) and merged, and the
  // prefill tokens' short contexts leave some splits without rows.
  uint16_t* d_twin_cache = ToDevice(cache);
  ExpectPagedAttentionMatchesTwin(expected, d_q_absorbed, d_twin_cache, d_tables, max_blocks,
                                  d_query_sequence, d_query_positions, tokens, heads, latent, rope,
                                  block_size, scale);
}

// Shapes off the fast path: a latent and rope that are not whole 16-byte units (rows loaded a
// value at a time and padded), a head count that is not a multiple of 16, a context of one row;
// and a row too wide for the kernel is refused.
TEST(GpuKernels, MlaPagedAttentionTakesOddShapesAndRefusesWideLatents) {
  REQUIRE_GPU();
  const int latent = 36, rope = 6, heads = 3, block_size = 4, blocks = 12;
  const int row_dim = latent + rope;
  const std::vector<uint16_t> cache =
      RandomBf16(static_cast<size_t>(blocks) * block_size * row_dim, 21);
  std::vector<int32_t> tables = {5, 2, 7, 0, 9, 11, 1, 3, 4, 6, 8, 10};
  const int max_blocks = 6;  // two sequences of up to 24 rows
  const std::vector<int32_t> positions = {0, 23, 13};
  const std::vector<int32_t> sequence = {0, 1, 0};
  const int tokens = 3;
  const std::vector<uint16_t> q =
      RandomBf16(static_cast<size_t>(tokens) * heads * row_dim, 22, 0.2f);
  std::vector<uint16_t> expected(static_cast<size_t>(tokens) * heads * latent);
  MlaPagedAttentionTwin(q.data(), cache.data(), tables.data(), max_blocks, sequence.data(),
                        positions.data(), expected.data(), tokens, heads, latent, rope, block_size,
                        0.3f);
  uint16_t* d_cache = ToDevice(cache);
  uint16_t* d_q = ToDevice(q);
  int32_t* d_tables = ToDevice(tables);
  int32_t* d_positions = ToDevice(positions);
  int32_t* d_sequence = ToDevice(sequence);
  ExpectPagedAttentionMatchesTwin(expected, d_q, d_cache, d_tables, max_blocks, d_sequence,
                                  d_positions, tokens, heads, latent, rope, block_size, 0.3f);
  const absl::Status wide =
      MlaPagedAttention(Bf(d_q), Bf(d_cache), d_tables, max_blocks, d_sequence, d_positions,
                        nullptr, tokens, heads, 1024, rope, block_size, 0.3f, nullptr, nullptr);
  EXPECT_EQ(wide.code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuKernels, FillRandomMatchesTwinAndHasTheRequestedSpread) {
  REQUIRE_GPU();
  const int64_t count = 100000;
  uint16_t* d_out = ToDevice(std::vector<uint16_t>(count));
  ASSERT_TRUE(FillRandomBf16(Bf(d_out), count, 42, 0.5f, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> gpu = ToHost(d_out, count);
  std::vector<uint16_t> cpu(count);
  FillRandomBf16Twin(cpu.data(), count, 42, 0.5f);
  EXPECT_EQ(gpu, cpu);
  double sum = 0, squares = 0;
  for (uint16_t v : gpu) {
    sum += Bf16ToFloat(v);
    squares += Bf16ToFloat(v) * Bf16ToFloat(v);
  }
  EXPECT_NEAR(sum / count, 0.0, 0.01);
  EXPECT_NEAR(std::sqrt(squares / count), 0.5, 0.01);
}

TEST(GpuKernels, AddInPlaceMatchesBf16Sum) {
  REQUIRE_GPU();
  const std::vector<uint16_t> a = RandomBf16(1000, 11), b = RandomBf16(1000, 12);
  uint16_t* d_a = ToDevice(a);
  uint16_t* d_b = ToDevice(b);
  ASSERT_TRUE(AddInPlace(Bf(d_a), Bf(d_b), 1000, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> sum = ToHost(d_a, 1000);
  for (int i = 0; i < 1000; ++i) {
    EXPECT_EQ(sum[i], FloatToBf16(Bf16ToFloat(a[i]) + Bf16ToFloat(b[i]))) << i;
  }
}

// Rows of DeepSeek-V3's vocabulary with many ties (values on a 1/64 grid), and a row whose
// logits all share their top bits, asking for every kind of head: greedy (1), a top-k cut (50),
// the largest head over the whole vocabulary (kept weight of everything), a top-k beyond the
// head (kept weight of the 5000 largest, cut inside a run of ties), a skipped row, and a row
// whose largest logits are −0 and +0 (equal: the lower id first).
TEST(GpuKernels, LogitHeadsMatchTwin) {
  REQUIRE_GPU();
  constexpr int kRows = 7;
  constexpr int kVocab = 129280;
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(static_cast<size_t>(kRows) * kVocab);
  for (float& v : logits) v = std::round(normal(rng) * 64.0f) / 64.0f;
  for (int i = 0; i < kVocab; ++i) logits[4 * kVocab + i] = 7.0f + (i % 97) * 1e-5f;
  for (int i = 0; i < kVocab; ++i) logits[6 * kVocab + i] = -1.0f - (i % 13);
  logits[6 * kVocab + 7] = 0.0f;
  logits[6 * kVocab + 3] = -0.0f;
  std::vector<LogitHeadParams> params(kRows);
  const int sizes[kRows][2] = {{1, kVocab},
                               {50, 50},
                               {kMaxLogitHead, kVocab},
                               {kMaxLogitHead, 5000},
                               {kMaxLogitHead, 3000},
                               {0, kVocab},
                               {2, kVocab}};
  int offset = 0;
  for (int r = 0; r < kRows; ++r) {
    params[r].head_size = sizes[r][0];
    params[r].keep_limit = sizes[r][1];
    params[r].temperature = 0.5f + r;
    params[r].output_offset = offset;
    params[r].kept_weight_needed = params[r].keep_limit > params[r].head_size;
    offset += params[r].head_size;
  }
  std::vector<int32_t> ids(offset, -1);
  std::vector<float> values(offset);
  std::vector<double> kept(kRows, 0.0);
  LogitHeadsTwin(logits.data(), kRows, kVocab, params.data(), ids.data(), values.data(),
                 kept.data());
  ASSERT_EQ(ids[params[6].output_offset], 3);  // −0 before +0: equal values, the lower id

  float* d_logits = ToDevice(logits);
  LogitHeadParams* d_params = ToDevice(params);
  int32_t* d_ids = ToDevice(std::vector<int32_t>(offset, -1));
  float* d_values = ToDevice(std::vector<float>(offset));
  double* d_kept = ToDevice(std::vector<double>(kRows, 0.0));
  ASSERT_TRUE(LogitHeads(d_logits, kRows, kVocab, d_params, d_ids, d_values, d_kept, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<int32_t> gpu_ids = ToHost(d_ids, offset);
  const std::vector<float> gpu_values = ToHost(d_values, offset);
  const std::vector<double> gpu_kept = ToHost(d_kept, kRows);
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < params[r].head_size; ++j) {
      const int k = params[r].output_offset + j;
      ASSERT_EQ(gpu_ids[k], ids[k]) << "row " << r << " position " << j;
      ASSERT_EQ(gpu_values[k], values[k]) << "row " << r << " position " << j;
    }
    if (params[r].kept_weight_needed) {
      EXPECT_NEAR(gpu_kept[r], kept[r], 1e-12 * kept[r]) << "row " << r;
    }
  }
  for (void* p : std::initializer_list<void*>{d_logits, d_params, d_ids, d_values, d_kept}) {
    cudaFree(p);
  }
}

}  // namespace
}  // namespace moeserve::kernels
