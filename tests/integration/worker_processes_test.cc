// Integration tests of expert-parallel groups whose ranks are processes, through the real
// binaries on loopback: `moeserve rank` processes (CPU ranks over Gloo), `moeserve node`
// supervisors that start them, and the `moeserve frontend` that serves the front doors over
// them. A client of the front end must see exactly what a client of one `moeserve serve` process
// sees — the same tokens, placements that commit at one step on every rank — and a group that
// loses a rank must fail visibly (UNAVAILABLE, health, logs) while the front end stays up, then
// serve again once its processes re-formed it under a new epoch.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "moeserve/v1/admin.grpc.pb.h"
#include "moeserve/v1/generation.grpc.pb.h"
#include "moeserve/v1/worker.grpc.pb.h"
#include "tests/integration/external_processes.h"
#include "tests/integration/server_process.h"

namespace moeserve::testing {
namespace {

using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
using HealthStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;
constexpr auto kServing = grpc::health::v1::HealthCheckResponse::SERVING;
constexpr auto kNotServing = grpc::health::v1::HealthCheckResponse::NOT_SERVING;

// `count` consecutive free TCP ports (a node's ranks listen on port + i).
int FreePorts(int count) {
  static std::mt19937 random(std::random_device{}());
  for (int attempt = 0; attempt < 200; ++attempt) {
    const int base = 20000 + static_cast<int>(random() % 30000);
    bool all_free = true;
    for (int i = 0; i < count && all_free; ++i) {
      const int fd = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in address{};
      address.sin_family = AF_INET;
      address.sin_port = htons(static_cast<uint16_t>(base + i));
      address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      all_free = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
      close(fd);
    }
    if (all_free) return base;
  }
  ADD_FAILURE() << "no free ports";
  return 0;
}

std::string Address(int port) { return "127.0.0.1:" + std::to_string(port); }

std::string WriteTokenFile() {
  const std::string path = ::testing::TempDir() + "/admin-token-" + std::to_string(getpid());
  std::ofstream(path) << "3f9c1a7be2d54086c1e9b7a2f4d6083e5b1c9d7a\n";
  return path;
}

// Waits until `service` reports `wanted`; false after `seconds`.
bool WaitForHealth(ServerProcess& server, const std::string& service, HealthStatus wanted,
                   double seconds) {
  const auto give_up =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  while (Clock::now() < give_up) {
    if (Health(server, service) == wanted) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

v1::RankLoad Load(const std::string& address) {
  auto stub = v1::Worker::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::RankLoad load;
  EXPECT_TRUE(stub->GetLoad(&context, {}, &load).ok()) << address;
  return load;
}

// One seeded, sampled generation (the sampler's state travels with a handed-over sequence).
std::vector<uint32_t> SampledTokens(ServerProcess& server) {
  auto stub = v1::Generation::NewStub(server.channel());
  v1::GenerateRequest request;
  request.set_text("sampled across processes");
  request.set_max_tokens(24);
  request.set_ignore_eos(true);
  request.mutable_sampling()->set_temperature(0.9f);
  request.mutable_sampling()->set_top_p(0.9f);
  request.mutable_sampling()->set_seed(11);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&context, request);
  std::vector<uint32_t> tokens;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
  }
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  return tokens;
}

// The rank processes a node supervisor started (its children).
std::vector<pid_t> Children(pid_t parent) {
  std::ifstream file("/proc/" + std::to_string(parent) + "/task/" + std::to_string(parent) +
                     "/children");
  std::vector<pid_t> children;
  for (pid_t pid; file >> pid;) children.push_back(pid);
  return children;
}

// Whether process `pid` ends (is gone, or a zombie no one has reaped) within `seconds`.
bool ProcessEnds(pid_t pid, double seconds) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while (Clock::now() < deadline) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string pid_field, command, state;
    if (!(stat >> pid_field >> command >> state) || state == "Z") return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// A group of rank processes started by `nodes` node supervisors of `ranks_per_node` ranks each,
// the first node's first rank being the leader.
class NodeGroup {
 public:
  // With `nccl_host_per_node`, each node's processes get an NCCL_HOSTID of their own, so that
  // NCCL treats the nodes as separate hosts even on one machine (and one GPU).
  NodeGroup(std::string group, int nodes, int ranks_per_node, std::vector<std::string> rank_args,
            bool nccl_host_per_node = false)
      : group_(std::move(group)),
        nodes_(nodes),
        ranks_per_node_(ranks_per_node),
        rank_args_(std::move(rank_args)),
        nccl_host_per_node_(nccl_host_per_node) {
    for (int node = 0; node < nodes_; ++node) {
      base_ports_.push_back(FreePorts(ranks_per_node_));
      metrics_ports_.push_back(FreePorts(ranks_per_node_));
    }
    Start();
  }
  void Start() {
    processes_.clear();
    for (int node = 0; node < nodes_; ++node) {
      std::vector<std::string> args = {"node",
                                       "--ranks-per-node",
                                       std::to_string(ranks_per_node_),
                                       "--num-nodes",
                                       std::to_string(nodes_),
                                       "--node-index",
                                       std::to_string(node),
                                       "--port",
                                       std::to_string(base_ports_[node]),
                                       "--metrics-port",
                                       std::to_string(metrics_ports_[node]),
                                       "--health-interval-seconds",
                                       "0.2",
                                       "--",
                                       "--group",
                                       group_,
                                       "--leader",
                                       leader(),
                                       "--join-timeout-seconds",
                                       "60"};
      args.insert(args.end(), rank_args_.begin(), rank_args_.end());
      std::vector<std::string> environment;
      if (nccl_host_per_node_) {
        environment.push_back("NCCL_HOSTID=moeserve-test-node-" + std::to_string(node));
      }
      processes_.push_back(std::make_unique<ChildProcess>(args, environment));
    }
  }
  std::string leader() const { return Address(base_ports_.front()); }
  std::vector<std::string> rank_addresses() const {
    std::vector<std::string> addresses;
    for (int node = 0; node < nodes_; ++node) {
      for (int i = 0; i < ranks_per_node_; ++i) addresses.push_back(Address(base_ports_[node] + i));
    }
    return addresses;
  }
  // Each rank's /metrics port, in rank order.
  std::vector<int> metrics_ports() const {
    std::vector<int> ports;
    for (int node = 0; node < nodes_; ++node) {
      for (int i = 0; i < ranks_per_node_; ++i) ports.push_back(metrics_ports_[node] + i);
    }
    return ports;
  }
  ChildProcess& node(int index) { return *processes_[index]; }
  // Waits until every rank printed its serving line.
  bool WaitServing(double seconds) {
    for (auto& process : processes_) {
      const std::string pattern = "(serving group `" + group_ + "` rank \\d+[^\\n]*\\n[\\s\\S]*){" +
                                  std::to_string(ranks_per_node_) + "}";
      if (process->WaitForOutput(pattern, seconds).empty()) {
        ADD_FAILURE() << "group `" << group_ << "` did not form:\n" << process->output();
        return false;
      }
    }
    return true;
  }

