// kvgate serve / coordinator / worker: the coordinator's gRPC services (proto/kvgate/v1: the
// public API, the operators' budgets, the workers' registration; health and reflection) over a
// pipeline of worker processes. `serve` starts the coordinator and its N local workers;
// `coordinator` and `worker` run them apart (several machines). Stop cleanly on SIGINT/SIGTERM.
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/commands.h"
#include "coordinator/admin.h"
#include "coordinator/cluster.h"
#include "coordinator/service.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/generation/generator.h"
#include "nlohmann/json.hpp"
#include "worker/worker.h"

namespace kvgate::cli {
namespace {

struct ServeFlags {
  std::string model;
  std::string host = "127.0.0.1";
  int port = 50051;
  int stages = 1;
  int threads = 0;
  int64_t max_batch = 32;
  std::string layers;
  std::string memory_limit;  // per local worker
  std::string device;        // of the local workers: cpu, cuda (stage i on GPU i mod count)
  std::string kv_dtype;
  cache::EvictionParams kv;
  std::vector<std::string> kv_weights;  // NAME=FILE or FILE
};

sigset_t BlockStopSignals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return stop_signals;
}

// Waits up to `ms` for a stop signal; its number, or 0.
int WaitSignal(const sigset_t& set, int ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

// Starts `kvgate worker` processes that die with this one.
// With --device cuda, worker i runs on GPU i mod the GPU count (two stages may share one GPU).
std::vector<pid_t> SpawnWorkers(int n, const std::string& coordinator, int threads,
                                const ServeFlags& f, const kernels::Device& device) {
  std::vector<pid_t> pids;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const pid_t parent = getpid();
  const int gpus = std::max(1, kernels::CudaDeviceCount());
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> args = {self,        "worker",    "--coordinator",
                                     coordinator, "--threads", std::to_string(threads)};
    if (!f.memory_limit.empty()) {
      args.push_back("--memory-limit");
      args.push_back(f.memory_limit);
    }
    kernels::Device d = device;
    if (d.type == kernels::Device::Type::kCuda) d.index = (device.index + i) % gpus;
    args.push_back("--device");
    args.push_back(d.ToString());
    if (!f.kv_dtype.empty()) {
      args.push_back("--kv-dtype");
      args.push_back(f.kv_dtype);
    }
    const pid_t pid = fork();
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);
      sigset_t all;
      sigemptyset(&all);
      pthread_sigmask(SIG_SETMASK, &all, nullptr);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(self.c_str(), argv.data());
      _exit(127);
    }
    if (pid > 0) pids.push_back(pid);
  }
  return pids;
}

