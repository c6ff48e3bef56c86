// Hugging Face `tokenizer.json`: added tokens, normalizers, pre-tokenizers, the BPE model,
// post-processors and decoders, following the semantics of the `tokenizers` library.
// Supported: byte-level BPE (GPT-2, Llama 3, Qwen2) and SentencePiece-style BPE with byte
// fallback (Llama 2, Mistral). Other model types are reported as UNIMPLEMENTED.
#include <algorithm>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "common/json_util.h"
#include "common/status.h"
#include "model/tokenizer/bpe.h"
#include "model/tokenizer/regex.h"
#include "model/tokenizer/tokenizer_base.h"
#include "model/tokenizer/utf8.h"

#if KVGATE_TOKENIZER_HAVE_ICU
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#endif

namespace kvgate::model::internal {
namespace {

using nlohmann::json;

// GPT-2's pre-tokenization regex, used by the ByteLevel pre-tokenizer when use_regex is set.
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Where a JSON value sits, for error messages: "<file>: field 'a.b[2].c' ...".
struct Ctx {
  const std::string* path;
  std::string field;

  Ctx Sub(std::string_view key) const {
    return Ctx{path, field.empty() ? std::string(key) : absl::StrCat(field, ".", std::string(key))};
  }
  Ctx Index(size_t i) const { return Ctx{path, absl::StrCat(field, "[", i, "]")}; }
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(*path, ": field '", field, "' ", what));
  }
  absl::Status Unsupported(absl::string_view kind, absl::string_view type) const {
    return absl::UnimplementedError(absl::StrCat(*path, ": ", kind, " type '", type, "' (field '",
                                                 field, "') is not supported"));
  }
};

const json* Find(const json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<std::string> GetString(const json& obj, std::string_view key, const Ctx& ctx,
                                      std::optional<std::string> fallback = std::nullopt) {
  const json* v = Find(obj, key);
  if (v == nullptr) {
    if (fallback) return *fallback;
    return ctx.Sub(key).Error("is missing");
  }
  if (!v->is_string()) return ctx.Sub(key).Error("must be a string");
  return v->get<std::string>();
}

absl::StatusOr<bool> GetBool(const json& obj, std::string_view key, const Ctx& ctx, bool fallback) {
  const json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return ctx.Sub(key).Error("must be a boolean");
  return v->get<bool>();
}

absl::StatusOr<int64_t> GetInt(const json& obj, std::string_view key, const Ctx& ctx,
                               int64_t fallback) {
  const json* v = Find(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_number_integer()) return ctx.Sub(key).Error("must be an integer");
  return v->get<int64_t>();
}

absl::StatusOr<std::string> GetType(const json& obj, const Ctx& ctx) {
  if (!obj.is_object()) return ctx.Error("must be an object");
  return GetString(obj, "type", ctx);
}

// A "pattern" object: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  bool is_regex = false;
  std::string text;
};
absl::StatusOr<Pattern> GetPattern(const json& obj, const Ctx& ctx) {
  const json* p = Find(obj, "pattern");
  const Ctx pctx = ctx.Sub("pattern");
  if (p == nullptr || !p->is_object()) return pctx.Error("is missing or not an object");
  if (const json* s = Find(*p, "String"); s != nullptr && s->is_string()) {
    return Pattern{false, s->get<std::string>()};
  }
  if (const json* r = Find(*p, "Regex"); r != nullptr && r->is_string()) {
    return Pattern{true, r->get<std::string>()};
  }
  return pctx.Error("must be {\"String\": ...} or {\"Regex\": ...}");
}

absl::StatusOr<std::unique_ptr<Regex>> CompilePattern(const Pattern& p, const Ctx& ctx) {
  const std::string what = absl::StrCat(*ctx.path, ": field '", ctx.field, ".pattern'");
  return p.is_regex ? Regex::Compile(p.text, what) : Regex::Literal(p.text, what);
}

// Replaces all matches of `re` in `s` by `content`.
std::string ReplaceAll(const Regex& re, const std::string& s, const std::string& content) {
  const auto matches = re.FindAll(s);
  if (matches.empty()) return s;
  std::string out;
  size_t last = 0;
  for (const auto& [b, e] : matches) {
    out.append(s, last, b - last);
    out += content;
    last = e;
  }
  out.append(s, last, std::string::npos);
  return out;
}

