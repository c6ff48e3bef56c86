// The operators' API (kvgate.v1.KvgateAdmin): KV budgets per node and per layer, read and
// tuned at run time, and a usage stream. Behind `kvgate budget show|set|watch`.
#pragma once

#include "coordinator/cluster.h"
#include "kvgate/v1/kvgate.grpc.pb.h"

namespace kvgate::coordinator {

class AdminService final : public v1::KvgateAdmin::CallbackService {
 public:
  explicit AdminService(Cluster* cluster) : cluster_(cluster) {}

  grpc::ServerUnaryReactor* GetBudgets(grpc::CallbackServerContext* ctx,
                                       const v1::GetBudgetsRequest* req,
                                       v1::Budgets* resp) override;
  grpc::ServerUnaryReactor* SetBudget(grpc::CallbackServerContext* ctx,
                                      const v1::SetBudgetRequest* req, v1::Budgets* resp) override;
  grpc::ServerWriteReactor<v1::Budgets>* WatchUsage(grpc::CallbackServerContext* ctx,
                                                    const v1::WatchUsageRequest* req) override;

 private:
  Cluster* cluster_;
};

}  // namespace kvgate::coordinator
