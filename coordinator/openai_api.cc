#include "coordinator/openai_api.h"

#include <limits>

#include "absl/strings/str_cat.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;

absl::Status Bad(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", why));
}

// A JSON number that must be finite (doubles) or integral (ints); null counts as absent.
absl::StatusOr<double> Number(const json& v, const std::string& field) {
  if (!v.is_number()) return Bad(field, "must be a number");
  return v.get<double>();
}

absl::StatusOr<int64_t> Integer(const json& v, const std::string& field) {
  if (!v.is_number_integer()) return Bad(field, "must be an integer");
  return v.get<int64_t>();
}

// The fields kvgate reads; any other field is refused by name (a typo must not be ignored
// silently), except the ones OpenAI clients send by default and that change nothing here.
constexpr const char* kCommon[] = {"model",
                                   "max_tokens",
                                   "max_completion_tokens",
                                   "temperature",
                                   "top_p",
                                   "stop",
                                   "seed",
                                   "stream",
                                   "stream_options",
                                   "presence_penalty",
                                   "frequency_penalty",
                                   "n",
                                   "user",
                                   "logprobs",
                                   "top_k",
                                   "min_p",
                                   "repetition_penalty",
                                   "ignore_eos",
                                   "kv_policy",
                                   "kv_budget",
                                   "kv_chunk",
                                   "kv_allocation",
                                   "kv_prefill",
                                   "kv_weights",
                                   "stop_token_ids",
                                   "request_id",
                                   "logit_bias"};
constexpr const char* kCompletion[] = {"prompt", "echo", "best_of", "suffix"};
constexpr const char* kChat[] = {"messages",
                                 "top_logprobs",
                                 "tools",
                                 "tool_choice",
                                 "response_format",
                                 "parallel_tool_calls",
                                 "continue_final_message",
                                 "add_generation_prompt"};

template <size_t N>
bool In(const char* const (&list)[N], const std::string& key) {
  for (const char* k : list) {
    if (key == k) return true;
  }
  return false;
}

}  // namespace

namespace {

// The body's object shape, its field names and the model it names.
absl::Status CheckBody(const json& body, const std::string& model_name, bool chat) {
  if (!body.is_object()) return absl::InvalidArgumentError("the body must be a JSON object");
  for (const auto& [key, value] : body.items()) {
    if (!In(kCommon, key) && !(chat ? In(kChat, key) : In(kCompletion, key))) {
      return Bad(key,
                 chat && In(kCompletion, key) ? "not a chat completions field" : "unknown field");
    }
  }
  if (!body.contains("model") || !body["model"].is_string()) {
    return Bad("model", "a string is required");
  }
  if (body["model"].get<std::string>() != model_name) {
    return absl::NotFoundError(
        absl::StrCat("model: this server serves '", model_name, "' only (GET /v1/models)"));
  }
  return absl::OkStatus();
}

// The fields both endpoints share: limits, sampling, stops, streaming, kvgate's own.
absl::Status ParseCommon(const json& body, CompletionCall* out);

}  // namespace