// ----------------------------------------------------------------------------- normalizers

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string Apply(std::string s) const = 0;
};

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  std::string Apply(std::string s) const override {
    for (const auto& p : parts_) s = p->Apply(std::move(s));
    return s;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prepend) : prepend_(std::move(prepend)) {}
  std::string Apply(std::string s) const override { return s.empty() ? s : prepend_ + s; }

 private:
  std::string prepend_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::unique_ptr<Regex> regex, std::string content)
      : pattern_(std::move(pattern)), regex_(std::move(regex)), content_(std::move(content)) {}
  std::string Apply(std::string s) const override {
    if (!pattern_.is_regex) {
      return pattern_.text.empty() ? s : absl::StrReplaceAll(s, {{pattern_.text, content_}});
    }
    return ReplaceAll(*regex_, s, content_);
  }

 private:
  Pattern pattern_;
  std::unique_ptr<Regex> regex_;
  std::string content_;
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  std::string Apply(std::string s) const override {
    size_t begin = 0, end = s.size();
    uint32_t cp;
    if (left_) {
      for (size_t pos = 0; pos < s.size();) {
        size_t next = pos;
        NextCodePoint(s, &next, &cp);
        if (!IsUnicodeWhitespace(cp)) break;
        begin = pos = next;
      }
    }
    if (right_) {
      // Walk forward remembering where the trailing whitespace run starts.
      size_t run_start = s.size();
      for (size_t pos = begin; pos < s.size();) {
        size_t next = pos;
        NextCodePoint(s, &next, &cp);
        if (IsUnicodeWhitespace(cp)) {
          if (run_start == s.size()) run_start = pos;
        } else {
          run_start = s.size();
        }
        pos = next;
      }
      end = run_start;
    }
    return s.substr(begin, end - begin);
  }

 private:
  bool left_, right_;
};

class ByteLevelNormalizer : public Normalizer {
 public:
  std::string Apply(std::string s) const override {
    std::string out;
    out.reserve(s.size() * 2);
    for (char c : s) out += ByteToUnicode(static_cast<uint8_t>(c));
    return out;
  }
};

// Unicode normalization forms. Without ICU they are identity (a documented gap).
class UnicodeNormalizer : public Normalizer {
 public:
  explicit UnicodeNormalizer(std::string form) : form_(std::move(form)) {}
  std::string Apply(std::string s) const override {
#if KVGATE_TOKENIZER_HAVE_ICU
    bool ascii = true;
    for (char c : s) ascii = ascii && static_cast<uint8_t>(c) < 0x80;
    if (ascii) return s;
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* n = form_ == "NFC"    ? icu::Normalizer2::getNFCInstance(status)
                                : form_ == "NFD"  ? icu::Normalizer2::getNFDInstance(status)
                                : form_ == "NFKC" ? icu::Normalizer2::getNFKCInstance(status)
                                                  : icu::Normalizer2::getNFKDInstance(status);
    if (U_FAILURE(status) || n == nullptr) return s;
    icu::UnicodeString normalized = n->normalize(icu::UnicodeString::fromUTF8(s), status);
    if (U_FAILURE(status)) return s;
    std::string out;
    normalized.toUTF8String(out);
    return out;
#else
    return s;
#endif
  }

 private:
  std::string form_;
};

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& j, const Ctx& ctx) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, ctx));
  if (type == "Sequence") {
    const json* list = Find(j, "normalizers");
    if (list == nullptr || !list->is_array()) {
      return ctx.Sub("normalizers").Error("is missing or not an array");
    }
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t i = 0; i < list->size(); ++i) {
      ASSIGN_OR_RETURN(auto part, ParseNormalizer((*list)[i], ctx.Sub("normalizers").Index(i)));
      parts.push_back(std::move(part));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(parts)));
  }
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prepend, GetString(j, "prepend", ctx));
    return std::unique_ptr<Normalizer>(new PrependNormalizer(std::move(prepend)));
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(Pattern pattern, GetPattern(j, ctx));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", ctx));
    std::unique_ptr<Regex> regex;
    if (pattern.is_regex) {
      ASSIGN_OR_RETURN(regex, CompilePattern(pattern, ctx));
    }
    return std::unique_ptr<Normalizer>(
        new ReplaceNormalizer(std::move(pattern), std::move(regex), std::move(content)));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(bool left, GetBool(j, "strip_left", ctx, true));
    ASSIGN_OR_RETURN(bool right, GetBool(j, "strip_right", ctx, true));
    return std::unique_ptr<Normalizer>(new StripNormalizer(left, right));
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    return std::unique_ptr<Normalizer>(new UnicodeNormalizer(type));
  }
  if (type == "ByteLevel") return std::unique_ptr<Normalizer>(new ByteLevelNormalizer());
  return ctx.Sub("type").Unsupported("normalizer", type);
}

