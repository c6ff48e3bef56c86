// kvgate's own reader of SentencePiece `tokenizer.model` files (the ModelProto wire format) and
// its BPE encoder and decoder, matching libsentencepiece on the Llama-family models (BPE, byte
// fallback, identity normalization with or without removal of extra spaces).
//
// Why not libsentencepiece: Debian's build carries its own copy of protobuf-lite with exported
// symbols, which clashes with the protobuf that gRPC needs in the same process (the server
// crashed at start-up in protobuf's static initialization).
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvgate::model::internal {

class SentencePieceModel {
 public:
  // Returns null and sets `*error` when the file cannot be read or is not a supported model.
  static std::unique_ptr<SentencePieceModel> Load(const std::string& path, std::string* error);
  // The same from the file's bytes.
  static std::unique_ptr<SentencePieceModel> Parse(const std::string& bytes, std::string* error);

  // Encodes text as SentencePiece's Encode does (normalization, BPE merges by piece score,
  // byte fallback or the unknown id). Never fails for valid models.
  bool Encode(const std::string& text, std::vector<int>* ids, std::string* error) const;
  // Decodes as SentencePiece's Decode does: control pieces vanish, byte pieces are joined into
  // UTF-8 (U+FFFD for invalid bytes), U+2581 becomes a space, the first piece's leading space
  // is dropped when the model adds a dummy prefix.
  bool Decode(const std::vector<int>& ids, std::string* text) const;
  int GetPieceSize() const { return static_cast<int>(pieces_.size()); }
  // -1 when the piece is unknown.
  int PieceToId(const std::string& piece) const;
  const std::string& IdToPiece(int id) const;
  bool IsControl(int id) const { return Type(id) == kControl; }
  bool IsUnknown(int id) const { return Type(id) == kUnknown; }
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }

 private:
  enum PieceType {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kByte = 6,
    kUnused = 5
  };
  struct Piece {
    std::string text;
    float score = 0;
    int type = kNormal;
  };
  SentencePieceModel() = default;
  int Type(int id) const {
    return id >= 0 && id < GetPieceSize() ? pieces_[static_cast<size_t>(id)].type : 0;
  }
  std::string Normalize(const std::string& text) const;

  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int> by_text_;    // every piece
  std::unordered_map<std::string, int> mergeable_;  // normal and user-defined pieces
  int byte_ids_[256];
  int unk_id_ = 0, bos_id_ = 1, eos_id_ = 2;
  bool byte_fallback_ = false;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
  bool escape_whitespaces_ = true;
  bool treat_whitespace_as_suffix_ = false;
  std::string unk_surface_ = " \xE2\x81\x87 ";  // TrainerSpec.unk_surface
  std::vector<std::string> user_defined_;       // matched whole when splitting, longest first
};

}  // namespace kvgate::model::internal