absl::StatusOr<CompletionCall> ParseCompletionRequest(const json& body,
                                                      const std::string& model_name) {
  if (absl::Status s = CheckBody(body, model_name, /*chat=*/false); !s.ok()) return s;
  CompletionCall call;
  v1::GenerateRequest& r = call.request;
  auto has = [&](const char* key) { return body.contains(key) && !body[key].is_null(); };
  if (!has("prompt")) return Bad("prompt", "required");
  const json& p = body["prompt"];
  auto token_array = [&](const json& a) -> absl::Status {
    for (const json& t : a) {
      if (!t.is_number_integer()) return Bad("prompt", "token ids must be integers");
      const int64_t id = t.get<int64_t>();
      if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
        return Bad("prompt", absl::StrCat("token id ", id, " is out of range"));
      }
      r.mutable_token_ids()->add_ids(static_cast<int32_t>(id));
    }
    return absl::OkStatus();
  };
  if (p.is_string()) {
    r.set_text(p.get<std::string>());
  } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
    r.set_text(p[0].get<std::string>());
  } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
    if (absl::Status s = token_array(p); !s.ok()) return s;
  } else if (p.is_array() && p.size() == 1 && p[0].is_array()) {
    if (absl::Status s = token_array(p[0]); !s.ok()) return s;
  } else if (p.is_array() && p.size() > 1) {
    return Bad("prompt", "one prompt per request (batches of prompts are not supported)");
  } else {
    return Bad("prompt", "a string, a list with one string, or a list of token ids");
  }

  if (has("best_of")) {
    absl::StatusOr<int64_t> n = Integer(body["best_of"], "best_of");
    if (!n.ok()) return n.status();
    if (*n != 1) return Bad("best_of", "only best_of = 1 is supported");
  }
  if (has("suffix")) return Bad("suffix", "not supported");
  if (has("logprobs")) {
    absl::StatusOr<int64_t> v = Integer(body["logprobs"], "logprobs");
    if (!v.ok()) return v.status();
    if (*v < 0 || *v > 20) return Bad("logprobs", "must be in [0, 20]");
    r.mutable_sampling()->set_logprobs(static_cast<int32_t>(*v));
    call.logprobs = true;
  }
  if (has("echo")) {
    if (!body["echo"].is_boolean()) return Bad("echo", "must be true or false");
    call.echo = body["echo"].get<bool>();
    if (call.echo) return Bad("echo", "not supported");
  }
  if (absl::Status s = ParseCommon(body, &call); !s.ok()) return s;
  return call;
}

absl::StatusOr<CompletionCall> ParseChatRequest(const json& body, const std::string& model_name) {
  if (absl::Status s = CheckBody(body, model_name, /*chat=*/true); !s.ok()) return s;
  CompletionCall call;
  call.chat = true;
  auto has = [&](const char* key) { return body.contains(key) && !body[key].is_null(); };
  if (!has("messages") || !body["messages"].is_array() || body["messages"].empty()) {
    return Bad("messages", "a non-empty list of messages is required");
  }
  v1::Chat* chat = call.request.mutable_chat();
  const json& messages = body["messages"];
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return Bad(field, "must be an object with role and content");
    for (const auto& [key, value] : m.items()) {
      if (key == "tool_calls" && !(value.is_array() && value.empty()) && !value.is_null()) {
        return Bad(field + ".tool_calls", "tool calls are not supported");
      }
      if (key != "role" && key != "content" && key != "name" && key != "tool_calls" &&
          key != "tool_call_id") {
        return Bad(absl::StrCat(field, ".", key), "unknown field");
      }
    }
    if (!m.contains("role") || !m["role"].is_string()) return Bad(field + ".role", "required");
    std::string role = m["role"].get<std::string>();
    if (role == "developer") role = "system";  // OpenAI's newer name for the system role
    std::string content;
    const json c = m.value("content", json());
    if (c.is_string()) {
      content = c.get<std::string>();
    } else if (c.is_array()) {  // content parts: text only
      for (size_t k = 0; k < c.size(); ++k) {
        const json& part = c[k];
        const std::string pf = absl::StrCat(field, ".content[", k, "]");
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return Bad(pf, "only {\"type\": \"text\", \"text\": ...} parts are supported");
        }
        if (k > 0) content += "\n";
        content += part["text"].get<std::string>();
      }
    } else if (!c.is_null()) {
      return Bad(field + ".content", "a string or a list of text parts");
    }
    v1::ChatMessage* out = chat->add_messages();
    out->set_role(role);
    out->set_content(std::move(content));
  }
  if (has("tools") && !(body["tools"].is_array() && body["tools"].empty())) {
    return Bad("tools", "tool calling is not supported");
  }
  if (has("tool_choice") && body["tool_choice"] != "none" && body["tool_choice"] != "auto") {
    return Bad("tool_choice", "tool calling is not supported");
  }
  if (has("response_format") && !(body["response_format"].is_object() &&
                                  body["response_format"].value("type", "") == "text")) {
    return Bad("response_format", "only {\"type\": \"text\"} is supported");
  }
  if (has("logprobs")) {
    if (!body["logprobs"].is_boolean()) return Bad("logprobs", "must be true or false");
    call.logprobs = body["logprobs"].get<bool>();
  }
  int64_t top = 0;
  if (has("top_logprobs")) {
    absl::StatusOr<int64_t> v = Integer(body["top_logprobs"], "top_logprobs");
    if (!v.ok()) return v.status();
    if (*v < 0 || *v > 20) return Bad("top_logprobs", "must be in [0, 20]");
    if (!call.logprobs) return Bad("top_logprobs", "needs logprobs: true");
    top = *v;
  }
  if (call.logprobs) call.request.mutable_sampling()->set_logprobs(static_cast<int32_t>(top));
  bool add_generation_prompt = true;
  for (const char* key : {"add_generation_prompt", "continue_final_message"}) {
    if (!has(key)) continue;
    if (!body[key].is_boolean()) return Bad(key, "must be true or false");
  }
  if (has("add_generation_prompt")) add_generation_prompt = body["add_generation_prompt"];
  const bool continue_final = has("continue_final_message") && body["continue_final_message"];
  if (continue_final && add_generation_prompt && has("add_generation_prompt")) {
    return Bad("continue_final_message", "cannot be combined with add_generation_prompt: true");
  }
  if (!add_generation_prompt && !continue_final) {
    return Bad("add_generation_prompt",
               "false only with continue_final_message: true (the reply continues the last "
               "message)");
  }
  chat->set_continue_final_message(continue_final);
  if (absl::Status s = ParseCommon(body, &call); !s.ok()) return s;
  return call;
}

