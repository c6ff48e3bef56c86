// The seed of a randomized test: a fresh one each run, printed so that a failure can be replayed
// with KVGATE_TEST_SEED=N.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace kvgate::testing {

inline uint32_t TestSeed() {
  if (const char* s = std::getenv("KVGATE_TEST_SEED")) {
    return static_cast<uint32_t>(std::strtoul(s, nullptr, 10));
  }
  return std::random_device{}();
}

}  // namespace kvgate::testing
