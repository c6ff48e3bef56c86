// Shared state of the tokenizer implementations: BOS/EOS ids and the special tokens that
// Encode(add_special=true) adds. Internal to model/tokenizer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer/tokenizer.h"

namespace kvgate::model::internal {

class TokenizerBase : public Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special) const final;
  int32_t bos_id() const final { return bos_id_; }
  const std::vector<int32_t>& eos_ids() const final { return eos_ids_; }
  bool adds_bos() const final;

  // Encodes without BOS/EOS; `text` is valid UTF-8.
  virtual absl::StatusOr<std::vector<int32_t>> EncodeText(std::string_view text) const = 0;
  // The id of a token (vocabulary or added token), if any.
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;

  void set_bos_id(int32_t id) { bos_id_ = id; }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }
  // Ids Encode(add_special=true) puts before / after the text.
  const std::vector<int32_t>& prefix_ids() const { return prefix_ids_; }
  const std::vector<int32_t>& suffix_ids() const { return suffix_ids_; }
  void set_prefix_ids(std::vector<int32_t> ids) { prefix_ids_ = std::move(ids); }
  void set_suffix_ids(std::vector<int32_t> ids) { suffix_ids_ = std::move(ids); }

 private:
  int32_t bos_id_ = -1;
  std::vector<int32_t> eos_ids_;
  std::vector<int32_t> prefix_ids_;
  std::vector<int32_t> suffix_ids_;
};

// Splits `text` at literal occurrences of special tokens (leftmost-longest). Used by the
// SentencePiece tokenizer for its control pieces.
struct LiteralToken {
  std::string text;
  int32_t id;
};
class LiteralMatcher {
 public:
  explicit LiteralMatcher(std::vector<LiteralToken> tokens);
  bool empty() const { return tokens_.empty(); }
  // Longest token matching at `pos`, or nullptr.
  const LiteralToken* MatchAt(std::string_view text, size_t pos) const;

 private:
  std::vector<LiteralToken> tokens_;               // sorted by first byte, then longest first
  std::vector<std::pair<size_t, size_t>> bucket_;  // per first byte: [begin, end) in tokens_
};

absl::StatusOr<std::unique_ptr<TokenizerBase>> LoadSentencePiece(const std::string& path);
absl::StatusOr<std::unique_ptr<TokenizerBase>> LoadHfTokenizerJson(const std::string& path);

}  // namespace kvgate::model::internal
