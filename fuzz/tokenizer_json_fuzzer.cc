// A Hugging Face tokenizer.json through LoadTokenizerFile; a tokenizer it accepts encodes and
// decodes a fixed text (pre-tokenizer regexes, merges, byte fallback, added tokens).
#include <cstddef>
#include <cstdint>

#include "fuzz/scratch_file.h"
#include "model/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = kvgate::fuzz::WriteScratch("tokenizer.json", data, size);
  auto tokenizer = kvgate::model::LoadTokenizerFile(path);
  if (!tokenizer.ok()) return 0;
  auto ids = (*tokenizer)->Encode("Hello, world! 123 \xc3\xa9t\xc3\xa9 <s> \xf0\x9f\x99\x82", true);
  if (ids.ok()) (void)(*tokenizer)->Decode(*ids, /*skip_special=*/false);
  (void)(*tokenizer)->Decode({0, 1, 2, 3, -1, 1 << 30}, /*skip_special=*/true);
  return 0;
}