 private:
  std::string group_;
  int nodes_;
  int ranks_per_node_;
  std::vector<std::string> rank_args_;
  bool nccl_host_per_node_;
  std::vector<int> base_ports_;
  std::vector<int> metrics_ports_;
  std::vector<std::unique_ptr<ChildProcess>> processes_;
};

// A prefill group of two rank processes and a decode group of two nodes of two rank processes
// each, behind one front end, serve exactly what one `serve --prefill-ep 2 --decode-ep 4`
// process serves; a placement applied through the front end's Admin API commits at the same
// step on every decode rank and changes no token.
TEST(WorkerProcesses, DisaggregatedGroupsServeWhatOneProcessServes) {
  const std::string token = WriteTokenFile();
  const std::vector<std::string> rank_args = {"--admin-token-file", token};
  NodeGroup prefill("prefill", 1, 2, rank_args);
  NodeGroup decode("decode", 2, 2, rank_args);
  ASSERT_TRUE(prefill.WaitServing(60));
  ASSERT_TRUE(decode.WaitServing(60));
  ServerProcess frontend(
      {"--group", "prefill=" + prefill.leader(), "--group", "decode=" + decode.leader(),
       "--admin-token-file", token, "--poll-interval-seconds", "0.1"},
      true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));
  EXPECT_EQ(Health(frontend, "moeserve.v1.Generation/prefill"), kServing);
  EXPECT_EQ(Health(frontend, "moeserve.v1.Generation/decode"), kServing);

