#include "model/tokenizer/sentencepiece_model.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>

#include "model/tokenizer/utf8.h"

namespace kvgate::model::internal {
namespace {

constexpr char kSpaceSymbol[] = "\xE2\x96\x81";  // U+2581, SentencePiece's escaped space

// A minimal protobuf wire-format reader: enough for ModelProto.
class Wire {
 public:
  Wire(const char* data, size_t size)
      : p_(reinterpret_cast<const uint8_t*>(data)), end_(p_ + size) {}
  bool done() const { return p_ >= end_; }
  bool ok() const { return ok_; }

  // Reads a field key; false at the end or on malformed input.
  bool Next(uint32_t* field, uint32_t* wire_type) {
    if (done()) return false;
    uint64_t key;
    if (!Varint(&key)) return false;
    *field = static_cast<uint32_t>(key >> 3);
    *wire_type = static_cast<uint32_t>(key & 7);
    return *field != 0 || Fail();
  }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return Fail();
      const uint8_t b = *p_++;
      *v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return Fail();
  }
  bool Bytes(const char** data, size_t* size) {
    uint64_t n;
    if (!Varint(&n) || n > static_cast<uint64_t>(end_ - p_)) return Fail();
    *data = reinterpret_cast<const char*>(p_);
    *size = static_cast<size_t>(n);
    p_ += n;
    return true;
  }
  bool Fixed32(uint32_t* v) {
    if (end_ - p_ < 4) return Fail();
    std::memcpy(v, p_, 4);
    p_ += 4;
    return true;
  }
  bool Skip(uint32_t wire_type) {
    uint64_t v;
    const char* d;
    size_t n;
    uint32_t f;
    switch (wire_type) {
      case 0:
        return Varint(&v);
      case 1:
        if (end_ - p_ < 8) return Fail();
        p_ += 8;
        return true;
      case 2:
        return Bytes(&d, &n);
      case 5:
        return Fixed32(&f);
      default:
        return Fail();
    }
  }

 private:
  bool Fail() {
    ok_ = false;
    p_ = end_;
    return false;
  }
  const uint8_t* p_;
  const uint8_t* end_;
  bool ok_ = true;
};

// Length of the valid UTF-8 character at the start of `s`, 0 when it is ill-formed.
size_t CharLength(std::string_view s) {
  size_t pos = 0;
  uint32_t cp;
  return NextCodePoint(s, &pos, &cp) ? pos : 0;
}

// Appends U+FFFD for every byte of `bytes` that is not part of a valid UTF-8 character, the
// characters themselves otherwise (SentencePiece's rule for byte pieces).
void AppendBytesAsUtf8(const std::string& bytes, std::string* out) {
  size_t i = 0;
  while (i < bytes.size()) {
    const size_t len = CharLength(std::string_view(bytes).substr(i));
    if (len == 0) {
      *out += "\xEF\xBF\xBD";
      ++i;
    } else {
      out->append(bytes, i, len);
      i += len;
    }
  }
}

}  // namespace

std::unique_ptr<SentencePieceModel> SentencePieceModel::Load(const std::string& path,
                                                             std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = "cannot open the file";
    return nullptr;
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  return Parse(buf.str(), error);
}

