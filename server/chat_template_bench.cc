// moeserve-chat-template-bench: what rendering a chat template costs a request. Renders a real
// template (default: the Qwen3 fixture, with tools) for a short conversation, first from one
// thread, then from T threads at once (renders share Python's interpreter lock, so they queue),
// and prints microseconds per render. A render happens once per chat request, before its prompt
// is queued: it adds to time to first token, never to the time between tokens.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "server/chat_template.h"

namespace {

using Clock = std::chrono::steady_clock;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moeserve-chat-template-bench: microseconds per chat template render"};
  std::string template_file = MOESERVE_DEFAULT_BENCH_TEMPLATE;
  int renders = 2000;
  std::vector<int> threads = {1, 8, 64};
  app.add_option("--template", template_file, "Jinja chat template")->capture_default_str();
  app.add_option("--renders", renders, "Renders per thread count")->capture_default_str();
  app.add_option("--threads", threads, "Threads rendering at once")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  auto compiled =
      moeserve::server::ChatTemplate::Compile({.text = ReadFile(template_file),
                                               .origin = template_file,
                                               .special_tokens = {{"eos_token", "<|im_end|>"}}});
  if (!compiled.ok()) {
    std::fprintf(stderr, "%s\n", std::string(compiled.status().message()).c_str());
    return 1;
  }
  const auto messages = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is a mixture of experts?"},
    {"role": "assistant", "content": "A layer whose tokens each go to a few of many experts."},
    {"role": "user", "content": "And expert parallelism?"}])");
  const auto tools = nlohmann::ordered_json::parse(R"([{"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}])");
  size_t length = 0;
  std::printf("| threads | renders | wall us per render | us per render per thread |\n");
  std::printf("|---:|---:|---:|---:|\n");
  for (int t : threads) {
    const int per_thread = std::max(1, renders / t);
    const auto start = Clock::now();
    std::vector<std::thread> workers;
    for (int i = 0; i < t; ++i) {
      workers.emplace_back([&] {
        for (int r = 0; r < per_thread; ++r) {
          auto rendered = (*compiled)->Render(messages, true, tools, {});
          if (rendered.ok()) length = rendered->size();
        }
      });
    }
    for (auto& w : workers) w.join();
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    std::printf("| %d | %d | %.1f | %.1f |\n", t, per_thread * t, us / (per_thread * t),
                us / per_thread);
  }
  std::fprintf(stderr, "rendered %zu bytes per conversation\n", length);
  return 0;
}