  auto lengths = [](int i) { return static_cast<uint32_t>(24 + i % 4); };
  const std::vector<std::vector<uint32_t>> cluster = ConcurrentGreedy(frontend, 6, lengths);
  const std::vector<uint32_t> cluster_sampled = SampledTokens(frontend);
  std::vector<std::vector<uint32_t>> single;
  std::vector<uint32_t> single_sampled;
  {
    ServerProcess one({"--prefill-ep", "2", "--decode-ep", "4"});
    ASSERT_TRUE(one.ok());
    single = ConcurrentGreedy(one, 6, lengths);
    single_sampled = SampledTokens(one);
  }
  EXPECT_EQ(cluster, single);
  EXPECT_EQ(cluster_sampled, single_sampled);
  EXPECT_EQ(cluster_sampled.size(), 24u);

  // Each decode rank exports the expert-load series of the experts its slots hold: together
  // every (layer, expert) once, each rank an equal share.
  {
    const std::regex series(R"(moeserve_expert_tokens_total\{[^}]*group="decode"[^}]*\})");
    const std::regex layer_expert(
        R"re(layer="(\d+)"[^}]*expert="(\d+)"|expert="(\d+)"[^}]*layer="(\d+)")re");
    std::set<std::pair<int, int>> all;
    size_t total = 0;
    std::set<size_t> per_rank;
    for (int port : decode.metrics_ports()) {
      const std::string text = ScrapeMetrics(port);
      size_t count = 0;
      for (std::sregex_iterator it(text.begin(), text.end(), series), end; it != end; ++it) {
        const std::string labels = it->str();
        std::smatch match;
        ASSERT_TRUE(std::regex_search(labels, match, layer_expert)) << labels;
        const bool layer_first = match[1].matched;
        all.insert({std::stoi(layer_first ? match[1] : match[4]),
                    std::stoi(layer_first ? match[2] : match[3])});
        ++count;
      }
      EXPECT_GT(count, 0u) << "rank metrics on port " << port;
      EXPECT_THAT(text, HasSubstr("moeserve_build_info{component=\"rank\""));
      // Every series of a rank process names its group and rank (dashboards' per-rank views).
      EXPECT_THAT(
          text, ::testing::ContainsRegex("process_threads\\{group=\"decode\",rank=\"[0-9]+\"\\}"));
      per_rank.insert(count);
      total += count;
    }
    EXPECT_EQ(per_rank.size(), 1u) << "the decode ranks export unequal shares";
    EXPECT_EQ(total, all.size()) << "an expert's series is exported by two ranks";
    int layers = 0, experts = 0;
    for (const auto& [layer, expert] : all) {
      layers = std::max(layers, layer + 1);
      experts = std::max(experts, expert + 1);
    }
    EXPECT_EQ(all.size(), static_cast<size_t>(layers * experts)) << "some experts are missing";
  }

