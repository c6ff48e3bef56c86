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
#include "absl/strings/str_format.h"
#include "cli/client_connection.h"
#include "cli/commands.h"
#include "common/log.h"
#include "common/mapped_file.h"
#include "coordinator/admin.h"
#include "coordinator/cluster.h"
#include "coordinator/frontend.h"
#include "coordinator/http_frontend.h"
#include "coordinator/pipeline_executor.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/chat/chat_template.h"
#include "model/generation/generator.h"
#include "model/weights/quantize.h"
#include "nlohmann/json.hpp"
#include "security/key_ring.h"
#include "security/secrets.h"
#include "security/tls.h"
#include "worker/worker.h"

namespace kvgate::cli {
namespace {

// The servers' log: --log-format, --log-level, --log-prompts (coordinator and workers).
struct LogFlags {
  std::string format = "text";
  std::string level = "info";
  bool prompts = false;
};

void AddLogFlags(CLI::App* cmd, LogFlags* f, bool prompts) {
  cmd->add_option("--log-format", f->format, "Log lines as text or json (one object a line)");
  cmd->add_option("--log-level", f->level, "Least log level shown: debug, info, warn, error");
  if (prompts) {
    cmd->add_flag("--log-prompts", f->prompts,
                  "Put each request's prompt text in its log line (off: never logged)");
  }
}

absl::Status ApplyLogFlags(const LogFlags& f, const std::string& component) {
  log::Options o;
  o.component = component;
  o.log_prompts = f.prompts;
  if (absl::Status s = log::ParseFormat(f.format, &o.format); !s.ok()) return s;
  if (absl::Status s = log::ParseLevel(f.level, &o.level); !s.ok()) return s;
  log::Init(o);
  return absl::OkStatus();
}

struct ServeFlags {
  std::string model;
  std::string host = "127.0.0.1";
  int port = 50051;
  // The admin API (budgets) and the cluster API (workers' registration): loopback unless
  // said otherwise; -1: --port + 1 and + 2 (any free port when --port is 0).
  std::string admin_host = "127.0.0.1";
  int admin_port = -1;
  std::string cluster_host = "127.0.0.1";
  int cluster_port = -1;
  security::TlsFiles tls;
  std::string api_keys, admin_keys;  // files
  std::string cluster_token_file;
  int stages = 1;
  int threads = 0;
  int64_t max_batch = 32;
  std::string layers;
  std::string memory_limit;  // per local worker
  std::string device;        // of the local workers: cpu, cuda (stage i on GPU i mod count)
  std::string kv_dtype;
  cache::EvictionParams kv;
  std::vector<std::string> kv_weights;  // NAME=FILE or FILE
  bool skip_weight_check = false;
  std::string quantize;       // --quantize
  bool quantize_all = false;  // --quantize-all
  double shutdown_grace = 5;  // seconds running streams get on SIGTERM
  int64_t max_step_tokens = 2048;
  int health_port = -1;  // plaintext health listener on --host (-1: none)
  std::string http_host = "127.0.0.1";
  int http_port = -1;         // the OpenAI-compatible HTTP API (-1: none; 0: any free port)
  std::string chat_template;  // a Jinja file overriding the model's chat_template
  LogFlags log;
  bool dry_run = false;  // check every flag and file, then exit
};

// SIGINT and SIGTERM stop; SIGHUP (when `hangup`) reloads the API keys.
sigset_t BlockStopSignals(bool hangup = false) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  if (hangup) sigaddset(&stop_signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return stop_signals;
}

bool Loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

// The port of a listener: `port` when given, else --port + offset (0 stays 0).
int DerivedPort(int port, int public_port, int offset) {
  if (port >= 0) return port;
  return public_port == 0 ? 0 : public_port + offset;
}

// A private directory for the token of `serve`'s own cluster, removed when it stops.
struct TokenDir {
  std::string dir, file;
  ~TokenDir() {
    if (!file.empty()) unlink(file.c_str());
    if (!dir.empty()) rmdir(dir.c_str());
  }
};

// Waits up to `ms` for a stop signal; its number, or 0.
int WaitSignal(const sigset_t& set, int ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

// Starts `kvgate worker` processes that die with this one.
// With --device cuda, worker i runs on GPU i mod the GPU count (two stages may share one GPU).
std::vector<pid_t> SpawnWorkers(int n, const std::string& coordinator, int threads,
                                const ServeFlags& f, const kernels::Device& device,
                                const std::string& token_file) {
  std::vector<pid_t> pids;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const pid_t parent = getpid();
  const int gpus = std::max(1, kernels::CudaDeviceCount());
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> args = {self,        "worker",    "--coordinator",
                                     coordinator, "--threads", std::to_string(threads)};
    kernels::Device d = device;
    if (d.type == kernels::Device::Type::kCuda) d.index = (device.index + i) % gpus;
    if (!f.memory_limit.empty()) {
      args.push_back("--memory-limit");
      args.push_back(f.memory_limit);
    } else {
      // The device's memory is shared by the workers on it, not claimed whole by each.
      const bool gpu = d.type == kernels::Device::Type::kCuda;
      int sharers = 0;
      for (int j = 0; j < n; ++j) sharers += !gpu || (device.index + j) % gpus == d.index ? 1 : 0;
      args.push_back("--memory-fraction");
      args.push_back(absl::StrCat((gpu ? 0.9 : 0.8) / std::max(1, sharers)));
    }
    args.push_back("--device");
    args.push_back(d.ToString());
    for (const char* flag : {"--log-format", "--log-level"}) {
      args.push_back(flag);
      args.push_back(flag[6] == 'f' ? f.log.format : f.log.level);
    }
    if (!f.kv_dtype.empty()) {
      args.push_back("--kv-dtype");
      args.push_back(f.kv_dtype);
    }
    for (const auto& [flag, value] :
         {std::pair<const char*, const std::string&>{"--cluster-token-file", token_file},
          {"--tls-cert", f.tls.cert},
          {"--tls-key", f.tls.key},
          {"--tls-ca", f.tls.ca}}) {
      if (value.empty()) continue;
      args.push_back(flag);
      args.push_back(value);
    }
    const pid_t pid = fork();
    if (pid == 0) {
      // A worker of a coordinator that died has nothing left to serve: it goes at once.
      prctl(PR_SET_PDEATHSIG, SIGKILL);
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

// Starts one gRPC listener; null (and `error` set) when it cannot bind.
std::unique_ptr<grpc::Server> Listen(const std::string& host, int port,
                                     const std::shared_ptr<grpc::ServerCredentials>& credentials,
                                     std::vector<grpc::Service*> services, int* bound,
                                     std::string* error) {
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(host, ":", port);
  builder.AddListeningPort(address, credentials, bound);
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *bound == 0) {
    *error = absl::StrCat("cannot listen on ", address, " (in use, or not a local address?)");
    return nullptr;
  }
  return server;
}

int RunCoordinator(const ServeFlags& f, bool spawn) {
  if (absl::Status s = ApplyLogFlags(f.log, "kvgate"); !s.ok()) return Fail(s);
  // Before any thread starts: every thread inherits the mask, and the main one takes them.
  const sigset_t stop_signals = BlockStopSignals(/*hangup=*/true);
  if (f.stages < 1) return Fail("--stages / --workers must be >= 1");
  for (const auto& [port, flag] : {std::pair<int, const char*>{f.port, "--port"},
                                   {f.admin_port, "--admin-port"},
                                   {f.cluster_port, "--cluster-port"},
                                   {f.health_port, "--health-port"}}) {
    if (port < (std::string(flag) == "--port" ? 0 : -1) || port > 65535) {
      return Fail(absl::StrCat(flag, " must be in [0, 65535] (0: any free port)"));
    }
  }
  if (f.max_batch < 1) return Fail("--max-batch must be >= 1");
  if (!(f.shutdown_grace >= 0 && f.shutdown_grace <= 3600)) {
    return Fail("--shutdown-grace must be in [0, 3600] seconds");
  }
  if (f.max_step_tokens < 512 || f.max_step_tokens > (int64_t{1} << 20)) {
    return Fail("--max-step-tokens must be in [512, 1048576] (512: the default prefill chunk)");
  }
  if (!f.memory_limit.empty()) {
    auto b = worker::ParseBytes(f.memory_limit);
    if (!b.ok()) return Fail(absl::StrCat("--memory-limit: ", b.status().message()));
    // serve's workers share this machine: their limits together must fit in it.
    const int64_t available = worker::AvailableMemory();
    const bool host = f.device.empty() || f.device == "cpu" || f.device == "guarded";
    if (spawn && host && available > 0 && *b * f.stages > available) {
      return Fail(absl::StrFormat(
          "--memory-limit %s for each of %d workers is %.2f GiB, more than this machine's "
          "%.2f GiB available (leave --memory-limit out to share it)",
          f.memory_limit, f.stages, static_cast<double>(*b * f.stages) / (1 << 30),
          static_cast<double>(available) / (1 << 30)));
    }
  }
  if (absl::Status s = f.tls.Validate(); !s.ok()) return Fail(s);
  // Credentials: keys for the public and admin APIs, the cluster's token.
  coordinator::ServiceOptions options;
  if (!f.api_keys.empty()) {
    auto ring = security::KeyRing::Load(f.api_keys, "--api-keys");
    if (!ring.ok()) return Fail(ring.status());
    options.api_keys = *std::move(ring);
  }
  if (!f.admin_keys.empty()) {
    auto ring = security::KeyRing::Load(f.admin_keys, "--admin-keys");
    if (!ring.ok()) return Fail(ring.status());
    options.admin_keys = *std::move(ring);
  }
  if (!Loopback(f.admin_host) && options.admin_keys == nullptr) {
    return Fail(absl::StrCat("--admin-host ", f.admin_host,
                             " exposes the admin API beyond this machine: give --admin-keys FILE"));
  }
  if (!Loopback(f.cluster_host) && f.cluster_token_file.empty() && !f.tls.mutual()) {
    return Fail(absl::StrCat("--cluster-host ", f.cluster_host,
                             " takes workers from the network: give --cluster-token-file FILE "
                             "or mutual TLS (--tls-cert, --tls-key, --tls-ca)"));
  }
  std::string cluster_token;
  TokenDir token_dir;
  if (!f.cluster_token_file.empty()) {
    auto token = security::ReadSecretFile(f.cluster_token_file, "--cluster-token-file");
    if (!token.ok()) return Fail(token.status());
    cluster_token = *token;
  } else if (!spawn && !f.tls.mutual()) {
    return Fail(
        "workers join with the cluster's credential: give --cluster-token-file FILE (the same "
        "file to every worker; make one with: umask 077; head -c 32 /dev/urandom | od -An -tx1 "
        "| tr -d ' \\n' > FILE) or mutual TLS (--tls-cert, --tls-key, --tls-ca)");
  }
  std::string token_file = f.cluster_token_file;
  if (spawn && cluster_token.empty() && !f.tls.mutual()) {
    // `serve`'s own workers: a fresh token, in a directory only this user can read.
    char dir[] = "/tmp/kvgate-XXXXXX";
    if (mkdtemp(dir) == nullptr) return Fail("cannot create a private directory in /tmp");
    token_dir.dir = dir;
    token_dir.file = token_file = absl::StrCat(dir, "/cluster-token");
    auto token = security::WriteSecretFile(token_file);
    if (!token.ok()) return Fail(token.status());
    cluster_token = *token;
  }
  cache::EvictionParams kv = f.kv;
  auto device = kernels::Device::ParseOrDefault(f.device);
  if (!device.ok()) return Fail(device.status());
  if (auto d = model::ResolveKvDType(f.kv_dtype, *device); !d.ok()) return Fail(d.status());
  if (spawn && !f.dry_run && device->type == kernels::Device::Type::kCuda) {
    // A clear one-line error here rather than N workers failing to start.
    if (auto probe = kernels::MakeBackend(*device, 1); !probe.ok()) return Fail(probe.status());
  }
  auto frontend = model::Generator::LoadFrontend(f.model);
  if (!frontend.ok()) return Fail(frontend.status());
  if (f.stages > (*frontend)->config().num_layers) {
    return Fail(absl::StrCat("--stages ", f.stages, ": the model has only ",
                             (*frontend)->config().num_layers, " layers"));
  }
  auto weights = coordinator::WeightsRegistry::Load(f.model, f.kv_weights, (*frontend)->config());
  if (!weights.ok()) return Fail(weights.status());
  // The chat template is parsed now: one with a construct the interpreter lacks is refused
  // here, naming it, not at the first chat request.
  std::optional<std::string> chat_source;
  if (!f.chat_template.empty()) {
    auto source = ReadFileToString(f.chat_template);
    if (!source.ok()) return Fail(absl::StrCat("--chat-template: ", source.status().message()));
    chat_source = *std::move(source);
  }
  auto chat = model::chat::ChatTemplate::Load(f.model, chat_source);
  if (!chat.ok()) {
    return Fail(
        f.chat_template.empty()
            ? absl::StrCat(chat.status().message(),
                           " (give --chat-template FILE with a template it supports)")
            : absl::StrCat("--chat-template ", f.chat_template, ": ", chat.status().message()));
  }
  if (chat->has_value()) {
    options.chat_template = std::make_shared<const model::chat::ChatTemplate>(**std::move(chat));
  }
  // An unknown policy is refused before anything asks for its traits.
  if (cache::FindPolicy(kv.policy) == nullptr) return Fail(kv.Validate());
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

  auto public_credentials = security::MakeServerCredentials(f.tls, /*require_client_cert=*/false);
  if (!public_credentials.ok()) return Fail(public_credentials.status());
  auto cluster_credentials = security::MakeServerCredentials(f.tls, /*require_client_cert=*/true);
  if (!cluster_credentials.ok()) return Fail(cluster_credentials.status());
  auto worker_credentials = security::MakeChannelCredentials(f.tls);
  if (!worker_credentials.ok()) return Fail(worker_credentials.status());
  if (f.http_port >= 0 && f.tls.serves_tls()) {
    return Fail(
        "--http-port: the HTTP API has no TLS yet; put a TLS proxy in front of it or drop "
        "--tls-cert");
  }
  if (f.dry_run) {
    std::printf(
        "kvgate %s: dry run: flags and files check out (model %s, %lld layers, %d stage%s; "
        "public %s:%d%s%s%s)\n",
        spawn ? "serve" : "coordinator", f.model.c_str(),
        static_cast<long long>((*frontend)->config().num_layers), f.stages, f.stages > 1 ? "s" : "",
        f.host.c_str(), f.port, f.tls.serves_tls() ? ", TLS" : "",
        f.tls.mutual() ? " (mutual on the cluster planes)" : "",
        options.api_keys != nullptr ? ", API keys" : "");
    return 0;
  }

  coordinator::Cluster cluster(/*heartbeat_ms=*/200, cluster_token, *worker_credentials);
  // The model's directory name, not its path on the server.
  std::filesystem::path model_path = std::filesystem::path(f.model).lexically_normal();
  if (model_path.filename().empty()) model_path = model_path.parent_path();
  options.model_name = model_path.filename().string();
  options.model_dir = std::filesystem::absolute(f.model).string();
  options.default_kv = kv;
  options.max_batch = f.max_batch;
  options.stages = f.stages;
  options.layers = f.layers;
  options.max_step_tokens = f.max_step_tokens;
  options.skip_weight_check = f.skip_weight_check;
  if (auto q = model::ParseQuant(f.quantize, f.quantize_all); !q.ok()) return Fail(q.status());
  options.quantize = f.quantize == "none" ? "" : f.quantize;
  options.quantize_all = f.quantize_all;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  options.worker_threads = f.threads > 0 ? f.threads : std::max(1, cores / f.stages);
  options.weights = *std::move(weights);
  coordinator::GrpcPipelineExecutor executor;
  auto service = std::make_unique<coordinator::GenerationService>(frontend->get(), &cluster,
                                                                  &executor, options);
  coordinator::AdminService admin(&cluster, options.admin_keys.get());

  // Three listeners: the public API (with health and reflection), the admin API, the cluster
  // API. No internal service is reachable on the public port.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  int public_port = 0, admin_port = 0, cluster_port = 0;
  std::string error;
  std::unique_ptr<grpc::Server> public_server =
      Listen(f.host, f.port, *public_credentials, {service.get()}, &public_port, &error);
  std::unique_ptr<grpc::Server> admin_server =
      public_server == nullptr ? nullptr
                               : Listen(f.admin_host, DerivedPort(f.admin_port, f.port, 1),
                                        *public_credentials, {&admin}, &admin_port, &error);
  std::unique_ptr<grpc::Server> cluster_server =
      admin_server == nullptr ? nullptr
                              : Listen(f.cluster_host, DerivedPort(f.cluster_port, f.port, 2),
                                       *cluster_credentials, {&cluster}, &cluster_port, &error);
  std::unique_ptr<grpc::Server> health_server;  // --health-port's
  coordinator::HttpFrontend http(service.get());
  auto shutdown = [&] {
    http.Stop();
    const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(2);
    for (auto* server :
         {public_server.get(), admin_server.get(), cluster_server.get(), health_server.get()}) {
      if (server != nullptr) server->Shutdown(deadline);
    }
    for (auto* server :
         {public_server.get(), admin_server.get(), cluster_server.get(), health_server.get()}) {
      if (server != nullptr) server->Wait();
    }
  };
  // The probes' plaintext listener (Kubernetes' gRPC probes speak no TLS): health only.
  if (cluster_server != nullptr && f.health_port >= 0) {
    int health_port = 0;
    health_server =
        Listen(f.host, f.health_port, grpc::InsecureServerCredentials(), {}, &health_port, &error);
    if (health_server != nullptr) {
      health_server->GetHealthCheckService()->SetServingStatus("liveness", true);
    }
  }
  if (cluster_server == nullptr || (f.health_port >= 0 && health_server == nullptr)) {
    shutdown();
    return Fail(error);
  }
  int http_port = -1;
  if (f.http_port >= 0) {
    absl::StatusOr<int> bound = http.Start(f.http_host, f.http_port);
    if (!bound.ok()) {
      shutdown();
      return Fail(std::string(bound.status().message()));
    }
    http_port = *bound;
    if (!Loopback(f.http_host) && options.api_keys == nullptr) {
      log::Warn(absl::StrFormat(
          "the HTTP API on %s has no --api-keys: anyone who reaches it can generate",
          f.http_host.c_str()));
    }
  }
  const std::string cluster_local = absl::StrCat(
      f.cluster_host == "0.0.0.0" || f.cluster_host == "::" ? "127.0.0.1" : f.cluster_host, ":",
      cluster_port);
  if (!Loopback(f.host) && options.api_keys == nullptr) {
    log::Warn(absl::StrFormat(
        "the public API on %s has no --api-keys: anyone who reaches it can generate",
        f.host.c_str()));
  }
  // Health ("" and kvgate.v1.Kvgate): SERVING only while the pipeline can serve.
  grpc::HealthCheckServiceInterface* health = public_server->GetHealthCheckService();
  grpc::HealthCheckServiceInterface* probe_health =
      health_server != nullptr ? health_server->GetHealthCheckService() : nullptr;
  std::mutex health_mu;
  bool stopping = false;  // guarded by health_mu
  // Reads the engine's state under the lock, so a change racing this call cannot be undone.
  coordinator::Engine* engine = &service->engine();  // called on its thread: it outlives calls
  auto update_health = [&, engine] {
    std::lock_guard<std::mutex> lock(health_mu);
    const bool serving = !stopping && engine->ready();
    for (grpc::HealthCheckServiceInterface* h : {health, probe_health}) {
      if (h == nullptr) continue;
      h->SetServingStatus("", serving);
      h->SetServingStatus("kvgate.v1.Kvgate", serving);
    }
  };
  service->engine().SetReadyListener([&](bool) { update_health(); });
  update_health();
  std::vector<pid_t> children;
  int sig = 0;
  auto stop = [&](int code) {
    // Drain: no new work; running streams get the grace period, then end at their next token;
    // their KV is freed on every stage.
    service->engine().SetReadyListener(nullptr);
    {
      std::lock_guard<std::mutex> lock(health_mu);
      stopping = true;
    }
    update_health();
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t running = service->engine().running(), queued = service->engine().queued();
    if (running + queued > 0) {
      std::fprintf(
          stderr, "kvgate: draining %lld running and %lld queued requests (grace %.1f s)\n",
          static_cast<long long>(running), static_cast<long long>(queued), f.shutdown_grace);
    }
    const bool drained = service->engine().Drain(
        std::chrono::milliseconds(static_cast<int64_t>(f.shutdown_grace * 1000)));
    if (running + queued > 0) {
      log::Info(absl::StrFormat(
          "%s in %.1f s", drained ? "drained" : "gave up draining",
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
    }
    shutdown();
    service.reset();
    for (pid_t pid : children) kill(pid, SIGTERM);
    // Workers exit within a few seconds of SIGTERM; one that does not is killed.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (pid_t pid : children) {
      while (waitpid(pid, nullptr, WNOHANG) == 0) {
        if (std::chrono::steady_clock::now() > give_up) {
          log::Warn(absl::StrFormat("local worker pid %d did not stop; killing it", pid));
          kill(pid, SIGKILL);
          waitpid(pid, nullptr, 0);
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
    return code;
  };
  // SIGHUP: reload the keys (the ones in force stay when a file is bad).
  auto reload = [&] {
    for (const auto& [ring, what] :
         {std::pair<security::KeyRing*, const char*>{options.api_keys.get(), "API"},
          {options.admin_keys.get(), "admin"}}) {
      if (ring == nullptr) continue;
      if (absl::Status s = ring->Reload(); !s.ok()) {
        log::Warn(absl::StrFormat("keeping the %s keys in force: %s", what,
                                  std::string(s.message()).c_str()));
      } else {
        log::Info(absl::StrFormat("reloaded %zu %s key%s", ring->size(), what,
                                  ring->size() == 1 ? "" : "s"));
      }
    }
    std::fflush(stderr);
  };
  const std::string listeners = absl::StrCat(
      "admin ", f.admin_host, ":", admin_port, ", cluster ", f.cluster_host, ":", cluster_port,
      f.tls.serves_tls() ? ", TLS" : "", f.tls.mutual() ? " (mutual on the cluster planes)" : "",
      options.api_keys != nullptr ? ", API keys" : "",
      http_port >= 0 ? absl::StrCat(", HTTP ", f.http_host, ":", http_port) : "");
  if (spawn) {
    children =
        SpawnWorkers(f.stages, cluster_local, options.worker_threads, f, *device, token_file);
    // Serve once every stage has loaded its layers; fail if a worker dies first.
    while (!service->engine().WaitReady(std::chrono::milliseconds(100))) {
      if ((sig = WaitSignal(stop_signals, 1)) == SIGHUP) {
        reload();
      } else if (sig != 0) {
        return stop(0);
      }
      if (const std::string load_error = service->engine().load_error(); !load_error.empty()) {
        Fail(load_error);
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
    log::Info(absl::StrFormat("serving %s on %s:%d (%d stage%s, KV policy %s; %s)", f.model.c_str(),
                              f.host.c_str(), public_port, f.stages, f.stages > 1 ? "s" : "",
                              kv.policy.c_str(), listeners.c_str()));
  } else {
    log::Info(absl::StrFormat("coordinator for %s on %s:%d, waiting for %d worker%s (%s)",
                              f.model.c_str(), f.host.c_str(), public_port, f.stages,
                              f.stages > 1 ? "s" : "", listeners.c_str()));
  }
  std::fflush(stderr);
  while (true) {
    sig = WaitSignal(stop_signals, 500);
    if (sig == SIGHUP) {
      reload();
      continue;
    }
    if (sig != 0) break;
    // Reap local workers that died (a restart is the operator's: `kvgate worker`).
    for (auto it = children.begin(); it != children.end();) {
      int status = 0;
      if (waitpid(*it, &status, WNOHANG) == *it) {
        log::Error(absl::StrFormat("local worker pid %d exited (status %d)", *it, status));
        it = children.erase(it);
      } else {
        ++it;
      }
    }
  }
  log::Info(absl::StrFormat("stopping (signal %d)", sig));
  return stop(0);
}

int RunWorkerCommand(const worker::WorkerOptions& options, const std::string& memory_limit,
                     const std::string& token_file, bool dry_run, const LogFlags& log_flags) {
  if (absl::Status s = ApplyLogFlags(log_flags, "kvgate worker"); !s.ok()) return Fail(s);
  worker::WorkerOptions o = options;
  if (!token_file.empty()) {
    auto token = security::ReadSecretFile(token_file, "--cluster-token-file");
    if (!token.ok()) return Fail(token.status());
    o.cluster_token = *token;
  }
  if (!memory_limit.empty()) {
    auto b = worker::ParseBytes(memory_limit);
    if (!b.ok()) return Fail(absl::StrCat("--memory-limit: ", b.status().message()));
    o.memory_limit = *b;
  }
  if (dry_run) {
    if (absl::Status s = worker::CheckWorkerOptions(o); !s.ok()) return Fail(s);
    std::printf("kvgate worker: dry run: flags and files check out (coordinator %s, listen %s%s)\n",
                o.coordinator.c_str(), o.host.c_str(),
                o.advertise.empty() ? "" : absl::StrCat(", advertised as ", o.advertise).c_str());
    return 0;
  }
  const sigset_t stop_signals = BlockStopSignals();
  std::atomic<bool> stop{false}, done{false};
  std::thread waiter([&] {
    while (!stop.load() && WaitSignal(stop_signals, 200) == 0) {
    }
    stop.store(true);
    // A step in progress (a long prefill) is not waited for long: what the worker holds is
    // of no use once it stops.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while (!done.load()) {
      if (std::chrono::steady_clock::now() > give_up) {
        log::Warn("still busy 3 s after the stop signal; exiting now");
        std::fflush(stderr);
        _exit(0);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  absl::Status s = worker::RunWorker(o, stop);
  done.store(true);
  stop.store(true);
  waiter.join();
  if (!s.ok()) return Fail(s);
  return 0;
}

int RunInfo(const ClientConnection& conn, double timeout) {
  const std::string& server = conn.server;
  auto channel = conn.Channel();
  if (!channel.ok()) return Fail(channel.status());
  auto stub = v1::Kvgate::NewStub(*channel);
  const auto deadline = std::chrono::system_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000));
  v1::ModelInfo model;
  v1::ServerInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline);
    conn.Authorize(&ctx);
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &model);
    if (!s.ok()) return Fail(ServerError(server, s));
  }
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline);
    conn.Authorize(&ctx);
    grpc::Status s = stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
    if (!s.ok()) return Fail(ServerError(server, s));
  }
  // The standard health service, called generically (grpc.health.v1.Health/Check with an
  // empty request; the response's field 1 is the status: 1 SERVING, 2 NOT_SERVING).
  std::string health = "UNKNOWN";
  {
    grpc::GenericStub generic(*channel);
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

int RunAbort(const ClientConnection& conn, const std::string& request_id) {
  const std::string& server = conn.server;
  auto channel = conn.Channel();
  if (!channel.ok()) return Fail(channel.status());
  auto stub = v1::Kvgate::NewStub(*channel);
  grpc::ClientContext ctx;
  conn.Authorize(&ctx);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::AbortRequest req;
  req.set_request_id(request_id);
  v1::AbortResponse resp;
  grpc::Status s = stub->Abort(&ctx, req, &resp);
  if (!s.ok()) return Fail(ServerError(server, s));
  if (!resp.found()) {
    return Fail(absl::StrCat("no request '", request_id, "' is queued or running on ", server));
  }
  std::printf("aborted %s\n", request_id.c_str());
  return 0;
}

}  // namespace

Runner AddAbortCommand(CLI::App& app) {
  auto conn = std::make_shared<ClientConnection>();
  auto id = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "abort", "Abort a queued or running request on a server (with the key that started it)");
  cmd->add_option("--server", conn->server, "kvgate server (host:port)")->required();
  AddClientFlags(cmd, conn.get());
  cmd->add_option("--request-id", *id, "The request's id")->required();
  return [conn, id] { return RunAbort(*conn, *id); };
}

Runner AddInfoCommand(CLI::App& app) {
  auto conn = std::make_shared<ClientConnection>();
  auto timeout = std::make_shared<double>(5.0);
  CLI::App* cmd = app.add_subcommand("info", "Print a server's model and server info as JSON");
  cmd->add_option("--server", conn->server, "kvgate server (host:port)")->required();
  AddClientFlags(cmd, conn.get());
  cmd->add_option("--timeout", *timeout, "Deadline in seconds");
  return [conn, timeout] { return RunInfo(*conn, *timeout); };
}

void AddTlsFlags(CLI::App* cmd, security::TlsFiles* tls) {
  cmd->add_option("--tls-cert", tls->cert,
                  "PEM certificate: every listener speaks TLS (with --tls-key)");
  cmd->add_option("--tls-key", tls->key, "PEM private key of --tls-cert");
  cmd->add_option("--tls-ca", tls->ca,
                  "PEM CA: the cluster, worker and data planes become mutual TLS (peers need a "
                  "certificate it signed)");
}

void AddServeFlags(CLI::App* cmd, ServeFlags* f) {
  cmd->add_option("--model", f->model, "Hugging Face model directory")->required();
  cmd->add_option("--host", f->host, "Public API address (default: loopback only)");
  cmd->add_option("--port", f->port,
                  "Public API port (default 50051; 0: any free port; the chosen one is printed)");
  cmd->add_option("--admin-host", f->admin_host,
                  "Admin API address (budgets; default: loopback; elsewhere needs --admin-keys)");
  cmd->add_option("--admin-port", f->admin_port, "Admin API port (default: --port + 1)");
  cmd->add_option("--cluster-host", f->cluster_host,
                  "Cluster API address, where workers register (default: loopback)");
  cmd->add_option("--cluster-port", f->cluster_port, "Cluster API port (default: --port + 2)");
  cmd->add_option("--api-keys", f->api_keys,
                  "File of public API keys, one per line (reloaded on SIGHUP); clients send "
                  "'authorization: Bearer KEY'");
  cmd->add_option("--admin-keys", f->admin_keys,
                  "File of admin API keys (reloaded on SIGHUP; an admin key may abort any "
                  "request)");
  cmd->add_option("--cluster-token-file", f->cluster_token_file,
                  "The cluster's shared secret, which workers must present (serve makes one)");
  AddTlsFlags(cmd, &f->tls);
  cmd->add_option("--http-port", f->http_port,
                  "OpenAI-compatible HTTP API port (/v1/completions, /v1/models, /health, "
                  "/ready; default: off; 0: any free port, printed)");
  cmd->add_option("--http-host", f->http_host, "HTTP API address (default: loopback only)");
  AddLogFlags(cmd, &f->log, /*prompts=*/true);
  cmd->add_option("--chat-template", f->chat_template,
                  "Jinja chat template file for chat requests, instead of the model's "
                  "tokenizer_config.json chat_template");
  cmd->add_option("--health-port", f->health_port,
                  "Plaintext gRPC health listener on --host for probes (service \"liveness\": "
                  "the process; \"\" and kvgate.v1.Kvgate: the pipeline can serve)");
  cmd->add_flag("--dry-run", f->dry_run,
                "Check every flag and file (model, keys, certificates), then exit 0");
  cmd->add_option("--layers", f->layers,
                  "Layer split over the stages, e.g. 0-12,12-32 (default: by workers' memory)");
  cmd->add_option("--max-batch", f->max_batch,
                  "Most sequences running at once (continuous batching); others queue");
  cmd->add_option("--kv-policy", f->kv.policy, "Default KV policy of requests that name none");
  cmd->add_option("--kv-budget", f->kv.budget, "Default budget (tokens per layer and KV head)");
  cmd->add_option("--kv-chunk", f->kv.chunk, "Default prefill chunk when a policy evicts");
  cmd->add_option("--kv-allocation", f->kv.allocation,
                  "Default budget allocation: uniform | pyramid | adaptive (also kvgate budget "
                  "set --allocation at run time)");
  cmd->add_option("--kv-prefill", f->kv.prefill, "Default prefill mode: chunked | whole");
  cmd->add_option("--quantize", f->quantize,
                  "Workers' layer matrices as q8_0 or q4_0 blocks, converted at load (CPU "
                  "workers; the embedding, norms and LM head stay as stored)");
  cmd->add_flag("--quantize-all", f->quantize_all,
                "With --quantize: the embedding and the LM head as blocks too");
  cmd->add_flag("--skip-weight-check", f->skip_weight_check,
                "Workers skip the sampled NaN/Inf check of the first and last layers' weights");
  cmd->add_option("--max-step-tokens", f->max_step_tokens,
                  "Most tokens one step carries; workers reserve scratch for it and no prefill "
                  "chunk may exceed it (default 2048)");
  cmd->add_option("--shutdown-grace", f->shutdown_grace,
                  "Seconds running streams may go on after SIGTERM before they are ended "
                  "(default 5)");
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
                  "Memory per worker (weights, KV, step scratch), e.g. 2G; their sum must fit "
                  "the machine (default: 80% of the available memory shared between them)");
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
  auto token_file = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "worker", "Run a pipeline worker: registers with a coordinator, which assigns its layers");
  cmd->add_option("--coordinator", o->coordinator,
                  "The coordinator's cluster API (host:port, its --cluster-port)")
      ->required();
  cmd->add_option("--cluster-token-file", *token_file,
                  "The cluster's shared secret (the coordinator's --cluster-token-file)");
  AddTlsFlags(cmd, &o->tls);
  cmd->add_option("--host", o->host, "Address to listen on (default: loopback only)");
  cmd->add_option("--port", o->port, "gRPC port (0: any free port)");
  cmd->add_option("--data-port", o->data_port, "Activation transport port (0: any free port)");
  cmd->add_option("--advertise", o->advertise,
                  "Name or address the coordinator and the previous stage dial (default: --host, "
                  "or the host name when --host is 0.0.0.0), e.g. a pod's stable DNS name");
  cmd->add_option("--health-port", o->health_port,
                  "Plaintext gRPC health listener on --host for probes (service \"liveness\": "
                  "the process; \"\": registered with the coordinator)");
  cmd->add_option("--memory-limit", *limit,
                  "Bytes this worker may hold (weights, KV, step scratch), e.g. 512M or 2G "
                  "(default: --memory-fraction of the free memory)");
  cmd->add_option("--memory-fraction", o->memory_fraction,
                  "Without --memory-limit: this fraction of a GPU's free memory or of the "
                  "host's available memory (default 0.9 on a GPU, 0.8 on the host)");
  cmd->add_option("--threads", o->threads, "CPU threads (default: all cores)");
  cmd->add_option("--device", o->device, "Where the layers run: cpu, cuda, cuda:N, guarded");
  cmd->add_option("--kv-dtype", o->kv_dtype,
                  "KV cache storage: f32, bf16, f16 (default: f32 on the CPU, bf16 on a GPU)");
  auto dry_run = std::make_shared<bool>(false);
  cmd->add_flag("--dry-run", *dry_run,
                "Check every flag and file (credentials, certificates), then exit 0");
  auto log_flags = std::make_shared<LogFlags>();
  AddLogFlags(cmd, log_flags.get(), /*prompts=*/false);
  return [o, limit, token_file, dry_run, log_flags] {
    return RunWorkerCommand(*o, *limit, *token_file, *dry_run, *log_flags);
  };
}

}  // namespace kvgate::cli
