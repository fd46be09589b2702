// What every CUDA-vs-CPU test needs: skipping without a device, device buffers, fresh seeds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device.h"

namespace quantkv::gpu_test {

// Skips the calling test, saying why, when no CUDA device can be used.
#define QKV_SKIP_WITHOUT_CUDA_DEVICE()                                                  \
  do {                                                                                  \
    const absl::StatusOr<int> count = ::quantkv::kernels::cuda::QueryCudaDeviceCount(); \
    if (!count.ok()) GTEST_SKIP() << "no CUDA device: " << count.status().message();    \
    if (*count == 0) GTEST_SKIP() << "no CUDA device: the driver reports 0 devices";    \
  } while (0)

// A seed printed for replay; QUANTKV_TEST_SEED fixes it.
inline uint64_t FreshSeed() {
  if (const char* fixed = std::getenv("QUANTKV_TEST_SEED")) {
    return std::strtoull(fixed, nullptr, 10);
  }
  const uint64_t seed =
      (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();
  std::cout << "[ seed ] " << seed << " (QUANTKV_TEST_SEED replays it)\n";
  return seed;
}

// Owns a device allocation for the length of a test.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    EXPECT_EQ(cudaMalloc(&ptr_, bytes_ == 0 ? 1 : bytes_), cudaSuccess) << bytes_ << " bytes";
  }
  template <typename T>
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size() * sizeof(T)) {
    Upload(host.data());
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  float* f32() const { return static_cast<float*>(ptr_); }
  size_t bytes() const { return bytes_; }
  void Upload(const void* src) {
    ASSERT_EQ(cudaMemcpy(ptr_, src, bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  void Download(void* dst) const {
    ASSERT_EQ(cudaMemcpy(dst, ptr_, bytes_, cudaMemcpyDeviceToHost), cudaSuccess);
  }
  template <typename T>
  std::vector<T> ToHost() const {
    std::vector<T> out(bytes_ / sizeof(T));
    Download(out.data());
    return out;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

}  // namespace quantkv::gpu_test