std::unique_ptr<SentencePieceModel> SentencePieceModel::Parse(const std::string& bytes,
                                                              std::string* error) {
  std::unique_ptr<SentencePieceModel> m(new SentencePieceModel());
  int model_type = 1;  // UNIGRAM is the proto default
  std::string normalizer_name;
  bool has_charsmap = false;
  Wire w(bytes.data(), bytes.size());
  uint32_t field, wt;
  while (w.Next(&field, &wt)) {
    if (field == 1 && wt == 2) {  // SentencePiece
      const char* d;
      size_t n;
      if (!w.Bytes(&d, &n)) break;
      Piece piece;
      Wire pw(d, n);
      uint32_t f2, wt2;
      while (pw.Next(&f2, &wt2)) {
        uint64_t v;
        if (f2 == 1 && wt2 == 2) {
          const char* s;
          size_t len;
          if (pw.Bytes(&s, &len)) piece.text.assign(s, len);
        } else if (f2 == 2 && wt2 == 5) {
          uint32_t bits;
          if (pw.Fixed32(&bits)) std::memcpy(&piece.score, &bits, 4);
        } else if (f2 == 3 && wt2 == 0) {
          if (pw.Varint(&v)) piece.type = static_cast<int>(v);
        } else {
          pw.Skip(wt2);
        }
      }
      if (!pw.ok()) {
        *error = "a malformed piece";
        return nullptr;
      }
      m->pieces_.push_back(std::move(piece));
    } else if ((field == 2 || field == 3) && wt == 2) {  // TrainerSpec, NormalizerSpec
      const char* d;
      size_t n;
      if (!w.Bytes(&d, &n)) break;
      Wire sw(d, n);
      uint32_t f2, wt2;
      while (sw.Next(&f2, &wt2)) {
        uint64_t v = 0;
        if (wt2 == 0) {
          if (!sw.Varint(&v)) break;
        } else if (field == 2 && f2 == 44 && wt2 == 2) {
          const char* s;
          size_t len;
          if (sw.Bytes(&s, &len)) m->unk_surface_.assign(s, len);
          continue;
        } else if (field == 3 && f2 == 1 && wt2 == 2) {
          const char* s;
          size_t len;
          if (sw.Bytes(&s, &len)) normalizer_name.assign(s, len);
          continue;
        } else if (field == 3 && f2 == 2 && wt2 == 2) {
          const char* s;
          size_t len;
          if (sw.Bytes(&s, &len)) has_charsmap = len > 0;
          continue;
        } else {
          sw.Skip(wt2);
          continue;
        }
        const int32_t iv = static_cast<int32_t>(v);
        if (field == 2) {
          if (f2 == 3) model_type = iv;
          if (f2 == 24) m->treat_whitespace_as_suffix_ = v != 0;
          if (f2 == 35) m->byte_fallback_ = v != 0;
          if (f2 == 40) m->unk_id_ = iv;
          if (f2 == 41) m->bos_id_ = iv;
          if (f2 == 42) m->eos_id_ = iv;
        } else {
          if (f2 == 3) m->add_dummy_prefix_ = v != 0;
          if (f2 == 4) m->remove_extra_whitespaces_ = v != 0;
          if (f2 == 5) m->escape_whitespaces_ = v != 0;
        }
      }
      if (!sw.ok()) {
        *error = "a malformed trainer or normalizer spec";
        return nullptr;
      }
    } else if (!w.Skip(wt)) {
      break;
    }
  }
  if (!w.ok()) {
    *error = "not a SentencePiece model (malformed protobuf)";
    return nullptr;
  }
  if (m->pieces_.empty()) {
    *error = "the model has no pieces";
    return nullptr;
  }
  if (model_type != 2) {
    *error =
        "only BPE SentencePiece models (model_type BPE, as in Llama 2 and Mistral) are "
        "supported; this one is " +
        std::string(model_type == 1   ? "UNIGRAM"
                    : model_type == 3 ? "WORD"
                                      : "CHAR");
    return nullptr;
  }
  if (has_charsmap) {
    *error = "the normalization rule '" + normalizer_name +
             "' (a precompiled character map) is not supported; only identity normalization";
    return nullptr;
  }
  if (m->treat_whitespace_as_suffix_) {
    *error = "treat_whitespace_as_suffix models are not supported";
    return nullptr;
  }
  std::fill(std::begin(m->byte_ids_), std::end(m->byte_ids_), -1);
  for (size_t i = 0; i < m->pieces_.size(); ++i) {
    const Piece& p = m->pieces_[i];
    const int id = static_cast<int>(i);
    m->by_text_.emplace(p.text, id);
    if (p.type == kNormal || p.type == kUserDefined) m->mergeable_.emplace(p.text, id);
    if (p.type == kUserDefined) m->user_defined_.push_back(p.text);
    unsigned byte = 0;
    if (p.type == kByte && p.text.size() == 6 &&
        std::sscanf(p.text.c_str(), "<0x%02X>", &byte) == 1) {
      m->byte_ids_[byte & 0xFF] = id;
    }
  }
  std::sort(m->user_defined_.begin(), m->user_defined_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  const int n = m->GetPieceSize();
  if (m->unk_id_ < 0 || m->unk_id_ >= n) {
    *error = "the unknown piece id is out of range";
    return nullptr;
  }
  if (m->byte_fallback_) {
    for (int b = 0; b < 256; ++b) {
      if (m->byte_ids_[b] < 0) {
        *error = "byte_fallback is on but a <0x..> byte piece is missing";
        return nullptr;
      }
    }
  }
  return m;
}

int SentencePieceModel::PieceToId(const std::string& piece) const {
  auto it = by_text_.find(piece);
  return it == by_text_.end() ? -1 : it->second;
}

const std::string& SentencePieceModel::IdToPiece(int id) const {
  static const std::string kEmpty;
  return id >= 0 && id < GetPieceSize() ? pieces_[static_cast<size_t>(id)].text : kEmpty;
}

std::string SentencePieceModel::Normalize(const std::string& text) const {
  std::string out;
  if (text.empty()) return out;
  std::string_view in(text);
  if (remove_extra_whitespaces_) {
    while (!in.empty() && in.front() == ' ') in.remove_prefix(1);
    if (in.empty()) return out;
  }
  const std::string space = escape_whitespaces_ ? kSpaceSymbol : " ";
  if (add_dummy_prefix_) out += space;
  bool prev_space = remove_extra_whitespaces_;
  for (char c : in) {
    if (c == ' ') {
      if (remove_extra_whitespaces_ && prev_space) continue;
      out += space;
      prev_space = true;
    } else {
      out += c;
      prev_space = false;
    }
  }
  if (remove_extra_whitespaces_) {
    while (out.size() >= space.size() &&
           out.compare(out.size() - space.size(), space.size(), space) == 0) {
      out.resize(out.size() - space.size());
    }
  }
  return out;
}

bool SentencePieceModel::Encode(const std::string& text, std::vector<int>* ids,
                                std::string* error) const {
  ids->clear();
  const std::string norm = Normalize(text);
  if (norm.empty()) return true;
  // Symbols: user-defined pieces whole, else one UTF-8 character (an invalid byte alone).
  struct Symbol {
    int prev, next;
    size_t begin, size;  // in `norm`; size 0 once merged into its left neighbour
  };
  std::vector<Symbol> sym;
  for (size_t pos = 0; pos < norm.size();) {
    size_t len = 0;
    for (const std::string& u : user_defined_) {
      if (norm.compare(pos, u.size(), u) == 0) {
        len = u.size();
        break;
      }
    }
    if (len == 0) len = std::max<size_t>(1, CharLength(std::string_view(norm).substr(pos)));
    const int i = static_cast<int>(sym.size());
    sym.push_back({i - 1, -1, pos, len});
    if (i > 0) sym[static_cast<size_t>(i - 1)].next = i;
    pos += len;
  }
  struct Pair {
    float score;
    int left, right;
    size_t size;
  };
  // Highest score first; on ties the leftmost pair (as SentencePiece's agenda).
  auto worse = [](const Pair& a, const Pair& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
  std::string scratch;
  auto add_pair = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = sym[static_cast<size_t>(left)];
    const Symbol& r = sym[static_cast<size_t>(right)];
    scratch.assign(norm, l.begin, l.size);
    scratch.append(norm, r.begin, r.size);
    auto it = mergeable_.find(scratch);
    if (it == mergeable_.end()) return;
    agenda.push({pieces_[static_cast<size_t>(it->second)].score, left, right, scratch.size()});
  };
  for (size_t i = 1; i < sym.size(); ++i) add_pair(static_cast<int>(i - 1), static_cast<int>(i));
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = sym[static_cast<size_t>(top.left)];
    Symbol& r = sym[static_cast<size_t>(top.right)];
    // Stale: one side was merged away or grew since the pair was queued.
    if (l.size == 0 || r.size == 0 || l.size + r.size != top.size || l.next != top.right) continue;
    l.size += r.size;
    r.size = 0;
    l.next = r.next;
    if (r.next >= 0) sym[static_cast<size_t>(r.next)].prev = top.left;
    add_pair(l.prev, top.left);
    add_pair(top.left, l.next);
  }
  bool prev_unknown = false;
  for (int i = 0; i >= 0 && i < static_cast<int>(sym.size());
       i = sym[static_cast<size_t>(i)].next) {
    const Symbol& s = sym[static_cast<size_t>(i)];
    const std::string piece = norm.substr(s.begin, s.size);
    auto it = by_text_.find(piece);
    const bool known =
        it != by_text_.end() && pieces_[static_cast<size_t>(it->second)].type != kUnused;
    const bool was_unknown = prev_unknown;
    prev_unknown = !known && !byte_fallback_;
    if (known) {
      ids->push_back(it->second);
    } else if (byte_fallback_) {
      for (unsigned char b : piece) ids->push_back(byte_ids_[b]);
    } else {
      // A run of unknown symbols becomes one unknown id, as SentencePiece does.
      if (!was_unknown) ids->push_back(unk_id_);
    }
  }
  (void)error;
  return true;
}

