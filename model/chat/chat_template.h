// A model's chat template: the Jinja `chat_template` of its tokenizer_config.json (a string,
// or the "default" of a list of named templates), rendered as transformers'
// apply_chat_template renders it (messages, add_generation_prompt, the special tokens' text).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/chat/jinja.h"
#include "model/chat/py_format.h"

namespace kvgate::model::chat {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", "tool"
  std::string content;  // text
};

class ChatTemplate {
 public:
  // Loads the template of a Hugging Face model directory (or `source` instead of its
  // chat_template, with its special tokens). nullopt when there is no template; an error when
  // tokenizer_config.json is malformed or the template uses something the interpreter does
  // not support (named, with its line).
  static absl::StatusOr<std::optional<ChatTemplate>> Load(
      const std::string& model_dir, const std::optional<std::string>& source = std::nullopt);
  // A template from its source and the special tokens' text (bos/eos may be empty).
  static absl::StatusOr<ChatTemplate> Create(std::string_view source, std::string bos_token,
                                             std::string eos_token);

  // The prompt text (to tokenize without adding special tokens: the template writes them).
  // Errors: what the template raised (e.g. roles that do not alternate).
  absl::StatusOr<std::string> Apply(const std::vector<ChatMessage>& messages,
                                    bool add_generation_prompt) const;
  // The same with messages as JSON objects (role, content, and any other fields a template
  // reads) and extra template variables merged into the context.
  absl::StatusOr<std::string> Apply(const Json& messages, bool add_generation_prompt,
                                    const Json& extra = Json::object()) const;

 private:
  JinjaTemplate template_;
  Json special_tokens_ = Json::object();  // bos_token, eos_token, unk_token, pad_token
};

}  // namespace kvgate::model::chat
