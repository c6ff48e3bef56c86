// SentencePiece `tokenizer.model` (kvgate's own reader, sentencepiece_model.h), Llama-2 style: BOS is added by
// default; control pieces (<s>, </s>) and the unknown piece written literally in the text are
// matched as single tokens (as Hugging Face's Llama tokenizers do), the text around them is
// encoded by SentencePiece as is.
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "model/tokenizer/sentencepiece_model.h"
#include "model/tokenizer/tokenizer_base.h"
#include "model/tokenizer/utf8.h"

namespace kvgate::model::internal {
namespace {

class SentencePieceTokenizer : public TokenizerBase {
 public:
  SentencePieceTokenizer(std::unique_ptr<SentencePieceModel> sp, std::string path)
      : sp_(std::move(sp)), path_(std::move(path)), specials_(SpecialPieces(*sp_)) {
    const int32_t bos = sp_->bos_id();
    set_bos_id(bos >= 0 && bos < vocab_size() ? bos : -1);
    const int32_t eos = sp_->eos_id();
    if (eos >= 0 && eos < vocab_size()) set_eos_ids({eos});
    if (bos_id() >= 0) set_prefix_ids({bos_id()});
  }

  absl::StatusOr<std::vector<int32_t>> EncodeText(std::string_view text) const override {
    std::vector<int32_t> out;
    size_t seg_start = 0;
    for (size_t pos = 0; pos < text.size();) {
      const LiteralToken* hit = specials_.empty() ? nullptr : specials_.MatchAt(text, pos);
      if (hit == nullptr) {
        ++pos;
        continue;
      }
      if (pos > seg_start) {
        auto s = EncodeSegment(text.substr(seg_start, pos - seg_start), &out);
        if (!s.ok()) return s;
      }
      out.push_back(hit->id);
      pos += hit->text.size();
      seg_start = pos;
    }
    if (seg_start < text.size()) {
      auto s = EncodeSegment(text.substr(seg_start), &out);
      if (!s.ok()) return s;
    }
    return out;
  }

  std::string Decode(const std::vector<int32_t>& ids, bool skip_special) const override {
    std::string out;
    std::vector<int> run;
    auto flush = [&] {
      if (run.empty()) return;
      std::string text;
      if (sp_->Decode(run, &text)) {
        // SentencePiece drops the leading space of the first piece; keep it after a control
        // token that was written out.
        if (!out.empty() && !text.empty() && text[0] != ' ' &&
            sp_->IdToPiece(run[0]).rfind("\xE2\x96\x81", 0) == 0) {
          out += ' ';
        }
        out += text;
      }
      run.clear();
    };
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      if (!skip_special && sp_->IsControl(id)) {
        flush();
        out += sp_->IdToPiece(id);
        continue;
      }
      run.push_back(id);
    }
    flush();
    return out;
  }

  int32_t vocab_size() const override { return sp_->GetPieceSize(); }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    const int id = sp_->PieceToId(std::string(token));
    if (id < 0 || id >= vocab_size()) return std::nullopt;
    return id;
  }

 private:
  static LiteralMatcher SpecialPieces(const SentencePieceModel& sp) {
    std::vector<LiteralToken> tokens;
    for (int i = 0; i < sp.GetPieceSize(); ++i) {
      if ((sp.IsControl(i) || sp.IsUnknown(i)) && !sp.IdToPiece(i).empty()) {
        tokens.push_back({sp.IdToPiece(i), i});
      }
    }
    return LiteralMatcher(std::move(tokens));
  }

  absl::Status EncodeSegment(std::string_view text, std::vector<int32_t>* out) const {
    std::vector<int> ids;
    std::string error;
    if (!sp_->Encode(std::string(text), &ids, &error)) {
      return absl::InternalError(absl::StrCat(path_, ": sentencepiece failed to encode: ", error));
    }
    out->insert(out->end(), ids.begin(), ids.end());
    return absl::OkStatus();
  }

  std::unique_ptr<SentencePieceModel> sp_;
  std::string path_;
  LiteralMatcher specials_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TokenizerBase>> LoadSentencePiece(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  std::string error;
  std::unique_ptr<SentencePieceModel> sp = SentencePieceModel::Load(path, &error);
  if (sp == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a valid SentencePiece model: ", error));
  }
  if (sp->GetPieceSize() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": SentencePiece model has no pieces"));
  }
  return std::unique_ptr<TokenizerBase>(new SentencePieceTokenizer(std::move(sp), path));
}

}  // namespace kvgate::model::internal