  // A new placement for the decode group (every layer's experts in reverse slot order).
  auto admin = v1::Admin::NewStub(frontend.channel());
  v1::ExpertPlacement current;
  {
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer 3f9c1a7be2d54086c1e9b7a2f4d6083e5b1c9d7a");
    v1::GetExpertPlacementRequest request;
    request.set_group("decode");
    grpc::Status status = admin->GetExpertPlacement(&context, request, &current);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(current.ep_size(), 4u);
  }
  v1::UpdateExpertPlacementRequest update;
  update.set_group("decode");
  update.set_version(current.version() + 1);
  update.set_timeout_seconds(30);
  for (const auto& layer : current.layers()) {
    auto* reversed = update.add_layers();
    for (int slot = layer.phy2log_size() - 1; slot >= 0; --slot) {
      reversed->add_phy2log(layer.phy2log(slot));
    }
  }
  {
    // Applied under load: requests stream while the ranks stage and commit it; none fails and
    // none changes a token (ConcurrentGreedy expects every status OK).
    std::vector<std::vector<uint32_t>> under_load;
    std::thread load([&] { under_load = ConcurrentGreedy(frontend, 6, lengths); });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    grpc::ClientContext context;
    context.AddMetadata("authorization", "Bearer 3f9c1a7be2d54086c1e9b7a2f4d6083e5b1c9d7a");
    v1::UpdateExpertPlacementResponse response;
    grpc::Status status = admin->UpdateExpertPlacement(&context, update, &response);
    load.join();
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.committed_version(), update.version());
    EXPECT_EQ(under_load, single);
  }
  std::set<int64_t> commit_steps;
  for (const std::string& address : decode.rank_addresses()) {
    const v1::RankLoad load = Load(address);
    EXPECT_EQ(load.placement_version(), update.version()) << address;
    commit_steps.insert(load.placement_commit_step());
  }
  EXPECT_EQ(commit_steps.size(), 1u) << "the decode ranks committed at different steps";
  EXPECT_GE(*commit_steps.begin(), 0);
  // Experts moved between processes; the tokens do not change.
  EXPECT_EQ(ConcurrentGreedy(frontend, 6, lengths), single);
}

