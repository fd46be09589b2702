// Drains a RequestStream of the serving engine loop into its token ids and final event.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "runtime/serve/engine_loop.h"

namespace quantkv::testing {

inline std::vector<int32_t> Drain(RequestStream& stream, GenerationFinal* final) {
  std::vector<int32_t> ids;
  while (true) {
    for (StreamEvent& e : stream.Wait(absl::Seconds(1))) {
      if (e.kind == StreamEvent::Kind::kChunk) {
        ids.insert(ids.end(), e.token_ids.begin(), e.token_ids.end());
      } else {
        EXPECT_EQ(e.kind, StreamEvent::Kind::kFinal) << e.error;
        *final = e.final;
        return ids;
      }
    }
  }
}

}  // namespace quantkv::testing
