// kvgate budget show|set|watch: the operators' view of KV budgets per node (pipeline worker)
// and per layer, through the coordinator's KvgateAdmin service.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/client_connection.h"
#include "cli/commands.h"
#include "grpcpp/grpcpp.h"
#include "kvgate/v1/kvgate.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

struct BudgetFlags {
  ClientConnection conn;  // the coordinator's admin listener (--admin-port)
  std::string node;
  std::string layers;  // A-B (model layers, B exclusive)
  int64_t tokens = -1;
  std::string allocation;
  bool json = false;
  double period = 1.0;
  int64_t count = 0;  // watch: stop after this many reports (0: until interrupted)
};

nlohmann::json ToJson(const v1::Budgets& b) {
  nlohmann::json j;
  j["ready"] = b.ready();
  j["max_batch"] = b.max_batch();
  j["requests_running"] = b.requests_running();
  j["requests_queued"] = b.requests_queued();
  j["allocation"] = b.allocation();
  j["nodes"] = nlohmann::json::array();
  for (const v1::NodeBudget& n : b.nodes()) {
    j["nodes"].push_back(
        {{"node", n.node_id()},
         {"address", n.address()},
         {"pid", n.pid()},
         {"stage", n.stage()},
         {"layers", {n.first_layer(), n.last_layer()}},
         {"alive", n.alive()},
         {"memory_limit_bytes", n.memory_limit_bytes()},
         {"weight_bytes", n.weight_bytes()},
         {"kv_capacity_bytes", n.kv_capacity_bytes()},
         {"kv_used_bytes", n.kv_used_bytes()},
         {"kv_peak_bytes", n.kv_peak_bytes()},
         {"kv_admitted_bytes", n.kv_admitted_bytes()},
         {"sequences", n.sequences()},
         {"retained_tokens", n.retained_tokens()},
         {"evicted_tokens", n.evicted_tokens()},
         {"max_budget", n.max_budget()},
         {"layer_caps", std::vector<int64_t>(n.layer_caps().begin(), n.layer_caps().end())},
         {"bytes_per_token",
          std::vector<int64_t>(n.bytes_per_token().begin(), n.bytes_per_token().end())},
         {"steps", n.steps()},
         {"busy_seconds", n.busy_seconds()}});
  }
  return j;
}

std::string Mib(int64_t bytes) {
  return absl::StrCat(bytes / (1 << 20), ".", (bytes % (1 << 20)) * 10 / (1 << 20), "M");
}

void PrintTable(const v1::Budgets& b) {
  std::printf("pipeline %s, max batch %lld, %lld running, %lld queued, allocation %s\n",
              b.ready() ? "ready" : "NOT READY", static_cast<long long>(b.max_batch()),
              static_cast<long long>(b.requests_running()),
              static_cast<long long>(b.requests_queued()),
              b.allocation().empty() ? "uniform" : b.allocation().c_str());
  std::printf("%-5s %-34s %-8s %-9s %9s %9s %9s %9s %5s %9s %9s %8s  %s\n", "stage", "node",
              "layers", "state", "limit", "kv cap", "kv used", "kv peak", "seqs", "retained",
              "evicted", "max bdgt", "layer caps");
  for (const v1::NodeBudget& n : b.nodes()) {
    std::string caps;
    for (int i = 0; i < n.layer_caps_size(); ++i) {
      if (n.layer_caps(i) > 0) {
        absl::StrAppend(&caps, caps.empty() ? "" : " ", "L", n.first_layer() + i, "=",
                        n.layer_caps(i));
      }
    }
    std::printf("%-5d %-34s %-8s %-9s %9s %9s %9s %9s %5lld %9lld %9lld %8lld  %s\n", n.stage(),
                n.node_id().empty() ? "-" : n.node_id().c_str(),
                absl::StrCat(n.first_layer(), "-", n.last_layer()).c_str(),
                n.node_id().empty() ? "no worker" : (n.alive() ? "alive" : "lost"),
                Mib(n.memory_limit_bytes()).c_str(), Mib(n.kv_capacity_bytes()).c_str(),
                Mib(n.kv_used_bytes()).c_str(), Mib(n.kv_peak_bytes()).c_str(),
                static_cast<long long>(n.sequences()), static_cast<long long>(n.retained_tokens()),
                static_cast<long long>(n.evicted_tokens()), static_cast<long long>(n.max_budget()),
                caps.empty() ? "none" : caps.c_str());
  }
  std::fflush(stdout);
}

void Print(const v1::Budgets& b, bool json) {
  if (json) {
    std::printf("%s\n", ToJson(b).dump().c_str());
    std::fflush(stdout);
  } else {
    PrintTable(b);
  }
}

std::unique_ptr<v1::KvgateAdmin::Stub> Stub(const ClientConnection& conn) {
  auto channel = conn.Channel();
  if (!channel.ok()) return nullptr;
  return v1::KvgateAdmin::NewStub(*channel);
}