// The EPLB loop over rank processes: Prometheus scrapes every rank's own expert-load series, the
// controller reads them and pushes a placement through the front end's Admin API, and every
// rank commits it at the same step while traffic runs; no request fails.
TEST(WorkerProcesses, EplbControllerRebalancesRankProcessesThroughTheFrontEnd) {
  const std::string token = WriteTokenFile();
  NodeGroup group("mixed", 2, 2, {"--admin-token-file", token, "--num-redundant-experts", "16"});
  ASSERT_TRUE(group.WaitServing(60));
  ServerProcess frontend({"--group", "mixed=" + group.leader(), "--admin-token-file", token,
                          "--poll-interval-seconds", "0.1"},
                         true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));
  PrometheusProcess prometheus(group.metrics_ports());

  std::atomic<bool> stop{false};
  std::atomic<int> failed{0}, completed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 2; ++c) {
    clients.emplace_back([&, c] {
      auto stub = v1::Generation::NewStub(frontend.channel());
      for (int i = 0; i < 2000 && !stop; ++i) {
        grpc::Status status;
        GreedyTokens(*stub, "traffic " + std::to_string(c) + " request " + std::to_string(i % 17),
                     16, &status);
        if (!status.ok()) ++failed;
        ++completed;
      }
    });
  }
  const std::string controller =
      std::string(MOESERVE_EPLB_BINARY) + " controller --prometheus-url " + prometheus.url() +
      " --targets " + frontend.address() + " --admin-token-file " + token +
      " --group mixed --window 20s --once --min-improvement 0.02";
  // Prometheus needs a few scrapes of every rank before the controller has whole data.
  CommandResult dry;
  for (int attempt = 0; attempt < 90; ++attempt) {
    dry = RunCommand(controller + " --dry-run");
    if (dry.exit_code == 0 && dry.output.find("would push") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  ASSERT_THAT(dry.output, HasSubstr("dry run: would push version 1")) << dry.output;
  const CommandResult run = RunCommand(controller);
  EXPECT_EQ(run.exit_code, 0) << run.output;
  EXPECT_THAT(run.output, HasSubstr("pushed version 1"));
  std::set<int64_t> commit_steps;
  for (const std::string& address : group.rank_addresses()) {
    const v1::RankLoad load = Load(address);
    EXPECT_EQ(load.placement_version(), 1) << address;
    commit_steps.insert(load.placement_commit_step());
  }
  EXPECT_EQ(commit_steps.size(), 1u) << "the ranks committed at different steps";
  stop = true;
  for (auto& t : clients) t.join();
  EXPECT_EQ(failed, 0);
  EXPECT_GT(completed, 0);
}

// A node supervisor killed outright (kill -9: no chance to stop its ranks) takes its ranks with
// it: they end within seconds instead of holding their ports (and GPUs) for a group that no
// supervisor watches any more.
TEST(WorkerProcesses, RanksEndWithTheirNodeSupervisor) {
  NodeGroup group("mixed", 1, 2, {});
  ASSERT_TRUE(group.WaitServing(60));
  const std::vector<pid_t> ranks = Children(group.node(0).pid());
  ASSERT_EQ(ranks.size(), 2u);
  kill(group.node(0).pid(), SIGKILL);
  for (pid_t rank : ranks) EXPECT_TRUE(ProcessEnds(rank, 15)) << "rank process " << rank;
}

// A decode rank killed mid-stream fails its group: the stream ends UNAVAILABLE naming the
// group, health turns NOT_SERVING for the server and the group, the front end stays up and
// answers new requests UNAVAILABLE; the node supervisors exit, and once they are started again
// the group re-forms under a new epoch and serves.
TEST(WorkerProcesses, KilledRankFailsItsGroupUntilItReforms) {
  NodeGroup decode("mixed", 2, 1, {"--min-step-ms", "20"});
  ASSERT_TRUE(decode.WaitServing(60));
  ServerProcess frontend({"--group", "mixed=" + decode.leader(), "--poll-interval-seconds", "0.1"},
                         true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));

  // A long generation, then rank 1's process dies.
  auto stub = v1::Generation::NewStub(frontend.channel());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest request;
  request.set_text("a long one");
  request.set_max_tokens(2000);
  request.set_ignore_eos(true);
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  int tokens = 0;
  while (tokens < 5 && reader->Read(&response)) tokens += response.token_ids_size();
  ASSERT_GE(tokens, 5);
  const std::vector<pid_t> ranks = Children(decode.node(1).pid());
  ASSERT_EQ(ranks.size(), 1u);
  const auto killed_at = Clock::now();
  kill(ranks.front(), SIGKILL);
  while (reader->Read(&response)) {
  }
  const grpc::Status status = reader->Finish();
  const double seconds_to_fail = std::chrono::duration<double>(Clock::now() - killed_at).count();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("`mixed`"));
  EXPECT_LT(seconds_to_fail, 10);
  EXPECT_TRUE(WaitForHealth(frontend, "", kNotServing, 5));
  EXPECT_EQ(Health(frontend, "moeserve.v1.Generation/mixed"), kNotServing);
  {
    grpc::Status refused;
    GreedyTokens(*stub, "while down", 4, &refused);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(refused.error_message(), HasSubstr("`mixed`"));
  }
  // Both supervisors end: node 1 because its rank died, node 0 because its rank's group failed.
  EXPECT_NE(decode.node(1).WaitForExit(20), 0);
  EXPECT_EQ(decode.node(0).WaitForExit(20), 3) << decode.node(0).output();
  EXPECT_THAT(decode.node(0).output(), HasSubstr("exiting so that the group re-forms"));
  EXPECT_THAT(frontend.output(), HasSubstr("expert-parallel group `mixed`"));

  // The orchestrator starts the nodes again: a new epoch, and the front end serves again.
  decode.Start();
  ASSERT_TRUE(decode.WaitServing(60));
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30)) << frontend.output();
  grpc::Status again;
  EXPECT_EQ(GreedyTokens(*stub, "after re-forming", 6, &again).size(), 6u);
  EXPECT_TRUE(again.ok()) << again.error_message();
  const std::regex epoch_line("group `mixed` serves \\(epoch (\\S+),");
  const std::string log = frontend.output();
  std::set<std::string> epochs;
  for (std::sregex_iterator it(log.begin(), log.end(), epoch_line), end; it != end; ++it) {
    epochs.insert((*it)[1]);
  }
  EXPECT_EQ(epochs.size(), 2u) << log;
}

// The GPU tests run where MOESERVE_TEST_CUDA_RANK_PROCESSES=1 (a GPU host, with the NCCL
// socket settings in the environment).
bool CudaRankProcessesEnabled() {
  const char* enabled = std::getenv("MOESERVE_TEST_CUDA_RANK_PROCESSES");
  return enabled != nullptr && std::string(enabled) == "1";
}