// -------------------------------------------------------------------------- pre-tokenizers

struct Piece {
  std::string text;
  bool at_start;  // begins at offset 0 of the original text (Metaspace's prepend_scheme "first")
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void Apply(std::vector<Piece>* pieces) const = 0;
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void Apply(std::vector<Piece>* pieces) const override {
    for (const auto& p : parts_) p->Apply(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits `s` at the matches of `re` the way tokenizers' NormalizedString::split does.
void SplitPiece(const Piece& piece, const Regex& re, SplitBehavior behavior, bool invert,
                std::vector<Piece>* out) {
  const std::string& s = piece.text;
  struct Span {
    size_t begin, end;
    bool is_match;
  };
  std::vector<Span> spans;
  size_t last = 0;
  for (const auto& [b, e] : re.FindAll(s)) {
    if (b > last) spans.push_back({last, b, false});
    spans.push_back({b, e, true});
    last = e;
  }
  if (last < s.size()) spans.push_back({last, s.size(), false});
  if (invert) {
    for (auto& sp : spans) sp.is_match = !sp.is_match;
  }
  std::vector<Span> merged;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      merged = spans;
      break;
    case SplitBehavior::kRemoved:
      for (const auto& sp : spans) {
        if (!sp.is_match) merged.push_back(sp);
      }
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& sp : spans) {
        if (sp.is_match && !previous_match && !merged.empty()) {
          merged.back().end = sp.end;
        } else {
          merged.push_back(sp);
        }
        previous_match = sp.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !merged.empty()) {
          merged.back().begin = it->begin;
        } else {
          merged.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(merged.begin(), merged.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const auto& sp : spans) {
        if (sp.is_match && previous_match && !merged.empty()) {
          merged.back().end = sp.end;
        } else {
          merged.push_back(sp);
        }
        previous_match = sp.is_match;
      }
      break;
    }
  }
  for (const auto& sp : merged) {
    if (sp.end > sp.begin) {
      out->push_back(Piece{s.substr(sp.begin, sp.end - sp.begin), piece.at_start && sp.begin == 0});
    }
  }
}

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Regex> re, SplitBehavior behavior, bool invert)
      : re_(std::move(re)), behavior_(behavior), invert_(invert) {}
  void Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (const Piece& p : *pieces) SplitPiece(p, *re_, behavior_, invert_, &out);
    *pieces = std::move(out);
  }

 private:
  std::unique_ptr<Regex> re_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> re)
      : add_prefix_space_(add_prefix_space), re_(std::move(re)) {}
  void Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> split;
    for (Piece p : *pieces) {
      if (p.text.empty()) continue;
      if (add_prefix_space_ && p.text[0] != ' ') p.text.insert(0, " ");
      if (re_) {
        SplitPiece(p, *re_, SplitBehavior::kIsolated, false, &split);
      } else {
        split.push_back(std::move(p));
      }
    }
    for (Piece& p : split) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (char c : p.text) mapped += ByteToUnicode(static_cast<uint8_t>(c));
      p.text = std::move(mapped);
    }
    *pieces = std::move(split);
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> re_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split,
                        std::unique_ptr<Regex> re)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split), re_(std::move(re)) {}
  void Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (Piece p : *pieces) {
      p.text = absl::StrReplaceAll(p.text, {{" ", replacement_}});
      const bool prepend =
          scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_start);
      if (prepend && p.text.rfind(replacement_, 0) != 0) p.text.insert(0, replacement_);
      if (split_) {
        SplitPiece(p, *re_, SplitBehavior::kMergedWithNext, false, &out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
    }
    *pieces = std::move(out);
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
  std::unique_ptr<Regex> re_;  // matches the replacement
};

