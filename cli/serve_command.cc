// kvgate serve: the coordinator's gRPC service (proto/kvgate/v1) over a local engine, with the
// standard health service and server reflection. Stops cleanly on SIGINT / SIGTERM.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "coordinator/service.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/generation/generator.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

struct ServeFlags {
  std::string model;
  std::string host = "127.0.0.1";
  int port = 50051;
  int stages = 1;
  int threads = 0;
  int64_t max_batch = 32;
  cache::EvictionParams kv;
  std::string kv_weights;
};

int RunServe(const ServeFlags& f) {
  if (f.stages != 1) {
    return Fail(absl::StrCat("--stages ", f.stages,
                             ": only 1 stage is served so far (pipeline workers are not built "
                             "yet); use --stages 1"));
  }
  if (f.port < 0 || f.port > 65535) return Fail("--port must be in [0, 65535] (0: any free port)");
  if (f.max_batch < 1) return Fail("--max-batch must be >= 1");
  cache::EvictionParams kv = f.kv;
  kv.weights = f.kv_weights;
  if (absl::Status s = kv.Validate(); !s.ok()) return Fail(s);

  // Block the stop signals in every thread; the main thread waits for them below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  model::LoadOptions load;
  load.threads = f.threads;
  auto gen = model::Generator::Load(f.model, load);
  if (!gen.ok()) return Fail(gen.status());
  // Load learned eviction weights now, so a bad file fails the start, not the first request.
  if (kv.policy != "full") {
    auto cache = (*gen)->NewCache(kv);
    if (!cache.ok()) return Fail(cache.status());
  }

  coordinator::ServiceOptions options;
  options.model_name = f.model;
  options.default_kv = kv;
  options.max_batch = f.max_batch;
  auto service = std::make_unique<coordinator::GenerationService>(gen->get(), options);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  const std::string address = absl::StrCat(f.host, ":", f.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return Fail(absl::StrCat("cannot listen on ", address, " (in use, or not a local address?)"));
  }
  std::fprintf(stderr, "kvgate: serving %s on %s:%d (1 stage, KV policy %s)\n", f.model.c_str(),
               f.host.c_str(), bound_port, kv.policy.c_str());
  std::fflush(stderr);

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "kvgate: stopping (signal %d)\n", sig);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  server->Wait();
  service.reset();
  return 0;
}

int RunInfo(const std::string& server, double timeout) {
  auto stub = v1::Kvgate::NewStub(grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
  v1::ModelInfo model;
  v1::ServerInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline);
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &model);
    if (!s.ok()) return Fail(absl::StrCat("server ", server, ": ", s.error_message()));
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline);
    grpc::Status s = stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
    if (!s.ok()) return Fail(absl::StrCat("server ", server, ": ", s.error_message()));
  }
  nlohmann::json j;
  j["model"] = {{"name", model.name()},
                {"architecture", model.architecture()},
                {"num_layers", model.num_layers()},
                {"hidden_size", model.hidden_size()},
                {"num_heads", model.num_heads()},
                {"num_kv_heads", model.num_kv_heads()},
                {"head_dim", model.head_dim()},
                {"vocab_size", model.vocab_size()},
                {"max_context", model.max_context()},
                {"has_tokenizer", model.has_tokenizer()}};
  j["server"] = {{"version", info.version()},
                 {"stages", info.stages()},
                 {"backend", info.backend()},
                 {"requests_running", info.requests_running()},
                 {"requests_queued", info.requests_queued()},
                 {"requests_served", info.requests_served()},
                 {"default_kv_policy", info.default_kv().policy()},
                 {"default_kv_budget", info.default_kv().budget()},
                 {"uptime_seconds", info.uptime_seconds()}};
  std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

int RunAbort(const std::string& server, const std::string& request_id) {
  auto stub = v1::Kvgate::NewStub(grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::AbortRequest req;
  req.set_request_id(request_id);
  v1::AbortResponse resp;
  grpc::Status s = stub->Abort(&ctx, req, &resp);
  if (!s.ok()) return Fail(absl::StrCat("server ", server, ": ", s.error_message()));
  if (!resp.found()) {
    return Fail(absl::StrCat("no request '", request_id, "' is queued or running on ", server));
  }
  std::printf("aborted %s\n", request_id.c_str());
  return 0;
}

}  // namespace

Runner AddAbortCommand(CLI::App& app) {
  auto server = std::make_shared<std::string>();
  auto id = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("abort", "Abort a queued or running request on a server");
  cmd->add_option("--server", *server, "kvgate server (host:port)")->required();
  cmd->add_option("--request-id", *id, "The request's id")->required();
  return [server, id] { return RunAbort(*server, *id); };
}

Runner AddInfoCommand(CLI::App& app) {
  auto server = std::make_shared<std::string>();
  auto timeout = std::make_shared<double>(5.0);
  CLI::App* cmd = app.add_subcommand("info", "Print a server's model and server info as JSON");
  cmd->add_option("--server", *server, "kvgate server (host:port)")->required();
  cmd->add_option("--timeout", *timeout, "Deadline in seconds");
  return [server, timeout] { return RunInfo(*server, *timeout); };
}

Runner AddServeCommand(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* cmd =
      app.add_subcommand("serve", "Serve a model over gRPC (kvgate.v1.Kvgate, health, reflection)");
  cmd->add_option("--model", f->model, "Hugging Face model directory")->required();
  cmd->add_option("--host", f->host, "Address to listen on (default: loopback only)");
  cmd->add_option("--port", f->port, "Port (0: any free port; the chosen one is printed)");
  cmd->add_option("--stages", f->stages, "Pipeline stages (only 1 so far)");
  cmd->add_option("--threads", f->threads, "CPU threads (default: all cores)");
  cmd->add_option("--max-batch", f->max_batch,
                  "Most sequences stepped together (continuous batching); others queue");
  cmd->add_option("--kv-policy", f->kv.policy, "Default KV policy of requests that name none");
  cmd->add_option("--kv-budget", f->kv.budget, "Default budget (tokens per layer and KV head)");
  cmd->add_option("--kv-chunk", f->kv.chunk, "Default prefill chunk when a policy evicts");
  cmd->add_option("--kv-weights", f->kv_weights,
                  "Default learned weights (locret, attention-gate)");
  return [f] { return RunServe(*f); };
}

}  // namespace kvgate::cli
