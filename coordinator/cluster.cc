#include "coordinator/cluster.h"

#include <algorithm>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cache/budget_allocation.h"
#include "common/log.h"
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
         u.kv_capacity_bytes() <= kMaxMemoryLimit && u.layer_retained_tokens_size() <= 4096 &&
         u.layer_evicted_tokens_size() <= 4096;
}

}  // namespace

std::shared_ptr<grpc::ClientContext> WorkerClient::Context(
    std::chrono::milliseconds timeout) const {
  auto ctx = std::make_shared<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  ctx->AddMetadata(security::kControlTokenHeader, control_token);
  return ctx;
}

Cluster::Cluster(int heartbeat_ms, std::string cluster_token,
                 std::shared_ptr<grpc::ChannelCredentials> worker_credentials)
    : heartbeat_ms_(heartbeat_ms),
      cluster_token_(std::move(cluster_token)),
      worker_credentials_(std::move(worker_credentials)) {}

void Cluster::set_on_change(std::function<void()> f) {
  std::lock_guard<std::mutex> lock(mu_);
  on_change_ = std::move(f);
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
  resp->set_worker_id(AddWorker(*req));
  resp->set_heartbeat_ms(heartbeat_ms_);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

std::string Cluster::AddWorker(const v1::RegisterRequest& req) {
  std::function<void()> on_change;
  std::string id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    WorkerRecord w;
    w.id = absl::StrCat("w-", security::RandomHex(16));
    w.registered = ++registrations_;
    w.client.control_token = req.control_token();
    w.address = req.address();
    w.data_address = req.data_address();
    w.hostname = req.hostname();
    w.backend = req.backend();
    w.pid = req.pid();
    w.memory_limit = req.memory_limit_bytes();
    w.last_seen = std::chrono::steady_clock::now();
    // The same address registering again is a new incarnation of that worker (restarted, or
    // it gave this coordinator up): the old one is gone now, not a heartbeat timeout later.
    for (auto& [old_id, old] : workers_) {
      if (old.alive && old.address == w.address) {
        old.alive = false;
        old.last_seen = {};
        log::Warn(absl::StrFormat("worker %s re-registered from %s; the old registration is gone",
                                  old_id.c_str(), w.address.c_str()));
      }
    }
    if (worker_credentials_ != nullptr) {
      grpc::ChannelArguments args;
      args.SetMaxReceiveMessageSize(-1);
      w.client.stub =
          v1::Worker::NewStub(grpc::CreateCustomChannel(w.address, worker_credentials_, args));
    }
    log::Info(absl::StrFormat("worker %s registered from %s (pid %d, memory limit %lld)",
                              w.id.c_str(), w.address.c_str(), w.pid,
                              static_cast<long long>(w.memory_limit)));
    id = w.id;
    workers_[w.id] = std::move(w);
    on_change = on_change_;
  }
  if (on_change) on_change();
  return id;
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
  resp->set_known(Touch(req->worker_id(), req->usage()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

bool Cluster::Touch(const std::string& worker_id, const v1::WorkerUsage& usage) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end() || !it->second.alive) return false;
  it->second.last_seen = std::chrono::steady_clock::now();
  it->second.usage = usage;
  return true;
}

std::string Cluster::ExpireWorkers() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  for (auto& [id, w] : workers_) {
    if (w.alive && now - w.last_seen > dead_after()) {
      w.alive = false;
      log::Warn(absl::StrFormat("worker %s (%s) stopped answering", id.c_str(), w.address.c_str()));
    }
  }
  std::string lost;
  for (size_t s = 0; s < stages_.size(); ++s) {
    StageRecord& st = stages_[s];
    if (st.worker_id.empty()) continue;
    auto w = workers_.find(st.worker_id);
    if (w == workers_.end() || !w->second.alive) {
      // Clients read this: no address (the log has it).
      if (lost.empty()) lost = absl::StrCat("stage ", s, "'s worker stopped answering");
      if (w != workers_.end()) w->second.stage = -1;
      st.worker_id.clear();
      st.loaded = false;
    }
  }
  return lost;
}

