#include "model/tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "model/tokenizer/tokenizer_base.h"
#include "model/tokenizer/utf8.h"

namespace kvgate::model {
namespace internal {

absl::StatusOr<std::vector<int32_t>> TokenizerBase::Encode(std::string_view text,
                                                           bool add_special) const {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text to encode is not valid UTF-8");
  std::vector<int32_t> ids;
  if (add_special) ids = prefix_ids_;
  ASSIGN_OR_RETURN(std::vector<int32_t> body, EncodeText(text));
  ids.insert(ids.end(), body.begin(), body.end());
  if (add_special) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

bool TokenizerBase::adds_bos() const {
  return bos_id_ >= 0 &&
         std::find(prefix_ids_.begin(), prefix_ids_.end(), bos_id_) != prefix_ids_.end();
}

LiteralMatcher::LiteralMatcher(std::vector<LiteralToken> tokens) : tokens_(std::move(tokens)) {
  std::erase_if(tokens_, [](const LiteralToken& t) { return t.text.empty(); });
  std::stable_sort(
      tokens_.begin(), tokens_.end(), [](const LiteralToken& a, const LiteralToken& b) {
        const auto fa = static_cast<uint8_t>(a.text[0]), fb = static_cast<uint8_t>(b.text[0]);
        return fa != fb ? fa < fb : a.text.size() > b.text.size();
      });
  bucket_.assign(256, {0, 0});
  for (size_t i = 0; i < tokens_.size();) {
    const auto first = static_cast<uint8_t>(tokens_[i].text[0]);
    size_t j = i;
    while (j < tokens_.size() && static_cast<uint8_t>(tokens_[j].text[0]) == first) ++j;
    bucket_[first] = {i, j};
    i = j;
  }
}

const LiteralToken* LiteralMatcher::MatchAt(std::string_view text, size_t pos) const {
  const auto [begin, end] = bucket_[static_cast<uint8_t>(text[pos])];
  for (size_t i = begin; i < end; ++i) {
    if (text.compare(pos, tokens_[i].text.size(), tokens_[i].text) == 0) return &tokens_[i];
  }
  return nullptr;
}

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

bool IsFile(const std::string& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

// Reads an optional JSON file: nullopt when it does not exist, an error when it is malformed.
absl::StatusOr<std::optional<json>> ReadOptionalJson(const std::string& path) {
  if (!IsFile(path)) return std::optional<json>();
  ASSIGN_OR_RETURN(json j, ReadJsonFile(path));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a JSON object"));
  }
  return std::optional<json>(std::move(j));
}

// A token field of tokenizer_config.json: a string, an AddedToken object with "content", or
// null. Returns the token's id when set.
absl::StatusOr<std::optional<int32_t>> ConfigTokenId(const json& config, const char* field,
                                                     const std::string& path,
                                                     const TokenizerBase& tok) {
  auto it = config.find(field);
  if (it == config.end() || it->is_null()) return std::optional<int32_t>();
  const json* content = &*it;
  if (it->is_object()) {
    auto c = it->find("content");
    if (c == it->end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": field '", field, "' has no \"content\""));
    }
    content = &*c;
  }
  if (!content->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field '", field, "' must be a string or an object with content"));
  }
  const std::string& token = content->get_ref<const std::string&>();
  auto id = tok.TokenToId(token);
  if (!id) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", field, "': token \"", token,
                                                   "\" is not in the vocabulary"));
  }
  return std::optional<int32_t>(*id);
}

// bos_token_id / eos_token_id of config.json or generation_config.json: an int, a list of
// ints, or null.
absl::StatusOr<std::optional<std::vector<int32_t>>> ConfigIds(const json& config, const char* field,
                                                              const std::string& path) {
  auto it = config.find(field);
  if (it == config.end() || it->is_null()) return std::optional<std::vector<int32_t>>();
  std::vector<int32_t> ids;
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": field '", field, "' must be a non-negative integer or a list of them"));
  };
  if (it->is_number_integer()) {
    if (it->get<int64_t>() < 0 || it->get<int64_t>() > INT32_MAX) return bad();
    ids.push_back(static_cast<int32_t>(it->get<int64_t>()));
  } else if (it->is_array()) {
    for (const json& v : *it) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
        return bad();
      }
      ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
  } else {
    return bad();
  }
  return std::optional<std::vector<int32_t>>(std::move(ids));
}

