#include "coordinator/http_frontend.h"

#include <sys/socket.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "coordinator/openai_api.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "proto/grpc_status.h"
#include "security/secrets.h"

namespace kvgate::coordinator {
namespace {

using nlohmann::json;

constexpr size_t kMaxBodyBytes = size_t{16} << 20;
constexpr int kThreads = 256;  // a held stream occupies one
constexpr auto kKeepAlive = std::chrono::seconds(1);

// The engine's output for one request, queued for the HTTP thread that serves it.
class QueueSink final : public OutputSink {
 public:
  void Send(v1::GenerateResponse message) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      out_.push_back(std::move(message));
    }
    cv_.notify_all();
  }
  void Complete(grpc::Status status) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      status_ = std::move(status);
    }
    cv_.notify_all();
  }
  // Waits up to `wait` (forever when negative) for output, then moves what there is to `out`;
  // the final status once the engine has completed.
  std::optional<grpc::Status> Take(std::deque<v1::GenerateResponse>* out,
                                   std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(mu_);
    auto any = [&] { return !out_.empty() || status_.has_value(); };
    if (wait.count() < 0) {
      cv_.wait(lock, any);
    } else {
      cv_.wait_for(lock, wait, any);
    }
    while (!out_.empty()) {
      out->push_back(std::move(out_.front()));
      out_.pop_front();
    }
    return status_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::GenerateResponse> out_;  // guarded by mu_
  std::optional<grpc::Status> status_;    // guarded by mu_
};

void SendJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(), "application/json");
}

void SendError(httplib::Response& res, const absl::Status& status) {
  SendJson(res, HttpStatusFor(status.code()), ErrorJson(status));
}

std::string Bearer(const httplib::Request& req) {
  const std::string auth = req.get_header_value("Authorization");
  constexpr absl::string_view kPrefix = "Bearer ";
  if (auth.size() > kPrefix.size() &&
      absl::string_view(auth).substr(0, kPrefix.size()) == kPrefix) {
    return auth.substr(kPrefix.size());
  }
  return "";
}

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string SseData(const json& j) { return absl::StrCat("data: ", j.dump(), "\n\n"); }

// A stream in progress: what was taken from the queue and not yet written.
struct Stream {
  std::shared_ptr<Job> job;
  std::shared_ptr<QueueSink> sink;
  std::deque<v1::GenerateResponse> pending;
  std::optional<grpc::Status> status;
  std::string id, model;
  int64_t created = 0;
  bool include_usage = false;
  bool chat = false;
  bool logprobs = false;
  int64_t text_offset = 0;  // completions' logprobs: bytes of text before this chunk
  bool sent_role = false;   // chat: the first chunk carries the assistant role
  bool finished = false;
};

json TextChunk(Stream& s, const std::string& text, const std::string* finish_reason,
               const v1::TokenChunk* chunk = nullptr) {
  json logprobs = nullptr;
  if (s.logprobs && chunk != nullptr) {
    const std::vector<v1::TokenLogprob> tokens(chunk->logprobs().begin(), chunk->logprobs().end());
    logprobs = s.chat ? ChatLogprobs(tokens) : CompletionLogprobs(tokens, s.text_offset);
    for (const v1::TokenLogprob& t : tokens)
      s.text_offset += static_cast<int64_t>(t.token().size());
  }
  if (!s.chat) return CompletionChunk(s.id, s.created, s.model, text, finish_reason, logprobs);
  json delta = json::object();
  if (!text.empty()) delta["content"] = text;
  return ChatChunk(s.id, s.created, s.model, std::move(delta), finish_reason, logprobs);
}

