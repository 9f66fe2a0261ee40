#include "server/shutdown_signals.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "absl/strings/str_cat.h"

namespace moeserve::server {
namespace {

// The self-pipe: the handler writes one byte per signal (its number), Next() reads them.
int pipe_fds[2] = {-1, -1};

void RecordSignal(int signal_number) {
  const int saved_errno = errno;  // the interrupted code may be about to read errno
  const unsigned char byte = static_cast<unsigned char>(signal_number);
  // A full pipe (hundreds of unread signals) drops the byte; one stop signal is enough.
  [[maybe_unused]] const ssize_t written = ::write(pipe_fds[1], &byte, 1);
  errno = saved_errno;
}

constexpr int kStopSignals[] = {SIGTERM, SIGINT, SIGHUP};
constexpr int kIgnoredSignals[] = {SIGUSR1, SIGUSR2};

}  // namespace

absl::Status ShutdownSignals::Install() {
  if (pipe_fds[0] >= 0) return absl::OkStatus();
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(
        absl::StrCat("cannot create the signal pipe: ", std::strerror(errno)));
  }
  struct sigaction action {};
  action.sa_handler = RecordSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // interrupted system calls resume in whatever thread ran this
  for (int signal_number : kStopSignals) sigaction(signal_number, &action, nullptr);
  for (int signal_number : kIgnoredSignals) sigaction(signal_number, &action, nullptr);
  // Writing to a closed stdout must not end the server.
  signal(SIGPIPE, SIG_IGN);
  return absl::OkStatus();
}

int ShutdownSignals::Next(std::chrono::milliseconds timeout) {
  if (pipe_fds[0] < 0) return 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    unsigned char byte = 0;
    if (::read(pipe_fds[0], &byte, 1) == 1) {
      for (int ignored : kIgnoredSignals) {
        if (byte == ignored) {
          std::cout << "moeserve: " << Name(byte)
                    << " ignored (SIGTERM, SIGINT or SIGHUP stop the server)" << std::endl;
          byte = 0;
        }
      }
      if (byte != 0) return byte;
      continue;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return 0;
    pollfd readable{pipe_fds[0], POLLIN, 0};
    ::poll(&readable, 1, static_cast<int>(left.count()));
  }
}

const char* ShutdownSignals::Name(int signal_number) {
  switch (signal_number) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    case SIGHUP:
      return "SIGHUP";
    case SIGUSR1:
      return "SIGUSR1";
    case SIGUSR2:
      return "SIGUSR2";
    default:
      return "a signal";
  }
}

}  // namespace moeserve::server
