#include "server/openai_http_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdlib>
#include <iostream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/http_listener.h"
#include "base/random_id.h"
#include "httplib.h"
#include "server/openai_protocol.h"

namespace moeserve::server {
namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(20);
constexpr char kJson[] = "application/json";

int64_t UnixSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

int PortOf(const sockaddr_storage& address) {
  if (address.ss_family == AF_INET) {
    return ntohs(reinterpret_cast<const sockaddr_in&>(address).sin_port);
  }
  if (address.ss_family == AF_INET6) {
    return ntohs(reinterpret_cast<const sockaddr_in6&>(address).sin6_port);
  }
  return -1;
}

// The numeric host of a socket address, as httplib writes Request::remote_addr.
std::string NumericHost(const sockaddr_storage& address, socklen_t size) {
  char host[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), size, host, sizeof(host), nullptr, 0,
                  NI_NUMERICHOST) != 0) {
    return "";
  }
  return host;
}

// cpp-httplib 0.11 gives a handler no handle on its connection, yet a server must notice a
// client that went away while its request waits in the engine (non-streaming requests write
// nothing until the end). The connection's socket is the one whose local port and peer
// address and port are the request's; it stays open (owned by httplib) until the handler
// returns. -1 if not found, which only loses early cancellation.
int FindConnectionSocket(const httplib::Request& request) {
  DIR* fds = opendir("/proc/self/fd");
  if (fds == nullptr) return -1;
  int found = -1;
  while (dirent* entry = readdir(fds)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (*end != '\0' || fd < 3 || fd == dirfd(fds)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t local_size = sizeof(local), peer_size = sizeof(peer);
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &local_size) != 0 ||
        PortOf(local) != request.local_port) {
      continue;
    }
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &peer_size) == 0 &&
        PortOf(peer) == request.remote_port &&
        NumericHost(peer, peer_size) == request.remote_addr) {
      found = static_cast<int>(fd);
      break;
    }
  }
  closedir(fds);
  return found;
}

