#include "base/http_listener.h"

#include <sys/socket.h>

#include <chrono>

#include "absl/strings/str_cat.h"

namespace moeserve::base {

absl::StatusOr<int> HttpListener::Bind(const std::string& host, int port,
                                       const std::string& refusal) {
  server_.set_socket_options([](socket_t socket) {
    int yes = 1;
    setsockopt(socket, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  int bound = port;
  if (port == 0) {
    bound = server_.bind_to_any_port(host);
  } else if (!server_.bind_to_port(host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    return absl::UnavailableError(
        absl::StrCat(refusal, " on ", host, ":", port, " (address in use or not available)"));
  }
  return bound;
}

void HttpListener::Start() {
  thread_ = std::thread([this] {
    server_.listen_after_bind();
    done_.store(true);
  });
}

void HttpListener::Stop() {
  if (!thread_.joinable()) return;
  while (!done_.load()) {
    server_.stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  thread_.join();
}

}  // namespace moeserve::base
