// ShutdownSignals: how `moeserve serve` hears the signals that stop it.
//
// SIGTERM, SIGINT and SIGHUP ask the server to stop; SIGUSR1 and SIGUSR2 are logged and otherwise
// ignored; SIGPIPE is ignored. Install() replaces their default actions (which end the process at
// once) with a handler that only writes the signal's number to a pipe, and Next() reads it.
//
// Why a handler and not a mask with sigwait: a mask is inherited only by threads created after
// it is set, and some exist before main() runs (OpenBLAS starts its thread pool from its library
// constructor). A process-directed signal goes to any thread that does not block it, and with the
// default action that ends the process. A handler is process-wide, so whichever thread the
// kernel picks only records the signal.
//
// Install() once, from main(), before the server starts anything; Next() from one thread (the
// serve loop). The handler itself is async-signal-safe.
#pragma once

#include <chrono>

#include "absl/status/status.h"

namespace moeserve::server {

class ShutdownSignals {
 public:
  // Sets up the pipe and the handlers. Idempotent.
  static absl::Status Install();
  // The next stop signal (SIGTERM, SIGINT or SIGHUP) received, waiting up to `timeout`; 0 when
  // none came. Logs and skips the ignored ones.
  static int Next(std::chrono::milliseconds timeout);
  // "SIGTERM", "SIGINT", …
  static const char* Name(int signal_number);
};

}  // namespace moeserve::server
