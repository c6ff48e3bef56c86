// kvgate tokenize: print the token ids of a text.
#include <cstdio>
#include <string>

#include "absl/strings/str_join.h"
#include "cli/commands.h"
#include "model/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

struct TokenizeFlags {
  std::string model;
  std::string tokenizer;
  std::string text;
  bool json = false;
  bool no_special = false;
};

int Run(const TokenizeFlags& f) {
  if (f.model.empty() == f.tokenizer.empty()) {
    return Fail("give exactly one of --model DIR or --tokenizer FILE");
  }
  auto tok =
      f.model.empty() ? model::LoadTokenizerFile(f.tokenizer) : model::LoadTokenizer(f.model);
  if (!tok.ok()) return Fail(tok.status());
  auto ids = (*tok)->Encode(f.text, !f.no_special);
  if (!ids.ok()) return Fail(ids.status());
  if (f.json) {
    std::printf("%s\n", nlohmann::json(*ids).dump().c_str());
  } else {
    std::printf("%s\n", absl::StrJoin(*ids, " ").c_str());
  }
  return 0;
}

}  // namespace

Runner AddTokenizeCommand(CLI::App& app) {
  auto f = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of TEXT");
  cmd->add_option("--model", f->model, "Hugging Face model directory");
  cmd->add_option("--tokenizer", f->tokenizer, "A tokenizer.json or SentencePiece .model file");
  cmd->add_flag("--json", f->json, "Print a JSON list");
  cmd->add_flag("--no-special", f->no_special, "Do not add BOS");
  cmd->add_option("text", f->text, "The text to tokenize")->required();
  return [f]() { return Run(*f); };
}

}  // namespace kvgate::cli
