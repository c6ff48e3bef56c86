// Tokenizer tests against references recorded by tests/fixtures/make_tokenizer_fixtures.py
// (Hugging Face `tokenizers` and python `sentencepiece`), plus streaming and error cases.
#include "model/tokenizer/tokenizer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/json_util.h"
#include "model/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace kvgate::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kTestData[] = "tests/testdata/tokenizer";
constexpr char kSharedModels[] = "../shared/models";

std::string TestData(const std::string& rel) { return std::string(kTestData) + "/" + rel; }
std::string Shared(const std::string& rel) { return std::string(kSharedModels) + "/" + rel; }

const json& Expected() {
  static const json* expected = [] {
    auto j = ReadJsonFile(TestData("expected.json"));
    if (!j.ok()) {
      ADD_FAILURE() << "cannot read the fixtures (run the test from the repository root): "
                    << j.status();
      return new json(json::object());
    }
    return new json(*std::move(j));
  }();
  return *expected;
}

std::vector<std::string> Texts() {
  std::vector<std::string> texts;
  if (Expected().contains("texts")) {
    for (const auto& t : Expected()["texts"]) texts.push_back(t.get<std::string>());
  }
  return texts;
}

std::vector<int32_t> Ids(const json& j) { return j.get<std::vector<int32_t>>(); }

