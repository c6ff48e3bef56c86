// The OpenAI JSON edge (openai_api.h) and the metrics' exposition format (metrics.h).
#include "coordinator/openai_api.h"

#include <string>

#include "coordinator/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

absl::StatusOr<CompletionCall> Parse(const std::string& body) {
  return ParseCompletionRequest(json::parse(body), "m");
}

TEST(OpenAiApiTest, CompletionFieldsReachTheRequest) {
  absl::StatusOr<CompletionCall> c = Parse(R"({
    "model": "m", "prompt": "hello", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
    "stop": ["a", "b"], "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2,
    "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "stream": true,
    "stream_options": {"include_usage": true}, "kv_policy": "locret", "kv_budget": 64,
    "kv_chunk": 32, "kv_allocation": "pyramid", "user": "someone", "n": 1})");
  ASSERT_TRUE(c.ok()) << c.status();
  const v1::GenerateRequest& r = c->request;
  EXPECT_EQ(r.text(), "hello");
  EXPECT_EQ(r.max_tokens(), 7);
  EXPECT_DOUBLE_EQ(r.sampling().temperature(), 0.5);
  EXPECT_DOUBLE_EQ(r.sampling().top_p(), 0.9);
  EXPECT_EQ(r.stop_size(), 2);
  EXPECT_EQ(r.sampling().seed(), 3u);
  EXPECT_DOUBLE_EQ(r.sampling().presence_penalty(), 0.1);
  EXPECT_DOUBLE_EQ(r.sampling().frequency_penalty(), 0.2);
  EXPECT_EQ(r.sampling().top_k(), 5);
  EXPECT_DOUBLE_EQ(r.sampling().min_p(), 0.05);
  EXPECT_DOUBLE_EQ(r.sampling().repetition_penalty(), 1.1);
  EXPECT_EQ(r.kv().policy(), "locret");
  EXPECT_EQ(r.kv().budget(), 64);
  EXPECT_EQ(r.kv().chunk(), 32);
  EXPECT_EQ(r.kv().allocation(), "pyramid");
  EXPECT_TRUE(c->stream);
  EXPECT_TRUE(c->include_usage);
  // Token ids, alone or as the one prompt of a list; max_completion_tokens.
  c = Parse(R"({"model": "m", "prompt": [[5, 6, 7]], "max_completion_tokens": 2})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->request.token_ids().ids_size(), 3);
  EXPECT_EQ(c->request.max_tokens(), 2);
  EXPECT_FALSE(c->request.sampling().has_temperature());  // the server's default
}

TEST(OpenAiApiTest, BadRequestsNameTheField) {
  const std::pair<const char*, const char*> cases[] = {
      {R"({"prompt": "x"})", "model"},
      {R"({"model": "m"})", "prompt"},
      {R"({"model": "m", "prompt": "x", "n": 2})", "n"},
      {R"({"model": "m", "prompt": ["a", "b"]})", "prompt"},
      {R"({"model": "m", "prompt": [1, "b"]})", "prompt"},
      {R"({"model": "m", "prompt": [-1]})", "prompt"},
      {R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens"},
      {R"({"model": "m", "prompt": "x", "max_tokens": 1.5})", "max_tokens"},
      {R"({"model": "m", "prompt": "x", "temperature": "hot"})", "temperature"},
      {R"({"model": "m", "prompt": "x", "stop": 3})", "stop"},
      {R"({"model": "m", "prompt": "x", "logprobs": 21})", "logprobs"},
      {R"({"model": "m", "prompt": "x", "stream_options": {"include_usage": true}})",
       "stream_options"},
      {R"({"model": "m", "prompt": "x", "kv_budget": -1})", "kv_budget"},
      {R"({"model": "m", "prompt": "x", "max_tokenz": 3})", "max_tokenz"},
  };
  for (const auto& [body, field] : cases) {
    absl::StatusOr<CompletionCall> c = Parse(body);
    ASSERT_FALSE(c.ok()) << body;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_THAT(std::string(c.status().message()), HasSubstr(field)) << body;
    EXPECT_EQ(ErrorJson(c.status())["error"]["param"], field) << body;
  }
  absl::StatusOr<CompletionCall> other = Parse(R"({"model": "gpt-4", "prompt": "x"})");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(HttpStatusFor(other.status().code()), 404);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kResourceExhausted), 429);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kUnavailable), 503);
  EXPECT_EQ(HttpStatusFor(absl::StatusCode::kUnauthenticated), 401);
}