absl::StatusOr<std::vector<Cluster::Assignment>> Cluster::AssignStages(int stages,
                                                                       const PlanFn& plan,
                                                                       bool* complete) {
  std::lock_guard<std::mutex> lock(mu_);
  *complete = false;
  std::vector<WorkerRecord*> spare;
  for (auto& [id, w] : workers_) {
    if (w.alive && w.stage < 0) spare.push_back(&w);
  }
  std::sort(spare.begin(), spare.end(),
            [](WorkerRecord* a, WorkerRecord* b) { return a->registered < b->registered; });
  if (stages_.empty()) {
    if (static_cast<int>(spare.size()) < stages) return std::vector<Assignment>{};
    std::vector<int64_t> memories;
    for (int s = 0; s < stages; ++s)
      memories.push_back(spare[static_cast<size_t>(s)]->memory_limit);
    absl::StatusOr<std::vector<LayerRange>> ranges = plan(memories);
    if (!ranges.ok()) return ranges.status();
    stages_.resize(static_cast<size_t>(stages));
    for (size_t s = 0; s < ranges->size(); ++s) {
      stages_[s].first_layer = (*ranges)[s].first;
      stages_[s].last_layer = (*ranges)[s].second;
    }
  }
  std::vector<Assignment> out;
  size_t next_spare = 0;
  *complete = true;
  for (size_t s = 0; s < stages_.size(); ++s) {
    StageRecord& st = stages_[s];
    if (!st.worker_id.empty()) continue;
    if (next_spare >= spare.size()) {
      *complete = false;
      continue;
    }
    WorkerRecord* w = spare[next_spare++];
    w->stage = static_cast<int>(s);
    st.worker_id = w->id;
    st.loaded = false;
    out.push_back(
        Assignment{static_cast<int>(s), w->id, w->client, {st.first_layer, st.last_layer}});
  }
  return out;
}

void Cluster::StageLoaded(int stage, const v1::ShardLoaded& loaded) {
  std::lock_guard<std::mutex> lock(mu_);
  StageRecord& st = stages_[static_cast<size_t>(stage)];
  st.loaded = true;
  st.weight_bytes = loaded.weight_bytes();
  st.capacity.first_layer = st.first_layer;
  st.capacity.kv_capacity_bytes = loaded.kv_capacity_bytes();
  st.capacity.bytes_per_token.assign(loaded.bytes_per_token().begin(),
                                     loaded.bytes_per_token().end());
  st.capacity.layer_caps.resize(st.capacity.bytes_per_token.size(), 0);
  st.admitted_bytes = 0;
}

void Cluster::StageFailed(int stage, const std::string& worker_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto w = workers_.find(worker_id);
  if (w != workers_.end()) {
    w->second.alive = false;
    w->second.stage = -1;
  }
  stages_[static_cast<size_t>(stage)].worker_id.clear();
  stages_[static_cast<size_t>(stage)].loaded = false;
}

std::vector<StageView> Cluster::Pipeline() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<StageView> out;
  for (size_t s = 0; s < stages_.size(); ++s) {
    StageRecord& st = stages_[s];
    st.admitted_bytes = 0;
    const WorkerRecord& w = workers_.at(st.worker_id);
    out.push_back(StageView{static_cast<int>(s),
                            w.id,
                            w.address,
                            w.data_address,
                            w.client,
                            {st.first_layer, st.last_layer}});
  }
  return out;
}

void Cluster::SetReady(bool ready) {
  std::lock_guard<std::mutex> lock(mu_);
  ready_ = ready;
}

std::string Cluster::Layout() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string layout;
  for (size_t s = 0; s < stages_.size(); ++s) {
    const StageRecord& st = stages_[s];
    absl::StrAppend(&layout, s ? ", " : "", st.worker_id, " [", st.first_layer, ", ", st.last_layer,
                    ")");
  }
  return layout;
}

std::string Cluster::NotReadyReason() const {
  std::lock_guard<std::mutex> lock(mu_);
  if (stages_.empty()) return "waiting for workers to register";
  int loaded = 0;
  std::string missing, loading;
  for (size_t s = 0; s < stages_.size(); ++s) {
    const StageRecord& st = stages_[s];
    if (st.worker_id.empty()) {
      if (missing.empty()) missing = absl::StrCat("stage ", s, " has no worker");
    } else if (!st.loaded) {
      if (loading.empty()) loading = absl::StrCat("stage ", s, "'s worker is loading its layers");
    } else {
      ++loaded;
    }
  }
  const std::string count = absl::StrCat(" (", loaded, " of ", stages_.size(), " stages loaded)");
  if (!missing.empty()) return missing + count;
  if (!loading.empty()) return loading + count;
  return "the stages are being wired";
}

std::vector<StageCapacity> Cluster::Capacities(std::vector<int64_t>* admitted) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<StageCapacity> caps;
  admitted->clear();
  for (const StageRecord& st : stages_) {
    caps.push_back(st.capacity);
    admitted->push_back(st.admitted_bytes);
  }
  return caps;
}

void Cluster::Account(const std::vector<StageGrant>& grants, int sign) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t s = 0; s < grants.size() && s < stages_.size(); ++s) {
    stages_[s].admitted_bytes += sign * grants[s].bytes;
  }
}

void Cluster::Unreserve(int stage, int64_t freed) {
  std::lock_guard<std::mutex> lock(mu_);
  if (stage >= 0 && static_cast<size_t>(stage) < stages_.size()) {
    stages_[static_cast<size_t>(stage)].admitted_bytes -= freed;
  }
}

uint64_t Cluster::CapsVersion() const {
  std::lock_guard<std::mutex> lock(mu_);
  return caps_version_;
}