std::unique_ptr<Tokenizer> MustLoadDir(const std::string& dir) {
  auto tok = LoadTokenizer(dir);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

std::unique_ptr<Tokenizer> MustLoadFile(const std::string& path) {
  auto tok = LoadTokenizerFile(path);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

std::string Printable(const std::string& s) { return ::testing::PrintToString(s); }

// A fresh directory under the test temp dir.
std::string TempDir(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("kvgate_tokenizer_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  out << contents;
}

// ------------------------------------------------------------------ tokenizer.json fixtures

void CheckHfCases(const Tokenizer& tok, const std::string& name) {
  const auto texts = Texts();
  const json& cases = Expected()["hf"][name];
  ASSERT_EQ(cases.size(), texts.size()) << name;
  for (size_t i = 0; i < texts.size(); ++i) {
    SCOPED_TRACE(name + " text #" + std::to_string(i) + ": " + Printable(texts[i]));
    const json& c = cases[i];
    auto plain = tok.Encode(texts[i], /*add_special=*/false);
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_EQ(*plain, Ids(c["ids"]));
    auto with_special = tok.Encode(texts[i], /*add_special=*/true);
    ASSERT_TRUE(with_special.ok()) << with_special.status();
    EXPECT_EQ(*with_special, Ids(c["ids_with_special"]));
    const auto ref_ids = Ids(c["ids_with_special"]);
    EXPECT_EQ(tok.Decode(ref_ids, /*skip_special=*/false), c["decode"].get<std::string>());
    EXPECT_EQ(tok.Decode(ref_ids, /*skip_special=*/true),
              c["decode_skip_special"].get<std::string>());
  }
}

class HfFixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(HfFixtureTest, MatchesHuggingFaceFromDirectory) {
  auto tok = MustLoadDir(TestData(GetParam()));
  ASSERT_NE(tok, nullptr);
  CheckHfCases(*tok, GetParam());
  EXPECT_EQ(tok->vocab_size(), Expected()["hf_special"][GetParam()]["vocab_size"].get<int>());
}

TEST_P(HfFixtureTest, MatchesHuggingFaceFromFile) {
  auto tok = MustLoadFile(TestData(GetParam() + "/tokenizer.json"));
  ASSERT_NE(tok, nullptr);
  CheckHfCases(*tok, GetParam());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, HfFixtureTest,
                         ::testing::Values("bytelevel_bpe", "bytelevel_gpt2", "spm_bpe_legacy",
                                           "spm_bpe_metaspace", "bytelevel_nfkc_digits",
                                           "spm_bpe_metaspace_split"));

// Older tokenizer.json files spell Metaspace's prepend scheme as add_prefix_space.
TEST(HfTokenizerTest, OldMetaspaceFormGivesTheSameIds) {
  auto j = ReadJsonFile(TestData("spm_bpe_metaspace_split/tokenizer.json"));
  ASSERT_TRUE(j.ok()) << j.status();
  for (json* part : {&(*j)["pre_tokenizer"], &(*j)["decoder"]["decoders"][1]}) {
    ASSERT_EQ((*part)["prepend_scheme"], "always");
    part->erase("prepend_scheme");
    part->erase("split");
    (*part)["add_prefix_space"] = true;
  }
  const std::string dir = TempDir("old_metaspace");
  WriteFile(dir + "/tokenizer.json", j->dump());
  auto tok = MustLoadFile(dir + "/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  CheckHfCases(*tok, "spm_bpe_metaspace_split");
}

// ignore_merges (Llama 3): a word that is in the vocabulary is one token even when the merges
// would not build it. Reference ids from tokenizers 0.23.
TEST(HfTokenizerTest, IgnoreMerges) {
  const std::string dir = TempDir("ignore_merges");
  for (bool ignore : {true, false}) {
    json j = {{"model",
               {{"type", "BPE"},
                {"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}, {"abc", 5}}},
                {"merges", json::array({json::array({"a", "b"})})},
                {"ignore_merges", ignore}}}};
    WriteFile(dir + "/tokenizer.json", j.dump());
    auto tok = MustLoadFile(dir + "/tokenizer.json");
    ASSERT_NE(tok, nullptr);
    if (ignore) {
      EXPECT_THAT(*tok->Encode("abc", false), ElementsAre(5));
    } else {
      EXPECT_THAT(*tok->Encode("abc", false), ElementsAre(3, 2));
    }
    EXPECT_THAT(*tok->Encode("abcab", false), ElementsAre(3, 2, 3));
    EXPECT_FALSE(tok->adds_bos());
    EXPECT_EQ(tok->bos_id(), -1);
    // No decoder: tokens are joined by spaces, as Hugging Face does.
    EXPECT_EQ(tok->Decode({3, 2}, true), "ab c");
  }
}

TEST(HfTokenizerTest, MergesAsStringsGiveTheSameIds) {
  auto j = ReadJsonFile(TestData("bytelevel_bpe/tokenizer.json"));
  ASSERT_TRUE(j.ok()) << j.status();
  json& merges = (*j)["model"]["merges"];
  ASSERT_TRUE(merges.is_array());
  ASSERT_GT(merges.size(), 100u);
  json strings = json::array();
  for (const json& m : merges) {
    ASSERT_TRUE(m.is_array()) << "fixture merges are expected as pairs";
    strings.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
  }
  merges = strings;
  const std::string dir = TempDir("merges_as_strings");
  WriteFile(dir + "/tokenizer.json", j->dump());
  auto tok = MustLoadFile(dir + "/tokenizer.json");
  ASSERT_NE(tok, nullptr);
  CheckHfCases(*tok, "bytelevel_bpe");
}

TEST(HfTokenizerTest, ByteLevelRoundTripsEveryText) {
  auto tok = MustLoadDir(TestData("bytelevel_bpe"));
  ASSERT_NE(tok, nullptr);
  for (const std::string& text : Texts()) {
    auto ids = tok->Encode(text, /*add_special=*/true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(tok->Decode(*ids, /*skip_special=*/true),
              // Special tokens written in the text are skipped too.
              tok->Decode(*tok->Encode(text, false), true));
  }
  const std::string plain = "Plain text: 你好 😀 \t\n 1234567 DON'T";
  EXPECT_EQ(tok->Decode(*tok->Encode(plain, true), true), plain);
}

TEST(HfTokenizerTest, SpecialIdsFromConfigFiles) {
  auto tok = MustLoadDir(TestData("bytelevel_bpe"));
  ASSERT_NE(tok, nullptr);
  const int bos = Expected()["hf_special"]["bytelevel_bpe"]["bos_id"].get<int>();
  EXPECT_EQ(tok->bos_id(), bos);
  EXPECT_TRUE(tok->adds_bos());
  // generation_config.json lists <|end_of_text|> and <|eot_id|>.
  auto gen = ReadJsonFile(TestData("bytelevel_bpe/generation_config.json"));
  ASSERT_TRUE(gen.ok());
  EXPECT_EQ(tok->eos_ids(), (*gen)["eos_token_id"].get<std::vector<int32_t>>());
  EXPECT_EQ(tok->eos_ids().size(), 2u);

  auto gpt2 = MustLoadFile(TestData("bytelevel_gpt2/tokenizer.json"));
  ASSERT_NE(gpt2, nullptr);
  EXPECT_FALSE(gpt2->adds_bos());

  auto legacy = MustLoadDir(TestData("spm_bpe_legacy"));
  ASSERT_NE(legacy, nullptr);
  EXPECT_EQ(legacy->bos_id(), 1);
  EXPECT_THAT(legacy->eos_ids(), ElementsAre(2));
  EXPECT_TRUE(legacy->adds_bos());
}

TEST(HfTokenizerTest, TokenizerConfigAddBosFalseDisablesBos) {
  const std::string dir = TempDir("add_bos_false");
  fs::copy_file(TestData("spm_bpe_legacy/tokenizer.json"), dir + "/tokenizer.json");
  WriteFile(dir + "/tokenizer_config.json",
            R"({"add_bos_token": false, "add_eos_token": true, "eos_token": "</s>"})");
  WriteFile(dir + "/config.json", R"({"bos_token_id": 1, "eos_token_id": [2, 1]})");
  auto tok = MustLoadDir(dir);
  ASSERT_NE(tok, nullptr);
  EXPECT_FALSE(tok->adds_bos());
  EXPECT_THAT(tok->eos_ids(), ElementsAre(2, 1));
  auto ids = tok->Encode("Hello", /*add_special=*/true);
  ASSERT_TRUE(ids.ok());
  ASSERT_FALSE(ids->empty());
  EXPECT_NE(ids->front(), 1);
  EXPECT_EQ(ids->back(), 2);
}

TEST(HfTokenizerTest, LongInputsEncodeQuicklyAndLosslessly) {
  const std::string word(200000, 'a');
  const std::string spaces = std::string(200000, ' ') + "x";
  std::string mixed;
  while (mixed.size() < 300000) mixed += "Lily saw 你好 😀 and 1234567.\n\t ";
  for (const char* name : {"bytelevel_bpe", "spm_bpe_legacy", "spm_bpe_metaspace_split"}) {
    auto tok = MustLoadDir(TestData(name));
    ASSERT_NE(tok, nullptr);
    for (const std::string* text : std::vector<const std::string*>{&word, &spaces, &mixed}) {
      const auto start = std::chrono::steady_clock::now();
      auto ids = tok->Encode(*text, false);
      ASSERT_TRUE(ids.ok()) << ids.status();
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_LT(seconds, 10.0) << name;
      const std::string decoded = tok->Decode(*ids, true);
      if (std::string(name) == "bytelevel_bpe") {
        EXPECT_TRUE(decoded == *text) << name << " size " << text->size();
      } else {
        // SentencePiece-style decoders may drop one leading space.
        EXPECT_LE(text->size() - decoded.size(), 1u) << name;
      }
    }
  }
}

// ------------------------------------------------------------------------- SentencePiece

void CheckSentencePieceCases(const Tokenizer& tok, const std::string& name) {
  const auto texts = Texts();
  const json& ref = Expected()["sentencepiece"][name];
  ASSERT_TRUE(ref.is_object()) << name;
  EXPECT_EQ(tok.vocab_size(), ref["vocab_size"].get<int>());
  EXPECT_EQ(tok.bos_id(), ref["bos_id"].get<int>());
  EXPECT_THAT(tok.eos_ids(), ElementsAre(ref["eos_id"].get<int>()));
  EXPECT_TRUE(tok.adds_bos());
  const json& cases = ref["cases"];
  ASSERT_EQ(cases.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    SCOPED_TRACE(name + " text #" + std::to_string(i) + ": " + Printable(texts[i]));
    auto plain = tok.Encode(texts[i], false);
    ASSERT_TRUE(plain.ok()) << plain.status();
    EXPECT_EQ(*plain, Ids(cases[i]["ids"]));
    auto with_bos = tok.Encode(texts[i], true);
    ASSERT_TRUE(with_bos.ok()) << with_bos.status();
    EXPECT_EQ(*with_bos, Ids(cases[i]["ids_with_special"]));
    EXPECT_EQ(tok.Decode(Ids(cases[i]["ids_with_special"]), true),
              cases[i]["decode_skip_special"].get<std::string>());
  }
}

TEST(SentencePieceTest, Llama2MatchesPythonSentencePiece) {
  const std::string path = Shared("llama2-tokenizer/tokenizer.model");
  ASSERT_TRUE(fs::exists(path)) << "missing " << path
                                << ": the shared models folder must sit next to the repository";
  auto tok = MustLoadFile(path);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 32000);
  CheckSentencePieceCases(*tok, "llama2");
  // A few well-known Llama 2 ids.
  EXPECT_THAT(*tok->Encode("Hello world", true), ElementsAre(1, 15043, 3186));
}

TEST(SentencePieceTest, Stories260KMatchesPythonSentencePiece) {
  const std::string dir = Shared("stories260K");
  ASSERT_TRUE(fs::exists(dir + "/tokenizer.model"))
      << "missing " << dir << "/tokenizer.model: the shared models folder must sit next to the "
      << "repository";
  auto tok = MustLoadDir(dir);
  ASSERT_NE(tok, nullptr);
  CheckSentencePieceCases(*tok, "stories260K");
}

TEST(SentencePieceTest, ControlTokensInTextAndDecodeWithSpecials) {
  auto tok = MustLoadFile(Shared("llama2-tokenizer/tokenizer.model"));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(*tok->Encode("<s>Hello</s>", false), ElementsAre(1, 15043, 2));
  EXPECT_EQ(tok->Decode({1, 15043, 3186, 2}, /*skip_special=*/true), "Hello world");
  EXPECT_EQ(tok->Decode({1, 15043, 3186, 2}, /*skip_special=*/false), "<s> Hello world</s>");
  // Out-of-range ids are ignored, never a crash.
  EXPECT_EQ(tok->Decode({-5, 15043, 1 << 30}, true), "Hello");
}

TEST(SentencePieceTest, GoldenTextOfStories260K) {
  auto golden = ReadJsonFile(Shared("stories260K/golden_greedy.json"));
  ASSERT_TRUE(golden.ok()) << golden.status();
  auto tok = MustLoadDir(Shared("stories260K"));
  ASSERT_NE(tok, nullptr);
  const auto ids = (*golden)["greedy_token_ids"].get<std::vector<int32_t>>();
  const std::string text = (*golden)["text"].get<std::string>();
  EXPECT_EQ(tok->Decode(ids, /*skip_special=*/true), text);
  // Streaming the generated ids (after the BOS prompt) gives the same text.
  StreamingDecoder decoder(tok.get(), {ids[0]});
  std::string streamed;
  for (size_t i = 1; i < ids.size(); ++i) streamed += decoder.Push(ids[i]);
  streamed += decoder.Flush();
  EXPECT_EQ(streamed, text);
}

// ------------------------------------------------------------------------ StreamingDecoder

struct StreamCase {
  std::string name;
  std::string loader;  // "dir" or "file"
  std::string path;
};

class StreamingTest : public ::testing::TestWithParam<StreamCase> {
 protected:
  std::unique_ptr<Tokenizer> Load() {
    const auto& p = GetParam();
    return p.loader == "dir" ? MustLoadDir(p.path) : MustLoadFile(p.path);
  }
};

// Streams `generated` after `prompt` and checks every chunk is valid UTF-8 and the whole
// stream equals Decode(prompt + generated) minus Decode(prompt). Returns the number of pushes
// that emitted nothing.
int CheckStream(const Tokenizer& tok, const std::vector<int32_t>& prompt,
                const std::vector<int32_t>& generated) {
  StreamingDecoder decoder(&tok, prompt);
  std::string streamed;
  int held = 0;
  for (int32_t id : generated) {
    const std::string chunk = decoder.Push(id);
    EXPECT_TRUE(internal::IsValidUtf8(chunk)) << Printable(chunk);
    if (chunk.empty()) ++held;
    streamed += chunk;
  }
  const std::string rest = decoder.Flush();
  EXPECT_TRUE(internal::IsValidUtf8(rest));
  streamed += rest;
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  const std::string full = tok.Decode(all, true);
  const std::string prompt_text = tok.Decode(prompt, true);
  EXPECT_TRUE(full.starts_with(prompt_text)) << Printable(full) << " vs " << Printable(prompt_text);
  EXPECT_EQ(streamed, full.substr(std::min(prompt_text.size(), full.size())));
  return held;
}

TEST_P(StreamingTest, StreamEqualsFullDecode) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> texts = Texts();
  const std::vector<std::string> prompts = {"", "Once upon a time", "日本語 😀", " spaced "};
  for (const std::string& prompt_text : prompts) {
    for (bool prompt_bos : {false, true}) {
      auto prompt = tok->Encode(prompt_text, prompt_bos);
      ASSERT_TRUE(prompt.ok());
      for (const std::string& text : texts) {
        SCOPED_TRACE("prompt " + Printable(prompt_text) + " text " + Printable(text));
        auto gen = tok->Encode(text, false);
        ASSERT_TRUE(gen.ok());
        CheckStream(*tok, *prompt, *gen);
      }
    }
  }
}

TEST_P(StreamingTest, HoldsBackIncompleteCharacters) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  const json& stream_texts = Expected()["texts"];
  ASSERT_GE(stream_texts.size(), 2u);
  // The last two texts are the emoji/CJK-heavy streaming texts.
  for (size_t i = stream_texts.size() - 2; i < stream_texts.size(); ++i) {
    const std::string text = stream_texts[i].get<std::string>();
    auto gen = tok->Encode(text, false);
    ASSERT_TRUE(gen.ok());
    auto prompt = tok->Encode("Prompt:", true);
    ASSERT_TRUE(prompt.ok());
    const int held = CheckStream(*tok, *prompt, *gen);
    // Byte-level and byte-fallback tokens split multi-byte characters, so some pushes must
    // have been held back.
    EXPECT_GT(held, 0) << GetParam().name;
  }
}

TEST_P(StreamingTest, LongGenerationIsLinear) {
  auto tok = Load();
  ASSERT_NE(tok, nullptr);
  auto unit = tok->Encode(" Lily saw 你好 😀 and 123.", false);
  ASSERT_TRUE(unit.ok());
  std::vector<int32_t> gen;
  while (gen.size() < 20000) gen.insert(gen.end(), unit->begin(), unit->end());
  const auto start = std::chrono::steady_clock::now();
  StreamingDecoder decoder(tok.get(), {});
  size_t emitted = 0;
  for (int32_t id : gen) emitted += decoder.Push(id).size();
  emitted += decoder.Flush().size();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(emitted, tok->Decode(gen, true).size());
  // Quadratic behaviour would take minutes here.
  EXPECT_LT(seconds, 10.0);
}

INSTANTIATE_TEST_SUITE_P(
    Tokenizers, StreamingTest,
    ::testing::Values(
        StreamCase{"llama2", "file", Shared("llama2-tokenizer/tokenizer.model")},
        StreamCase{"stories260K", "dir", Shared("stories260K")},
        StreamCase{"bytelevel_bpe", "dir", TestData("bytelevel_bpe")},
        StreamCase{"bytelevel_gpt2", "dir", TestData("bytelevel_gpt2")},
        StreamCase{"spm_bpe_legacy", "dir", TestData("spm_bpe_legacy")},
        StreamCase{"spm_bpe_metaspace", "dir", TestData("spm_bpe_metaspace")},
        StreamCase{"spm_bpe_metaspace_split", "dir", TestData("spm_bpe_metaspace_split")},
        StreamCase{"bytelevel_nfkc_digits", "dir", TestData("bytelevel_nfkc_digits")}),
    [](const ::testing::TestParamInfo<StreamCase>& info) { return info.param.name; });

// ---------------------------------------------------------------------------------- errors

TEST(TokenizerErrorTest, MissingFilesAndDirectories) {
  auto r = LoadTokenizer(TestData("no_such_model"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("no_such_model"));

  const std::string empty_dir = TempDir("empty_model_dir");
  r = LoadTokenizer(empty_dir);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tokenizer.json"));

  for (const std::string& path :
       {TestData("missing/tokenizer.json"), TestData("missing/tokenizer.model")}) {
    r = LoadTokenizerFile(path);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
  }
}

TEST(TokenizerErrorTest, CorruptFiles) {
  const std::string dir = TempDir("corrupt");
  WriteFile(dir + "/tokenizer.json", "{ \"model\": { \"type\": \"BPE\", ");
  auto r = LoadTokenizerFile(dir + "/tokenizer.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tokenizer.json"));

  WriteFile(dir + "/tokenizer.model", "definitely not a protobuf \x01\x02\xff");
  r = LoadTokenizerFile(dir + "/tokenizer.model");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tokenizer.model"));

  // Valid tokenizer, malformed config next to it.
  const std::string dir2 = TempDir("bad_config");
  fs::copy_file(TestData("bytelevel_bpe/tokenizer.json"), dir2 + "/tokenizer.json");
  WriteFile(dir2 + "/generation_config.json", R"({"eos_token_id": "two"})");
  r = LoadTokenizer(dir2);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("generation_config.json"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("eos_token_id"));
  WriteFile(dir2 + "/generation_config.json", "[1, 2");
  r = LoadTokenizer(dir2);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("generation_config.json"));
  fs::remove(dir2 + "/generation_config.json");
  WriteFile(dir2 + "/tokenizer_config.json", R"({"eos_token": "<|no_such_token|>"})");
  r = LoadTokenizer(dir2);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("eos_token"));
}

struct BadJsonCase {
  std::string name;
  std::string json;
  absl::StatusCode code;
  std::vector<std::string> message_parts;
};

class BadTokenizerJsonTest : public ::testing::TestWithParam<BadJsonCase> {};

TEST_P(BadTokenizerJsonTest, ReportsAClearError) {
  const std::string dir = TempDir("bad_json_" + GetParam().name);
  const std::string path = dir + "/tokenizer.json";
  WriteFile(path, GetParam().json);
  auto r = LoadTokenizerFile(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), GetParam().code) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
  for (const std::string& part : GetParam().message_parts) {
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(part));
  }
  // The same through a model directory.
  auto d = LoadTokenizer(dir);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), GetParam().code);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadTokenizerJsonTest,
    ::testing::Values(
        BadJsonCase{"wordpiece",
                    R"({"model": {"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"}})",
                    absl::StatusCode::kUnimplemented,
                    {"WordPiece", "model.type"}},
        BadJsonCase{"unigram",
                    R"({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}})",
                    absl::StatusCode::kUnimplemented,
                    {"Unigram"}},
        BadJsonCase{"not_object", "[1, 2, 3]", absl::StatusCode::kInvalidArgument, {}},
        BadJsonCase{
            "no_model", R"({"added_tokens": []})", absl::StatusCode::kInvalidArgument, {"model"}},
        BadJsonCase{"no_vocab",
                    R"({"model": {"type": "BPE", "merges": []}})",
                    absl::StatusCode::kInvalidArgument,
                    {"model.vocab"}},
        BadJsonCase{"empty_vocab",
                    R"({"model": {"type": "BPE", "vocab": {}, "merges": []}})",
                    absl::StatusCode::kInvalidArgument,
                    {"model.vocab", "no vocabulary"}},
        BadJsonCase{"vocab_not_int",
                    R"({"model": {"type": "BPE", "vocab": {"a": "x"}}})",
                    absl::StatusCode::kInvalidArgument,
                    {"model.vocab"}},
        BadJsonCase{"merge_unknown",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}})",
                    absl::StatusCode::kInvalidArgument,
                    {"model.merges[0]"}},
        BadJsonCase{"merge_malformed",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [42]}})",
                    absl::StatusCode::kInvalidArgument,
                    {"model.merges[0]"}},
        BadJsonCase{"bad_pretokenizer",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "pre_tokenizer": {"type": "BertPreTokenizer"}})",
                    absl::StatusCode::kUnimplemented,
                    {"BertPreTokenizer", "pre_tokenizer"}},
        BadJsonCase{"bad_regex",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(unclosed"},
                                          "behavior": "Isolated", "invert": false}})",
                    absl::StatusCode::kInvalidArgument,
                    {"pre_tokenizer.pattern"}},
        BadJsonCase{"bad_decoder",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "decoder": {"type": "WordPiece"}})",
                    absl::StatusCode::kUnimplemented,
                    {"decoder"}},
        BadJsonCase{"bad_added_token",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "added_tokens": [{"id": "x", "content": "<s>"}]})",
                    absl::StatusCode::kInvalidArgument,
                    {"added_tokens[0].id"}},
        BadJsonCase{"bad_template",
                    R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                        "post_processor": {"type": "TemplateProcessing",
                          "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}],
                          "special_tokens": {}}})",
                    absl::StatusCode::kInvalidArgument,
                    {"special_tokens"}}),
    [](const ::testing::TestParamInfo<BadJsonCase>& info) { return info.param.name; });

