// Fuzzes SafetensorsFile::Open: the header length, the JSON header (dtypes, shapes, offsets) and
// the checks of every tensor's byte range against the file. The input is a whole file, opened
// through a memfd so the real path (regular-file check, mmap) runs.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = memfd_create("safetensors-fuzz", MFD_CLOEXEC);
  if (fd < 0) return 0;
  if (size > 0 && write(fd, data, size) != static_cast<ssize_t>(size)) {
    close(fd);
    return 0;
  }
  absl::StatusOr<moeserve::engine::SafetensorsFile> file =
      moeserve::engine::SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (file.ok()) {
    // Every tensor it accepted must convert without reading outside the mapping.
    for (const auto& [name, tensor] : file->tensors()) {
      if (tensor.num_bytes <= (1u << 20)) (void)moeserve::engine::ToFloat32(tensor);
    }
  }
  close(fd);
  return 0;
}
