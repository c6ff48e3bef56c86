#include "coordinator/request.h"

#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/sampling/logprobs.h"
#include "security/secrets.h"

namespace kvgate::coordinator {

namespace {

absl::Status Field(absl::string_view field, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(field, ": ", status.message()));
}

constexpr int64_t kDefaultMaxTokens = 256;
constexpr int64_t kDefaultPrefillChunk = 512;
// Limits on request fields (validated once, here at the edge).
constexpr size_t kMaxRequestIdChars = 128;
constexpr int kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 512;
constexpr int kMaxStopTokenIds = 64;
constexpr size_t kMaxPromptBytes = size_t{8} << 20;
constexpr int kMaxChatMessages = 4096;
constexpr int64_t kMaxKvParam = int64_t{1} << 31;  // budgets, chunks, sinks, windows, tails

// The conversation as the model's chat template renders it (transformers' apply_chat_template:
// add_generation_prompt, or continue_final_message: the text cut after the last message).
absl::StatusOr<std::string> RenderChat(const v1::Chat& chat,
                                       const model::chat::ChatTemplate* chat_template) {
  if (chat_template == nullptr) {
    return absl::InvalidArgumentError(
        "prompt.chat: the model has no chat template (tokenizer_config.json's chat_template); "
        "start the server with --chat-template FILE, or send prompt.text");
  }
  if (chat.messages().empty()) return absl::InvalidArgumentError("prompt.chat: no messages");
  if (chat.messages_size() > kMaxChatMessages) {
    return absl::InvalidArgumentError(absl::StrCat("prompt.chat: ", chat.messages_size(),
                                                   " messages; at most ", kMaxChatMessages));
  }
  size_t bytes = 0;
  std::vector<model::chat::ChatMessage> messages;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& m = chat.messages(i);
    if (m.role().empty() || m.role().size() > 64) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt.chat.messages[", i, "].role: 1 to 64 characters"));
    }
    bytes += m.role().size() + m.content().size();
    messages.push_back({m.role(), m.content()});
  }
  if (bytes > kMaxPromptBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt.chat: ", bytes, " bytes; at most ", kMaxPromptBytes));
  }
  const bool cont = chat.continue_final_message();
  absl::StatusOr<std::string> text = chat_template->Apply(messages, !cont);
  if (!text.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt.chat: the chat template refused it: ", text.status().message()));
  }
  if (cont) {
    const std::string last(absl::StripAsciiWhitespace(messages.back().content));
    const size_t at = last.empty() ? std::string::npos : text->rfind(last);
    if (at == std::string::npos) {
      return absl::InvalidArgumentError(
          "prompt.chat.continue_final_message: the last message's text is not in the rendered "
          "conversation");
    }
    text->resize(at + last.size());
  }
  return text;
}

}  // namespace

std::string RandomRequestId() { return absl::StrCat("req-", security::RandomHex(16)); }

absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv,
                                               const WeightsRegistry& weights,
                                               const model::chat::ChatTemplate* chat_template) {
  const model::ModelConfig& c = generator.config();
  PreparedRequest out;
  const std::string& id = request.request_id();
  if (id.size() > kMaxRequestIdChars) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_id: ", id.size(), " characters; at most ", kMaxRequestIdChars));
  }
  for (char ch : id) {
    if (ch < 0x20 || ch > 0x7e) {
      return absl::InvalidArgumentError("request_id: only printable ASCII characters are allowed");
    }
  }
  if (request.prompt_case() == v1::GenerateRequest::kText &&
      request.text().size() > kMaxPromptBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt.text: ", request.text().size(), " bytes; at most ", kMaxPromptBytes));
  }
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (generator.tokenizer() == nullptr) {
        return absl::InvalidArgumentError(
            "prompt.text: the model has no tokenizer; send prompt.token_ids");
      }
      auto ids = generator.tokenizer()->Encode(request.text(), /*add_special=*/true);
      if (!ids.ok()) return Field("prompt.text", ids.status());
      out.prompt_ids = *std::move(ids);
      if (out.prompt_ids.empty()) {
        return absl::InvalidArgumentError("prompt.text: the text gives no tokens");
      }
      break;
    }
    case v1::GenerateRequest::kChat: {
      ASSIGN_OR_RETURN(std::string text, RenderChat(request.chat(), chat_template));
      if (generator.tokenizer() == nullptr) {
        return absl::InvalidArgumentError("prompt.chat: the model has no tokenizer");
      }
      // The template wrote the special tokens (BOS included) as text.
      auto ids = generator.tokenizer()->Encode(text, /*add_special=*/false);
      if (!ids.ok()) return Field("prompt.chat", ids.status());
      out.prompt_ids = *std::move(ids);
      if (out.prompt_ids.empty()) {
        return absl::InvalidArgumentError("prompt.chat: the rendered conversation gives no tokens");
      }
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      out.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      if (out.prompt_ids.empty()) {
        return absl::InvalidArgumentError("prompt.token_ids: no token ids given");
      }
      for (int32_t id : out.prompt_ids) {
        if (id < 0 || id >= c.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat(
              "prompt.token_ids: id ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
        }
      }
      break;
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError(
          "prompt: give prompt.text, prompt.token_ids or prompt.chat");
  }
  if (static_cast<int64_t>(out.prompt_ids.size()) >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", out.prompt_ids.size(),
                                                   " tokens do not fit the model's context of ",
                                                   c.max_position_embeddings, " tokens"));
  }

  model::GenerateOptions& opt = out.options;
  if (request.max_tokens() < 0 || request.max_tokens() > c.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens: ", request.max_tokens(),
                                                   " is not in [1, ", c.max_position_embeddings,
                                                   "] (0 means ", kDefaultMaxTokens, ")"));
  }
  opt.max_tokens = request.max_tokens() == 0 ? kDefaultMaxTokens : request.max_tokens();
  if (request.prefill_chunk() < 0) {
    return absl::InvalidArgumentError("prefill_chunk: must be >= 0 (0: the default)");
  }
  opt.prefill_chunk = request.prefill_chunk() == 0 ? kDefaultPrefillChunk : request.prefill_chunk();

  const v1::SamplingParams& s = request.sampling();
  opt.sampling.temperature = s.has_temperature() ? s.temperature() : 1.0;
  opt.sampling.top_k = s.top_k();
  opt.sampling.top_p = s.has_top_p() ? s.top_p() : 1.0;
  opt.sampling.min_p = s.min_p();
  opt.sampling.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0;
  opt.sampling.presence_penalty = s.presence_penalty();
  opt.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) opt.sampling.seed = s.seed();
  if (s.has_logprobs()) {
    if (s.logprobs() < 0 || s.logprobs() > model::kMaxTopLogprobs) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sampling.logprobs: ", s.logprobs(), " is not in [0, ", model::kMaxTopLogprobs, "]"));
    }
    opt.sampling.logprobs = s.logprobs();
  }
  RETURN_IF_ERROR(Field("sampling", opt.sampling.Validate()));

  if (request.stop_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop: ", request.stop_size(), " stop strings; at most ", kMaxStopStrings));
  }
  for (const std::string& stop : request.stop()) {
    if (stop.empty()) return absl::InvalidArgumentError("stop: a stop string must not be empty");
    if (stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop: a stop string of ", stop.size(),
                                                     " bytes; at most ", kMaxStopStringBytes));
    }
  }
  if (request.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stop_token_ids: ", request.stop_token_ids_size(), " ids; at most ", kMaxStopTokenIds));
  }
  for (int32_t stop_id : request.stop_token_ids()) {
    if (stop_id < 0 || stop_id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_token_ids: id ", stop_id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (request.stop_size() > 0 && generator.tokenizer() == nullptr) {
    return absl::InvalidArgumentError("stop: stop strings need a model with a tokenizer");
  }
  opt.stop_strings.assign(request.stop().begin(), request.stop().end());
  opt.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  opt.ignore_eos = request.ignore_eos();

  const v1::KvParams& kv = request.kv();
  if (kv.policy().empty()) {
    if (kv.budget() != 0 || !kv.weights_name().empty()) {
      return absl::InvalidArgumentError("kv.policy: a budget or weights_name needs a policy");
    }
    opt.kv = default_kv;
  } else {
    cache::EvictionParams p;
    p.policy = kv.policy();
    p.budget = kv.budget();
    if (kv.chunk() < 0 || kv.sinks() < 0 || kv.window() < 0 || kv.ea_future() < 0) {
      return absl::InvalidArgumentError(
          "kv: chunk, sinks, window and ea_future must be >= 0 (0: default)");
    }
    for (const auto& [name, value] :
         std::vector<std::pair<const char*, int64_t>>{{"kv.budget", kv.budget()},
                                                      {"kv.chunk", kv.chunk()},
                                                      {"kv.sinks", kv.sinks()},
                                                      {"kv.window", kv.window()},
                                                      {"kv.ea_future", kv.ea_future()}}) {
      if (value > kMaxKvParam) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": ", value, " is larger than any context (at most 2^31)"));
      }
    }
    if (kv.has_stabilizers() && (kv.stabilizers() < 0 || kv.stabilizers() > kMaxKvParam)) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv.stabilizers: ", kv.stabilizers(), " is not in [0, 2^31]"));
    }
    if (kv.has_protected_tail() && (kv.protected_tail() < 0 || kv.protected_tail() > kMaxKvParam)) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv.protected_tail: ", kv.protected_tail(), " is not in [0, 2^31]"));
    }
    if (kv.chunk() > 0) p.chunk = kv.chunk();
    if (kv.sinks() > 0) p.sinks = kv.sinks();
    if (kv.window() > 0) p.window = kv.window();
    if (kv.ea_future() > 0) p.ea_future = kv.ea_future();
    p.position = kv.position();
    if (kv.has_stabilizers()) p.stabilizers = kv.stabilizers();
    if (kv.has_protected_tail()) p.protected_tail = kv.protected_tail();
    opt.kv = std::move(p);
  }
  // Allocation and prefill mode: the request's, else the server's.
  opt.kv.allocation = kv.allocation().empty() ? default_kv.allocation : kv.allocation();
  if (kv.allocation().empty() && opt.kv.allocation == "adaptive" &&
      cache::FindPolicy(opt.kv.policy) != nullptr &&
      opt.kv.kind() == cache::PolicyKind::kStreaming) {
    opt.kv.allocation = "uniform";  // the server's adaptive default has no scores to go by
  }
  opt.kv.prefill = kv.prefill().empty() ? default_kv.prefill : kv.prefill();
  if (opt.kv.allocation.size() > 64 || opt.kv.prefill.size() > 64) {
    return absl::InvalidArgumentError("kv: allocation and prefill are short names");
  }
  // Whole-prompt prefill holds the prompt until it is compressed: its slab is sized for it.
  opt.kv.prompt_tokens = static_cast<int64_t>(out.prompt_ids.size());
  if (!kv.policy().empty()) {
    if (cache::FindPolicy(opt.kv.policy) == nullptr) return Field("kv", opt.kv.Validate());
    if (opt.kv.learned()) {
      ASSIGN_OR_RETURN(opt.kv.weights, weights.Resolve(opt.kv.policy, kv.weights_name()));
    } else if (!kv.weights_name().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "kv.weights_name: applies to locret and attention-gate, not to ", opt.kv.policy));
    }
  }
  RETURN_IF_ERROR(Field("kv", opt.kv.Validate()));
  return out;
}

}  // namespace kvgate::coordinator