// Whether the peer closed its end (FIN or reset). Never reads: the socket is httplib's.
bool PeerClosed(int fd) {
  if (fd < 0) return false;
  pollfd probe{fd, POLLRDHUP, 0};
  return poll(&probe, 1, 0) > 0 && (probe.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// httplib::Server with its listening socket in reach: Debian's build listens with a backlog of
// 5, so a burst of new connections (64 clients starting at once) overflows the accept queue and
// the kernel drops SYNs, costing the unlucky clients a 1 s retransmit before their first token.
class HttpServer : public httplib::Server {
 public:
  // Raises the accept queue to the system's limit (listen() on a listening socket resizes it).
  void WidenBacklog() { ::listen(svr_sock_, SOMAXCONN); }
};

void SetError(httplib::Response& response, const absl::Status& status) {
  response.status = HttpStatusFor(status);
  response.set_content(ErrorBody(status), kJson);
}

absl::Status StatusOfOutput(const engine::GenerationOutput& output) {
  if (!output.status.ok()) return output.status;
  if (output.finish_reason == engine::FinishReason::kAborted) {
    return absl::UnavailableError("the server stopped before the request finished");
  }
  if (output.finish_reason == engine::FinishReason::kCancelled) {
    return absl::CancelledError("the request was cancelled");
  }
  return absl::OkStatus();
}

}  // namespace

// One request's choices in flight: their engine streams, what each has produced, and the
// client connection they belong to. Used by one worker thread.
class OpenAiHttpServer::Exchange {
 public:
  struct Choice {
    std::shared_ptr<engine::RequestStream> stream;
    bool finished = false;
    bool sent_role = false;
    std::string text;
    std::string finish_reason;
    int prompt_tokens = 0;
    int completion_tokens = 0;
  };

  Exchange(OpenAiHttpServer& server, OpenAiResponseHeader header, int n, bool include_usage,
           int connection_fd)
      : server_(server),
        header_(std::move(header)),
        n_(n),
        include_usage_(include_usage),
        connection_fd_(connection_fd) {
    server_.in_flight_.fetch_add(1);
  }
  ~Exchange() {
    CancelAll();
    server_.in_flight_.fetch_sub(1);
  }

  std::vector<Choice>& choices() { return choices_; }
  const OpenAiResponseHeader& header() const { return header_; }

  void CancelAll() {
    for (Choice& choice : choices_) {
      if (!choice.finished) choice.stream->Cancel();
    }
  }

  // The next message of any unfinished choice: (choice index, message). nullopt once every
  // choice finished, or when the client went away or the server gave up on draining (the
  // choices are then cancelled and `*abandoned` is set).
  std::optional<std::pair<int, engine::GenerationOutput>> Next(bool* abandoned) {
    *abandoned = false;
    while (true) {
      // Checked every interval even while tokens flow: a non-streaming client that left would
      // otherwise be noticed only when its whole response failed to send.
      const auto now = std::chrono::steady_clock::now();
      if (now - last_check_ >= kPollInterval) {
        last_check_ = now;
        if (PeerClosed(connection_fd_) || server_.cancel_all_.load()) {
          CancelAll();
          *abandoned = true;
          return std::nullopt;
        }
      }
      int unfinished = 0;
      for (size_t k = 0; k < choices_.size(); ++k) {
        const size_t index = (next_ + k) % choices_.size();
        Choice& choice = choices_[index];
        if (choice.finished) continue;
        ++unfinished;
        // One choice blocks for the whole interval; several share it.
        const auto wait = choices_.size() == 1 ? kPollInterval : std::chrono::milliseconds(1);
        if (std::optional<engine::GenerationOutput> output = choice.stream->Next(wait)) {
          next_ = index + 1;
          if (output->is_last()) choice.finished = true;
          return std::make_pair(static_cast<int>(index), std::move(*output));
        }
      }
      if (unfinished == 0) return std::nullopt;
    }
  }

  // Records a choice's last message into its totals.
  void Finish(Choice& choice, const engine::GenerationOutput& output) {
    choice.finish_reason = FinishReasonName(output.finish_reason);
    choice.prompt_tokens = output.usage.prompt_tokens;
    choice.completion_tokens = output.usage.completion_tokens;
  }

  OpenAiUsage Usage() const {
    OpenAiUsage usage;
    for (size_t k = 0; k < choices_.size(); ++k) {
      // A prompt counts once however many choices it has.
      if (k % n_ == 0) usage.prompt_tokens += choices_[k].prompt_tokens;
      usage.completion_tokens += choices_[k].completion_tokens;
    }
    return usage;
  }

  bool include_usage() const { return include_usage_; }
  // Whether an abandoned exchange was given up by the server (shutdown past its grace period)
  // rather than by its client.
  bool server_stopping() const { return server_.cancel_all_.load(); }

 private:
  OpenAiHttpServer& server_;
  OpenAiResponseHeader header_;
  int n_;
  bool include_usage_;
  int connection_fd_;
  std::vector<Choice> choices_;
  size_t next_ = 0;
  std::chrono::steady_clock::time_point last_check_ = std::chrono::steady_clock::now();
};

OpenAiHttpServer::OpenAiHttpServer(OpenAiHttpOptions options,
                                   std::unique_ptr<ChatTemplate> chat_template)
    : options_(std::move(options)),
      chat_template_(std::move(chat_template)),
      http_(std::make_unique<HttpServer>()),
      listener_(std::make_unique<base::HttpListener>(*http_)),
      created_(UnixSeconds()) {}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

absl::StatusOr<int> OpenAiHttpServer::Start() {
  const size_t workers = static_cast<size_t>(std::max(1, options_.max_connections));
  http_->new_task_queue = [workers] { return new httplib::ThreadPool(workers); };
  // Tokens go out as soon as they exist: no Nagle delay on small event writes.
  http_->set_tcp_nodelay(true);
  // Benchmarks and SDKs keep connections open across many requests.
  http_->set_keep_alive_max_count(100000);
  // An idle kept-alive connection holds a worker; 5 s also bounds how long Stop waits for one.
  http_->set_keep_alive_timeout(5);
  http_->set_payload_max_length(options_.max_body_bytes);
  RegisterRoutes();
  absl::StatusOr<int> port =
      listener_->Bind(options_.host, options_.port, "cannot listen for HTTP");
  if (!port.ok()) return port.status();
  static_cast<HttpServer*>(http_.get())->WidenBacklog();
  listener_->Start();
  return *port;
}

void OpenAiHttpServer::SetChatTemplate(std::unique_ptr<ChatTemplate> chat_template,
                                       std::string chat_unavailable) {
  chat_template_ = std::move(chat_template);
  options_.chat_unavailable = std::move(chat_unavailable);
}

void OpenAiHttpServer::AttachEngine(engine::Engine* engine) { engine_.store(engine); }

void OpenAiHttpServer::Drain(std::chrono::system_clock::time_point deadline) {
  while (in_flight_.load() > 0 && std::chrono::system_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  cancel_all_.store(true);
}

void OpenAiHttpServer::Stop() {
  cancel_all_.store(true);
  listener_->Stop();
}

void OpenAiHttpServer::RegisterRoutes() {
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& response) {
    engine::Engine* engine = engine_.load();
    if (engine == nullptr) {
      return SetError(response, absl::UnavailableError("the model is still loading"));
    }
    for (const engine::GroupHealth& group : engine->Health()) {
      if (!group.status.ok()) return SetError(response, group.status);
    }
    response.set_content("{\"status\":\"ok\"}", kJson);
  });

  auto model_name = [this]() -> std::optional<std::string> {
    engine::Engine* engine = engine_.load();
    if (engine == nullptr) return std::nullopt;
    return engine->model_info().name;
  };
  http_->Get("/v1/models",
             [this, model_name](const httplib::Request&, httplib::Response& response) {
               std::optional<std::string> name = model_name();
               if (!name)
                 return SetError(response, absl::UnavailableError("the model is still loading"));
               response.set_content(ModelListResponse(*name, created_), kJson);
             });
  http_->Get("/v1/models/(.+)", [this, model_name](const httplib::Request& request,
                                                   httplib::Response& response) {
    std::optional<std::string> name = model_name();
    if (!name) return SetError(response, absl::UnavailableError("the model is still loading"));
    if (request.matches[1] != *name) {
      return SetError(response, absl::NotFoundError(absl::StrCat(
                                    "the model `", std::string(request.matches[1]),
                                    "` does not exist; this server serves `", *name, "`")));
    }
    nlohmann::json model = {
        {"id", *name}, {"object", "model"}, {"created", created_}, {"owned_by", "moeserve"}};
    response.set_content(model.dump(), kJson);
  });

  auto generate = [this](bool chat) {
    return [this, chat](const httplib::Request& request, httplib::Response& response) {
      engine::Engine* engine = engine_.load();
      if (engine == nullptr) {
        return SetError(response, absl::UnavailableError("the model is still loading; retry"));
      }
      const engine::ModelInfo& info = engine->model_info();
      OpenAiModel model{.name = info.name,
                        .context_length = info.context_length,
                        .chat_template = chat_template_.get(),
                        .chat_unavailable = options_.chat_unavailable,
                        .max_choices = options_.max_choices};
      OpenAiResponseHeader header{
          .id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", base::RandomHexId()),
          .created = UnixSeconds(),
          .model = info.name,
          .chat = chat};
      absl::StatusOr<OpenAiRequest> parsed =
          ParseOpenAiRequest(chat, request.body, model, header.id);
      if (!parsed.ok()) return SetError(response, parsed.status());

      auto exchange = std::make_shared<Exchange>(*this, header, parsed->n, parsed->include_usage,
                                                 FindConnectionSocket(request));
      for (engine::GenerationInput& input : parsed->choices) {
        absl::StatusOr<std::shared_ptr<engine::RequestStream>> stream =
            engine->Submit(std::move(input));
        // The exchange cancels the choices already queued when it goes.
        if (!stream.ok()) return SetError(response, stream.status());
        Exchange::Choice choice;
        choice.stream = std::move(*stream);
        exchange->choices().push_back(std::move(choice));
      }

      if (!parsed->stream) {
        bool abandoned = false;
        while (auto next = exchange->Next(&abandoned)) {
          auto& [index, output] = *next;
          Exchange::Choice& choice = exchange->choices()[index];
          if (absl::Status status = StatusOfOutput(output); !status.ok()) {
            return SetError(response, status);
          }
          choice.text += output.text;
          if (output.is_last()) exchange->Finish(choice, output);
        }
        if (abandoned) {
          return SetError(response,
                          exchange->server_stopping()
                              ? absl::UnavailableError("the server stopped before the request "
                                                       "finished")
                              : absl::CancelledError("the client went away"));
        }
        std::vector<OpenAiChoiceResult> results;
        for (const Exchange::Choice& choice : exchange->choices()) {
          results.push_back({choice.text, choice.finish_reason});
        }
        response.set_content(CompletionResponse(header, results, exchange->Usage()), kJson);
        return;
      }

      response.set_header("Cache-Control", "no-cache");
      response.set_chunked_content_provider(
          "text/event-stream",
          [exchange](size_t, httplib::DataSink& sink) {
            auto write = [&sink](std::string_view event) {
              return sink.write(event.data(), event.size());
            };
            bool abandoned = false;
            while (auto next = exchange->Next(&abandoned)) {
              auto& [index, output] = *next;
              Exchange::Choice& choice = exchange->choices()[index];
              if (absl::Status status = StatusOfOutput(output); !status.ok()) {
                // The status line went out already: the error travels as an event.
                exchange->CancelAll();
                write(ErrorEvent(status));
                write(kDoneEvent);
                sink.done();
                return true;
              }
              std::optional<std::string> finish_reason;
              if (output.is_last()) {
                exchange->Finish(choice, output);
                finish_reason = choice.finish_reason;
              }
              std::optional<std::string_view> role;
              if (!choice.sent_role) role = "assistant";
              choice.sent_role = true;
              if (!write(StreamChunkEvent(exchange->header(), index, role, output.text,
                                          finish_reason, exchange->include_usage()))) {
                exchange->CancelAll();  // the client went away
                return false;
              }
            }
            if (abandoned) {
              if (!exchange->server_stopping()) return false;  // nobody is listening
              write(ErrorEvent(
                  absl::UnavailableError("the server stopped before the request finished")));
              write(kDoneEvent);
              sink.done();
              return true;
            }
            if (exchange->include_usage()) write(UsageEvent(exchange->header(), exchange->Usage()));
            write(kDoneEvent);
            sink.done();
            return true;
          },
          // Runs however the response ended (also when it never started): stop what is left.
          [exchange](bool) { exchange->CancelAll(); });
    };
  };
  http_->Post("/v1/completions", generate(false));
  http_->Post("/v1/chat/completions", generate(true));

  http_->set_error_handler([](const httplib::Request& request, httplib::Response& response) {
    if (!response.body.empty()) return;
    if (response.status == 404) {
      SetError(response, absl::NotFoundError(absl::StrCat("no such endpoint: ", request.method, " ",
                                                          request.path)));
      response.status = 404;
    } else if (response.status == 413) {
      SetError(response, absl::InvalidArgumentError("the request body is too large"));
      response.status = 413;
    }
  });
  http_->set_exception_handler(
      [](const httplib::Request&, httplib::Response& response, std::exception_ptr error) {
        std::string what = "unknown error";
        try {
          std::rethrow_exception(error);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        SetError(response, absl::InternalError(absl::StrCat("internal error: ", what)));
      });
}

}  // namespace moeserve::server
