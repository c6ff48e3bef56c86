// A thin wrapper over libsentencepiece that exposes only standard types. sentencepiece's header
// declares `absl::string_view` as std::string_view, which clashes with Debian's abseil (its
// own absl::string_view class), so the library is included in sentencepiece_wrapper.cc only.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace kvgate::model::internal {

class SentencePieceWrapper {
 public:
  // Returns null and sets `*error` when the model cannot be loaded.
  static std::unique_ptr<SentencePieceWrapper> Load(const std::string& path, std::string* error);
  ~SentencePieceWrapper();

  // False (with `*error`) when sentencepiece reports an error.
  bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const;
  bool Decode(const std::vector<int>& ids, std::string* text) const;
  int GetPieceSize() const;
  // -1 when the piece is unknown.
  int PieceToId(const std::string& piece) const;
  const std::string& IdToPiece(int id) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  int bos_id() const;
  int eos_id() const;

 private:
  SentencePieceWrapper();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::model::internal