const std::vector<std::string> kGpuArgs = {"--device", "cuda", "--kv-cache-mib", "256"};

// Rank flags for GPU rank processes that all share GPU 0.
std::vector<std::string> GpuRankArgs(std::vector<std::string> more) {
  std::vector<std::string> args = kGpuArgs;
  args.insert(args.end(), {"--cuda-device", "0"});
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

// The front end's greedy and seeded tokens equal those of one `serve --device cuda --ep 1`,
// requests sent one at a time: a GPU's dense projections (cuBLAS) and MLA's context split give
// bits that depend on a batch's size, so concurrent requests, which a group batches otherwise
// than one GPU, may part on a near tie of the random model.
void ExpectTokensOfOneGpuProcess(ServerProcess& frontend) {
  auto lengths = [](int i) { return static_cast<uint32_t>(24 + i % 4); };
  const std::vector<std::vector<uint32_t>> cluster = SequentialGreedy(frontend, 6, lengths);
  const std::vector<uint32_t> cluster_sampled = SampledTokens(frontend);
  std::vector<std::string> one_args = kGpuArgs;
  one_args.insert(one_args.end(), {"--ep", "1"});
  ServerProcess one(one_args);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(cluster, SequentialGreedy(one, 6, lengths));
  EXPECT_EQ(cluster_sampled, SampledTokens(one));
}

// GPU ranks as processes, on one GPU: two "nodes" of one rank each, which NCCL treats as two
// hosts (their own NCCL_HOSTID, sockets over loopback), serve the tokens one GPU process serves,
// and a killed rank fails the group cleanly.
TEST(WorkerProcesses, GpuRanksOnOneGpuServeWhatOneGpuProcessServes) {
  if (!CudaRankProcessesEnabled()) GTEST_SKIP() << "not a GPU host (see above)";
  NodeGroup group("mixed", 2, 1, GpuRankArgs({"--collective-timeout-seconds", "10"}),
                  /*nccl_host_per_node=*/true);
  ASSERT_TRUE(group.WaitServing(120));
  ServerProcess frontend({"--group", "mixed=" + group.leader(), "--poll-interval-seconds", "0.1"},
                         true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));
  ExpectTokensOfOneGpuProcess(frontend);

  const std::vector<pid_t> ranks = Children(group.node(1).pid());
  ASSERT_EQ(ranks.size(), 1u);
  kill(ranks.front(), SIGKILL);
  EXPECT_TRUE(WaitForHealth(frontend, "moeserve.v1.Generation/mixed", kNotServing, 15));
  auto stub = v1::Generation::NewStub(frontend.channel());
  grpc::Status refused;
  GreedyTokens(*stub, "while down", 4, &refused);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(group.node(0).WaitForExit(30), 3) << group.node(0).output();
}

