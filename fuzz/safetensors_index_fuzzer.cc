// A sharded checkpoint's model.safetensors.index.json through Checkpoint::Open (its weight map,
// shard names that must stay inside the directory), then every tensor looked up. The directory
// holds one real shard (shard.safetensors) so valid maps reach it.
#include <cstddef>
#include <cstdint>
#include <filesystem>

#include "fuzz/scratch_file.h"
#include "model/weights/safetensors.h"

namespace {

// A valid one-tensor shard: 8-byte header length, JSON header, 4 bytes of F32 data.
void WriteShard() {
  const std::string header =
      R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"a":"b"}})";
  std::string bytes(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  bytes += header + std::string(4, '\0');
  kvgate::fuzz::WriteScratch("shard.safetensors", reinterpret_cast<const uint8_t*>(bytes.data()),
                             bytes.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static bool init = (WriteShard(), true);
  (void)init;
  kvgate::fuzz::WriteScratch("model.safetensors.index.json", data, size);
  auto checkpoint = kvgate::model::Checkpoint::Open(kvgate::fuzz::ScratchDir());
  if (!checkpoint.ok()) return 0;
  for (const std::string& name : (*checkpoint)->Names()) {
    (void)(*checkpoint)->Has(name);
    (void)(*checkpoint)->Get(name);
  }
  return 0;
}
