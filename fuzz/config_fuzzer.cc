// A model directory's config.json through ModelConfig::Load: JSON syntax, every field's type
// and range, RoPE scaling variants.
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_file.h"
#include "model/config/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kvgate::fuzz::WriteScratch("config.json", data, size);
  auto config = kvgate::model::ModelConfig::Load(kvgate::fuzz::ScratchDir());
  (void)config;
  return 0;
}
