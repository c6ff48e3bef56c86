// A safetensors file (header length, JSON header, dtypes, shapes, offsets) through
// SafetensorsFile::Open, then every tensor it accepted read to the end.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "fuzz/scratch_file.h"
#include "model/weights/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvgate::fuzz::WriteScratch("model.safetensors", data, size);
  auto file = kvgate::model::SafetensorsFile::Open(path);
  if (!file.ok()) return 0;
  for (const auto& [name, t] : (*file)->tensors()) {
    if (!t.dtype.has_value() || t.nbytes == 0) continue;
    const size_t n = t.nbytes / kvgate::DTypeSize(*t.dtype);
    std::vector<float> out(n);
    kvgate::ConvertToF32(*t.dtype, t.data, out.data(), n);
  }
  return 0;
}