TEST(OpenAiApiTest, ChatMessagesBecomeAChatPrompt) {
  absl::StatusOr<CompletionCall> c = ParseChatRequest(json::parse(R"({
    "model": "m", "max_completion_tokens": 5, "temperature": 0, "stream": true,
    "messages": [{"role": "developer", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "a"},
                                              {"type": "text", "text": "b"}]},
                 {"role": "assistant", "content": null, "tool_calls": []},
                 {"role": "user", "content": "c", "name": "x"}],
    "tool_choice": "none", "kv_budget": 64})"),
                                                      "m");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->chat);
  EXPECT_TRUE(c->stream);
  const v1::Chat& chat = c->request.chat();
  ASSERT_EQ(chat.messages_size(), 4);
  EXPECT_EQ(chat.messages(0).role(), "system");
  EXPECT_EQ(chat.messages(1).content(), "a\nb");
  EXPECT_EQ(chat.messages(2).content(), "");
  EXPECT_FALSE(chat.continue_final_message());
  EXPECT_EQ(c->request.max_tokens(), 5);
  EXPECT_EQ(c->request.kv().budget(), 64);

  auto bad = [](const std::string& body) {
    absl::StatusOr<CompletionCall> r = ParseChatRequest(json::parse(body), "m");
    EXPECT_FALSE(r.ok()) << body;
    return std::string(r.status().message());
  };
  EXPECT_THAT(bad(R"({"model": "m", "messages": []})"), HasSubstr("messages"));
  EXPECT_THAT(
      bad(R"({"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}]})"),
      HasSubstr("prompt: not a chat completions field"));
  EXPECT_THAT(bad(R"({"model": "m", "messages": [{"role": "user", "content": 3}]})"),
              HasSubstr("messages[0].content"));
  EXPECT_THAT(bad(R"({"model": "m", "messages": [{"content": "x"}]})"),
              HasSubstr("messages[0].role"));
  EXPECT_THAT(bad(R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "json_object"}})"),
              HasSubstr("response_format"));
  EXPECT_THAT(bad(R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
                      "add_generation_prompt": false})"),
              HasSubstr("add_generation_prompt"));
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  Histogram h({0.1, 1.0});
  for (double v : {0.05, 0.1, 0.5, 2.0, 3.0}) h.Observe(v);
  std::string out;
  h.Render("x", "a=\"b\"", &out);
  EXPECT_THAT(out, HasSubstr("x_bucket{a=\"b\",le=\"0.1\"} 2\n"));  // le is inclusive
  EXPECT_THAT(out, HasSubstr("x_bucket{a=\"b\",le=\"1\"} 3\n"));
  EXPECT_THAT(out, HasSubstr("x_bucket{a=\"b\",le=\"+Inf\"} 5\n"));
  EXPECT_THAT(out, HasSubstr("x_count{a=\"b\"} 5\n"));
  EXPECT_THAT(out, HasSubstr("x_sum{a=\"b\"} 5.65\n"));
}

TEST(MetricsTest, RenderCountsRequestsAndWorkers) {
  Metrics m("mod\"el");
  m.FirstToken(0.2);
  m.InterToken(0.01);
  m.Finished("length", 10, 2, 0.3, 0.0);
  m.Failed();
  v1::Budgets b;
  v1::NodeBudget* n = b.add_nodes();
  n->set_node_id("w1");
  n->set_stage(0);
  n->set_alive(true);
  n->set_kv_used_bytes(25);
  n->set_kv_capacity_bytes(100);
  n->add_layer_caps(0);
  n->add_layer_caps(64);
  n->set_first_layer(2);
  const std::string out = m.Render(b, 1, 3);
  const std::string label = "model_name=\"mod\\\"el\"";
  EXPECT_THAT(out, HasSubstr("kvgate:prompt_tokens_total{" + label + "} 10\n"));
  EXPECT_THAT(
      out, HasSubstr("kvgate:request_success_total{" + label + ",finished_reason=\"length\"} 1\n"));
  EXPECT_THAT(out, HasSubstr("kvgate:request_failure_total{" + label + "} 1\n"));
  EXPECT_THAT(out, HasSubstr("kvgate:num_requests_waiting{" + label + "} 3\n"));
  EXPECT_THAT(out, HasSubstr("kvgate:kv_cache_usage_perc{" + label + "} 0.25\n"));
  EXPECT_THAT(out,
              HasSubstr("kvgate:layer_cap_tokens{" + label + ",stage=\"0\",layer=\"3\"} 64\n"));
  EXPECT_THAT(out, HasSubstr("# TYPE kvgate:time_to_first_token_seconds histogram\n"));
}

}  // namespace
}  // namespace kvgate::coordinator
