// config.json and safetensors validation: every malformed input gives an error naming the
// problem and the file or field, never a crash.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "model/config/model_config.h"
#include "model/weights/safetensors.h"
#include "model/weights/stage_weights.h"
#include "tests/unit/model/test_util.h"

namespace kvgate::model {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("kvgate_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() { fs::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string path() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// A safetensors file from a header and a data section.
std::string Safetensors(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string ErrorOf(const std::string& path) {
  auto f = SafetensorsFile::Open(path);
  return f.ok() ? "" : std::string(f.status().message());
}

TEST(Safetensors, ReadsValidFile) {
  TempDir d;
  const std::string data(8, '\x01');
  WriteFile(d.file("a.safetensors"),
            Safetensors(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},)"
                        R"("__metadata__":{"format":"pt"}})",
                        data));
  auto f = SafetensorsFile::Open(d.file("a.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status();
  const TensorInfo& t = (*f)->tensors().at("w");
  EXPECT_EQ(t.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(*t.dtype, DType::kBF16);
  EXPECT_EQ(t.nbytes, 8u);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
}

TEST(Safetensors, RejectsCorruptFiles) {
  TempDir d;
  struct Case {
    std::string bytes;
    std::string expect;
  };
  const std::string ok_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string huge(8, '\0');
  uint64_t big = 1ull << 40;
  std::memcpy(huge.data(), &big, 8);
  const std::vector<Case> cases = {
      {"", "too short"},
      {"abc", "too short"},
      {huge + "{}", "header length"},
      {Safetensors("{not json", ""), "not a JSON object"},
      {Safetensors(ok_header, "1234"), "exceed the data section"},  // truncated data
      {Safetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678"),
       "shape and dtype need"},
      {Safetensors(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", "12345678"),
       "unknown dtype"},
      {Safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", "12345678"),
       "data_offsets"},
      {Safetensors(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", "12345678"),
       "non-integer dimension"},
      {Safetensors(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                   "12345678"),
       "overflows"},
      {Safetensors(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", "12345678"), "no dtype"},
      {Safetensors(R"({"w":[]})", ""), "not an object"},
      {Safetensors(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                   "123456789012"),
       "overlap"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = d.file("c" + std::to_string(i) + ".safetensors");
    WriteFile(path, cases[i].bytes);
    const std::string err = ErrorOf(path);
    EXPECT_NE(err.find(cases[i].expect), std::string::npos) << "case " << i << ": " << err;
    EXPECT_NE(err.find(path), std::string::npos) << "the error names the file: " << err;
  }
  EXPECT_NE(ErrorOf(d.file("missing.safetensors")).find("no such file"), std::string::npos);
}

TEST(Safetensors, EveryTruncationOfARealCheckpointIsAnErrorNotACrash) {
  const std::string src = testing::SharedModel("stories260K") + "/model.safetensors";
  std::ifstream in(src, std::ios::binary);
  ASSERT_TRUE(in) << src << " is missing: these tests need ../shared/models";
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  TempDir d;
  for (size_t cut :
       {size_t{0}, size_t{7}, size_t{9}, size_t{100}, bytes.size() / 2, bytes.size() - 1}) {
    const std::string path = d.file("t.safetensors");
    WriteFile(path, bytes.substr(0, cut));
    EXPECT_FALSE(ErrorOf(path).empty()) << "truncated at " << cut;
  }
  // Flipped header bytes: either an error or a consistent file, never a crash.
  for (size_t pos = 8; pos < 200; pos += 13) {
    std::string copy = bytes;
    copy[pos] = static_cast<char>(copy[pos] ^ 0x5a);
    const std::string path = d.file("f.safetensors");
    WriteFile(path, copy);
    (void)SafetensorsFile::Open(path);
  }
}

TEST(Checkpoint, UnsupportedDtypeAndMissingTensorsAreNamed) {
  TempDir d;
  WriteFile(d.file("model.safetensors"),
            Safetensors(R"({"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", "12345678"));
  auto c = Checkpoint::Open(d.path());
  ASSERT_TRUE(c.ok()) << c.status();
  auto t = (*c)->Get("ids");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("unsupported dtype I64"), std::string::npos) << t.status();
  auto m = (*c)->Get("nope");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("'nope' is missing"), std::string::npos);
}

TEST(Checkpoint, ShardedIndexWithMissingShardIsRefused) {
  TempDir d;
  WriteFile(d.file("model.safetensors.index.json"),
            R"({"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors"}})");
  auto c = Checkpoint::Open(d.path());
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("model-00001-of-00002.safetensors"), std::string::npos);
  WriteFile(d.file("model.safetensors.index.json"), R"({"weight_map":{"a":"../../etc/passwd"}})");
  EXPECT_FALSE(Checkpoint::Open(d.path()).ok());
  EXPECT_FALSE(Checkpoint::Open(d.file("does-not-exist")).ok());
}

TEST(Checkpoint, ShapeMismatchWithConfigNamesTensorAndFile) {
  TempDir d;
  const std::string src = testing::SharedModel("stories260K");
  fs::copy_file(src + "/model.safetensors", d.file("model.safetensors"));
  auto json = testing::ReadJson(src + "/config.json");
  json["intermediate_size"] = 100;
  WriteFile(d.file("config.json"), json.dump());
  auto config = ModelConfig::Load(d.path());
  ASSERT_TRUE(config.ok()) << config.status();
  auto ckpt = Checkpoint::Open(d.path());
  ASSERT_TRUE(ckpt.ok());
  auto w = LoadStageWeights(*config, std::shared_ptr<Checkpoint>(std::move(*ckpt)), 0, -1);
  ASSERT_FALSE(w.ok());
  const std::string msg(w.status().message());
  EXPECT_NE(msg.find("mlp.gate_proj.weight' has shape [172, 64]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
}

TEST(Checkpoint, LayerRangeLoadsOnlyItsTensors) {
  const std::string dir = testing::SharedModel("stories260K");
  auto config = ModelConfig::Load(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok());
  std::shared_ptr<Checkpoint> shared(std::move(*ckpt));
  auto mid = LoadStageWeights(*config, shared, 1, 3);
  ASSERT_TRUE(mid.ok()) << mid.status();
  EXPECT_EQ(mid->layers.size(), 2u);
  EXPECT_FALSE(mid->is_first());
  EXPECT_FALSE(mid->is_last());
  auto last = LoadStageWeights(*config, shared, 3, 5);
  ASSERT_TRUE(last.ok());
  EXPECT_TRUE(last->is_last());  // tied: the head is the embedding
  EXPECT_FALSE(last->is_first());
  EXPECT_FALSE(LoadStageWeights(*config, shared, 3, 9).ok());
  EXPECT_FALSE(LoadStageWeights(*config, shared, 2, 2).ok());
}

// Overwrites the first `count` elements (count 0: all) of tensor `name` in a single-file
// checkpoint with `value` (its dtype's encoding).
void PoisonTensor(const std::string& file, const std::string& name, float value, size_t count) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  uint64_t header_len = 0;
  f.read(reinterpret_cast<char*>(&header_len), 8);
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  const nlohmann::json t = nlohmann::json::parse(header).at(name);
  const size_t begin = t["data_offsets"][0], end = t["data_offsets"][1];
  const std::string dtype = t["dtype"];
  std::string bytes;
  if (dtype == "F32") {
    bytes.assign(reinterpret_cast<const char*>(&value), 4);
  } else {
    const uint16_t h = dtype == "BF16" ? F32ToBf16(value) : F32ToF16(value);
    bytes.assign(reinterpret_cast<const char*>(&h), 2);
  }
  const size_t n = count == 0 ? (end - begin) / bytes.size() : count;
  f.seekp(static_cast<std::streamoff>(8 + header_len + begin));
  for (size_t i = 0; i < n; ++i) f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(Checkpoint, NanOrInfInTheFirstOrLastLayersIsRefusedUnlessSkipped) {
  const std::string src = testing::SharedModel("stories260K");
  auto config = ModelConfig::Load(src);
  ASSERT_TRUE(config.ok()) << config.status();
  const std::string last =
      absl::StrCat("model.layers.", config->num_layers - 1, ".mlp.down_proj.weight");
  for (const auto& [tensor, value, count] :
       {std::tuple<std::string, float, size_t>{"model.embed_tokens.weight", NAN, 0},
        {last, INFINITY, 1},
        {"model.layers.0.self_attn.q_proj.weight", -INFINITY, 1},
        {"model.norm.weight", NAN, 1}}) {
    SCOPED_TRACE(tensor);
    TempDir d;
    fs::copy_file(src + "/model.safetensors", d.file("model.safetensors"));
    PoisonTensor(d.file("model.safetensors"), tensor, value, count);
    auto open = [&] {
      auto ckpt = Checkpoint::Open(d.path());
      EXPECT_TRUE(ckpt.ok());
      return std::shared_ptr<Checkpoint>(std::move(*ckpt));
    };
    auto w = LoadStageWeights(*config, open(), 0, -1);
    ASSERT_FALSE(w.ok());
    const std::string msg(w.status().message());
    EXPECT_NE(msg.find("'" + tensor + "' holds NaN or Inf"), std::string::npos) << msg;
    EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_TRUE(LoadStageWeights(*config, open(), 0, -1, nullptr, /*check_finite=*/false).ok());
  }
}

TEST(Config, MaxPositionEmbeddingsBeyondTheEngineIsRefused) {
  auto j = testing::ReadJson(testing::SharedModel("stories260K") + "/config.json");
  j["max_position_embeddings"] = int64_t{1} << 40;
  auto c = ModelConfig::FromJson(j, "config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("max_position_embeddings"), std::string::npos) << c.status();
  j["max_position_embeddings"] = kMaxPositions;
  EXPECT_TRUE(ModelConfig::FromJson(j, "config.json").ok());
}

TEST(Config, ErrorsNameTheField) {
  auto base = testing::ReadJson(testing::SharedModel("stories260K") + "/config.json");
  ASSERT_FALSE(base.is_discarded());
  auto error = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = base;
    edit(j);
    auto c = ModelConfig::FromJson(j, "config.json");
    return c.ok() ? std::string() : std::string(c.status().message());
  };
  EXPECT_EQ(error([](auto&) {}), "");
  EXPECT_NE(error([](auto& j) { j.erase("hidden_size"); }).find("'hidden_size' is missing"),
            std::string::npos);
  EXPECT_NE(error([](auto& j) { j["num_key_value_heads"] = 3; }).find("num_key_value_heads"),
            std::string::npos);
  EXPECT_NE(error([](auto& j) { j["vocab_size"] = "big"; }).find("'vocab_size' must be an integer"),
            std::string::npos);
  EXPECT_NE(
      error([](auto& j) { j["architectures"] = {"GPT2LMHeadModel"}; }).find("GPT2LMHeadModel"),
      std::string::npos);
  EXPECT_NE(error([](auto& j) {
              j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 2}};
            }).find("'yarn' is not supported"),
            std::string::npos);
  EXPECT_NE(error([](auto& j) {
              j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8}};
            }).find("original_max_position_embeddings"),
            std::string::npos);
  EXPECT_NE(error([](auto& j) { j["hidden_act"] = "gelu"; }).find("hidden_act"), std::string::npos);
  EXPECT_NE(error([](auto& j) { j["rms_norm_eps"] = -1; }).find("rms_norm_eps"), std::string::npos);
}

TEST(Config, SyntheticShapes) {
  for (const std::string& name : SyntheticConfigNames()) {
    auto c = SyntheticConfig(name);
    ASSERT_TRUE(c.ok()) << name << ": " << c.status();
  }
  auto c = SyntheticConfig("llama-3.2-1b");
  EXPECT_EQ(c->num_layers, 16);
  EXPECT_EQ(c->rope_scaling.type, RopeType::kLlama3);
  EXPECT_FALSE(SyntheticConfig("gpt-5").ok());
}

}  // namespace
}  // namespace kvgate::model
