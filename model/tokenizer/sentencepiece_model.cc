// Only standard headers and sentencepiece here: see sentencepiece_wrapper.h.
#include "model/tokenizer/sentencepiece_wrapper.h"

#include <sentencepiece_processor.h>

namespace kvgate::model::internal {

struct SentencePieceWrapper::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SentencePieceWrapper::SentencePieceWrapper() : impl_(std::make_unique<Impl>()) {}
SentencePieceWrapper::~SentencePieceWrapper() = default;

std::unique_ptr<SentencePieceWrapper> SentencePieceWrapper::Load(const std::string& path,
                                                                 std::string* error) {
  std::unique_ptr<SentencePieceWrapper> w(new SentencePieceWrapper());
  const auto status = w->impl_->sp.Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  return w;
}

bool SentencePieceWrapper::Encode(const std::string& text, std::vector<int>* ids,
                                  std::string* error) const {
  const auto status = impl_->sp.Encode(text, ids);
  if (!status.ok()) {
    *error = status.ToString();
    return false;
  }
  return true;
}

bool SentencePieceWrapper::Decode(const std::vector<int>& ids, std::string* text) const {
  return impl_->sp.Decode(ids, text).ok();
}

int SentencePieceWrapper::GetPieceSize() const { return impl_->sp.GetPieceSize(); }

int SentencePieceWrapper::PieceToId(const std::string& piece) const {
  const int id = impl_->sp.PieceToId(piece);
  // sentencepiece maps unknown pieces to the unknown id.
  if (id < 0 || (impl_->sp.IsUnknown(id) && impl_->sp.IdToPiece(id) != piece)) return -1;
  return id;
}

const std::string& SentencePieceWrapper::IdToPiece(int id) const { return impl_->sp.IdToPiece(id); }
bool SentencePieceWrapper::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SentencePieceWrapper::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
int SentencePieceWrapper::bos_id() const { return impl_->sp.bos_id(); }
int SentencePieceWrapper::eos_id() const { return impl_->sp.eos_id(); }

}  // namespace kvgate::model::internal
