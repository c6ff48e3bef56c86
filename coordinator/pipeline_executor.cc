#include "coordinator/pipeline_executor.h"

#include "absl/strings/str_cat.h"
#include "proto/grpc_status.h"
#include "security/secrets.h"

namespace kvgate::coordinator {

void GrpcPipelineExecutor::SetCallbacks(StepCallback on_step, FreeCallback on_free) {
  std::lock_guard<std::mutex> lock(callbacks_->mu);
  callbacks_->on_step = std::move(on_step);
  callbacks_->on_free = std::move(on_free);
}

absl::Status GrpcPipelineExecutor::Load(const Cluster::Assignment& assignment,
                                        const v1::ShardAssignment& shard, v1::ShardLoaded* loaded) {
  auto ctx = assignment.client.Context(std::chrono::seconds(600));
  return FromGrpc(assignment.client.stub->LoadShard(ctx.get(), shard, loaded));
}

absl::Status GrpcPipelineExecutor::Wire(const std::vector<StageView>& stages,
                                        uint64_t first_step_id, const std::string& nccl_unique_id) {
  stages_ = stages;
  // This wiring's secret: each stage accepts activations only from a stage that shows it.
  const std::string data_token = security::RandomHex(32);
  for (size_t s = 0; s < stages.size(); ++s) {
    v1::PipelineWiring wire;
    wire.set_next_data_address(s + 1 < stages.size() ? stages[s + 1].data_address : "");
    wire.set_first_step_id(first_step_id);
    wire.set_nccl_unique_id(nccl_unique_id);
    wire.set_num_stages(static_cast<int32_t>(stages.size()));
    wire.set_data_token(data_token);
    v1::WiringDone done;
    auto ctx = stages[s].client.Context(std::chrono::seconds(15));
    grpc::Status status = stages[s].client.stub->Connect(ctx.get(), wire, &done);
    if (!status.ok()) return FromGrpc(status);
  }
  return absl::OkStatus();
}

void GrpcPipelineExecutor::Step(std::vector<std::shared_ptr<v1::StepPlan>> plans,
                                std::chrono::milliseconds timeout) {
  for (size_t s = 0; s < plans.size() && s < stages_.size(); ++s) {
    std::shared_ptr<v1::StepPlan> req = plans[s];
    auto ctx = stages_[s].client.Context(timeout);
    auto resp = std::make_shared<v1::StepResult>();
    const int stage = static_cast<int>(s);
    std::shared_ptr<Callbacks> callbacks = callbacks_;
    stages_[s].client.stub->async()->Step(
        ctx.get(), req.get(), resp.get(), [callbacks, ctx, req, resp, stage](grpc::Status status) {
          StepReply r{
              req->step_id(),
              stage,
              FromGrpc(status),
              std::vector<int32_t>(resp->tokens().begin(), resp->tokens().end()),
              resp->compute_seconds(),
              std::vector<v1::TokenLogprobs>(resp->logprobs().begin(), resp->logprobs().end())};
          std::lock_guard<std::mutex> lock(callbacks->mu);
          if (callbacks->on_step) callbacks->on_step(std::move(r));
        });
  }
}

void GrpcPipelineExecutor::Free(uint64_t batch, const std::vector<uint64_t>& seq_ids) {
  auto req = std::make_shared<v1::FreeRequest>();
  for (uint64_t id : seq_ids) req->add_seq_ids(id);
  for (size_t s = 0; s < stages_.size(); ++s) {
    auto ctx = stages_[s].client.Context(std::chrono::seconds(10));
    auto resp = std::make_shared<v1::FreeResponse>();
    const int stage = static_cast<int>(s);
    std::shared_ptr<Callbacks> callbacks = callbacks_;
    stages_[s].client.stub->async()->Free(
        ctx.get(), req.get(), resp.get(),
        [callbacks, ctx, req, resp, stage, batch](grpc::Status status) {
          FreeReply r{batch, stage, FromGrpc(status),
                      std::vector<v1::SequenceKvStats>(resp->stats().begin(), resp->stats().end())};
          std::lock_guard<std::mutex> lock(callbacks->mu);
          if (callbacks->on_free) callbacks->on_free(std::move(r));
        });
  }
}

void GrpcPipelineExecutor::FreeAll(uint64_t wiring) {
  for (const StageView& stage : stages_) {
    if (stage.client.stub == nullptr) continue;
    auto ctx = stage.client.Context(std::chrono::seconds(2));
    auto req = std::make_shared<v1::FreeRequest>();
    auto resp = std::make_shared<v1::FreeResponse>();
    req->set_all(true);
    req->set_wiring(wiring);
    stage.client.stub->async()->Free(ctx.get(), req.get(), resp.get(),
                                     [ctx, req, resp](grpc::Status) {});
  }
}

}  // namespace kvgate::coordinator
