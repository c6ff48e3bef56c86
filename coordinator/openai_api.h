// The OpenAI-compatible API's JSON (https://platform.openai.com/docs/api-reference/completions,
// .../chat)
// to and from kvgate's own messages: a completion request becomes a v1::GenerateRequest, which
// the same edge as gRPC's (request.h) then validates; the engine's output becomes completion
// objects, stream chunks and errors in OpenAI's shapes. No I/O here (http_frontend.h serves it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/v1/kvgate.pb.h"
#include "nlohmann/json.hpp"

namespace kvgate::coordinator {

struct CompletionCall {
  v1::GenerateRequest request;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool echo = false;
  bool chat = false;      // /v1/chat/completions
  bool logprobs = false;  // the response carries logprobs
};

// POST /v1/completions. `model_name`: the one model served (a request naming another is
// NOT_FOUND). INVALID_ARGUMENT naming the field for anything malformed or unsupported.
absl::StatusOr<CompletionCall> ParseCompletionRequest(const nlohmann::json& body,
                                                      const std::string& model_name);

// POST /v1/chat/completions: `messages` (text content; "developer" is "system") become a
// prompt.chat the model's chat template renders; tools, non-text parts and logprobs are refused
// by name. Otherwise the same fields as completions.
absl::StatusOr<CompletionCall> ParseChatRequest(const nlohmann::json& body,
                                                const std::string& model_name);

// The final KV statistics as the `usage.kv` extension.
nlohmann::json KvStatsJson(const v1::KvStats& kv);

// A whole (non-streamed) completion object.
nlohmann::json CompletionObject(const std::string& id, int64_t created,
                                const std::string& model_name, const std::string& text,
                                const v1::GenerateFinal& final,
                                const nlohmann::json& logprobs = nullptr);

// One `text_completion` stream chunk with `text` (finish_reason null unless given).
nlohmann::json CompletionChunk(const std::string& id, int64_t created,
                               const std::string& model_name, const std::string& text,
                               const std::string* finish_reason,
                               const nlohmann::json& logprobs = nullptr);

// A whole chat.completion object (the assistant message with `text`).
nlohmann::json ChatCompletionObject(const std::string& id, int64_t created,
                                    const std::string& model_name, const std::string& text,
                                    const v1::GenerateFinal& final,
                                    const nlohmann::json& logprobs = nullptr);

// One chat.completion.chunk with `delta` ({"role": "assistant", "content": ""} first, then
// {"content": text}, {} with the finish_reason).
nlohmann::json ChatChunk(const std::string& id, int64_t created, const std::string& model_name,
                         nlohmann::json delta, const std::string* finish_reason,
                         const nlohmann::json& logprobs = nullptr);

// The logprobs object of a completion choice (tokens, token_logprobs, top_logprobs as
// {token: logprob}, text_offset counted from `text_offset`) and of a chat choice
// ({"content": [{token, logprob, bytes, top_logprobs}]}).
nlohmann::json CompletionLogprobs(const std::vector<v1::TokenLogprob>& tokens, int64_t text_offset);
nlohmann::json ChatLogprobs(const std::vector<v1::TokenLogprob>& tokens);

// The usage object (prompt, completion and total tokens, plus `kv`).
nlohmann::json UsageJson(const v1::GenerateFinal& final);

// OpenAI's error body: {"error": {"message", "type", "param", "code"}}, and the HTTP status for
// an absl status code (400, 401, 404, 429 when admission refuses, 503 while not ready, 504 on a
// deadline, 500 otherwise).
nlohmann::json ErrorJson(const absl::Status& status);
int HttpStatusFor(absl::StatusCode code);

// "stop" | "length" | "abort" (kvgate) -> OpenAI's finish_reason ("stop" | "length" | "abort").
std::string FinishReason(const std::string& kvgate_reason);

}  // namespace kvgate::coordinator