int RunCoordinator(const ServeFlags& f, bool spawn) {
  if (f.stages < 1) return Fail("--stages / --workers must be >= 1");
  if (f.port < 0 || f.port > 65535) return Fail("--port must be in [0, 65535] (0: any free port)");
  if (f.max_batch < 1) return Fail("--max-batch must be >= 1");
  if (!f.memory_limit.empty()) {
    if (auto b = worker::ParseBytes(f.memory_limit); !b.ok()) {
      return Fail(absl::StrCat("--memory-limit: ", b.status().message()));
    }
  }
  cache::EvictionParams kv = f.kv;
  auto device = kernels::Device::ParseOrDefault(f.device);
  if (!device.ok()) return Fail(device.status());
  if (auto d = model::ResolveKvDType(f.kv_dtype, *device); !d.ok()) return Fail(d.status());
  if (spawn && device->type == kernels::Device::Type::kCuda) {
    // A clear one-line error here rather than N workers failing to start.
    if (auto probe = kernels::MakeBackend(*device, 1); !probe.ok()) return Fail(probe.status());
  }
  const sigset_t stop_signals = BlockStopSignals();

  auto frontend = model::Generator::LoadFrontend(f.model);
  if (!frontend.ok()) return Fail(frontend.status());
  if (f.stages > (*frontend)->config().num_layers) {
    return Fail(absl::StrCat("--stages ", f.stages, ": the model has only ",
                             (*frontend)->config().num_layers, " layers"));
  }
  auto weights = coordinator::WeightsRegistry::Load(f.model, f.kv_weights, (*frontend)->config());
  if (!weights.ok()) return Fail(weights.status());
  if (kv.learned()) {
    auto path = weights->Resolve(kv.policy, "");
    if (!path.ok()) {
      return Fail(absl::StrCat("--kv-policy ", kv.policy,
                               " needs its weights: --kv-weights FILE "
                               "or the model directory's own"));
    }
    kv.weights = *path;
  }
  if (absl::Status s = kv.Validate(); !s.ok()) return Fail(s);
  if (!f.layers.empty()) {
    auto split = coordinator::ParseLayerSplit(
        f.layers, static_cast<int>((*frontend)->config().num_layers), f.stages);
    if (!split.ok()) return Fail(split.status());
  }

  coordinator::Cluster cluster(/*heartbeat_ms=*/200);
  coordinator::ServiceOptions options;
  options.model_name = f.model;
  options.model_dir = std::filesystem::absolute(f.model).string();
  options.default_kv = kv;
  options.max_batch = f.max_batch;
  options.stages = f.stages;
  options.layers = f.layers;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.worker_threads = f.threads > 0 ? f.threads : std::max(1, cores / f.stages);
  options.weights = *std::move(weights);
  auto service =
      std::make_unique<coordinator::GenerationService>(frontend->get(), &cluster, options);
  coordinator::AdminService admin(&cluster);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  const std::string address = absl::StrCat(f.host, ":", f.port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(service.get());
  builder.RegisterService(&cluster);
  builder.RegisterService(&admin);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    return Fail(absl::StrCat("cannot listen on ", address, " (in use, or not a local address?)"));
  }
  const std::string local =
      absl::StrCat(f.host == "0.0.0.0" || f.host == "::" ? "127.0.0.1" : f.host, ":", bound_port);
  std::vector<pid_t> children;
  int sig = 0;
  auto stop = [&](int code) {
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server->Wait();
    service.reset();
    for (pid_t pid : children) kill(pid, SIGTERM);
    for (pid_t pid : children) waitpid(pid, nullptr, 0);
    return code;
  };
  if (spawn) {
    children = SpawnWorkers(f.stages, local, options.worker_threads, f, *device);
    // Serve once every stage has loaded its layers; fail if a worker dies first.
    while (!service->WaitReady(std::chrono::milliseconds(100))) {
      if ((sig = WaitSignal(stop_signals, 1)) != 0) return stop(0);
      if (const std::string error = service->load_error(); !error.empty()) {
        Fail(error);
        return stop(1);
      }
      for (pid_t pid : children) {
        int status = 0;
        if (waitpid(pid, &status, WNOHANG) == pid) {
          children.erase(std::find(children.begin(), children.end(), pid));
          Fail(absl::StrCat("a worker exited before the pipeline was ready (status ", status,
                            "); see its messages above"));
          return stop(1);
        }
      }
    }
    std::fprintf(stderr, "kvgate: serving %s on %s:%d (%d stage%s, KV policy %s)\n",
                 f.model.c_str(), f.host.c_str(), bound_port, f.stages, f.stages > 1 ? "s" : "",
                 kv.policy.c_str());
  } else {
    std::fprintf(stderr, "kvgate: coordinator for %s on %s:%d, waiting for %d worker%s\n",
                 f.model.c_str(), f.host.c_str(), bound_port, f.stages, f.stages > 1 ? "s" : "");
  }
  std::fflush(stderr);
  while ((sig = WaitSignal(stop_signals, 500)) == 0) {
    // Reap local workers that died (a restart is the operator's: `kvgate worker`).
    for (auto it = children.begin(); it != children.end();) {
      int status = 0;
      if (waitpid(*it, &status, WNOHANG) == *it) {
        std::fprintf(stderr, "kvgate: local worker pid %d exited (status %d)\n", *it, status);
        it = children.erase(it);
      } else {
        ++it;
      }
    }
  }
  std::fprintf(stderr, "kvgate: stopping (signal %d)\n", sig);
  return stop(0);
}

