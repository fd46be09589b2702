// The communicator of an MPI test binary: one for the whole process, since MPI initializes
// once and finalizes at exit.
#pragma once

#include <memory>

#include "gtest/gtest.h"
#include "runtime/comm/communicator.h"

namespace quantkv::testing {

inline Communicator& TestComm() {
  static std::unique_ptr<Communicator> comm = [] {
    auto c = CreateCommunicator();
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : std::make_unique<LocalCommunicator>();
  }();
  return *comm;
}

}  // namespace quantkv::testing
