#include "coordinator/admin.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "security/key_ring.h"

namespace kvgate::coordinator {
namespace {

// Writes the cluster's budgets every period until the client cancels. A small thread paces the
// writes (one at a time: it waits for each write to finish).
class UsageWriter final : public grpc::ServerWriteReactor<v1::Budgets> {
 public:
  UsageWriter(Cluster* cluster, int period_ms) : cluster_(cluster), period_ms_(period_ms) {
    pacer_ = std::thread([this] { Pace(); });
  }
  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) stop_ = true;
    cv_.notify_all();
  }
  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    pacer_.join();
    delete this;
  }

 private:
  void Pace() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      {
        std::lock_guard<std::mutex> cl(cluster_->mu);
        current_ = cluster_->BudgetsLocked();
      }
      writing_ = true;
      StartWrite(&current_);
      cv_.wait(lock, [this] { return !writing_ || stop_; });
      if (stop_) break;
      cv_.wait_for(lock, std::chrono::milliseconds(period_ms_), [this] { return stop_; });
    }
    // Finish once, after the last write completed.
    cv_.wait(lock, [this] { return !writing_; });
    if (!finished_) {
      finished_ = true;
      lock.unlock();
      Finish(grpc::Status::OK);
    }
  }

  Cluster* cluster_;
  const int period_ms_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool writing_ = false, stop_ = false, finished_ = false;
  v1::Budgets current_;
  std::thread pacer_;
};

// A stream refused before it starts (a missing or wrong admin key).
class Refused final : public grpc::ServerWriteReactor<v1::Budgets> {
 public:
  explicit Refused(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerUnaryReactor* AdminService::GetBudgets(grpc::CallbackServerContext* ctx,
                                                   const v1::GetBudgetsRequest*,
                                                   v1::Budgets* resp) {
  if (grpc::Status s = security::CheckKey(admin_keys_, *ctx); !s.ok()) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(s);
    return reactor;
  }
  {
    std::lock_guard<std::mutex> lock(cluster_->mu);
    *resp = cluster_->BudgetsLocked();
  }
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::SetBudget(grpc::CallbackServerContext* ctx,
                                                  const v1::SetBudgetRequest* req,
                                                  v1::Budgets* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (grpc::Status s = security::CheckKey(admin_keys_, *ctx); !s.ok()) {
    reactor->Finish(s);
    return reactor;
  }
  grpc::Status status = grpc::Status::OK;
  {
    std::lock_guard<std::mutex> lock(cluster_->mu);
    if (req->tokens() < 0 || req->tokens() > (int64_t{1} << 31)) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "tokens: must be in [0, 2^31] (0: no cap)");
    } else if (req->first_layer() < 0 || req->last_layer() < req->first_layer()) {
      status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "layers: want first <= last (model layer indices, last exclusive)");
    } else if (cluster_->stages.empty()) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the pipeline is not planned yet");
    } else {
      const bool all_layers = req->first_layer() == 0 && req->last_layer() == 0;
      int matched_nodes = 0, matched_layers = 0;
      for (StageRecord& s : cluster_->stages) {
        if (!req->node_id().empty() && s.worker_id != req->node_id()) continue;
        ++matched_nodes;
        s.capacity.layer_caps.resize(s.capacity.bytes_per_token.size(), 0);
        for (int l = s.first_layer; l < s.last_layer; ++l) {
          if (!all_layers && (l < req->first_layer() || l >= req->last_layer())) continue;
          s.capacity.layer_caps[static_cast<size_t>(l - s.first_layer)] = req->tokens();
          ++matched_layers;
        }
      }
      if (matched_nodes == 0) {
        status =
            grpc::Status(grpc::StatusCode::NOT_FOUND,
                         absl::StrCat("node: no stage is held by '", req->node_id().substr(0, 64),
                                      "' (see kvgate budget show)"));
      } else if (matched_layers == 0) {
        status = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                              "layers: the range holds no layer of the chosen node(s)");
      } else {
        ++cluster_->caps_version;
      }
    }
    *resp = cluster_->BudgetsLocked();
  }
  reactor->Finish(status);
  return reactor;
}

grpc::ServerWriteReactor<v1::Budgets>* AdminService::WatchUsage(grpc::CallbackServerContext* ctx,
                                                                const v1::WatchUsageRequest* req) {
  if (grpc::Status s = security::CheckKey(admin_keys_, *ctx); !s.ok()) return new Refused(s);
  const int period = req->period_ms() > 0 ? std::max(req->period_ms(), 50) : 1000;
  return new UsageWriter(cluster_, period);
}

}  // namespace kvgate::coordinator
