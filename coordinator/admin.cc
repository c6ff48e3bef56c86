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
      current_ = cluster_->Budgets();
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
  *resp = cluster_->Budgets();
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
  grpc::Status status = cluster_->SetBudget(*req, resp);
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