int RunWorkerCommand(const worker::WorkerOptions& options, const std::string& memory_limit) {
  worker::WorkerOptions o = options;
  if (!memory_limit.empty()) {
    auto b = worker::ParseBytes(memory_limit);
    if (!b.ok()) return Fail(absl::StrCat("--memory-limit: ", b.status().message()));
    o.memory_limit = *b;
  }
  const sigset_t stop_signals = BlockStopSignals();
  std::atomic<bool> stop{false};
  std::thread waiter([&] {
    int sig = 0;
    while (!stop.load() && (sig = WaitSignal(stop_signals, 200)) == 0) {
    }
    stop.store(true);
  });
  absl::Status s = worker::RunWorker(o, stop);
  stop.store(true);
  waiter.join();
  if (!s.ok()) return Fail(s);
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
  // The standard health service, called generically (grpc.health.v1.Health/Check with an
  // empty request; the response's field 1 is the status: 1 SERVING, 2 NOT_SERVING).
  std::string health = "UNKNOWN";
  {
    grpc::GenericStub generic(grpc::CreateChannel(server, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline);
    grpc::ByteBuffer request, response;
    grpc::Slice empty("");
    request = grpc::ByteBuffer(&empty, 1);
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                      &response, [&](grpc::Status s) {
                        std::lock_guard<std::mutex> lock(mu);
                        status = s;
                        done = true;
                        cv.notify_all();
                      });
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    if (!status.ok()) {
      health = absl::StrCat("error: ", status.error_message());
    } else {
      std::vector<grpc::Slice> slices;
      std::string bytes;
      if (response.Dump(&slices).ok()) {
        for (const grpc::Slice& sl : slices) {
          bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
        }
      }
      health = bytes == std::string("\x08\x01", 2) ? "SERVING"
               : bytes.empty()                     ? "UNKNOWN"
                                                   : "NOT_SERVING";
    }
  }
  nlohmann::json j;
  j["health"] = health;
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
                 {"ready", info.ready()},
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

void AddServeFlags(CLI::App* cmd, ServeFlags* f) {
  cmd->add_option("--model", f->model, "Hugging Face model directory")->required();
  cmd->add_option("--host", f->host, "Address to listen on (default: loopback only)");
  cmd->add_option("--port", f->port, "Port (0: any free port; the chosen one is printed)");
  cmd->add_option("--layers", f->layers,
                  "Layer split over the stages, e.g. 0-12,12-32 (default: by workers' memory)");
  cmd->add_option("--max-batch", f->max_batch,
                  "Most sequences running at once (continuous batching); others queue");
  cmd->add_option("--kv-policy", f->kv.policy, "Default KV policy of requests that name none");
  cmd->add_option("--kv-budget", f->kv.budget, "Default budget (tokens per layer and KV head)");
  cmd->add_option("--kv-chunk", f->kv.chunk, "Default prefill chunk when a policy evicts");
  cmd->add_option("--kv-weights", f->kv_weights,
                  "Learned eviction weights requests may name: NAME=FILE (repeatable); a bare "
                  "FILE replaces its policy's default (the model directory's locret.safetensors "
                  "and attention_gate.safetensors are registered as locret and attention-gate)");
}

Runner AddServeCommand(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "Serve a model over gRPC: a coordinator and --stages local worker processes");
  AddServeFlags(cmd, f.get());
  cmd->add_option("--stages", f->stages, "Pipeline stages: local worker processes (default 1)");
  cmd->add_option("--threads", f->threads, "CPU threads per worker (default: cores / stages)");
  cmd->add_option("--memory-limit", f->memory_limit,
                  "Memory per worker for weights + KV, e.g. 2G (default: available memory)");
  cmd->add_option("--device", f->device,
                  "Where the workers run: cpu, cuda (stage i on GPU i mod the GPU count), cuda:N, "
                  "guarded (default: cpu)");
  cmd->add_option("--kv-dtype", f->kv_dtype,
                  "KV cache storage: f32, bf16, f16 (default: f32 on the CPU, bf16 on a GPU)");
  return [f] { return RunCoordinator(*f, /*spawn=*/true); };
}

Runner AddCoordinatorCommand(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "coordinator", "Run the coordinator alone; `kvgate worker` processes join it");
  AddServeFlags(cmd, f.get());
  cmd->add_option("--workers", f->stages, "Pipeline stages (one worker each)")->required();
  cmd->add_option("--threads", f->threads, "CPU threads per worker (default: the worker's)");
  return [f] { return RunCoordinator(*f, /*spawn=*/false); };
}

Runner AddWorkerCommand(CLI::App& app) {
  auto o = std::make_shared<worker::WorkerOptions>();
  auto limit = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "worker", "Run a pipeline worker: registers with a coordinator, which assigns its layers");
  cmd->add_option("--coordinator", o->coordinator, "The coordinator (host:port)")->required();
  cmd->add_option("--host", o->host, "Address to listen on (default: loopback only)");
  cmd->add_option("--port", o->port, "gRPC port (0: any free port)");
  cmd->add_option("--data-port", o->data_port, "Activation transport port (0: any free port)");
  cmd->add_option("--memory-limit", *limit,
                  "Bytes for weights + KV, e.g. 512M or 2G (default: available memory)");
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  cmd->add_option("--device", o->device, "Where the layers run: cpu, cuda, cuda:N, guarded");
  cmd->add_option("--kv-dtype", o->kv_dtype,
                  "KV cache storage: f32, bf16, f16 (default: f32 on the CPU, bf16 on a GPU)");
  return [o, limit] { return RunWorkerCommand(*o, *limit); };
}

}  // namespace kvgate::cli
