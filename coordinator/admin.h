// The operators' API (kvgate.v1.KvgateAdmin): KV budgets per node and per layer, read and
// tuned at run time, and a usage stream. Behind `kvgate budget show|set|watch`.
#pragma once

#include "coordinator/cluster.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "security/key_ring.h"

namespace kvgate::coordinator {

class AdminService final : public v1::KvgateAdmin::CallbackService {
 public:
  // `admin_keys`: the keys a caller must show (null: none; the admin listener is on loopback).
  AdminService(Cluster* cluster, const security::KeyRing* admin_keys)
      : cluster_(cluster), admin_keys_(admin_keys) {}

  grpc::ServerUnaryReactor* GetBudgets(grpc::CallbackServerContext* ctx,
                                       const v1::GetBudgetsRequest* req,
                                       v1::Budgets* resp) override;
  grpc::ServerUnaryReactor* SetBudget(grpc::CallbackServerContext* ctx,
                                      const v1::SetBudgetRequest* req, v1::Budgets* resp) override;
  grpc::ServerWriteReactor<v1::Budgets>* WatchUsage(grpc::CallbackServerContext* ctx,
                                                    const v1::WatchUsageRequest* req) override;

 private:
  Cluster* cluster_;
  const security::KeyRing* admin_keys_;
};

}  // namespace kvgate::coordinator