// Writes what `s` holds; false when the client is gone.
bool WritePending(Stream& s, httplib::DataSink& sink) {
  auto write = [&](const std::string& text) { return sink.write(text.data(), text.size()); };
  if (s.chat && !s.sent_role && (!s.pending.empty() || s.status.has_value())) {
    s.sent_role = true;
    const json delta = {{"role", "assistant"}, {"content", ""}};
    if (!write(SseData(ChatChunk(s.id, s.created, s.model, delta, nullptr)))) return false;
  }
  while (!s.pending.empty()) {
    v1::GenerateResponse m = std::move(s.pending.front());
    s.pending.pop_front();
    if (m.has_chunk()) {
      if (m.chunk().text().empty() && (!s.logprobs || m.chunk().logprobs_size() == 0)) continue;
      if (!write(SseData(TextChunk(s, m.chunk().text(), nullptr, &m.chunk())))) return false;
    } else if (m.has_final()) {
      const std::string reason = FinishReason(m.final().finish_reason());
      if (!write(SseData(TextChunk(s, "", &reason)))) return false;
      if (s.include_usage) {
        json usage = TextChunk(s, "", nullptr);
        usage["choices"] = json::array();
        usage["usage"] = UsageJson(m.final());
        if (!write(SseData(usage))) return false;
      }
    }
  }
  if (s.status.has_value() && !s.finished) {
    s.finished = true;
    if (!s.status->ok()) {
      if (!write(SseData(ErrorJson(FromGrpc(*s.status))))) return false;
    }
    if (!write("data: [DONE]\n\n")) return false;
    sink.done();
  }
  return true;
}

}  // namespace

HttpFrontend::HttpFrontend(GenerationService* service) : service_(service) {}

HttpFrontend::~HttpFrontend() { Stop(); }

void HttpFrontend::Stop() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<int> HttpFrontend::Start(const std::string& host, int port) {
  server_ = std::make_unique<httplib::Server>();
  server_->new_task_queue = [] { return new httplib::ThreadPool(kThreads); };
  server_->set_payload_max_length(kMaxBodyBytes);
  // Each server-sent event goes out at once: without TCP_NODELAY, Nagle's algorithm holds a
  // small event until the previous one is acknowledged (delayed ACKs: ~40 ms of added TTFT).
  server_->set_tcp_nodelay(true);
  Routes();
  // The library listens with a backlog of 5 (compiled into Debian's libcpp-httplib): a burst of
  // clients connecting at once would see SYNs dropped and retried after 1, 3, 7... s. The
  // listening socket is noted as it is made and listens again with the system's maximum.
  auto listen_fd = std::make_shared<int>(-1);
  server_->set_socket_options([listen_fd](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));  // the library's default
    if (*listen_fd == -2) return;  // bound: sockets made later are not the listener
    *listen_fd = sock;             // the last one made while binding is the one that bound
  });
  const int bound =
      port == 0 ? server_->bind_to_any_port(host) : (server_->bind_to_port(host, port) ? port : -1);
  if (bound < 0) {
    return absl::UnavailableError(
        absl::StrCat("--http-port: cannot listen on ", host, ":", port, " (in use?)"));
  }
  if (*listen_fd >= 0) ::listen(*listen_fd, SOMAXCONN);
  *listen_fd = -2;
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return bound;
}

