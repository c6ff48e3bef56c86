// The OpenAI-compatible HTTP front end (`kvgate serve --http-port`): a second front end over
// the same engine as gRPC. A request's JSON becomes a v1::GenerateRequest (openai_api.h), which
// GenerationService::Start validates and submits exactly as it does gRPC's; the engine's output
// comes back through a queue and is written as one JSON object or as server-sent events ending
// in `data: [DONE]`. A client that goes away cancels its request, which frees its KV on every
// stage. Served by cpp-httplib (Debian's libcpp-httplib-dev).
//
//   GET  /health               200 while the process serves
//   GET  /ready                200 when the pipeline is ready, else 503
//   GET  /metrics              Prometheus text format (metrics.h); no key needed
//   GET  /v1/models            the one model
//   POST /v1/completions       text completion, `stream: true` for SSE
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "coordinator/frontend.h"

namespace httplib {
class Server;
}

namespace kvgate::coordinator {

class HttpFrontend {
 public:
  // `service` is borrowed and must outlive Stop().
  explicit HttpFrontend(GenerationService* service);
  ~HttpFrontend();  // stops

  // Binds `host`:`port` (0: any free port) and serves on a thread of its own; the bound port.
  absl::StatusOr<int> Start(const std::string& host, int port);
  // Stops accepting and waits for the server thread; open streams are cut.
  void Stop();

 private:
  void Routes();

  GenerationService* service_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace kvgate::coordinator
