// Tokenizers of Hugging Face checkpoints: SentencePiece `tokenizer.model` and `tokenizer.json`
// (byte-level BPE as in Llama 3 / Qwen2, SentencePiece-style BPE with byte fallback as in
// Llama 2 / Mistral). Used by the CLI and the coordinator; workers never tokenize.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Encodes `text`. With `add_special`, prepends BOS when the tokenizer's configuration says
  // to (add_bos_token), as Hugging Face's `tokenizer(text)` does. Added/special tokens that
  // appear literally in the text are matched as single tokens.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special) const = 0;
  // Decodes ids to text. Special tokens (BOS/EOS/...) are skipped when `skip_special`.
  virtual std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const = 0;

  virtual int32_t vocab_size() const = 0;
  // -1 when the tokenizer has none.
  virtual int32_t bos_id() const = 0;
  // All ids that end generation (from generation_config.json / config.json /
  // tokenizer_config.json); may be empty.
  virtual const std::vector<int32_t>& eos_ids() const = 0;
  // Whether Encode(text, add_special=true) prepends BOS.
  virtual bool adds_bos() const = 0;
};

// Loads the tokenizer of a Hugging Face model directory: tokenizer.json if present, else
// tokenizer.model; reads BOS/EOS from tokenizer_config.json, generation_config.json and
// config.json (in that order of precedence for EOS: generation_config, then config, then
// tokenizer_config). Errors name the missing or malformed file.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir);
// Loads a single tokenizer file (tokenizer.json or a SentencePiece .model).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFile(const std::string& path);

// Streaming detokenization: push generated ids one at a time and get back only text that is
// complete, valid UTF-8 and will not change when later ids arrive. Flush() returns the rest.
class StreamingDecoder {
 public:
  // `prompt_ids` give the decoder its context (e.g. so SentencePiece's leading space of the
  // first generated piece is handled as in a full decode); their text is never emitted.
  StreamingDecoder(const Tokenizer* tokenizer, std::vector<int32_t> prompt_ids);
  std::string Push(int32_t id);
  std::string Flush();

 private:
  const Tokenizer* tokenizer_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // ids_[prefix_offset_, read_offset_) is context already emitted
  size_t read_offset_ = 0;
};

}  // namespace kvgate::model