// Greedy tokens of `count` requests given as token ids (for models without a tokenizer), each
// of its own prompt and length, sent one after another (why: ExpectTokensOfOneGpuProcess).
std::vector<std::vector<uint32_t>> SequentialGreedyIds(ServerProcess& server, int count) {
  std::vector<std::vector<uint32_t>> results(count);
  auto stub = v1::Generation::NewStub(server.channel());
  for (int i = 0; i < count; ++i) {
    std::vector<uint32_t> prompt;
    for (int j = 0; j < 8 + 5 * i; ++j) prompt.push_back((i * 131 + j * 37 + 11) % 5000);
    grpc::Status status;
    results[i] = GreedyTokens(*stub, prompt, 16 + i % 4, &status);
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  return results;
}

// The same two GPU rank processes with their decode steps' exchange planned on the GPUs
// (--gpu-exchange-plan device: fixed-size blocks over NCCL, no host round trip), on a model
// whose experts the device path runs (DeepSeek-V3's widths, FP8 experts: builtin:v3-bench-fp8):
// half of every step's experts are on the other process's GPU, and the tokens are those of one
// GPU process, whose experts are all local; no step overflowed. Their decode steps ran as CUDA
// graphs holding the exchange's collectives (replayed on both ranks), NCCL bound to 2 CTAs.
TEST(WorkerProcesses, GpuRanksPlanningTheExchangeOnTheGpuServeWhatOneGpuServes) {
  if (!CudaRankProcessesEnabled()) GTEST_SKIP() << "not a GPU host (see above)";
  // At most 64 tokens a step: every step, prefill too, is planned on the device in both the
  // group and the single process, so both run the same expert kernel.
  const std::vector<std::string> model = {"--model", "builtin:v3-bench-fp8", "--max-batch-tokens",
                                          "64"};
  std::vector<std::string> args = model;
  // Each of the exchange's collectives bound to 2 CTAs, as an overlapped exchange would be.
  args.insert(args.end(), {"--gpu-exchange-plan", "device", "--gpu-exchange-max-ctas", "2"});
  NodeGroup group("mixed", 2, 1, GpuRankArgs(args), /*nccl_host_per_node=*/true);
  ASSERT_TRUE(group.WaitServing(300));
  ServerProcess frontend({"--group", "mixed=" + group.leader(), "--poll-interval-seconds", "0.1"},
                         true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));
  const std::vector<std::vector<uint32_t>> cluster = SequentialGreedyIds(frontend, 6);
  std::vector<std::string> one_args = kGpuArgs;
  one_args.insert(one_args.end(), model.begin(), model.end());
  one_args.insert(one_args.end(), {"--ep", "1"});
  ServerProcess one(one_args);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(cluster, SequentialGreedyIds(one, 6));
  for (const auto& tokens : cluster) EXPECT_GE(tokens.size(), 16u);
  const std::string log = group.node(0).output() + group.node(1).output();
  EXPECT_NE(log.find("plans the experts and the exchange"), std::string::npos) << log;
  EXPECT_NE(log.find("as CUDA graphs, their exchange included"), std::string::npos) << log;
  EXPECT_NE(log.find("NCCL exchange on GPU 0 (at most 2 CTAs per collective)"), std::string::npos)
      << log;
  EXPECT_EQ(log.find("overflowed"), std::string::npos) << log;
  const std::regex replays(R"(moeserve_gpu_step_graph_replays_total\{[^}]*\} ([0-9.e+]+))");
  for (int port : group.metrics_ports()) {
    const std::string text = ScrapeMetrics(port);
    std::smatch match;
    ASSERT_TRUE(std::regex_search(text, match, replays)) << text;
    EXPECT_GT(std::stod(match[1]), 0) << "rank metrics on port " << port;
  }
}

// Two GPU rank processes (two NCCL hosts over sockets) serving FP8 experts with the exchange
// planned on the host: the dispatch carries packed FP8 rows that each sender quantized
// (--gpu-dispatch-rows fp8, the default) or bf16 rows that each receiver quantizes. The experts
// read the same codes either way, so the greedy tokens are the same, and each rank's dispatch
// moved 7,392 bytes a row instead of 14,336 (moeserve_dispatch_bytes_total).
TEST(WorkerProcesses, GpuRanksDispatchingFp8RowsServeTheBf16RowsTokensInHalfTheBytes) {
  if (!CudaRankProcessesEnabled()) GTEST_SKIP() << "not a GPU host (see above)";
  const std::regex dispatch_bytes(R"(moeserve_dispatch_bytes_total\{[^}]*\} ([0-9.e+]+))");
  auto serve = [&](const std::string& rows, std::vector<double>& bytes) {
    std::vector<std::vector<uint32_t>> tokens;
    NodeGroup group("mixed", 2, 1,
                    GpuRankArgs({"--model", "builtin:v3-bench-fp8", "--gpu-dispatch-rows", rows}),
                    /*nccl_host_per_node=*/true);
    EXPECT_TRUE(group.WaitServing(300)) << rows;
    ServerProcess frontend({"--group", "mixed=" + group.leader(), "--poll-interval-seconds", "0.1"},
                           true, true, "frontend");
    EXPECT_TRUE(frontend.ok());
    EXPECT_TRUE(WaitForHealth(frontend, "", kServing, 30));
    tokens = SequentialGreedyIds(frontend, 4);
    for (int port : group.metrics_ports()) {
      const std::string text = ScrapeMetrics(port);
      std::smatch match;
      EXPECT_TRUE(std::regex_search(text, match, dispatch_bytes)) << text;
      bytes.push_back(match.empty() ? -1 : std::stod(match[1]));
    }
    return tokens;
  };
  std::vector<double> fp8_bytes, bf16_bytes;
  const auto fp8 = serve("fp8", fp8_bytes);
  const auto bf16 = serve("bf16", bf16_bytes);
  ASSERT_EQ(fp8.size(), 4u);
  EXPECT_EQ(fp8, bf16);
  ASSERT_EQ(fp8_bytes.size(), 2u);
  ASSERT_EQ(bf16_bytes.size(), 2u);
  for (int rank = 0; rank < 2; ++rank) {
    std::printf("rank %d dispatched %.0f bytes of FP8 rows, %.0f of bf16 rows\n", rank,
                fp8_bytes[rank], bf16_bytes[rank]);
    ASSERT_GT(bf16_bytes[rank], 0);
    EXPECT_NEAR(fp8_bytes[rank] / bf16_bytes[rank], 7392.0 / 14336.0, 1e-6) << "rank " << rank;
  }
}