absl::StatusOr<PrependScheme> GetPrependScheme(const json& j, const Ctx& ctx) {
  if (const json* s = Find(j, "prepend_scheme"); s != nullptr) {
    if (!s->is_string()) return ctx.Sub("prepend_scheme").Error("must be a string");
    const std::string v = s->get<std::string>();
    if (v == "always") return PrependScheme::kAlways;
    if (v == "first") return PrependScheme::kFirst;
    if (v == "never") return PrependScheme::kNever;
    return ctx.Sub("prepend_scheme").Error(absl::StrCat("has unknown value \"", v, "\""));
  }
  ASSIGN_OR_RETURN(bool add_prefix_space, GetBool(j, "add_prefix_space", ctx, true));
  return add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& j, const Ctx& ctx) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, ctx));
  const std::string what = absl::StrCat(*ctx.path, ": field '", ctx.field, "'");
  if (type == "Sequence") {
    const json* list = Find(j, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return ctx.Sub("pretokenizers").Error("is missing or not an array");
    }
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (size_t i = 0; i < list->size(); ++i) {
      ASSIGN_OR_RETURN(auto part, ParsePreTokenizer((*list)[i], ctx.Sub("pretokenizers").Index(i)));
      parts.push_back(std::move(part));
    }
    return std::unique_ptr<PreTokenizer>(new SequencePreTokenizer(std::move(parts)));
  }
  if (type == "Split") {
    ASSIGN_OR_RETURN(Pattern pattern, GetPattern(j, ctx));
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, CompilePattern(pattern, ctx));
    ASSIGN_OR_RETURN(std::string behavior_name, GetString(j, "behavior", ctx, "Isolated"));
    SplitBehavior behavior;
    if (behavior_name == "Removed") {
      behavior = SplitBehavior::kRemoved;
    } else if (behavior_name == "Isolated") {
      behavior = SplitBehavior::kIsolated;
    } else if (behavior_name == "MergedWithPrevious") {
      behavior = SplitBehavior::kMergedWithPrevious;
    } else if (behavior_name == "MergedWithNext") {
      behavior = SplitBehavior::kMergedWithNext;
    } else if (behavior_name == "Contiguous") {
      behavior = SplitBehavior::kContiguous;
    } else {
      return ctx.Sub("behavior").Error(absl::StrCat("has unknown value \"", behavior_name, "\""));
    }
    ASSIGN_OR_RETURN(bool invert, GetBool(j, "invert", ctx, false));
    return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(std::move(re), behavior, invert));
  }
  if (type == "ByteLevel") {
    ASSIGN_OR_RETURN(bool add_prefix_space, GetBool(j, "add_prefix_space", ctx, true));
    ASSIGN_OR_RETURN(bool use_regex, GetBool(j, "use_regex", ctx, true));
    std::unique_ptr<Regex> re;
    if (use_regex) {
      ASSIGN_OR_RETURN(re, Regex::Compile(kGpt2Regex, what));
    }
    return std::unique_ptr<PreTokenizer>(
        new ByteLevelPreTokenizer(add_prefix_space, std::move(re)));
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string replacement, GetString(j, "replacement", ctx, "\xE2\x96\x81"));
    if (replacement.empty()) return ctx.Sub("replacement").Error("must not be empty");
    ASSIGN_OR_RETURN(PrependScheme scheme, GetPrependScheme(j, ctx));
    ASSIGN_OR_RETURN(bool split, GetBool(j, "split", ctx, true));
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, Regex::Literal(replacement, what));
    return std::unique_ptr<PreTokenizer>(
        new MetaspacePreTokenizer(std::move(replacement), scheme, split, std::move(re)));
  }
  if (type == "Digits") {
    ASSIGN_OR_RETURN(bool individual, GetBool(j, "individual_digits", ctx, false));
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> re,
                     Regex::Compile(individual ? R"(\p{N})" : R"(\p{N}+)", what));
    return std::unique_ptr<PreTokenizer>(
        new SplitPreTokenizer(std::move(re), SplitBehavior::kIsolated, false));
  }
  if (type == "Whitespace") {
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, Regex::Compile(R"(\w+|[^\w\s]+)", what));
    return std::unique_ptr<PreTokenizer>(
        new SplitPreTokenizer(std::move(re), SplitBehavior::kRemoved, /*invert=*/true));
  }
  if (type == "WhitespaceSplit") {
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, Regex::Compile(R"(\s+)", what));
    return std::unique_ptr<PreTokenizer>(
        new SplitPreTokenizer(std::move(re), SplitBehavior::kRemoved, false));
  }
  return ctx.Sub("type").Unsupported("pre_tokenizer", type);
}

