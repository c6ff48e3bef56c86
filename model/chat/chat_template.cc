#include "model/chat/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace kvgate::model::chat {
namespace {

// A token field of tokenizer_config.json: a string, or an AddedToken object's "content".
std::optional<std::string> TokenText(const Json& config, const char* field) {
  auto it = config.find(field);
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace

absl::StatusOr<std::optional<ChatTemplate>> ChatTemplate::Load(
    const std::string& model_dir, const std::optional<std::string>& source_override) {
  const std::string path = (std::filesystem::path(model_dir) / "tokenizer_config.json").string();
  Json config = Json::object();
  if (std::ifstream in(path); in) {
    std::stringstream text;
    text << in.rdbuf();
    config = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
    }
  }
  std::string source;
  if (source_override) {
    source = *source_override;
  } else {
    auto it = config.find("chat_template");
    if (it == config.end() || it->is_null()) return std::optional<ChatTemplate>();
    if (it->is_string()) {
      source = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const Json& named : *it) {
        if (named.is_object() && named.value("name", "") == "default" &&
            named.contains("template") && named["template"].is_string()) {
          source = named["template"].get<std::string>();
        }
      }
      if (source.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": chat_template is a list without a \"default\" template"));
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": chat_template must be a string or a list of named templates"));
    }
  }
  ChatTemplate t;
  auto parsed = JinjaTemplate::Parse(source);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source_override ? "the chat template" : path + ": its chat_template",
                     " is not supported: ", parsed.status().message()));
  }
  t.template_ = *std::move(parsed);
  for (const char* field : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    if (auto token = TokenText(config, field)) t.special_tokens_[field] = *token;
  }
  return std::optional<ChatTemplate>(std::move(t));
}

absl::StatusOr<ChatTemplate> ChatTemplate::Create(std::string_view source, std::string bos_token,
                                                  std::string eos_token) {
  ChatTemplate t;
  ASSIGN_OR_RETURN(t.template_, JinjaTemplate::Parse(source));
  if (!bos_token.empty()) t.special_tokens_["bos_token"] = std::move(bos_token);
  if (!eos_token.empty()) t.special_tokens_["eos_token"] = std::move(eos_token);
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(const std::vector<ChatMessage>& messages,
                                                bool add_generation_prompt) const {
  Json list = Json::array();
  for (const ChatMessage& m : messages) list.push_back({{"role", m.role}, {"content", m.content}});
  return Apply(list, add_generation_prompt);
}

absl::StatusOr<std::string> ChatTemplate::Apply(const Json& messages, bool add_generation_prompt,
                                                const Json& extra) const {
  // What transformers passes: messages, tools and documents (None), add_generation_prompt,
  // then the special tokens' text.
  Json context = {{"messages", messages},
                  {"tools", nullptr},
                  {"documents", nullptr},
                  {"add_generation_prompt", add_generation_prompt}};
  context.update(special_tokens_);
  if (extra.is_object()) context.update(extra);
  return template_.Render(context);
}

}  // namespace kvgate::model::chat
