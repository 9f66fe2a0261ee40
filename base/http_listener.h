// HttpListener: runs a cpp-httplib server (the /metrics listener's, the OpenAI front door's) on
// a thread of its own, with the two things every moeserve HTTP port needs from cpp-httplib's
// defaults changed:
// - SO_REUSEADDR only: cpp-httplib also sets SO_REUSEPORT on Linux, which lets a second process
//   bind the same port and take half its connections; with it off that process fails to start.
// - Stop() works at any time: cpp-httplib's stop() closes the listening socket only once the
//   listener thread is inside listen, so called earlier (a process that fails right after
//   starting the port) it did nothing and the join waited in accept() forever.
//
// Thread rules: Bind, Start and Stop from one thread (the owner's); the server's handlers run
// on cpp-httplib's pool.
#pragma once

#include <atomic>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "httplib.h"

namespace moeserve::base {

class HttpListener {
 public:
  explicit HttpListener(httplib::Server& server) : server_(server) {}
  ~HttpListener() { Stop(); }
  HttpListener(const HttpListener&) = delete;
  HttpListener& operator=(const HttpListener&) = delete;

  // Binds host:port (0: a free port) and returns the port; UNAVAILABLE "<refusal> on host:port
  // (address in use or not available)", e.g. with refusal "cannot serve metrics".
  absl::StatusOr<int> Bind(const std::string& host, int port, const std::string& refusal);
  // Starts serving the bound port on the listener thread.
  void Start();
  // Stops the server and joins the listener thread; nothing when it was never started.
  void Stop();

 private:
  httplib::Server& server_;
  std::thread thread_;
  std::atomic<bool> done_{false};  // set when listen_after_bind returns
};

}  // namespace moeserve::base
