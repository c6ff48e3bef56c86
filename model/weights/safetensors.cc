#include "model/weights/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/json_util.h"
#include "common/status.h"

namespace kvgate::model {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // as the reference implementation

absl::Status Corrupt(const std::string& path, absl::string_view what) {
  return absl::DataLossError(absl::StrCat(path, ": corrupt safetensors file: ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto f = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  ASSIGN_OR_RETURN(f->file_, MappedFile::Open(path));
  const uint8_t* base = f->file_->data();
  const size_t size = f->file_->size();
  if (size < 8) return Corrupt(path, "the file is too short for a header");
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian u64
  if (header_len < 2 || header_len > kMaxHeaderBytes || header_len > size - 8) {
    // Neither the value (the file's first 8 bytes) nor the size: an error must not leak a
    // file's contents to whoever named it.
    return Corrupt(path, "the header length (its first 8 bytes) does not fit the file");
  }
  const std::string_view header(reinterpret_cast<const char*>(base + 8), header_len);
  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Corrupt(path, "header is not a JSON object");
  const uint8_t* data_start = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    if (name == "__metadata__") {
      if (!e.is_object()) return Corrupt(path, "__metadata__ is not an object");
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m.value().is_string()) return Corrupt(path, "__metadata__ values must be strings");
        f->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!e.is_object()) return Corrupt(path, absl::StrCat("entry '", name, "' is not an object"));
    auto dt = e.find("dtype");
    auto sh = e.find("shape");
    auto off = e.find("data_offsets");
    if (dt == e.end() || !dt->is_string()) {
      return Corrupt(path, absl::StrCat("tensor '", name, "' has no dtype"));
    }
    if (sh == e.end() || !sh->is_array()) {
      return Corrupt(path, absl::StrCat("tensor '", name, "' has no shape"));
    }
    if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned()) {
      return Corrupt(path, absl::StrCat("tensor '", name, "' has no valid data_offsets"));
    }
    TensorInfo t;
    t.name = name;
    t.dtype_name = dt->get<std::string>();
    auto parsed = ParseSafetensorsDType(t.dtype_name);
    if (parsed.ok()) t.dtype = *parsed;
    size_t elem_bytes = 0;
    if (t.dtype) {
      elem_bytes = DTypeSize(*t.dtype);
    } else {
      static const std::map<std::string, size_t> kOther = {
          {"F64", 8}, {"I64", 8}, {"U64", 8}, {"I32", 4},  {"U32", 4},     {"I16", 2},
          {"U16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
      auto o = kOther.find(t.dtype_name);
      if (o == kOther.end()) {
        return Corrupt(path,
                       absl::StrCat("tensor '", name, "' has unknown dtype '", t.dtype_name, "'"));
      }
      elem_bytes = o->second;
    }
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned()) {
        return Corrupt(path, absl::StrCat("tensor '", name, "' has a non-integer dimension"));
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (UINT64_MAX / 16) / dim) {
        return Corrupt(path, absl::StrCat("tensor '", name, "' shape overflows"));
      }
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return Corrupt(
          path, absl::StrCat("tensor '", name, "' data_offsets [", begin, ", ", end,
                             ") exceed the data section (", data_size, " bytes): file truncated?"));
    }
    if (end - begin != numel * elem_bytes) {
      return Corrupt(path,
                     absl::StrCat("tensor '", name, "' holds ", end - begin,
                                  " bytes but its shape and dtype need ", numel * elem_bytes));
    }
    t.data = data_start + begin;
    t.nbytes = end - begin;
    f->tensors_.emplace(name, std::move(t));
  }
  // Tensors own disjoint byte ranges (overlapping ones would alias each other's data).
  std::vector<const TensorInfo*> by_offset;
  for (auto& [name, t] : f->tensors_) {
    t.file = &f->file_->path();
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->data < b->data; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo& a = *by_offset[i - 1];
    const TensorInfo& b = *by_offset[i];
    if (a.data + a.nbytes > b.data) {
      return Corrupt(path, absl::StrCat("tensors '", a.name, "' and '", b.name,
                                        "' overlap in the data section"));
    }
  }
  return f;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& model_dir) {
  namespace fs = std::filesystem;
  auto c = std::unique_ptr<Checkpoint>(new Checkpoint());
  c->dir_ = model_dir;
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat(model_dir, ": no such model directory"));
  }
  const std::string index_path = absl::StrCat(model_dir, "/model.safetensors.index.json");
  const std::string single_path = absl::StrCat(model_dir, "/model.safetensors");
  if (fs::exists(index_path, ec)) {
    ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(index_path));
    auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": field 'weight_map' is missing"));
    }
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map['", it.key(), "'] is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": shard name '", shard, "' must be a plain file name"));
      }
      c->weight_map_[it.key()] = shard;
    }
    // Validate that every shard exists now; map them lazily.
    for (const auto& [name, shard] : c->weight_map_) {
      if (!fs::exists(absl::StrCat(model_dir, "/", shard), ec)) {
        return absl::NotFoundError(absl::StrCat(model_dir, "/", shard,
                                                ": shard listed in model.safetensors.index.json "
                                                "is missing"));
      }
    }
    return c;
  }
  if (!fs::exists(single_path, ec)) {
    return absl::NotFoundError(
        absl::StrCat(model_dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
  for (const auto& [name, t] : file->tensors()) c->weight_map_[name] = "model.safetensors";
  c->shards_["model.safetensors"] = std::move(file);
  return c;
}

void Checkpoint::DropPages(const void* p, size_t bytes) const {
  for (const auto& [name, shard] : shards_) {
    if (shard && shard->DropPages(p, bytes)) return;
  }
}

bool Checkpoint::Has(const std::string& name) const { return weight_map_.count(name) > 0; }

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, shard] : weight_map_) names.push_back(name);
  return names;
}

absl::StatusOr<const TensorInfo*> Checkpoint::Get(const std::string& name) {
  auto it = weight_map_.find(name);
  if (it == weight_map_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": tensor '", name, "' is missing"));
  }
  auto& shard = shards_[it->second];
  if (!shard) {
    ASSIGN_OR_RETURN(shard, SafetensorsFile::Open(absl::StrCat(dir_, "/", it->second)));
  }
  auto t = shard->tensors().find(name);
  if (t == shard->tensors().end()) {
    return absl::NotFoundError(absl::StrCat(shard->path(), ": tensor '", name,
                                            "' listed in the index is not in the shard"));
  }
  if (!t->second.dtype) {
    return absl::InvalidArgumentError(absl::StrCat(shard->path(), ": tensor '", name,
                                                   "' has unsupported dtype ", t->second.dtype_name,
                                                   " (supported: F32, F16, BF16)"));
  }
  return &t->second;
}

}  // namespace kvgate::model
