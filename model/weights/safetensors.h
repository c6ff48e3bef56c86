// Safetensors checkpoints: memory-mapped single files and sharded checkpoints
// (model.safetensors.index.json). Every header is validated against the file before any
// tensor is touched: header size, JSON, dtypes, shapes and data offsets, so a truncated or
// corrupted file gives an error, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/mapped_file.h"

namespace kvgate::model {

struct TensorInfo {
  std::string name;
  std::string dtype_name;      // as written in the header, e.g. "BF16"
  std::optional<DType> dtype;  // unset for dtypes kvgate cannot compute with (e.g. I64)
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping; valid while the file is open
  size_t nbytes = 0;
  const std::string* file = nullptr;  // path of the file holding it
};

class SafetensorsFile {
 public:
  // Maps and validates `path`.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_->path(); }
  // MappedFile::DropPages over this file's mapping.
  bool DropPages(const void* p, size_t bytes) const { return file_->DropPages(p, bytes); }

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors, or shards listed by model.safetensors.index.json.
// Shards are opened lazily, on the first request for one of their tensors, so a pipeline stage
// maps only the shards holding its layers.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& model_dir);

  bool Has(const std::string& name) const;
  // The tensor, validated to have a supported dtype. NotFound names the tensor and checkpoint.
  absl::StatusOr<const TensorInfo*> Get(const std::string& name);
  // Names of all tensors of the checkpoint.
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }
  // Drops the resident pages of tensor bytes [p, p + bytes) that a backend has copied (e.g.
  // repacked) and will not read here again (MappedFile::DropPages); no effect on memory that
  // is not one of the open shards'.
  void DropPages(const void* p, size_t bytes) const;

 private:
  std::string dir_;
  std::map<std::string, std::string> weight_map_;  // tensor -> shard file name
  std::map<std::string, std::unique_ptr<SafetensorsFile>> shards_;
};

}  // namespace kvgate::model
