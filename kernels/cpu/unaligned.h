// Internal to kernels/cpu: unaligned little-endian loads and stores.
#pragma once

#include <cstdint>
#include <cstring>

namespace quantkv::kernels::internal {

// GGUF blocks and KV codec slabs pack fp16/int fields at odd offsets, so go through memcpy.
inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void StoreU16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace quantkv::kernels::internal
