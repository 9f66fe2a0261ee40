// Files read at start-up (model folders, placements, tokens, certificates), opened only when
// they are regular files.
//
// open() on a FIFO blocks until a writer appears and a read from a character device may never
// end, so a FIFO or a device in place of config.json would hang start-up forever. These
// functions open without blocking, check the file type, and refuse anything but a regular file
// with a message naming the path.
//
// Stateless; safe to call from any thread.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace moeserve::base {

// A regular file opened read-only; closes its descriptor when destroyed. Move-only.
class RegularFile {
 public:
  // NOT_FOUND when `path` does not exist; INVALID_ARGUMENT when it is not a regular file (a
  // FIFO, a socket, a device or a directory) or cannot be opened.
  static absl::StatusOr<RegularFile> Open(const std::string& path);

  RegularFile(RegularFile&& other) noexcept;
  RegularFile& operator=(RegularFile&& other) noexcept;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  ~RegularFile();

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

 private:
  RegularFile(int fd, uint64_t size) : fd_(fd), size_(size) {}
  int fd_ = -1;
  uint64_t size_ = 0;
};

// The whole content of the regular file `path`. As RegularFile::Open, and INVALID_ARGUMENT when
// it is larger than `max_bytes` (what its kind of file can sensibly be).
absl::StatusOr<std::string> ReadRegularFile(const std::string& path, uint64_t max_bytes);

}  // namespace moeserve::base