// GPU prefill and decode groups as processes (one rank each, on one GPU, as two NCCL hosts): the
// prefilled sequence's KV rows leave the prefill GPU and enter the decode GPU through the
// Worker API, and the tokens are those of one GPU process.
TEST(WorkerProcesses, GpuPrefillHandsOffToGpuDecodeAcrossProcesses) {
  if (!CudaRankProcessesEnabled()) GTEST_SKIP() << "not a GPU host (see above)";
  NodeGroup prefill("prefill", 1, 1, GpuRankArgs({}), /*nccl_host_per_node=*/true);
  NodeGroup decode("decode", 1, 1, GpuRankArgs({}), /*nccl_host_per_node=*/true);
  ASSERT_TRUE(prefill.WaitServing(120));
  ASSERT_TRUE(decode.WaitServing(120));
  ServerProcess frontend({"--group", "prefill=" + prefill.leader(), "--group",
                          "decode=" + decode.leader(), "--poll-interval-seconds", "0.1"},
                         true, true, "frontend");
  ASSERT_TRUE(frontend.ok());
  ASSERT_TRUE(WaitForHealth(frontend, "", kServing, 30));
  ExpectTokensOfOneGpuProcess(frontend);
}

// A rank whose peers never come, or whose leader never answers, gives up with a message naming
// the group and exits 2; a front end whose groups never answer exits 1.
TEST(WorkerProcesses, MissingPeersEndWithAClearError) {
  ChildProcess alone({"rank", "--group", "decode", "--group-size", "2", "--rank", "0", "--port",
                      "0", "--metrics-port", "-1", "--join-timeout-seconds", "2"});
  ChildProcess orphan({"rank", "--group", "decode", "--group-size", "2", "--rank", "1", "--port",
                       "0", "--metrics-port", "-1", "--leader", Address(FreePorts(1)),
                       "--join-timeout-seconds", "2"});
  EXPECT_EQ(alone.WaitForExit(30), 2);
  EXPECT_THAT(alone.output(), HasSubstr("did not form"));
  EXPECT_EQ(orphan.WaitForExit(30), 2);
  EXPECT_THAT(orphan.output(), HasSubstr(" rank 1"));

  ServerProcess lonely(
      {"--group", "mixed=" + Address(FreePorts(1)), "--wait-for-groups-seconds", "1"}, false, true,
      "frontend");
  EXPECT_FALSE(lonely.ok());
  EXPECT_EQ(lonely.WaitForExit(30), 1);
  EXPECT_THAT(lonely.output(), HasSubstr("did not answer"));

  ChildProcess malformed({"frontend", "--group", "mixed", "--port", "0", "--metrics-port", "-1"});
  EXPECT_EQ(malformed.WaitForExit(30), 2);
  EXPECT_THAT(malformed.output(), HasSubstr("NAME=HOST:PORT"));
}

}  // namespace
}  // namespace moeserve::testing
