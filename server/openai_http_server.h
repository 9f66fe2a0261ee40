// OpenAiHttpServer: the OpenAI-compatible HTTP front door of `moeserve serve` —
// POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with `stream`),
// GET /v1/models, /v1/models/{id} and /health — over the same engine::Engine as the gRPC
// services. Requests are parsed by server/openai_protocol.h; chat messages are rendered by
// the model's ChatTemplate.
//
// HTTP/1.1 comes from cpp-httplib (Debian's libcpp-httplib-dev): one worker thread per open
// connection (up to `max_connections`; more wait to be accepted). A handler watches its
// client's connection while it waits for the engine: a client that disconnects (or stops
// reading) cancels its request, which frees the request's KV blocks.
//
// Lifecycle: Start (listens; until AttachEngine every request gets 503), AttachEngine, then
// Drain on shutdown and Stop. Start/AttachEngine/Drain/Stop are called from one thread; the
// handlers run on the server's workers.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "server/chat_template.h"

namespace moeserve::base {
class HttpListener;
}

namespace httplib {
class Server;
}

namespace moeserve::server {

struct OpenAiHttpOptions {
  std::string host = "127.0.0.1";
  int port = 8000;  // 0 picks a free port
  int max_connections = 256;
  int max_choices = 16;  // n × prompts per request
  size_t max_body_bytes = 16 << 20;
  // Set when chat templates cannot be rendered here (OpenAiModel::chat_unavailable).
  std::string chat_unavailable;
};

class OpenAiHttpServer {
 public:
  // `chat_template` may be null (chat completions then get 400 naming --chat-template).
  OpenAiHttpServer(OpenAiHttpOptions options, std::unique_ptr<ChatTemplate> chat_template);
  ~OpenAiHttpServer();

  // Binds and starts serving; returns the port (useful with port 0). UNAVAILABLE when the
  // address cannot be bound.
  absl::StatusOr<int> Start();
  // Replaces the chat template given at construction (and why chats cannot be rendered, when
  // they cannot): for a front end that learns the model's template with its engine. Before
  // AttachEngine only.
  void SetChatTemplate(std::unique_ptr<ChatTemplate> chat_template, std::string chat_unavailable);
  // Makes the endpoints live; `engine` must outlive Stop().
  void AttachEngine(engine::Engine* engine);
  // Waits until no request is in flight or `deadline` passes, then cancels what is left.
  void Drain(std::chrono::system_clock::time_point deadline);
  // Stops listening and joins the workers.
  void Stop();

  class Exchange;

 private:
  void RegisterRoutes();

  OpenAiHttpOptions options_;
  std::unique_ptr<ChatTemplate> chat_template_;
  std::unique_ptr<httplib::Server> http_;
  std::unique_ptr<base::HttpListener> listener_;  // after http_: stops it before it goes
  std::atomic<engine::Engine*> engine_{nullptr};
  std::atomic<int> in_flight_{0};
  std::atomic<bool> cancel_all_{false};  // set by Drain once its deadline passed
  int64_t created_ = 0;                  // unix seconds of start-up, for /v1/models
};

}  // namespace moeserve::server
