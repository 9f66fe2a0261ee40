#include "engine/comm/peer_waker.h"

#include <netdb.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moeserve::engine::comm {
namespace {

// Resolves host (an IP or a name) with `port` to a datagram address of `family` (AF_UNSPEC:
// the first the resolver gives).
absl::StatusOr<std::pair<sockaddr_storage, socklen_t>> Resolve(const std::string& host,
                                                               const std::string& port,
                                                               int family) {
  addrinfo hints{};
  hints.ai_family = family;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (int error = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); error != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve `", host, "`: ", gai_strerror(error)));
  }
  std::pair<sockaddr_storage, socklen_t> address{};
  std::memcpy(&address.first, found->ai_addr, found->ai_addrlen);
  address.second = found->ai_addrlen;
  freeaddrinfo(found);
  return address;
}

std::string Numeric(const sockaddr_storage& address, socklen_t length) {
  char host[NI_MAXHOST];
  char port[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&address), length, host, sizeof(host), port,
                  sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "";
  }
  // host|port: an IPv6 host has colons of its own.
  return absl::StrCat(host, "|", port);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PeerWaker>> PeerWaker::Create(KeyValueStore& store,
                                                             const std::string& key_prefix,
                                                             int rank, int size,
                                                             const std::string& hostname,
                                                             std::chrono::milliseconds timeout) {
  absl::StatusOr<std::pair<sockaddr_storage, socklen_t>> self = Resolve(hostname, "0", AF_UNSPEC);
  if (!self.ok()) return self.status();
  const int family = self->first.ss_family;
  const int fd = socket(family, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("wake socket: ", std::strerror(errno)));
  if (bind(fd, reinterpret_cast<const sockaddr*>(&self->first), self->second) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&self->first), &self->second) != 0) {
    const std::string error = std::strerror(errno);
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("cannot bind a wake socket on `", hostname, "`: ", error));
  }
  auto fail = [fd](absl::Status status) {
    close(fd);
    return status;
  };
  if (absl::Status status =
          store.Set(absl::StrCat(key_prefix, "/wake/", rank), Numeric(self->first, self->second));
      !status.ok()) {
    return fail(status);
  }
  std::vector<sockaddr_storage> peers(size);
  std::vector<socklen_t> lengths(size, 0);
  for (int peer = 0; peer < size; ++peer) {
    if (peer == rank) continue;
    absl::StatusOr<std::string> text = store.Get(absl::StrCat(key_prefix, "/wake/", peer), timeout);
    if (!text.ok()) {
      return fail(absl::Status(
          text.status().code(),
          absl::StrCat("rank ", rank, " of ", size, ": rank ", peer,
                       " did not publish its wake address: ", text.status().message())));
    }
    std::vector<std::string> parts = absl::StrSplit(*text, '|');
    if (parts.size() != 2) {
      return fail(absl::InternalError(absl::StrCat("malformed wake address `", *text, "`")));
    }
    absl::StatusOr<std::pair<sockaddr_storage, socklen_t>> address =
        Resolve(parts[0], parts[1], family);
    if (!address.ok()) return fail(address.status());
    peers[peer] = address->first;
    lengths[peer] = address->second;
  }
  return std::unique_ptr<PeerWaker>(new PeerWaker(fd, rank, std::move(peers), std::move(lengths)));
}

PeerWaker::PeerWaker(int socket, int rank, std::vector<sockaddr_storage> peers,
                     std::vector<socklen_t> peer_lengths)
    : socket_(socket),
      rank_(rank),
      peers_(std::move(peers)),
      peer_lengths_(std::move(peer_lengths)) {}

PeerWaker::~PeerWaker() {
  stopping_ = true;
  if (receiver_.joinable()) receiver_.join();
  close(socket_);
}

void PeerWaker::Start(std::function<void()> on_wake) {
  receiver_ = std::thread([this, on_wake = std::move(on_wake)] { Receive(on_wake); });
}

void PeerWaker::Receive(const std::function<void()>& on_wake) {
  while (!stopping_.load()) {
    pollfd entry{socket_, POLLIN, 0};
    // Wakes up now and then to notice stopping_.
    if (poll(&entry, 1, /*timeout_ms=*/100) <= 0) continue;
    char byte[16];
    bool woken = false;
    while (recv(socket_, byte, sizeof(byte), 0) >= 0) woken = true;  // drain: one wake is enough
    if (woken) on_wake();
  }
}

void PeerWaker::WakePeers() {
  const char byte = 1;
  for (size_t peer = 0; peer < peers_.size(); ++peer) {
    if (static_cast<int>(peer) == rank_) continue;
    // A full buffer or an unreachable peer drops the wake; the peer's sleep ends anyway.
    sendto(socket_, &byte, 1, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&peers_[peer]),
           peer_lengths_[peer]);
  }
}

}  // namespace moeserve::engine::comm
