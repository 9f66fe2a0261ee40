// Integration tests of the EPLB loop: the Admin API (auth, validation, load), live placement
// updates under load that change no output, and the external controller closing the loop
// through a real Prometheus server scraping a real moeserve.
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <thread>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moeserve/v1/admin.grpc.pb.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "tests/integration/external_processes.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
constexpr char kToken[] = "5c1f8e3a9b7d2c6e0f4a8b1d3c5e7f9a";

std::string TokenFile() {
  const std::string path =
      ::testing::TempDir() + "/moeserve-admin-token-" + std::to_string(getpid());
  std::ofstream(path) << kToken << "\n";
  return path;
}

void Authorize(grpc::ClientContext& context, const std::string& token = kToken) {
  context.AddMetadata("authorization", "Bearer " + token);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
}

std::vector<uint32_t> Greedy(v1::Generation::Stub& stub, const std::string& prompt,
                             grpc::Status* status) {
  return GreedyTokens(stub, prompt, 24, status);
}

v1::ExpertPlacement GetPlacement(v1::Admin::Stub& admin) {
  grpc::ClientContext context;
  Authorize(context);
  v1::ExpertPlacement placement;
  EXPECT_TRUE(admin.GetExpertPlacement(&context, {}, &placement).ok());
  return placement;
}

// A random valid placement: every expert once, the rest random replicas, shuffled.
v1::UpdateExpertPlacementRequest RandomPlacement(const v1::ExpertPlacement& current,
                                                 int64_t version, std::mt19937& rng) {
  v1::UpdateExpertPlacementRequest request;
  request.set_version(version);
  for (int layer = 0; layer < current.layers_size(); ++layer) {
    std::vector<int> slots(current.num_logical_experts());
    std::iota(slots.begin(), slots.end(), 0);
    while (slots.size() < current.num_physical_experts()) {
      slots.push_back(static_cast<int>(rng() % current.num_logical_experts()));
    }
    std::shuffle(slots.begin(), slots.end(), rng);
    auto* out = request.add_layers();
    for (int expert : slots) out->add_phy2log(expert);
  }
  return request;
}

grpc::Status Update(v1::Admin::Stub& admin, const v1::UpdateExpertPlacementRequest& request,
                    const std::string& token = kToken) {
  grpc::ClientContext context;
  Authorize(context, token);
  v1::UpdateExpertPlacementResponse response;
  return admin.UpdateExpertPlacement(&context, request, &response);
}

