#include "coordinator/cluster.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "security/key_ring.h"
#include "security/secrets.h"

namespace kvgate::coordinator {

namespace {

constexpr size_t kMaxAddressChars = 256;
// More than any machine has: a larger claim is a lie that would win every stage.
constexpr int64_t kMaxMemoryLimit = int64_t{1} << 50;

bool Printable(const std::string& s) {
  for (char c : s) {
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

// What a registering worker claims, checked before the planner believes it.
grpc::Status ValidateRegistration(const v1::RegisterRequest& r) {
  for (const auto& [value, field] :
       {std::pair<const std::string&, const char*>{r.address(), "address"},
        {r.data_address(), "data_address"},
        {r.hostname(), "hostname"},
        {r.backend(), "backend"}}) {
    if (value.size() > kMaxAddressChars || !Printable(value)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrCat(field, ": at most 256 printable characters"));
    }
  }
  if (r.address().empty() || r.data_address().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "address and data_address are required");
  }
  if (r.control_token().size() < 32 || r.control_token().size() > 256) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "control_token: 32 to 256 characters");
  }
  if (r.memory_limit_bytes() < 0 || r.memory_limit_bytes() > kMaxMemoryLimit) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "memory_limit_bytes: must be in [0, 2^50]");
  }
  return grpc::Status::OK;
}

// Usage figures are the worker's; negative ones are nonsense and are not believed.
bool PlausibleUsage(const v1::WorkerUsage& u) {
  return u.kv_capacity_bytes() >= 0 && u.kv_used_bytes() >= 0 && u.kv_peak_bytes() >= 0 &&
         u.sequences() >= 0 && u.retained_tokens() >= 0 && u.evicted_tokens() >= 0 &&
         u.steps() >= 0 && u.busy_seconds() >= 0 && u.kv_used_bytes() <= kMaxMemoryLimit &&
         u.kv_capacity_bytes() <= kMaxMemoryLimit;
}

}  // namespace

std::shared_ptr<grpc::ClientContext> WorkerClient::Context(
    std::chrono::milliseconds timeout) const {
  auto ctx = std::make_shared<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  ctx->AddMetadata(security::kControlTokenHeader, control_token);
  return ctx;
}

grpc::ServerUnaryReactor* Cluster::Register(grpc::CallbackServerContext* ctx,
                                            const v1::RegisterRequest* req,
                                            v1::RegisterResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status s = security::CheckToken(cluster_token_, security::kClusterTokenHeader, *ctx);
      !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  if (grpc::Status s = ValidateRegistration(*req); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    WorkerRecord w;
    w.id = absl::StrCat("w-", security::RandomHex(16));
    w.registered = ++registrations_;
    w.client.control_token = req->control_token();
    w.address = req->address();
    w.data_address = req->data_address();
    w.hostname = req->hostname();
    w.backend = req->backend();
    w.pid = req->pid();
    w.memory_limit = req->memory_limit_bytes();
    w.last_seen = std::chrono::steady_clock::now();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    w.client.stub =
        v1::Worker::NewStub(grpc::CreateCustomChannel(w.address, worker_credentials_, args));
    resp->set_worker_id(w.id);
    resp->set_heartbeat_ms(heartbeat_ms_);
    std::fprintf(stderr, "kvgate: worker %s registered from %s (pid %d, memory limit %lld)\n",
                 w.id.c_str(), w.address.c_str(), w.pid, static_cast<long long>(w.memory_limit));
    workers[w.id] = std::move(w);
  }
  if (on_change_) on_change_();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* Cluster::Heartbeat(grpc::CallbackServerContext* ctx,
                                             const v1::HeartbeatRequest* req,
                                             v1::HeartbeatResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status s = security::CheckToken(cluster_token_, security::kClusterTokenHeader, *ctx);
      !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  if (!PlausibleUsage(req->usage())) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "usage: implausible"));
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = workers.find(req->worker_id());
    const bool known = it != workers.end() && it->second.alive;
    resp->set_known(known);
    if (known) {
      it->second.last_seen = std::chrono::steady_clock::now();
      it->second.usage = req->usage();
    }
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

v1::Budgets Cluster::BudgetsLocked() const {
  v1::Budgets b;
  b.set_max_batch(max_batch);
  b.set_ready(ready);
  b.set_requests_running(running);
  b.set_requests_queued(queued);
  for (size_t i = 0; i < stages.size(); ++i) {
    const StageRecord& s = stages[i];
    v1::NodeBudget* n = b.add_nodes();
    n->set_stage(static_cast<int32_t>(i));
    n->set_first_layer(s.first_layer);
    n->set_last_layer(s.last_layer);
    n->set_weight_bytes(s.weight_bytes);
    n->set_kv_capacity_bytes(s.capacity.kv_capacity_bytes);
    n->set_kv_admitted_bytes(s.admitted_bytes);
    n->set_max_budget(SlotsPerSequence(s.capacity, max_batch));
    for (int64_t cap : s.capacity.layer_caps) n->add_layer_caps(cap);
    for (int64_t bpt : s.capacity.bytes_per_token) n->add_bytes_per_token(bpt);
    auto it = workers.find(s.worker_id);
    if (it == workers.end()) continue;
    const WorkerRecord& w = it->second;
    n->set_node_id(w.id);
    n->set_address(w.address);
    n->set_pid(w.pid);
    n->set_alive(w.alive);
    n->set_memory_limit_bytes(w.memory_limit);
    n->set_kv_used_bytes(w.usage.kv_used_bytes());
    n->set_kv_peak_bytes(w.usage.kv_peak_bytes());
    n->set_sequences(w.usage.sequences());
    n->set_retained_tokens(w.usage.retained_tokens());
    n->set_evicted_tokens(w.usage.evicted_tokens());
    n->set_pressure(w.usage.pressure());
    n->set_busy_seconds(w.usage.busy_seconds());
    n->set_steps(w.usage.steps());
  }
  return b;
}

}  // namespace kvgate::coordinator