TEST(TokenizerErrorTest, InvalidUtf8InputIsAnError) {
  auto tok = MustLoadDir(TestData("bytelevel_bpe"));
  ASSERT_NE(tok, nullptr);
  auto r = tok->Encode("bad \xff\xfe bytes", false);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  // Decode of ids outside the vocabulary drops them.
  EXPECT_EQ(tok->Decode({-1, 1 << 29}, false), "");
}

TEST(Utf8Test, LossyAndCompletePrefix) {
  EXPECT_EQ(internal::Utf8Lossy("a\xE4\xBD"), "a\xEF\xBF\xBD");
  EXPECT_EQ(internal::Utf8Lossy("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
  EXPECT_EQ(internal::Utf8Lossy("\xC0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(internal::CompleteUtf8Prefix("ab\xF0\x9F\x98"), 2u);
  EXPECT_EQ(internal::CompleteUtf8Prefix("ab\xF0\x9F\x98\x80"), 6u);
  EXPECT_EQ(internal::CompleteUtf8Prefix("ab\xFF"), 3u);
  EXPECT_FALSE(internal::IsValidUtf8("\xED\xA0\x80"));  // surrogate
  EXPECT_EQ(internal::UnicodeToByte(0x120), ' ');       // 'Ġ'
  EXPECT_EQ(internal::ByteToUnicode(' '), "\xC4\xA0");
}

}  // namespace
}  // namespace kvgate::model