bool SentencePieceModel::Decode(const std::vector<int>& ids, std::string* text) const {
  text->clear();
  std::string bytes;   // pending byte pieces
  bool bos_ws = true;  // a leading space may still be dropped
  auto flush_bytes = [&] {
    if (!bytes.empty()) AppendBytesAsUtf8(bytes, text);
    bytes.clear();
  };
  for (int id : ids) {
    if (id < 0 || id >= GetPieceSize()) return false;
    const Piece& p = pieces_[static_cast<size_t>(id)];
    if (p.type == kByte) {
      bos_ws = false;
      unsigned b = 0;
      if (std::sscanf(p.text.c_str(), "<0x%02X>", &b) == 1) bytes.push_back(static_cast<char>(b));
      continue;
    }
    flush_bytes();
    if (p.type == kControl) continue;
    if (p.type == kUnknown) {
      *text += unk_surface_;
      if (!unk_surface_.empty()) bos_ws = false;
      continue;
    }
    std::string_view piece(p.text);
    // SentencePiece drops the leading space of the first piece that has one; with
    // remove_extra_whitespaces it keeps dropping them until some text has come out.
    if (bos_ws && (add_dummy_prefix_ || remove_extra_whitespaces_)) {
      const bool consumed = piece.rfind(kSpaceSymbol, 0) == 0;
      if (consumed) piece.remove_prefix(3);
      if (consumed && !remove_extra_whitespaces_) bos_ws = false;
    }
    if (!piece.empty()) bos_ws = false;
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, 3, kSpaceSymbol) == 0) {
        *text += ' ';
        i += 3;
      } else {
        *text += piece[i++];
      }
    }
  }
  flush_bytes();
  return true;
}

}  // namespace kvgate::model::internal