std::vector<std::vector<int64_t>> Cluster::LayerCaps() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::vector<int64_t>> out;
  for (const StageRecord& st : stages_) out.push_back(st.capacity.layer_caps);
  return out;
}

std::vector<int> Cluster::PressedStages() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int> pressed;
  for (size_t s = 0; s < stages_.size(); ++s) {
    auto w = workers_.find(stages_[s].worker_id);
    if (w != workers_.end() && w->second.usage.pressure()) pressed.push_back(static_cast<int>(s));
  }
  return pressed;
}

std::string Cluster::Allocation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return allocation_;
}

void Cluster::SetAllocation(std::string allocation) {
  std::lock_guard<std::mutex> lock(mu_);
  allocation_ = std::move(allocation);
}

std::vector<int64_t> Cluster::BytesPerToken(int stage) const {
  std::lock_guard<std::mutex> lock(mu_);
  return stages_[static_cast<size_t>(stage)].capacity.bytes_per_token;
}

void Cluster::SetCounts(int64_t running, int64_t queued) {
  std::lock_guard<std::mutex> lock(mu_);
  running_ = running;
  queued_ = queued;
}

void Cluster::SetMaxBatch(int64_t max_batch) {
  std::lock_guard<std::mutex> lock(mu_);
  max_batch_ = max_batch;
}

v1::Budgets Cluster::Budgets() const {
  std::lock_guard<std::mutex> lock(mu_);
  return BudgetsLocked();
}

grpc::Status Cluster::SetBudget(const v1::SetBudgetRequest& req, v1::Budgets* out) {
  std::lock_guard<std::mutex> lock(mu_);
  grpc::Status status = grpc::Status::OK;
  const std::vector<std::string>& allocations = cache::AllocationNames();
  if (!req.allocation().empty()) {
    if (std::find(allocations.begin(), allocations.end(), req.allocation()) == allocations.end()) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            absl::StrCat("allocation: '", req.allocation().substr(0, 64),
                                         "' is not one of ", absl::StrJoin(allocations, ", ")));
    } else if (!req.node_id().empty() || req.first_layer() != 0 || req.last_layer() != 0 ||
               req.tokens() != 0) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "allocation: applies to every node and layer; set it alone, "
                            "without node, layers or tokens");
    } else {
      allocation_ = req.allocation();
    }
  } else if (req.tokens() < 0 || req.tokens() > (int64_t{1} << 31)) {
  } else if (stages_.empty()) {
    status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the pipeline is not planned yet");
  } else {
    const bool all_layers = req.first_layer() == 0 && req.last_layer() == 0;
    int matched_nodes = 0, matched_layers = 0;
    for (StageRecord& s : stages_) {
      if (!req.node_id().empty() && s.worker_id != req.node_id()) continue;
      ++matched_nodes;
      s.capacity.layer_caps.resize(s.capacity.bytes_per_token.size(), 0);
      for (int l = s.first_layer; l < s.last_layer; ++l) {
        if (!all_layers && (l < req.first_layer() || l >= req.last_layer())) continue;
        s.capacity.layer_caps[static_cast<size_t>(l - s.first_layer)] = req.tokens();
        ++matched_layers;
      }
    }
    if (matched_nodes == 0) {
      status = grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("node: no stage is held by '", req.node_id().substr(0, 64),
                                         "' (see kvgate budget show)"));
    } else if (matched_layers == 0) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "layers: the range holds no layer of the chosen node(s)");
    } else {
      ++caps_version_;
    }
  }
  *out = BudgetsLocked();
  return status;
}

v1::Budgets Cluster::BudgetsLocked() const {
  v1::Budgets b;
  b.set_max_batch(max_batch_);
  b.set_allocation(allocation_);
  b.set_ready(ready_);
  b.set_requests_running(running_);
  b.set_requests_queued(queued_);
  for (size_t i = 0; i < stages_.size(); ++i) {
    const StageRecord& s = stages_[i];
    v1::NodeBudget* n = b.add_nodes();
    n->set_stage(static_cast<int32_t>(i));
    n->set_first_layer(s.first_layer);
    n->set_last_layer(s.last_layer);
    n->set_weight_bytes(s.weight_bytes);
    n->set_kv_capacity_bytes(s.capacity.kv_capacity_bytes);
    n->set_kv_admitted_bytes(s.admitted_bytes);
    n->set_max_budget(SlotsPerSequence(s.capacity, max_batch_));
    for (int64_t cap : s.capacity.layer_caps) n->add_layer_caps(cap);
    for (int64_t bpt : s.capacity.bytes_per_token) n->add_bytes_per_token(bpt);
    auto it = workers_.find(s.worker_id);
    if (it == workers_.end()) continue;
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
    n->mutable_layer_retained_tokens()->CopyFrom(w.usage.layer_retained_tokens());
    n->mutable_layer_evicted_tokens()->CopyFrom(w.usage.layer_evicted_tokens());
  }
  return b;
}

}  // namespace kvgate::coordinator