absl::StatusOr<std::optional<bool>> ConfigBool(const json& config, const char* field,
                                               const std::string& path) {
  auto it = config.find(field);
  if (it == config.end() || it->is_null()) return std::optional<bool>();
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field '", field, "' must be a boolean"));
  }
  return std::optional<bool>(it->get<bool>());
}

absl::Status ApplyModelConfigs(const std::string& dir, TokenizerBase* tok) {
  const std::string tc_path = (fs::path(dir) / "tokenizer_config.json").string();
  const std::string gc_path = (fs::path(dir) / "generation_config.json").string();
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  ASSIGN_OR_RETURN(std::optional<json> tc, ReadOptionalJson(tc_path));
  ASSIGN_OR_RETURN(std::optional<json> gc, ReadOptionalJson(gc_path));
  ASSIGN_OR_RETURN(std::optional<json> cfg, ReadOptionalJson(cfg_path));

  std::optional<int32_t> tc_bos, tc_eos;
  std::optional<bool> add_bos, add_eos;
  if (tc) {
    ASSIGN_OR_RETURN(tc_bos, ConfigTokenId(*tc, "bos_token", tc_path, *tok));
    ASSIGN_OR_RETURN(tc_eos, ConfigTokenId(*tc, "eos_token", tc_path, *tok));
    ASSIGN_OR_RETURN(add_bos, ConfigBool(*tc, "add_bos_token", tc_path));
    ASSIGN_OR_RETURN(add_eos, ConfigBool(*tc, "add_eos_token", tc_path));
  }
  std::optional<std::vector<int32_t>> gc_bos, gc_eos, cfg_bos, cfg_eos;
  if (gc) {
    ASSIGN_OR_RETURN(gc_bos, ConfigIds(*gc, "bos_token_id", gc_path));
    ASSIGN_OR_RETURN(gc_eos, ConfigIds(*gc, "eos_token_id", gc_path));
  }
  if (cfg) {
    ASSIGN_OR_RETURN(cfg_bos, ConfigIds(*cfg, "bos_token_id", cfg_path));
    ASSIGN_OR_RETURN(cfg_eos, ConfigIds(*cfg, "eos_token_id", cfg_path));
  }

  // BOS: tokenizer_config, then generation_config, then config, then the tokenizer's own.
  const int32_t old_bos = tok->bos_id();
  if (tc_bos) {
    tok->set_bos_id(*tc_bos);
  } else if (gc_bos && !gc_bos->empty()) {
    tok->set_bos_id(gc_bos->front());
  } else if (cfg_bos && !cfg_bos->empty()) {
    tok->set_bos_id(cfg_bos->front());
  }
  // EOS: generation_config, then config, then tokenizer_config, then the tokenizer's own.
  if (gc_eos) {
    tok->set_eos_ids(*gc_eos);
  } else if (cfg_eos) {
    tok->set_eos_ids(*cfg_eos);
  } else if (tc_eos) {
    tok->set_eos_ids({*tc_eos});
  }

  // What Encode(add_special) adds: the tokenizer's post-processor, overridden by
  // add_bos_token / add_eos_token as transformers does.
  std::vector<int32_t> prefix = tok->prefix_ids();
  if (old_bos != tok->bos_id() && old_bos >= 0) {
    std::replace(prefix.begin(), prefix.end(), old_bos, tok->bos_id());
  }
  if (add_bos) {
    std::erase(prefix, tok->bos_id());
    if (*add_bos) {
      if (tok->bos_id() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(tc_path, ": field 'add_bos_token' is true but there is no BOS token"));
      }
      prefix.insert(prefix.begin(), tok->bos_id());
    }
  }
  tok->set_prefix_ids(std::move(prefix));
  if (add_eos) {
    const int32_t eos = tc_eos ? *tc_eos : tok->eos_ids().empty() ? -1 : tok->eos_ids().front();
    std::vector<int32_t> suffix = tok->suffix_ids();
    if (eos >= 0) std::erase(suffix, eos);
    if (*add_eos) {
      if (eos < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(tc_path, ": field 'add_eos_token' is true but there is no EOS token"));
      }
      suffix.push_back(eos);
    }
    tok->set_suffix_ids(std::move(suffix));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TokenizerBase>> LoadFile(const std::string& path) {
  if (absl::EndsWith(path, ".json")) return LoadHfTokenizerJson(path);
  if (absl::EndsWith(path, ".model")) return LoadSentencePiece(path);
  if (!IsFile(path)) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  // Unknown extension: JSON starts with '{' (after whitespace); a SentencePiece model is a
  // binary protobuf.
  ASSIGN_OR_RETURN(std::string head, ReadFileToString(path));
  const size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{') return LoadHfTokenizerJson(path);
  return LoadSentencePiece(path);
}

}  // namespace
}  // namespace internal

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizerFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<internal::TokenizerBase> tok, internal::LoadFile(path));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat(model_dir, ": not a directory"));
  }
  const std::string json_path = (fs::path(model_dir) / "tokenizer.json").string();
  const std::string model_path = (fs::path(model_dir) / "tokenizer.model").string();
  std::unique_ptr<internal::TokenizerBase> tok;
  if (internal::IsFile(json_path)) {
    ASSIGN_OR_RETURN(tok, internal::LoadHfTokenizerJson(json_path));
  } else if (internal::IsFile(model_path)) {
    ASSIGN_OR_RETURN(tok, internal::LoadSentencePiece(model_path));
  } else {
    return absl::NotFoundError(
        absl::StrCat(model_dir, ": no tokenizer.json or tokenizer.model in the model directory"));
  }
  RETURN_IF_ERROR(internal::ApplyModelConfigs(model_dir, tok.get()));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