// -------------------------------------------------------------------------------- decoders

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void Apply(std::vector<std::string>* tokens) const = 0;
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (const auto& p : parts_) p->Apply(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// Maps the byte-level alphabet back to bytes; tokens with other characters (added tokens) are
// taken as they are. The result is one string, ill-formed UTF-8 replaced by U+FFFD.
class ByteLevelDecoder : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    std::string bytes;
    std::string token_bytes;
    for (const std::string& t : *tokens) {
      token_bytes.clear();
      bool all_mapped = true;
      uint32_t cp;
      for (size_t pos = 0; pos < t.size();) {
        const int b = NextCodePoint(t, &pos, &cp) ? UnicodeToByte(cp) : -1;
        if (b < 0) {
          all_mapped = false;
          break;
        }
        token_bytes.push_back(static_cast<char>(b));
      }
      bytes += all_mapped ? token_bytes : t;
    }
    tokens->assign(1, Utf8Lossy(bytes));
  }
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::unique_ptr<Regex> regex, std::string content)
      : pattern_(std::move(pattern)), regex_(std::move(regex)), content_(std::move(content)) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) {
      if (!pattern_.is_regex) {
        if (!pattern_.text.empty()) t = absl::StrReplaceAll(t, {{pattern_.text, content_}});
      } else {
        t = ReplaceAll(*regex_, t, content_);
      }
    }
  }

 private:
  Pattern pattern_;
  std::unique_ptr<Regex> regex_;
  std::string content_;
};

// Runs of <0xXX> tokens become their bytes when those are valid UTF-8, else one U+FFFD per
// byte.
class ByteFallbackDecoder : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string run;
    size_t run_len = 0;
    auto flush = [&] {
      if (run_len == 0) return;
      if (IsValidUtf8(run)) {
        out.push_back(run);
      } else {
        for (size_t i = 0; i < run_len; ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      run.clear();
      run_len = 0;
    };
    for (std::string& t : *tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') byte = HexByte(t[3], t[4]);
      if (byte >= 0) {
        run.push_back(static_cast<char>(byte));
        ++run_len;
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    *tokens = std::move(out);
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  static int HexByte(char hi, char lo) {
    const int h = HexDigit(hi), l = HexDigit(lo);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }
};

class FuseDecoder : public Decoder {
 public:
  void Apply(std::vector<std::string>* tokens) const override {
    tokens->assign(1, absl::StrJoin(*tokens, ""));
  }
};

// Strips up to `start` leading and `stop` trailing copies of `content` from every token.
class StripDecoder : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void Apply(std::vector<std::string>* tokens) const override {
    if (content_.empty()) return;
    for (std::string& t : *tokens) {
      size_t begin = 0, end = t.size();
      for (size_t i = 0; i < start_ && t.compare(begin, content_.size(), content_) == 0 &&
                         begin + content_.size() <= end;
           ++i) {
        begin += content_.size();
      }
      for (size_t i = 0; i < stop_ && end >= begin + content_.size() &&
                         t.compare(end - content_.size(), content_.size(), content_) == 0;
           ++i) {
        end -= content_.size();
      }
      t = t.substr(begin, end - begin);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

// Replacement characters become spaces; in the first token they are dropped (unless the
// prepend scheme is "never").
class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  void Apply(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
      (*tokens)[i] = absl::StrReplaceAll((*tokens)[i], {{replacement_, drop ? "" : " "}});
    }
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& j, const Ctx& ctx) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, ctx));
  if (type == "Sequence") {
    const json* list = Find(j, "decoders");
    if (list == nullptr || !list->is_array()) {
      return ctx.Sub("decoders").Error("is missing or not an array");
    }
    std::vector<std::unique_ptr<Decoder>> parts;
    for (size_t i = 0; i < list->size(); ++i) {
      ASSIGN_OR_RETURN(auto part, ParseDecoder((*list)[i], ctx.Sub("decoders").Index(i)));
      parts.push_back(std::move(part));
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(parts)));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Replace") {
    ASSIGN_OR_RETURN(Pattern pattern, GetPattern(j, ctx));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", ctx));
    std::unique_ptr<Regex> regex;
    if (pattern.is_regex) {
      ASSIGN_OR_RETURN(regex, CompilePattern(pattern, ctx));
    }
    return std::unique_ptr<Decoder>(
        new ReplaceDecoder(std::move(pattern), std::move(regex), std::move(content)));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", ctx, " "));
    ASSIGN_OR_RETURN(int64_t start, GetInt(j, "start", ctx, 0));
    ASSIGN_OR_RETURN(int64_t stop, GetInt(j, "stop", ctx, 0));
    if (start < 0 || stop < 0) return ctx.Error("start/stop must not be negative");
    return std::unique_ptr<Decoder>(new StripDecoder(std::move(content), start, stop));
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string replacement, GetString(j, "replacement", ctx, "\xE2\x96\x81"));
    ASSIGN_OR_RETURN(PrependScheme scheme, GetPrependScheme(j, ctx));
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(std::move(replacement), scheme));
  }
  return ctx.Sub("type").Unsupported("decoder", type);
}

// --------------------------------------------------------------------------- post-processor

struct SpecialWrapping {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
};