void HttpFrontend::Routes() {
  GenerationService* svc = service_;
  auto authorized = [svc](const httplib::Request& req, httplib::Response& res) {
    const security::KeyRing* keys = svc->options().api_keys.get();
    if (keys == nullptr) return true;
    const std::string key = Bearer(req);
    if (!key.empty() && keys->Contains(key)) return true;
    SendError(res, absl::UnauthenticatedError("a valid API key is required"));
    return false;
  };

  server_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok\n", "text/plain");
  });
  server_->Get("/ready", [svc](const httplib::Request&, httplib::Response& res) {
    const bool ready = svc->engine().ready();
    res.status = ready ? 200 : 503;
    res.set_content(ready ? "ready\n" : "not ready\n", "text/plain");
  });
  // Prometheus scrapes without the API key (like /health): it carries no prompt or output.
  server_->Get("/metrics", [svc](const httplib::Request&, httplib::Response& res) {
    res.set_content(svc->RenderMetrics(), "text/plain; version=0.0.4; charset=utf-8");
  });
  server_->Get("/v1/models",
               [svc, authorized](const httplib::Request& req, httplib::Response& res) {
                 if (!authorized(req, res)) return;
                 json model = {{"id", svc->options().model_name},
                               {"object", "model"},
                               {"created", svc->started_unix()},
                               {"owned_by", "kvgate"},
                               {"max_model_len", svc->max_context()}};
                 SendJson(res, 200, {{"object", "list"}, {"data", json::array({model})}});
               });

  // Completions and chat completions: parsed apart, then the same path into the engine.
  auto generate = [svc, authorized](const httplib::Request& req, httplib::Response& res,
                                    bool chat) {
    if (!authorized(req, res)) return;
    json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
    if (body.is_discarded()) {
      SendError(res, absl::InvalidArgumentError("the body is not valid JSON"));
      return;
    }
    absl::StatusOr<CompletionCall> call =
        chat ? ParseChatRequest(body, svc->options().model_name)
             : ParseCompletionRequest(body, svc->options().model_name);
    if (!call.ok()) {
      SendError(res, call.status());
      return;
    }
    auto stream = std::make_shared<Stream>();
    stream->sink = std::make_shared<QueueSink>();
    stream->job = std::make_shared<Job>();
    stream->job->owner_key = Bearer(req);
    stream->job->output = stream->sink.get();
    stream->job->output_owner = stream->sink;
    if (grpc::Status s = svc->Start(call->request, stream->job); !s.ok()) {
      SendError(res, FromGrpc(s));
      return;
    }
    stream->id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", stream->job->id);
    stream->chat = chat;
    stream->logprobs = call->logprobs;
    stream->model = svc->options().model_name;
    stream->created = UnixNow();
    stream->include_usage = call->include_usage;

    // Wait for the first output: a request the engine refuses (admission, not ready) gets its
    // HTTP status before any byte of a stream is sent.
    stream->status = stream->sink->Take(&stream->pending, std::chrono::milliseconds(-1));
    if (stream->pending.empty() && stream->status.has_value() && !stream->status->ok()) {
      SendError(res, FromGrpc(*stream->status));
      return;
    }
    if (!call->stream) {
      while (!stream->status.has_value()) {
        stream->status = stream->sink->Take(&stream->pending, std::chrono::milliseconds(-1));
      }
      if (!stream->status->ok()) {
        SendError(res, FromGrpc(*stream->status));
        return;
      }
      std::string text;
      std::vector<v1::TokenLogprob> tokens;
      const v1::GenerateFinal* final = nullptr;
      for (const v1::GenerateResponse& m : stream->pending) {
        if (m.has_chunk()) {
          absl::StrAppend(&text, m.chunk().text());
          tokens.insert(tokens.end(), m.chunk().logprobs().begin(), m.chunk().logprobs().end());
        }
        if (m.has_final()) final = &m.final();
      }
      json logprobs = nullptr;
      if (call->logprobs) logprobs = chat ? ChatLogprobs(tokens) : CompletionLogprobs(tokens, 0);
      if (final == nullptr) {
        SendError(res, absl::InternalError("the request ended without its final message"));
        return;
      }
      SendJson(res, 200,
               chat ? ChatCompletionObject(stream->id, stream->created, stream->model, text, *final,
                                           logprobs)
                    : CompletionObject(stream->id, stream->created, stream->model, text, *final,
                                       logprobs));
      return;
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [stream](size_t, httplib::DataSink& sink) {
          if (!WritePending(*stream, sink)) return false;
          if (stream->finished) return true;
          stream->status = stream->sink->Take(&stream->pending, kKeepAlive);
          if (stream->pending.empty() && !stream->status.has_value()) {
            static const std::string kPing = ": keep-alive\n\n";
            return sink.write(kPing.data(), kPing.size());  // finds a client that left
          }
          return WritePending(*stream, sink);
        },
        [stream](bool success) {
          // A client that left (or a write that failed): the engine frees its KV everywhere.
          if (!success || !stream->finished) stream->job->cancelled.store(true);
        });
  };
  server_->Post("/v1/completions", [generate](const httplib::Request& req, httplib::Response& res) {
    generate(req, res, /*chat=*/false);
  });
  server_->Post("/v1/chat/completions",
                [generate](const httplib::Request& req, httplib::Response& res) {
                  generate(req, res, /*chat=*/true);
                });
}

}  // namespace kvgate::coordinator