namespace {

absl::Status ParseCommon(const json& body, CompletionCall* out) {
  CompletionCall& call = *out;
  v1::GenerateRequest& r = call.request;
  auto has = [&](const char* key) { return body.contains(key) && !body[key].is_null(); };
  if (has("n")) {
    absl::StatusOr<int64_t> n = Integer(body["n"], "n");
    if (!n.ok()) return n.status();
    if (*n != 1) return Bad("n", "only n = 1 is supported");
  }
  if (has("logit_bias") && !(body["logit_bias"].is_object() && body["logit_bias"].empty())) {
    return Bad("logit_bias", "not supported");
  }
  for (const char* key : {"max_tokens", "max_completion_tokens"}) {
    if (!has(key)) continue;
    absl::StatusOr<int64_t> v = Integer(body[key], key);
    if (!v.ok()) return v.status();
    if (*v < 1) return Bad(key, "must be at least 1");
    r.set_max_tokens(*v);
  }
  v1::SamplingParams* s = r.mutable_sampling();
  for (const auto& [key, set] :
       std::initializer_list<std::pair<const char*, void (v1::SamplingParams::*)(double)>>{
           {"temperature", &v1::SamplingParams::set_temperature},
           {"top_p", &v1::SamplingParams::set_top_p},
           {"min_p", &v1::SamplingParams::set_min_p},
           {"repetition_penalty", &v1::SamplingParams::set_repetition_penalty},
           {"presence_penalty", &v1::SamplingParams::set_presence_penalty},
           {"frequency_penalty", &v1::SamplingParams::set_frequency_penalty}}) {
    if (!has(key)) continue;
    absl::StatusOr<double> v = Number(body[key], key);
    if (!v.ok()) return v.status();
    (s->*set)(*v);
  }
  if (has("top_k")) {
    absl::StatusOr<int64_t> v = Integer(body["top_k"], "top_k");
    if (!v.ok()) return v.status();
    if (*v < -1) return Bad("top_k", "must be -1 (off), 0 (off) or positive");
    s->set_top_k(*v < 0 ? 0 : *v);
  }
  if (has("seed")) {
    absl::StatusOr<int64_t> v = Integer(body["seed"], "seed");
    if (!v.ok()) return v.status();
    s->set_seed(static_cast<uint64_t>(*v));
  }
  if (has("stop")) {
    const json& st = body["stop"];
    if (st.is_string()) {
      r.add_stop(st.get<std::string>());
    } else if (st.is_array()) {
      for (const json& x : st) {
        if (!x.is_string()) return Bad("stop", "a string or a list of strings");
        r.add_stop(x.get<std::string>());
      }
    } else {
      return Bad("stop", "a string or a list of strings");
    }
  }
  if (has("stop_token_ids")) {
    if (!body["stop_token_ids"].is_array()) return Bad("stop_token_ids", "a list of integers");
    for (const json& x : body["stop_token_ids"]) {
      if (!x.is_number_integer()) return Bad("stop_token_ids", "a list of integers");
      r.add_stop_token_ids(x.get<int32_t>());
    }
  }
  if (has("ignore_eos")) {
    if (!body["ignore_eos"].is_boolean()) return Bad("ignore_eos", "must be true or false");
    r.set_ignore_eos(body["ignore_eos"].get<bool>());
  }
  if (has("request_id")) {
    if (!body["request_id"].is_string()) return Bad("request_id", "must be a string");
    r.set_request_id(body["request_id"].get<std::string>());
  }
  if (has("stream")) {
    if (!body["stream"].is_boolean()) return Bad("stream", "must be true or false");
    call.stream = body["stream"].get<bool>();
  }
  if (has("stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) return Bad("stream_options", "must be an object");
    if (!call.stream) return Bad("stream_options", "only with stream: true");
    for (const auto& [key, value] : so.items()) {
      if (key != "include_usage") return Bad(absl::StrCat("stream_options.", key), "unknown");
      if (!value.is_boolean()) return Bad("stream_options.include_usage", "true or false");
      call.include_usage = value.get<bool>();
    }
  }
  // kvgate's own extra body parameters.
  v1::KvParams* kv = r.mutable_kv();
  for (const auto& [key, set] :
       std::initializer_list<std::pair<const char*, void (v1::KvParams::*)(const std::string&)>>{
           {"kv_policy", &v1::KvParams::set_policy},
           {"kv_allocation", &v1::KvParams::set_allocation},
           {"kv_prefill", &v1::KvParams::set_prefill},
           {"kv_weights", &v1::KvParams::set_weights_name}}) {
    if (!has(key)) continue;
    if (!body[key].is_string()) return Bad(key, "must be a string");
    (kv->*set)(body[key].get<std::string>());
  }
  for (const auto& [key, set] :
       std::initializer_list<std::pair<const char*, void (v1::KvParams::*)(int64_t)>>{
           {"kv_budget", &v1::KvParams::set_budget}, {"kv_chunk", &v1::KvParams::set_chunk}}) {
    if (!has(key)) continue;
    absl::StatusOr<int64_t> v = Integer(body[key], key);
    if (!v.ok()) return v.status();
    if (*v < 0) return Bad(key, "must be >= 0");
    (kv->*set)(*v);
  }
  return absl::OkStatus();
}

}  // namespace

json KvStatsJson(const v1::KvStats& kv) {
  json j = {{"policy", kv.policy()},
            {"budget", kv.budget()},
            {"allocation", kv.allocation()},
            {"prefill", kv.prefill()},
            {"evicted_tokens", kv.evicted_tokens()},
            {"retained_tokens", kv.retained_tokens()},
            {"eviction_ratio", kv.eviction_ratio()},
            {"max_retained_per_head", kv.max_retained_per_head()},
            {"peak_kv_bytes", kv.peak_kv_bytes()}};
  json stages = json::array();
  for (const v1::StageBudget& s : kv.stages()) {
    stages.push_back({{"stage", s.stage()},
                      {"first_layer", s.first_layer()},
                      {"last_layer", s.last_layer()},
                      {"budget", s.budget()}});
  }
  j["stages"] = std::move(stages);
  return j;
}

json UsageJson(const v1::GenerateFinal& final) {
  const int64_t prompt = final.usage().prompt_tokens();
  const int64_t completion = final.usage().completion_tokens();
  return {{"prompt_tokens", prompt},
          {"completion_tokens", completion},
          {"total_tokens", prompt + completion},
          {"kv", KvStatsJson(final.kv())}};
}

std::string FinishReason(const std::string& kvgate_reason) { return kvgate_reason; }

json CompletionObject(const std::string& id, int64_t created, const std::string& model_name,
                      const std::string& text, const v1::GenerateFinal& final,
                      const json& logprobs) {
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model_name},
          {"choices", json::array({{{"index", 0},
                                    {"text", text},
                                    {"logprobs", logprobs},
                                    {"finish_reason", FinishReason(final.finish_reason())}}})},
          {"usage", UsageJson(final)}};
}