TEST(AdminApi, AuthenticatesAndRefusesBadPlacementsWithoutChangingAnything) {
  ServerProcess server(
      {"--ep", "2", "--num-redundant-experts", "4", "--admin-token-file", TokenFile()});
  ASSERT_TRUE(server.ok());
  auto admin = v1::Admin::NewStub(server.channel());
  {
    grpc::ClientContext context;  // no token
    v1::ExpertPlacement placement;
    EXPECT_EQ(admin->GetExpertPlacement(&context, {}, &placement).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  std::mt19937 rng(1);
  const v1::ExpertPlacement current = GetPlacement(*admin);
  EXPECT_EQ(current.version(), 0);
  EXPECT_EQ(current.ep_size(), 2u);
  EXPECT_EQ(current.num_physical_experts(), 68u);
  EXPECT_EQ(current.layers_size(), 3);
  EXPECT_EQ(Update(*admin, RandomPlacement(current, 1, rng), "wrong-token").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);

  struct Case {
    std::string name;
    std::function<void(v1::UpdateExpertPlacementRequest&)> damage;
    grpc::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"missing layer", [](auto& r) { r.mutable_layers()->RemoveLast(); },
       grpc::StatusCode::INVALID_ARGUMENT, "MoE layers"},
      {"short layer", [](auto& r) { r.mutable_layers(1)->mutable_phy2log()->RemoveLast(); },
       grpc::StatusCode::INVALID_ARGUMENT, "slots"},
      {"expert out of range", [](auto& r) { r.mutable_layers(0)->set_phy2log(3, 64); },
       grpc::StatusCode::INVALID_ARGUMENT, "outside [0, 64)"},
      {"expert without replica",
       [](auto& r) {
         for (int i = 0; i < r.layers(2).phy2log_size(); ++i) {
           if (r.layers(2).phy2log(i) == 5) r.mutable_layers(2)->set_phy2log(i, 6);
         }
       },
       grpc::StatusCode::INVALID_ARGUMENT, "no replica of expert 5"},
      {"stale version", [](auto& r) { r.set_version(0); }, grpc::StatusCode::FAILED_PRECONDITION,
       "stale"},
      // A version no later update could exceed would block every update until a restart.
      {"last version", [](auto& r) { r.set_version(std::numeric_limits<int64_t>::max()); },
       grpc::StatusCode::INVALID_ARGUMENT, "out of range"},
      // Regression: timeouts of inf or 1e10 answered DEADLINE_EXCEEDED at once and 1e-9 expired
      // before the commit, yet the placement committed afterwards.
      {"infinite timeout",
       [](auto& r) { r.set_timeout_seconds(std::numeric_limits<double>::infinity()); },
       grpc::StatusCode::INVALID_ARGUMENT, "timeout_seconds"},
      {"huge timeout", [](auto& r) { r.set_timeout_seconds(1e10); },
       grpc::StatusCode::INVALID_ARGUMENT, "timeout_seconds"},
      {"negative timeout", [](auto& r) { r.set_timeout_seconds(-1); },
       grpc::StatusCode::INVALID_ARGUMENT, "timeout_seconds"},
      {"NaN timeout",
       [](auto& r) { r.set_timeout_seconds(std::numeric_limits<double>::quiet_NaN()); },
       grpc::StatusCode::INVALID_ARGUMENT, "timeout_seconds"},
      // Regression: a 1 MB group name was echoed into the message (RESOURCE_EXHAUSTED).
      {"unknown group", [](auto& r) { r.set_group(std::string(1 << 20, 'g')); },
       grpc::StatusCode::NOT_FOUND, "(groups: mixed)"},
  };
  for (const Case& c : cases) {
    v1::UpdateExpertPlacementRequest request = RandomPlacement(current, 1, rng);
    c.damage(request);
    const grpc::Status status = Update(*admin, request);
    EXPECT_EQ(status.error_code(), c.code) << c.name;
    EXPECT_THAT(status.error_message(), HasSubstr(c.message)) << c.name;
    EXPECT_EQ(GetPlacement(*admin).version(), 0) << c.name;
  }
  // A timeout too short for the commit withdraws the update: it answers DEADLINE_EXCEEDED and
  // never commits (or, if it committed first, answers OK).
  {
    v1::UpdateExpertPlacementRequest request = RandomPlacement(current, 2, rng);
    request.set_timeout_seconds(1e-9);
    const grpc::Status status = Update(*admin, request);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    if (status.ok()) {
      EXPECT_EQ(GetPlacement(*admin).version(), 2);
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << status.error_message();
      EXPECT_EQ(GetPlacement(*admin).version(), 0);
    }
  }
  // A good one commits.
  ASSERT_TRUE(Update(*admin, RandomPlacement(current, 3, rng)).ok());
  EXPECT_EQ(GetPlacement(*admin).version(), 3);

  // Expert load: every routed (token, expert) pair is counted once per MoE layer.
  auto generation = v1::Generation::NewStub(server.channel());
  grpc::Status status;
  Greedy(*generation, "count me", &status);
  ASSERT_TRUE(status.ok());
  grpc::ClientContext context;
  Authorize(context);
  v1::ExpertLoad load;
  ASSERT_TRUE(admin->GetExpertLoad(&context, {}, &load).ok());
  ASSERT_EQ(load.layers_size(), 3);
  int64_t layer0 = 0;
  for (int64_t tokens : load.layers(0).tokens()) layer0 += tokens;
  // Prompt "<bos>count me" (9 tokens) and 24 generated tokens, of which the last is never fed
  // back: 9 + 23 = 32 tokens through each MoE layer, 6 experts each.
  EXPECT_EQ(layer0, 32 * 6);
}

TEST(AdminApi, IsOffWithoutATokenFile) {
  ServerProcess server({});
  ASSERT_TRUE(server.ok());
  auto admin = v1::Admin::NewStub(server.channel());
  grpc::ClientContext context;
  Authorize(context);
  v1::ExpertPlacement placement;
  EXPECT_EQ(admin->GetExpertPlacement(&context, {}, &placement).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST(LivePlacementUpdates, UnderContinuousLoadNoRequestFailsAndNoOutputChanges) {
  ServerProcess server({"--prefill-ep", "2", "--decode-ep", "4", "--num-redundant-experts", "4",
                        "--two-batch-overlap", "--overlap-min-tokens", "1", "--admin-token-file",
                        TokenFile()});
  ASSERT_TRUE(server.ok());
  const std::vector<std::string> prompts = {"alpha", "beta gamma", "a longer prompt here", "x"};
  std::vector<std::vector<uint32_t>> expected;
  auto generation = v1::Generation::NewStub(server.channel());
  for (const auto& prompt : prompts) {
    grpc::Status status;
    expected.push_back(Greedy(*generation, prompt, &status));
    ASSERT_TRUE(status.ok());
  }
  std::atomic<bool> stop{false};
  std::atomic<int> completed{0}, failed{0}, mismatched{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      auto stub = v1::Generation::NewStub(server.channel());
      for (int i = 0; i < 200 && !stop; ++i) {
        const size_t p = (c + i) % prompts.size();
        grpc::Status status;
        const auto tokens = Greedy(*stub, prompts[p], &status);
        if (!status.ok())
          ++failed;
        else if (tokens != expected[p])
          ++mismatched;
        ++completed;
      }
    });
  }
  auto admin = v1::Admin::NewStub(server.channel());
  std::mt19937 rng(7);
  for (const std::string group : {"prefill", "decode"}) {
    v1::GetExpertPlacementRequest get;
    get.set_group(group);
    grpc::ClientContext context;
    Authorize(context);
    v1::ExpertPlacement current;
    ASSERT_TRUE(admin->GetExpertPlacement(&context, get, &current).ok());
    for (int version = 1; version <= 3; ++version) {
      auto request = RandomPlacement(current, version, rng);
      request.set_group(group);
      const grpc::Status status = Update(*admin, request);
      EXPECT_TRUE(status.ok()) << status.error_message();
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  }
  while (completed < 40) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_EQ(mismatched, 0);
  EXPECT_GE(completed, 40);
}

double SampleBalancedness(int metrics_port, int samples) {
  double sum = 0;
  int count = 0;
  for (int i = 0; i < samples; ++i) {
    const std::string metrics = ScrapeMetrics(metrics_port);
    for (int layer = 0; layer < 3; ++layer) {
      const double value =
          MetricValue(metrics, "moeserve_expert_balancedness{group=\"mixed\",layer=\"" +
                                   std::to_string(layer) + "\"}");
      if (value > 0) {
        sum += value;
        ++count;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return count > 0 ? sum / count : 0;
}

TEST(EplbController, ClosesTheLoopThroughARealPrometheus) {
  const std::string token_file = TokenFile();
  ServerProcess server(
      {"--ep", "4", "--num-redundant-experts", "16", "--admin-token-file", token_file});
  ASSERT_TRUE(server.ok());
  PrometheusProcess prometheus(server.metrics_port());

  // Bounded background traffic: many prompts, so routing covers the experts.
  std::atomic<bool> stop{false};
  std::atomic<int> failed{0}, completed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&, c] {
      auto stub = v1::Generation::NewStub(server.channel());
      for (int i = 0; i < 2000 && !stop; ++i) {
        grpc::Status status;
        Greedy(*stub, "traffic " + std::to_string(c) + " request " + std::to_string(i % 17),
               &status);
        if (!status.ok()) ++failed;
        ++completed;
      }
    });
  }
  const std::string controller = std::string(MOESERVE_EPLB_BINARY) +
                                 " controller --prometheus-url " + prometheus.url() +
                                 " --targets " + server.address() + " --admin-token-file " +
                                 token_file + " --group mixed --window 20s --once";
  // Prometheus needs a few scrapes before increase() has data; the controller refuses partial
  // data, so retry the dry run until it has a plan (bounded).
  CommandResult dry;
  for (int attempt = 0; attempt < 60; ++attempt) {
    dry = RunCommand(controller + " --dry-run --min-improvement 0.02");
    if (dry.exit_code == 0 && dry.output.find("would push") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  ASSERT_EQ(dry.exit_code, 0) << dry.output;
  ASSERT_THAT(dry.output, HasSubstr("dry run: would push version 1")) << dry.output;
  auto admin = v1::Admin::NewStub(server.channel());
  EXPECT_EQ(GetPlacement(*admin).version(), 0) << "a dry run pushes nothing";

  const double before = SampleBalancedness(server.metrics_port(), 30);
  const CommandResult run = RunCommand(controller + " --min-improvement 0.02");
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("pushed version 1"));
  EXPECT_EQ(GetPlacement(*admin).version(), 1);
  const double after = SampleBalancedness(server.metrics_port(), 30);
  EXPECT_GT(after, before) << "measured rank balancedness before " << before << ", after " << after;

  // An unreachable Prometheus fails the cycle and pushes nothing.
  const CommandResult down =
      RunCommand(std::string(MOESERVE_EPLB_BINARY) +
                 " controller --prometheus-url http://127.0.0.1:1 --targets " + server.address() +
                 " --admin-token-file " + token_file + " --once");
  EXPECT_NE(down.exit_code, 0);
  EXPECT_EQ(GetPlacement(*admin).version(), 1);

  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_GT(completed, 0);
}

}  // namespace
}  // namespace moeserve::testing