int RunShow(const BudgetFlags& f) {
  auto stub = Stub(f.conn);
  if (stub == nullptr) return Fail(f.conn.Channel().status());
  grpc::ClientContext ctx;
  f.conn.Authorize(&ctx);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::Budgets b;
  grpc::Status s = stub->GetBudgets(&ctx, v1::GetBudgetsRequest(), &b);
  if (!s.ok()) return Fail(ServerError(f.conn.server, s));
  Print(b, f.json);
  return 0;
}

int RunSet(const BudgetFlags& f) {
  v1::SetBudgetRequest req;
  if (!f.allocation.empty()) {
    if (f.tokens >= 0 || !f.node.empty() || !f.layers.empty()) {
      return Fail(
          "--allocation applies to every node and layer: give it without --tokens, "
          "--node or --layers");
    }
    req.set_allocation(f.allocation);
  } else if (f.tokens < 0) {
    return Fail("give --tokens N (0 removes the cap) or --allocation uniform|pyramid|adaptive");
  } else {
    req.set_node_id(f.node);
    req.set_tokens(f.tokens);
    if (!f.layers.empty()) {
      std::vector<std::string> ends = absl::StrSplit(f.layers, '-');
      int a = 0, b = 0;
      if (ends.size() != 2 || !absl::SimpleAtoi(ends[0], &a) || !absl::SimpleAtoi(ends[1], &b) ||
          b <= a || a < 0) {
        return Fail(
            absl::StrCat("--layers '", f.layers, "': want A-B with 0 <= A < B (B exclusive)"));
      }
      req.set_first_layer(a);
      req.set_last_layer(b);
    }
  }
  auto stub = Stub(f.conn);
  if (stub == nullptr) return Fail(f.conn.Channel().status());
  grpc::ClientContext ctx;
  f.conn.Authorize(&ctx);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::Budgets b;
  grpc::Status s = stub->SetBudget(&ctx, req, &b);
  if (!s.ok()) return Fail(ServerError(f.conn.server, s));
  Print(b, f.json);
  return 0;
}

int RunWatch(const BudgetFlags& f) {
  if (f.period <= 0) return Fail("--period must be > 0 seconds");
  auto stub = Stub(f.conn);
  if (stub == nullptr) return Fail(f.conn.Channel().status());
  grpc::ClientContext ctx;
  f.conn.Authorize(&ctx);
  v1::WatchUsageRequest req;
  req.set_period_ms(static_cast<int32_t>(f.period * 1000));
  std::unique_ptr<grpc::ClientReader<v1::Budgets>> reader = stub->WatchUsage(&ctx, req);
  v1::Budgets b;
  int64_t n = 0;
  while (reader->Read(&b)) {
    Print(b, f.json);
    if (f.count > 0 && ++n >= f.count) {
      ctx.TryCancel();
      break;
    }
  }
  grpc::Status s = reader->Finish();
  if (!s.ok() && s.error_code() != grpc::StatusCode::CANCELLED) {
    return Fail(ServerError(f.conn.server, s));
  }
  return 0;
}

}  // namespace

Runner AddBudgetCommand(CLI::App& app) {
  auto f = std::make_shared<BudgetFlags>();
  f->conn.key_env = {"KVGATE_ADMIN_KEY", "KVGATE_API_KEY"};
  auto which = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("budget", "Read and tune KV budgets per node and layer");
  cmd->require_subcommand(1);
  CLI::App* show = cmd->add_subcommand("show", "Budgets, memory and usage of every node");
  CLI::App* set = cmd->add_subcommand(
      "set",
      "Cap the budget (tokens per layer and KV head) of a node's layers, or set the allocation");
  CLI::App* watch = cmd->add_subcommand("watch", "Stream usage every --period seconds");
  for (CLI::App* c : {show, set, watch}) {
    c->add_option("--server", f->conn.server,
                  "The coordinator's admin API (host:port, its --admin-port)")
        ->required();
    AddClientFlags(c, &f->conn);
    c->add_flag("--json", f->json, "One JSON object per report");
  }
  set->add_option("--node", f->node, "Node id (see show; default: every node)");
  set->add_option("--layers", f->layers, "Model layers A-B (B exclusive; default: all)");
  set->add_option("--tokens", f->tokens, "Tokens per layer and KV head (0: remove the cap)");
  set->add_option("--allocation", f->allocation,
                  "Instead of a cap: how requests that name none spread their budget from now "
                  "on (uniform | pyramid | adaptive)");
  watch->add_option("--period", f->period, "Seconds between reports (default 1)");
  watch->add_option("--count", f->count, "Stop after this many reports (default: never)");
  return [f, show, set, watch] {
    if (show->parsed()) return RunShow(*f);
    if (set->parsed()) return RunSet(*f);
    return RunWatch(*f);
  };
}

}  // namespace kvgate::cli