json CompletionChunk(const std::string& id, int64_t created, const std::string& model_name,
                     const std::string& text, const std::string* finish_reason,
                     const json& logprobs) {
  json choice = {{"index", 0}, {"text", text}, {"logprobs", logprobs}};
  choice["finish_reason"] = finish_reason != nullptr ? json(*finish_reason) : json(nullptr);
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model_name},
          {"choices", json::array({std::move(choice)})}};
}

json ChatCompletionObject(const std::string& id, int64_t created, const std::string& model_name,
                          const std::string& text, const v1::GenerateFinal& final,
                          const json& logprobs) {
  return {{"id", id},
          {"object", "chat.completion"},
          {"created", created},
          {"model", model_name},
          {"choices", json::array({{{"index", 0},
                                    {"message", {{"role", "assistant"}, {"content", text}}},
                                    {"logprobs", logprobs},
                                    {"finish_reason", FinishReason(final.finish_reason())}}})},
          {"usage", UsageJson(final)}};
}

json ChatChunk(const std::string& id, int64_t created, const std::string& model_name, json delta,
               const std::string* finish_reason, const json& logprobs) {
  json choice = {{"index", 0}, {"delta", std::move(delta)}, {"logprobs", logprobs}};
  choice["finish_reason"] = finish_reason != nullptr ? json(*finish_reason) : json(nullptr);
  return {{"id", id},
          {"object", "chat.completion.chunk"},
          {"created", created},
          {"model", model_name},
          {"choices", json::array({std::move(choice)})}};
}