absl::Status ParsePostProcessor(const json& j, const Ctx& ctx, SpecialWrapping* wrap) {
  ASSIGN_OR_RETURN(std::string type, GetType(j, ctx));
  if (type == "ByteLevel") return absl::OkStatus();  // only adjusts offsets
  if (type == "Sequence") {
    const json* list = Find(j, "processors");
    if (list == nullptr || !list->is_array()) {
      return ctx.Sub("processors").Error("is missing or not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      RETURN_IF_ERROR(ParsePostProcessor((*list)[i], ctx.Sub("processors").Index(i), wrap));
    }
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    const json* single = Find(j, "single");
    const Ctx sctx = ctx.Sub("single");
    if (single == nullptr || !single->is_array()) return sctx.Error("is missing or not an array");
    const json* specials = Find(j, "special_tokens");
    bool seen_sequence = false;
    for (size_t i = 0; i < single->size(); ++i) {
      const json& item = (*single)[i];
      const Ctx ictx = sctx.Index(i);
      if (Find(item, "Sequence") != nullptr) {
        seen_sequence = true;
        continue;
      }
      const json* st = Find(item, "SpecialToken");
      if (st == nullptr)
        return ictx.Error("must be {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      ASSIGN_OR_RETURN(std::string name, GetString(*st, "id", ictx.Sub("SpecialToken")));
      const json* entry = specials == nullptr ? nullptr : Find(*specials, name);
      const Ctx ectx = ctx.Sub("special_tokens").Sub(name);
      if (entry == nullptr) return ectx.Error("is missing");
      const json* ids = Find(*entry, "ids");
      if (ids == nullptr || !ids->is_array()) return ectx.Sub("ids").Error("is missing");
      for (const json& id : *ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0) {
          return ectx.Sub("ids").Error("must hold non-negative integers");
        }
        (seen_sequence ? wrap->suffix : wrap->prefix)
            .push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
    }
    return absl::OkStatus();
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    auto token_id = [&](const char* key) -> absl::StatusOr<int32_t> {
      const json* v = Find(j, key);
      if (v == nullptr || !v->is_array() || v->size() != 2 || !(*v)[1].is_number_integer()) {
        return ctx.Sub(key).Error("must be [token, id]");
      }
      return static_cast<int32_t>((*v)[1].get<int64_t>());
    };
    ASSIGN_OR_RETURN(int32_t cls, token_id("cls"));
    ASSIGN_OR_RETURN(int32_t sep, token_id("sep"));
    wrap->prefix.push_back(cls);
    wrap->suffix.push_back(sep);
    return absl::OkStatus();
  }
  return ctx.Sub("type").Unsupported("post_processor", type);
}

// ----------------------------------------------------------------------------- the tokenizer

struct AddedToken {
  int32_t id;
  std::string content;
  bool special, lstrip, rstrip, single_word, normalized;
};

bool IsWordChar(uint32_t cp) {
  if (cp < 0x80) {
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
           cp == '_';
  }
  return !IsUnicodeWhitespace(cp);  // approximation of Unicode alphanumerics
}

class HfTokenizer : public TokenizerBase {
 public:
  absl::StatusOr<std::vector<int32_t>> EncodeText(std::string_view text) const override {
    std::vector<int32_t> out;
    // 1. Added tokens that are matched on the raw text.
    std::vector<Segment> raw;
    SplitAdded(std::string(text), raw_matcher_, /*at_start=*/true, &raw);
    for (Segment& seg : raw) {
      if (seg.id >= 0) {
        out.push_back(seg.id);
        continue;
      }
      // 2. Normalize, then split the added tokens that are matched on normalized text.
      std::string normalized = normalizer_ ? normalizer_->Apply(std::move(seg.text)) : seg.text;
      std::vector<Segment> segs;
      SplitAdded(std::move(normalized), normalized_matcher_, seg.at_start, &segs);
      for (Segment& s : segs) {
        if (s.id >= 0) {
          out.push_back(s.id);
          continue;
        }
        // 3. Pre-tokenize and run the model on every piece.
        std::vector<Piece> pieces;
        pieces.push_back(Piece{std::move(s.text), s.at_start});
        if (pre_tokenizer_) pre_tokenizer_->Apply(&pieces);
        for (const Piece& p : pieces) bpe_.Tokenize(p.text, &out);
      }
    }
    return out;
  }

  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
        const AddedToken& t = added_[it->second];
        if (skip_special && t.special) continue;
        tokens.push_back(t.content);
      } else if (const std::string* t = bpe_.IdToToken(id)) {
        tokens.push_back(*t);
      }
    }
    if (!decoder_) return absl::StrJoin(tokens, " ");
    decoder_->Apply(&tokens);
    return absl::StrJoin(tokens, "");
  }

  int32_t vocab_size() const override { return vocab_size_; }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (auto it = added_by_content_.find(absl::string_view(token.data(), token.size()));
        it != added_by_content_.end()) {
      return it->second;
    }
    return bpe_.TokenToId(token);
  }

  static absl::StatusOr<std::unique_ptr<HfTokenizer>> FromJson(const json& j,
                                                               const std::string& path);

 private:
  struct Segment {
    std::string text;
    int32_t id;  // the added token, or -1 for text
    bool at_start;
  };

  void SplitAdded(std::string text, const LiteralMatcher& matcher, bool at_start,
                  std::vector<Segment>* out) const {
    if (matcher.empty() || text.empty()) {
      if (!text.empty()) out->push_back(Segment{std::move(text), -1, at_start});
      return;
    }
    size_t start_offset = 0;
    uint32_t cp;
    for (size_t pos = 0; pos < text.size();) {
      const LiteralToken* hit = matcher.MatchAt(text, pos);
      if (hit == nullptr) {
        NextCodePoint(text, &pos, &cp);
        continue;
      }
      const AddedToken& tok = added_[added_by_id_.at(hit->id)];
      size_t start = pos, stop = pos + hit->text.size();
      pos = stop;
      if (tok.single_word) {
        bool start_ok = true, stop_ok = true;
        if (start > 0) {
          size_t b = start - 1;
          while (b > 0 && (static_cast<uint8_t>(text[b]) & 0xC0) == 0x80) --b;
          size_t p = b;
          start_ok = !(NextCodePoint(text, &p, &cp) && IsWordChar(cp));
        }
        if (stop < text.size()) {
          size_t p = stop;
          stop_ok = !(NextCodePoint(text, &p, &cp) && IsWordChar(cp));
        }
        if (!start_ok || !stop_ok) continue;
      }
      if (tok.lstrip) {
        size_t s = start;
        while (s > start_offset) {
          size_t b = s - 1;
          while (b > start_offset && (static_cast<uint8_t>(text[b]) & 0xC0) == 0x80) --b;
          size_t p = b;
          if (!(NextCodePoint(text, &p, &cp) && IsUnicodeWhitespace(cp))) break;
          s = b;
        }
        start = s;
      }
      if (tok.rstrip) {
        while (stop < text.size()) {
          size_t p = stop;
          if (!(NextCodePoint(text, &p, &cp) && IsUnicodeWhitespace(cp))) break;
          stop = p;
        }
        pos = stop;
      }
      if (start > start_offset) {
        out->push_back(Segment{text.substr(start_offset, start - start_offset), -1,
                               at_start && start_offset == 0});
      }
      out->push_back(Segment{std::string(), hit->id, false});
      start_offset = stop;
    }
    if (start_offset < text.size()) {
      out->push_back(Segment{text.substr(start_offset), -1, at_start && start_offset == 0});
    }
  }

  internal::BpeModel bpe_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;
  absl::flat_hash_map<std::string, int32_t> added_by_content_;
  LiteralMatcher raw_matcher_{{}};
  LiteralMatcher normalized_matcher_{{}};
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  int32_t vocab_size_ = 0;
};

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::FromJson(const json& j,
                                                                   const std::string& path) {
  const Ctx root{&path, ""};
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON object"));
  auto tok = std::make_unique<HfTokenizer>();

  // Model.
  const json* model = Find(j, "model");
  if (model == nullptr || !model->is_object())
    return root.Sub("model").Error("is missing or not an object");
  std::string model_type;
  if (Find(*model, "type") != nullptr) {
    ASSIGN_OR_RETURN(model_type, GetString(*model, "type", root.Sub("model")));
  } else if (Find(*model, "merges") != nullptr) {
    model_type = "BPE";  // old files omit the type of BPE models
  } else {
    return root.Sub("model.type").Error("is missing");
  }
  if (model_type != "BPE") {
    return absl::UnimplementedError(absl::StrCat(path, ": model type '", model_type,
                                                 "' (field 'model.type') is not supported; only "
                                                 "BPE tokenizer.json files are"));
  }
  ASSIGN_OR_RETURN(tok->bpe_, BpeModel::FromJson(*model, path));

  // Pipeline stages; null or absent means none.
  if (const json* n = Find(j, "normalizer")) {
    ASSIGN_OR_RETURN(tok->normalizer_, ParseNormalizer(*n, root.Sub("normalizer")));
  }
  if (const json* p = Find(j, "pre_tokenizer")) {
    ASSIGN_OR_RETURN(tok->pre_tokenizer_, ParsePreTokenizer(*p, root.Sub("pre_tokenizer")));
  }
  if (const json* d = Find(j, "decoder")) {
    ASSIGN_OR_RETURN(tok->decoder_, ParseDecoder(*d, root.Sub("decoder")));
  }
  SpecialWrapping wrap;
  if (const json* pp = Find(j, "post_processor")) {
    RETURN_IF_ERROR(ParsePostProcessor(*pp, root.Sub("post_processor"), &wrap));
  }

  // Added tokens.
  int32_t max_id = tok->bpe_.id_limit() - 1;
  if (const json* added = Find(j, "added_tokens")) {
    if (!added->is_array()) return root.Sub("added_tokens").Error("must be an array");
    for (size_t i = 0; i < added->size(); ++i) {
      const json& a = (*added)[i];
      const Ctx actx = root.Sub("added_tokens").Index(i);
      if (!a.is_object()) return actx.Error("must be an object");
      AddedToken t;
      ASSIGN_OR_RETURN(int64_t id, GetInt(a, "id", actx, -1));
      if (id < 0 || id > (1 << 30)) return actx.Sub("id").Error("is missing or out of range");
      t.id = static_cast<int32_t>(id);
      ASSIGN_OR_RETURN(t.content, GetString(a, "content", actx));
      ASSIGN_OR_RETURN(t.special, GetBool(a, "special", actx, false));
      ASSIGN_OR_RETURN(t.lstrip, GetBool(a, "lstrip", actx, false));
      ASSIGN_OR_RETURN(t.rstrip, GetBool(a, "rstrip", actx, false));
      ASSIGN_OR_RETURN(t.single_word, GetBool(a, "single_word", actx, false));
      ASSIGN_OR_RETURN(t.normalized, GetBool(a, "normalized", actx, !t.special));
      if (t.content.empty()) return actx.Sub("content").Error("must not be empty");
      max_id = std::max(max_id, t.id);
      tok->added_by_id_[t.id] = tok->added_.size();
      tok->added_by_content_[t.content] = t.id;
      tok->added_.push_back(std::move(t));
    }
  }
  std::vector<LiteralToken> raw, normalized;
  for (const AddedToken& t : tok->added_) {
    if (t.normalized && tok->normalizer_) {
      normalized.push_back({tok->normalizer_->Apply(t.content), t.id});
    } else {
      (t.normalized ? normalized : raw).push_back({t.content, t.id});
    }
  }
  tok->raw_matcher_ = LiteralMatcher(std::move(raw));
  tok->normalized_matcher_ = LiteralMatcher(std::move(normalized));
  tok->vocab_size_ = max_id + 1;

  for (int32_t id : wrap.prefix) {
    if (id >= tok->vocab_size_)
      return root.Sub("post_processor").Error("uses an id outside the vocabulary");
  }
  for (int32_t id : wrap.suffix) {
    if (id >= tok->vocab_size_)
      return root.Sub("post_processor").Error("uses an id outside the vocabulary");
  }

  // BOS/EOS of a lone tokenizer.json: the post-processor's leading special token, else
  // well-known names. LoadTokenizer() overrides them from the model's config files.
  auto first_known = [&](std::initializer_list<const char*> names) -> int32_t {
    for (const char* n : names) {
      if (auto id = tok->TokenToId(n)) return *id;
    }
    return -1;
  };
  int32_t bos = wrap.prefix.empty() ? -1 : wrap.prefix.front();
  if (bos < 0) bos = first_known({"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"});
  int32_t eos = first_known({"</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"});
  if (eos < 0 && !wrap.suffix.empty()) eos = wrap.suffix.back();
  tok->set_bos_id(bos);
  if (eos >= 0) tok->set_eos_ids({eos});
  tok->set_prefix_ids(std::move(wrap.prefix));
  tok->set_suffix_ids(std::move(wrap.suffix));
  return tok;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TokenizerBase>> LoadHfTokenizerJson(const std::string& path) {
  ASSIGN_OR_RETURN(json j, ReadJsonFile(path));
  try {
    ASSIGN_OR_RETURN(std::unique_ptr<HfTokenizer> tok, HfTokenizer::FromJson(j, path));
    return std::unique_ptr<TokenizerBase>(std::move(tok));
  } catch (const std::exception& e) {
    // Backstop: a JSON shape the parser did not anticipate.
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed tokenizer.json: ", e.what()));
  }
}

}  // namespace kvgate::model::internal