// ---------------------------------------------------------------------------------------------
// StreamingDecoder: the prefix/read offset scheme of Hugging Face text-generation-inference.
// ids_[prefix_offset_, read_offset_) is the context whose text was already emitted (or belongs
// to the prompt); each step decodes ids_[prefix_offset_, end) and emits what it adds to the
// context's text once that is complete UTF-8. The window is normally one or two tokens, so a
// step costs O(1) decoding work.

namespace {

constexpr size_t kPromptContext = 6;   // prompt tokens used as context at most
constexpr size_t kMaxHeldTokens = 64;  // bound on the window while text is held back

const std::string_view kReplacement = "\xEF\xBF\xBD";

std::string DecodeRange(const Tokenizer* tok, const std::vector<int32_t>& ids, size_t begin,
                        size_t end) {
  return tok->Decode(std::vector<int32_t>(ids.begin() + begin, ids.begin() + end),
                     /*skip_special=*/true);
}

}  // namespace

StreamingDecoder::StreamingDecoder(const Tokenizer* tokenizer, std::vector<int32_t> prompt_ids)
    : tokenizer_(tokenizer), ids_(std::move(prompt_ids)) {
  read_offset_ = ids_.size();
  // Context: the last few prompt tokens, starting where the text does not begin inside a
  // character (a byte token continuing a character).
  size_t start = ids_.size() > kPromptContext ? ids_.size() - kPromptContext : 0;
  for (; start + 1 < ids_.size(); ++start) {
    const std::string text = DecodeRange(tokenizer_, ids_, start, ids_.size());
    if (!text.starts_with(kReplacement)) break;
  }
  prefix_offset_ = start;
}

std::string StreamingDecoder::Push(int32_t id) {
  ids_.push_back(id);
  const std::string prefix_text = DecodeRange(tokenizer_, ids_, prefix_offset_, read_offset_);
  const std::string new_text = DecodeRange(tokenizer_, ids_, prefix_offset_, ids_.size());
  const bool held_too_long = ids_.size() - prefix_offset_ > kMaxHeldTokens;
  if (new_text.size() > prefix_text.size() && new_text.starts_with(prefix_text) &&
      (!new_text.ends_with(kReplacement) || held_too_long)) {
    std::string out = new_text.substr(prefix_text.size());
    prefix_offset_ = read_offset_;
    read_offset_ = ids_.size();
    return out;
  }
  if (held_too_long && !new_text.starts_with(prefix_text)) {
    // Pathological: the text of the context changed. Move on rather than grow the window.
    prefix_offset_ = read_offset_;
    read_offset_ = ids_.size();
  }
  return "";
}

std::string StreamingDecoder::Flush() {
  if (read_offset_ >= ids_.size()) return "";
  const std::string prefix_text = DecodeRange(tokenizer_, ids_, prefix_offset_, read_offset_);
  const std::string new_text = DecodeRange(tokenizer_, ids_, prefix_offset_, ids_.size());
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  if (new_text.starts_with(prefix_text)) return new_text.substr(prefix_text.size());
  // The context decodes differently now; emit the part after the common prefix, cut at a
  // character boundary.
  size_t common = 0;
  while (common < prefix_text.size() && common < new_text.size() &&
         prefix_text[common] == new_text[common]) {
    ++common;
  }
  while (common > 0 && (static_cast<uint8_t>(new_text[common]) & 0xC0) == 0x80) --common;
  return new_text.substr(common);
}

}  // namespace kvgate::model