namespace {

json Bytes(const std::string& text) {
  json out = json::array();
  for (const char c : text) out.push_back(static_cast<int>(static_cast<unsigned char>(c)));
  return out;
}

}  // namespace

json CompletionLogprobs(const std::vector<v1::TokenLogprob>& tokens, int64_t text_offset) {
  json out = {{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (const v1::TokenLogprob& t : tokens) {
    out["tokens"].push_back(t.token());
    out["token_logprobs"].push_back(t.logprob());
    json top = json::object();
    for (const v1::TopLogprob& alt : t.top()) {
      if (!top.contains(alt.token())) top[alt.token()] = alt.logprob();
    }
    out["top_logprobs"].push_back(std::move(top));
    out["text_offset"].push_back(text_offset);
    text_offset += static_cast<int64_t>(t.token().size());
  }
  return out;
}

json ChatLogprobs(const std::vector<v1::TokenLogprob>& tokens) {
  json content = json::array();
  for (const v1::TokenLogprob& t : tokens) {
    json top = json::array();
    for (const v1::TopLogprob& alt : t.top()) {
      top.push_back(
          {{"token", alt.token()}, {"logprob", alt.logprob()}, {"bytes", Bytes(alt.token())}});
    }
    content.push_back({{"token", t.token()},
                       {"logprob", t.logprob()},
                       {"bytes", Bytes(t.token())},
                       {"top_logprobs", std::move(top)}});
  }
  return {{"content", std::move(content)}};
}

int HttpStatusFor(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    case absl::StatusCode::kCancelled:
      return 499;
    default:
      return 500;
  }
}

json ErrorJson(const absl::Status& status) {
  const int http = HttpStatusFor(status.code());
  std::string type = http == 400   ? "invalid_request_error"
                     : http == 401 ? "authentication_error"
                     : http == 404 ? "not_found_error"
                     : http == 429 ? "rate_limit_error"
                     : http == 503 ? "service_unavailable"
                                   : "server_error";
  std::string message(status.message());
  json param = nullptr;
  if (http == 400) {  // "field: why" names the field
    if (size_t colon = message.find(':');
        colon != std::string::npos && colon < 64 && message.find(' ') > colon) {
      param = message.substr(0, colon);
    }
  }
  return {{"error", {{"message", message}, {"type", type}, {"param", param}, {"code", http}}}};
}

}  // namespace kvgate::coordinator
