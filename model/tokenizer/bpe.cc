#include "model/tokenizer/bpe.h"

#include <cstdio>
#include <queue>

#include "absl/strings/str_cat.h"

namespace kvgate::model::internal {
namespace {

using nlohmann::json;

size_t CharLen(std::string_view s, size_t pos) {
  size_t next = pos + 1;
  while (next < s.size() && (static_cast<uint8_t>(s[next]) & 0xC0) == 0x80) ++next;
  return next - pos;
}

absl::Status FieldError(const std::string& path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field '", field, "' ", what));
}

absl::StatusOr<std::string> OptionalString(const json& obj, const char* key,
                                           const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::string();
  if (!it->is_string()) return FieldError(path, absl::StrCat("model.", key), "must be a string");
  return it->get<std::string>();
}

absl::StatusOr<bool> OptionalBool(const json& obj, const char* key, const std::string& path) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return false;
  if (!it->is_boolean()) return FieldError(path, absl::StrCat("model.", key), "must be a boolean");
  return it->get<bool>();
}

}  // namespace

absl::StatusOr<BpeModel> BpeModel::FromJson(const json& model, const std::string& path) {
  BpeModel bpe;
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end() || !vocab_it->is_object()) {
    return FieldError(path, "model.vocab", "is missing or not an object");
  }
  if (vocab_it->empty()) {
    // Every text would encode to nothing (or BOS alone): refused at load, not at the first
    // request.
    return FieldError(path, "model.vocab", "is empty: the tokenizer has no vocabulary");
  }
  int32_t max_id = -1;
  for (auto it = vocab_it->begin(); it != vocab_it->end(); ++it) {
    if (!it.value().is_number_integer()) {
      return FieldError(path, absl::StrCat("model.vocab[\"", it.key(), "\"]"),
                        "must be an integer id");
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > (1 << 30)) {
      return FieldError(path, absl::StrCat("model.vocab[\"", it.key(), "\"]"), "is out of range");
    }
    bpe.vocab_[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, static_cast<int32_t>(id));
  }
  bpe.id_to_token_.resize(max_id + 1);
  bpe.has_id_.assign(max_id + 1, false);
  for (const auto& [token, id] : bpe.vocab_) {
    bpe.id_to_token_[id] = token;
    bpe.has_id_[id] = true;
  }

  auto get = [&](const std::string& tok) -> std::optional<int32_t> { return bpe.TokenToId(tok); };

  auto str = OptionalString(model, "unk_token", path);
  if (!str.ok()) return str.status();
  if (!str->empty()) {
    auto id = get(*str);
    // HF tolerates an unk_token outside the vocabulary until it is needed; so do we.
    bpe.unk_id_ = id ? *id : -1;
  }
  auto prefix = OptionalString(model, "continuing_subword_prefix", path);
  if (!prefix.ok()) return prefix.status();
  bpe.continuing_subword_prefix_ = *prefix;
  auto suffix = OptionalString(model, "end_of_word_suffix", path);
  if (!suffix.ok()) return suffix.status();
  bpe.end_of_word_suffix_ = *suffix;
  for (auto [key, field] :
       {std::pair{"byte_fallback", &bpe.byte_fallback_}, std::pair{"fuse_unk", &bpe.fuse_unk_},
        std::pair{"ignore_merges", &bpe.ignore_merges_}}) {
    auto b = OptionalBool(model, key, path);
    if (!b.ok()) return b.status();
    *field = *b;
  }
  if (auto it = model.find("dropout");
      it != model.end() && it->is_number() && it->get<double>() > 0.0) {
    return absl::UnimplementedError(
        absl::StrCat(path, ": field 'model.dropout': BPE dropout is not supported"));
  }

  bpe.byte_ids_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    if (auto id = get(name)) bpe.byte_ids_[b] = *id;
  }

  auto merges_it = model.find("merges");
  if (merges_it == model.end() || merges_it->is_null()) return bpe;
  if (!merges_it->is_array()) return FieldError(path, "model.merges", "must be an array");
  const size_t prefix_len = bpe.continuing_subword_prefix_.size();
  int32_t rank = 0;
  for (const json& m : *merges_it) {
    std::string a, b;
    const std::string field = absl::StrCat("model.merges[", rank, "]");
    if (m.is_string()) {
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return FieldError(path, field, absl::StrCat("must be \"a b\" (got \"", s, "\")"));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return FieldError(path, field, "must be a string \"a b\" or a pair [a, b]");
    }
    auto ida = get(a);
    auto idb = get(b);
    std::string merged = a;
    if (prefix_len > 0 && b.compare(0, prefix_len, bpe.continuing_subword_prefix_) == 0) {
      merged += b.substr(prefix_len);
    } else {
      merged += b;
    }
    auto idm = get(merged);
    if (!ida || !idb || !idm) {
      return FieldError(path, field,
                        absl::StrCat("uses a token not in model.vocab (\"",
                                     !ida   ? a
                                     : !idb ? b
                                            : merged,
                                     "\")"));
    }
    bpe.merges_.try_emplace(PairKey(*ida, *idb), Merge{rank, *idm});
    ++rank;
  }
  return bpe;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(absl::string_view(token.data(), token.size()));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= id_limit() || !has_id_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto id = TokenToId(word)) {
      out->push_back(*id);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto push = [&](int32_t id) {
    const auto n = static_cast<int32_t>(symbols.size());
    symbols.push_back(Symbol{id, n - 1, n + 1, true});
  };
  int32_t pending_unk = -1;  // an unknown-token symbol not yet pushed (for fuse_unk)
  std::string buf;
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = CharLen(word, pos);
    const bool first = pos == 0;
    const bool last = pos + len == word.size();
    std::string_view piece = word.substr(pos, len);
    if ((!first && !continuing_subword_prefix_.empty()) || (last && !end_of_word_suffix_.empty())) {
      buf.clear();
      if (!first) buf += continuing_subword_prefix_;
      buf += piece;
      if (last) buf += end_of_word_suffix_;
      piece = buf;
    }
    pos += len;
    if (auto id = TokenToId(piece)) {
      if (pending_unk >= 0) push(pending_unk), pending_unk = -1;
      push(*id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : piece) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        if (pending_unk >= 0) push(pending_unk), pending_unk = -1;
        for (char c : piece) push(byte_ids_[static_cast<uint8_t>(c)]);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (pending_unk >= 0 && !fuse_unk_) push(pending_unk);
      pending_unk = unk_id_;
    }
    // Without an unk token the character is dropped, as Hugging Face's BPE does.
  }
  if (pending_unk >= 0) push(pending_unk);
  if (symbols.empty()) return;
  symbols.back().next = -1;

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int32_t left) {
    const int32_t right = symbols[left].next;
    if (right < 0) return;
    auto it = merges_.find(PairKey(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push(Candidate{it->second.rank, left, it->second.new_id});
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(symbols.size()); ++i) consider(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto it = merges_.find(PairKey(left.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;  // stale candidate
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
}

}  // namespace kvgate::model::internal
