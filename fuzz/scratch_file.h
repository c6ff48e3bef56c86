// Fuzz inputs as files: kvgate's parsers read files (memory-mapped checkpoints, JSON and
// SentencePiece files in a model directory), so each harness writes the input into a private
// scratch directory (on /dev/shm when there is one) and runs the real loader on it.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace kvgate::fuzz {

// One per process, removed at exit.
inline const std::string& ScratchDir() {
  static const std::string* dir = [] {
    const char* base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    auto* d = new std::string(std::string(base) + "/kvgate-fuzz-" + std::to_string(getpid()));
    std::filesystem::create_directories(*d);
    std::atexit([] { std::filesystem::remove_all(*dir); });
    return d;
  }();
  return *dir;
}

// Writes `data` to ScratchDir()/name (replacing it); its path.
inline std::string WriteScratch(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = ScratchDir() + "/" + name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

// The repository's model for harnesses that need one (run from the repository root, or set
// KVGATE_FUZZ_MODEL).
inline std::string FuzzModelDir() {
  const char* env = std::getenv("KVGATE_FUZZ_MODEL");
  return env != nullptr ? env : "models/kvgate-default";
}

}  // namespace kvgate::fuzz
