#include "runtime/util/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"

namespace quantkv {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;

// Reads the whole file into anonymous memory advised for huge pages.
absl::StatusOr<uint8_t*> ReadIntoHugePages(int fd, const std::string& path, size_t size,
                                           size_t mapped) {
  void* addr = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (addr == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("%s: cannot allocate %d bytes for the weights", path, mapped));
  }
  ::madvise(addr, mapped, MADV_HUGEPAGE);  // advisory: fine if THP is off
  uint8_t* dst = static_cast<uint8_t*>(addr);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pread(fd, dst + done, std::min<size_t>(size - done, 64 << 20), done);
    if (n <= 0) {
      const int err = errno;
      ::munmap(addr, mapped);
      return absl::DataLossError(absl::StrFormat("%s: read failed at byte %d: %s", path, done,
                                                 n == 0 ? "unexpected end" : std::strerror(err)));
    }
    done += static_cast<size_t>(n);
  }
  ::mprotect(addr, mapped, PROT_READ);
  return dst;
}
}  // namespace

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path, Mode mode) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrFormat("%s: no such file", path));
    return absl::PermissionDeniedError(
        absl::StrFormat("%s: cannot open: %s", path, std::strerror(err)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrFormat("%s: not a regular file", path));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return std::unique_ptr<MappedFile>(new MappedFile(path, nullptr, 0, 0));
  }
  if (mode == Mode::kHugeCopy) {
    const size_t mapped = (size + kHugePage - 1) / kHugePage * kHugePage;
    absl::StatusOr<uint8_t*> data = ReadIntoHugePages(fd, path, size, mapped);
    ::close(fd);
    if (!data.ok()) return data.status();
    return std::unique_ptr<MappedFile>(new MappedFile(path, *data, size, mapped));
  }
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("%s: mmap of %d bytes failed: %s", path, size, std::strerror(errno)));
  }
  return std::unique_ptr<MappedFile>(
      new MappedFile(path, static_cast<const uint8_t*>(addr), size, size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), mapped_);
}

}  // namespace quantkv
