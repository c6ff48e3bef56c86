#include "worker/worker.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "common/status.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "kernels/arena.h"
#include "kernels/cpu/ops.h"
#include "model/config/model_config.h"
#include "model/generation/generator.h"
#include "model/sampling/logprobs.h"
#include "model/weights/eviction_weights.h"
#include "model/weights/quantize.h"
#include "model/weights/safetensors.h"
#include "model/weights/stage_weights.h"
#include "proto/convert.h"
#include "proto/grpc_status.h"
#include "security/key_ring.h"
#include "security/secrets.h"
#include "security/tls_stream.h"

namespace kvgate::worker {
namespace {

using Clock = std::chrono::steady_clock;

// The most tokens one sequence brings to one step (a prefill chunk).
constexpr int64_t kMaxStepTokens = int64_t{1} << 24;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// One live sequence of this stage.
struct Sequence {
  cache::EvictionParams kv;
  int64_t max_tokens = 0;
  std::unique_ptr<cache::KvCache> cache;
  std::unique_ptr<model::Sampler> sampler;  // last stage
  std::vector<int32_t> prompt, generated;   // last stage
  int32_t logprobs = -1;                    // last stage: the API's logprobs (-1: none)
};

}  // namespace

absl::StatusOr<int64_t> ParseBytes(const std::string& text) {
  std::string t = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  double scale = 1;
  for (const auto& [suffix, s] : std::vector<std::pair<std::string, double>>{{"gib", 1 << 30},
                                                                             {"mib", 1 << 20},
                                                                             {"kib", 1 << 10},
                                                                             {"gb", 1e9},
                                                                             {"mb", 1e6},
                                                                             {"kb", 1e3},
                                                                             {"g", 1 << 30},
                                                                             {"m", 1 << 20},
                                                                             {"k", 1 << 10},
                                                                             {"b", 1}}) {
    if (t.size() > suffix.size() && t.substr(t.size() - suffix.size()) == suffix) {
      t.resize(t.size() - suffix.size());
      scale = s;
      break;
    }
  }
  double v = 0;
  if (!absl::SimpleAtod(t, &v) || v < 0 || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' is not a byte count (examples: 1073741824, 512M, 2G)"));
  }
  return static_cast<int64_t>(v * scale);
}

int64_t AvailableMemory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

int64_t ResidentMemory() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    int64_t kb = 0;
    if (line.rfind("VmRSS:", 0) == 0 &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(6, line.size() - 9)), &kb)) {
      return kb * 1024;
    }
  }
  return 0;
}

class WorkerService final : public v1::Worker::CallbackService {
 public:
  WorkerService(const WorkerOptions& options, std::unique_ptr<kernels::Backend> backend,
                DType kv_dtype, std::unique_ptr<TcpTransport> transport)
      : options_(options),
        transport_(std::move(transport)),
        backend_(std::move(backend)),
        kv_dtype_(kv_dtype) {
    executor_ = std::thread([this] { ExecutorLoop(); });
  }
  ~WorkerService() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    transport_->Interrupt();
    cv_.notify_all();
    executor_.join();
  }

  // The process is stopping: work in progress on the data plane gives up at once.
  void Interrupt() { transport_->Shutdown(); }

  // The coordinator is gone: every sequence goes (a new coordinator loads and wires afresh).
  void DropAll() {
    transport_->Interrupt();  // a step waiting for the previous stage gives up
    Control([this] {
      v1::FreeRequest all;
      all.set_all(true);
      v1::FreeResponse ignored;
      FreeSequences(all, &ignored);
    });
  }

  // Set when the worker registers: only the coordinator it registered with holds it.
  void set_control_token(const std::string& token) {
    std::lock_guard<std::mutex> lock(mu_);
    control_token_ = token;
  }

  grpc::ServerUnaryReactor* LoadShard(grpc::CallbackServerContext* ctx,
                                      const v1::ShardAssignment* req,
                                      v1::ShardLoaded* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!Authorized(*ctx, reactor)) return reactor;
    Control([this, req, resp, reactor] { reactor->Finish(ToGrpc(Load(*req, resp))); });
    return reactor;
  }

  grpc::ServerUnaryReactor* Connect(grpc::CallbackServerContext* ctx, const v1::PipelineWiring* req,
                                    v1::WiringDone*) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!Authorized(*ctx, reactor)) return reactor;
    transport_->Interrupt();  // a step blocked on the old pipeline gives up
    Control([this, req, reactor] { reactor->Finish(ToGrpc(Wire(*req))); });
    return reactor;
  }

  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* ctx, const v1::StepPlan* req,
                                 v1::StepResult* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!Authorized(*ctx, reactor)) return reactor;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (req->step_id() < next_step_id_ || plans_.count(req->step_id()) > 0) {
        reactor->Finish(grpc::Status(grpc::StatusCode::ABORTED,
                                     absl::StrCat("step ", req->step_id(), " is stale")));
        return reactor;
      }
      plans_[req->step_id()] = PendingStep{req, resp, reactor};
    }
    cv_.notify_all();
    return reactor;
  }

  grpc::ServerUnaryReactor* Free(grpc::CallbackServerContext* ctx, const v1::FreeRequest* req,
                                 v1::FreeResponse* resp) override {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    if (!Authorized(*ctx, reactor)) return reactor;
    Control([this, req, resp, reactor] {
      FreeSequences(*req, resp);
      reactor->Finish(grpc::Status::OK);
    });
    return reactor;
  }

  v1::WorkerUsage Usage() {
    std::lock_guard<std::mutex> lock(mu_);
    v1::WorkerUsage u = usage_;
    u.set_kv_capacity_bytes(pool_ ? static_cast<int64_t>(pool_->capacity_bytes()) : 0);
    u.set_kv_used_bytes(pool_ ? static_cast<int64_t>(pool_->used_bytes()) : 0);
    u.set_kv_peak_bytes(pool_ ? static_cast<int64_t>(pool_->peak_bytes()) : 0);
    // Memory pressure: the KV pool is over 95% full, or the machine itself runs low.
    const int64_t available = AvailableMemory();
    u.set_pressure((pool_ && pool_->capacity_bytes() > 0 &&
                    pool_->used_bytes() > pool_->capacity_bytes() / 20 * 19) ||
                   (available > 0 && available < options_.memory_floor));
    return u;
  }

 private:
  // Whether the call carries the control token of the coordinator this worker registered with;
  // otherwise finishes it UNAUTHENTICATED.
  bool Authorized(const grpc::CallbackServerContext& ctx, grpc::ServerUnaryReactor* reactor) {
    std::string token;
    {
      std::lock_guard<std::mutex> lock(mu_);
      token = control_token_;
    }
    if (!token.empty() && security::CheckToken(token, security::kControlTokenHeader, ctx).ok()) {
      return true;
    }
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                                 "only this worker's coordinator may drive it"));
    return false;
  }

  struct PendingStep {
    const v1::StepPlan* plan;
    v1::StepResult* result;
    grpc::ServerUnaryReactor* reactor;
  };

  void Control(std::function<void()> work) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      control_.push_back(std::move(work));
    }
    cv_.notify_all();
  }

  void ExecutorLoop() {
    while (true) {
      std::function<void()> work;
      std::optional<PendingStep> step;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] {
          return stopping_ || !control_.empty() || plans_.count(next_step_id_) > 0;
        });
        if (stopping_) {
          for (auto& [id, p] : plans_) {
            p.reactor->Finish(
                grpc::Status(grpc::StatusCode::UNAVAILABLE, "the worker is stopping"));
          }
          plans_.clear();
          for (auto& w : control_) w();
          return;
        }
        if (!control_.empty()) {
          work = std::move(control_.front());
          control_.pop_front();
        } else {
          auto it = plans_.find(next_step_id_);
          step = it->second;
          plans_.erase(it);
        }
      }
      if (work) {
        work();
        continue;
      }
      absl::Status s = RunStep(*step->plan, step->result);
      {
        std::lock_guard<std::mutex> lock(mu_);
        ++next_step_id_;
      }
      step->reactor->Finish(ToGrpc(s));
    }
  }

  absl::Status Load(const v1::ShardAssignment& a, v1::ShardLoaded* out) {
    const auto t0 = Clock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      seqs_.clear();
      pool_.reset();
    }
    arena_.reset();
    transformer_.reset();
    eviction_weights_.Clear();
    ASSIGN_OR_RETURN(model::ModelConfig config, model::ModelConfig::Load(a.model_dir()));
    if (a.first_layer() < 0 || a.first_layer() >= a.last_layer() ||
        a.last_layer() > config.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("layer range [", a.first_layer(), ", ",
                                                     a.last_layer(), ") is not within the ",
                                                     config.num_layers, " layers"));
    }
    ASSIGN_OR_RETURN(std::unique_ptr<model::Checkpoint> ckpt,
                     model::Checkpoint::Open(a.model_dir()));
    std::shared_ptr<model::Checkpoint> shared(std::move(ckpt));
    ASSIGN_OR_RETURN(model::StageWeights weights,
                     model::LoadStageWeights(config, shared, a.first_layer(), a.last_layer(),
                                             nullptr, !a.skip_weight_check()));
    ASSIGN_OR_RETURN(const kernels::Quant quant, model::ParseQuant(a.quantize(), a.quantize_all()));
    RETURN_IF_ERROR(model::CheckQuantizedBackend(quant, *backend_));
    RETURN_IF_ERROR(model::QuantizeStageWeights(quant, a.quantize_all(), &weights).status());
    int64_t weight_bytes = weights.WeightBytesPerToken();
    if (weights.is_first()) {
      weight_bytes += (weights.embed.rows - 1) * weights.embed.row_bytes();
    }
    if (a.threads() > 0 && backend_->host_accessible()) kernels::cpu::SetNumThreads(a.threads());
    ASSIGN_OR_RETURN(transformer_, model::Transformer::Create(config, std::move(weights),
                                                              backend_.get(), kv_dtype_));
    // The registered eviction weights, now; no sequence may name another file.
    for (const v1::EvictionWeightsFile& f : a.kv_weights()) {
      cache::EvictionParams params;
      params.policy = f.policy();
      params.weights = f.path();
      if (cache::FindPolicy(params.policy) == nullptr || !params.learned()) {
        return absl::InvalidArgumentError(
            absl::StrCat("kv_weights: '", params.policy, "' is not a learned policy"));
      }
      RETURN_IF_ERROR(eviction_weights_.Resolve(&params, config, backend_.get()));
    }
    eviction_weights_.Seal();
    // KV capacity: the memory limit less what is held already (on a GPU the weights; on the
    // host the whole process, its touched weights included), less the reserve for the largest
    // step (scratch and activations of --max-step-tokens tokens, sampled logits of a full
    // batch); 16 MiB and a twentieth of what remains are left to the allocator, the RPC buffers
    // and the caches' bookkeeping.
    const int64_t step_tokens = a.max_step_tokens() > 0 ? a.max_step_tokens() : 2048;
    const int64_t batch = a.max_batch() > 0 ? a.max_batch() : 32;
    int64_t reserve = step_tokens * (transformer_->ScratchBytesPerToken() +
                                     2 * config.hidden_size * static_cast<int64_t>(sizeof(float)));
    if (a.last_layer() == config.num_layers) {
      reserve += 2 * batch * config.vocab_size * static_cast<int64_t>(sizeof(float));
    }
    // The CPU kernels' per-thread scratch, which grows to the largest step and stays: weights
    // converted for prefill (4 panels or 64 rows of the widest matrix, and 16 dequantized rows
    // for quantized panels), attention scores, quantized activations. Per pool thread and the
    // caller: that plus 256 KiB, at least 1 MiB.
    if (backend_->host_accessible()) {
      const int64_t widest = std::max(config.hidden_size, config.intermediate_size);
      const int64_t per_thread = std::max<int64_t>(
          int64_t{1} << 20, 80 * widest * static_cast<int64_t>(sizeof(float)) + (256 << 10));
      reserve += (kernels::cpu::NumThreads() + 1) * per_thread;
    }
    const int64_t held =
        backend_->device().type == kernels::Device::Type::kCuda ? weight_bytes : ResidentMemory();
    const int64_t limit = options_.memory_limit;
    const int64_t kv_bytes = (limit - held - reserve - (int64_t{16} << 20)) / 20 * 19;
    if (kv_bytes <= 0) {
      transformer_.reset();
      return absl::ResourceExhaustedError(
          absl::StrCat("layers [", a.first_layer(), ", ", a.last_layer(), ") need ", weight_bytes,
                       " bytes of weights (", held, " held in all) and ", reserve,
                       " bytes for a step of --max-step-tokens ", step_tokens,
                       ", but this worker's memory limit is ", limit, " bytes"));
    }
    // On a GPU, one arena for every cache of this worker, reserved now (as vLLM reserves its
    // KV blocks): serving then never calls cudaMalloc / cudaFree (which synchronizes the
    // device) per sequence. The CPU backends allocate each cache's slab from the heap: a full
    // cache's geometric growth briefly holds its old and new storage, which the pool's
    // accounting (and so admission) does not count, and on the CPU that costs nothing extra.
    if (backend_->device().type == kernels::Device::Type::kCuda) {
      auto arena = kernels::Arena::Create(backend_.get(), static_cast<size_t>(kv_bytes));
      if (!arena.ok()) {
        transformer_.reset();
        return absl::ResourceExhaustedError(
            absl::StrCat("cannot reserve ", kv_bytes, " bytes of KV memory on ", backend_->name(),
                         ": ", arena.status().message()));
      }
      arena_ = *std::move(arena);
    }
    config_ = config;
    {
      std::lock_guard<std::mutex> lock(mu_);
      pool_ = std::make_unique<cache::KvPool>(static_cast<size_t>(kv_bytes), arena_.get());
      stage_ = a.stage();
      num_stages_ = a.num_stages();
    }
    out->set_weight_bytes(weight_bytes);
    out->set_kv_capacity_bytes(kv_bytes);
    const int64_t per_token =
        static_cast<int64_t>(config.num_kv_heads * transformer_->cache_shape().slot_bytes());
    for (int l = a.first_layer(); l < a.last_layer(); ++l) out->add_bytes_per_token(per_token);
    log::Info(absl::StrFormat(
        "stage %d of %d, layers [%d, %d) loaded on %s in %.1f s (%lld weight bytes, %lld KV bytes, "
        "%lld reserved for steps)",
        a.stage(), a.num_stages(), a.first_layer(), a.last_layer(), backend_->name().c_str(),
        Seconds(t0, Clock::now()), static_cast<long long>(weight_bytes),
        static_cast<long long>(kv_bytes), static_cast<long long>(reserve)));
    return absl::OkStatus();
  }

  absl::Status Wire(const v1::PipelineWiring& w) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      seqs_.clear();
      for (auto it = plans_.begin(); it != plans_.end();) {
        if (it->first < w.first_step_id()) {
          it->second.reactor->Finish(grpc::Status(grpc::StatusCode::ABORTED, "pipeline rewired"));
          it = plans_.erase(it);
        } else {
          ++it;
        }
      }
      next_step_id_ = w.first_step_id();
      wiring_ = w.first_step_id();
    }
    transport_->set_data_token(w.data_token());
    transport_->ResetIncoming();
    return transport_->ConnectNext(w.next_data_address(), 10.0);
  }

  absl::StatusOr<std::unique_ptr<cache::KvCache>> NewCache(const Sequence& seq) {
    cache::EvictionParams params = seq.kv;
    RETURN_IF_ERROR(eviction_weights_.Resolve(&params, config_, backend_.get()));
    return cache::MakeKvCache(transformer_->cache_shape(), params, seq.max_tokens, backend_.get(),
                              transformer_->Rotation(), pool_.get());
  }

  // Creates the plan's new sequences and readies every cache for the step.
  absl::Status Prepare(const v1::StepPlan& plan) {
    if (transformer_ == nullptr) return absl::FailedPreconditionError("no shard loaded");
    const bool last = stage_ == num_stages_ - 1;
    for (const v1::SequenceStep& s : plan.seqs()) {
      if (s.has_init()) {
        auto seq = std::make_unique<Sequence>();
        seq->kv = proto::FromProto(s.init().kv());
        seq->kv.layer_budgets.assign(s.init().layer_budgets().begin(),
                                     s.init().layer_budgets().end());
        seq->max_tokens = s.init().max_tokens();
        if (last) {
          model::SamplingParams sp = proto::FromProto(s.init().sampling());
          RETURN_IF_ERROR(sp.Validate());
          seq->sampler = std::make_unique<model::Sampler>(sp);
          seq->logprobs = sp.logprobs;
          seq->prompt.assign(s.init().prompt_ids().begin(), s.init().prompt_ids().end());
        }
        ASSIGN_OR_RETURN(seq->cache, NewCache(*seq));
        std::lock_guard<std::mutex> lock(mu_);
        seqs_[s.seq_id()] = std::move(seq);
      }
      auto it = seqs_.find(s.seq_id());
      if (it == seqs_.end()) {
        return absl::FailedPreconditionError(
            absl::StrCat("sequence ", s.seq_id(), " is unknown on stage ", stage_));
      }
      Sequence& seq = *it->second;
      if (s.new_cache()) {
        seq.cache.reset();
        ASSIGN_OR_RETURN(seq.cache, NewCache(seq));
      }
      for (int l = 0; l < s.layer_budgets_size(); ++l) {
        seq.cache->LowerBudget(l, s.layer_budgets(l));
        if (l < static_cast<int>(seq.kv.layer_budgets.size())) {
          seq.kv.layer_budgets[static_cast<size_t>(l)] = s.layer_budgets(l);
        }
      }
      seq.cache->BeginStep(static_cast<cache::StepKind>(s.kind()));
    }
    return absl::OkStatus();
  }

  absl::Status RunStep(const v1::StepPlan& plan, v1::StepResult* result) {
    const auto t0 = Clock::now();
    const bool first = stage_ == 0, last = stage_ == num_stages_ - 1;
    result->set_step_id(plan.step_id());
    absl::Status status = Prepare(plan);
    int64_t total = 0;
    for (const v1::SequenceStep& s : plan.seqs()) {
      // Token ids travel to stage 0 only; every stage gets the count.
      if (s.num_tokens() < 0 || s.num_tokens() > kMaxStepTokens ||
          (first && s.token_ids_size() != s.num_tokens())) {
        status = absl::InvalidArgumentError(
            absl::StrCat("sequence ", s.seq_id(), ": ", s.num_tokens(), " tokens with ",
                         s.token_ids_size(), " token ids on stage ", stage_));
        break;
      }
      total += s.num_tokens();
    }
    const int64_t hidden_size = config_.hidden_size;
    hidden_.assign(static_cast<size_t>(total * hidden_size), 0.f);
    double waited = 0;
    if (!first && transport_ != nullptr) {
      const auto w0 = Clock::now();
      absl::Status recv = transport_->Recv(plan.step_id(), &hidden_);
      waited = Seconds(w0, Clock::now());
      if (status.ok()) status = recv;
      if (status.ok() && static_cast<int64_t>(hidden_.size()) != total * hidden_size) {
        status = absl::InternalError(absl::StrCat("the previous stage sent ", hidden_.size(),
                                                  " floats for ", total, " tokens"));
      }
    }
    std::vector<model::SequenceStep> steps;
    std::vector<int32_t> tokens, positions;
    std::vector<int64_t> rows;
    std::vector<size_t> sample_index;
    if (status.ok()) {
      positions.reserve(static_cast<size_t>(total));
      for (const v1::SequenceStep& s : plan.seqs()) {
        for (int i = 0; i < s.num_tokens(); ++i) {
          if (first) tokens.push_back(s.token_ids(i));
          positions.push_back(s.first_position() + i);
        }
      }
      int64_t offset = 0;
      for (int i = 0; i < plan.seqs_size(); ++i) {
        const v1::SequenceStep& s = plan.seqs(i);
        const int64_t n = s.num_tokens();
        steps.push_back(model::SequenceStep{
            seqs_[s.seq_id()]->cache.get(), positions.data() + offset, n,
            s.kind() == static_cast<int>(cache::StepKind::kDecode) ? 0 : s.rope_seq_len()});
        if (s.sample()) {
          rows.push_back(offset + n - 1);
          sample_index.push_back(static_cast<size_t>(i));
        }
        offset += n;
      }
      for (int32_t id : tokens) {
        if (first && (id < 0 || id >= config_.vocab_size)) {
          status = absl::InvalidArgumentError(absl::StrCat("token id ", id, " out of range"));
        }
      }
      if (status.ok() && !first) status = transformer_->LoadHidden(hidden_.data(), total);
      if (status.ok()) status = transformer_->Forward(steps, first ? tokens.data() : nullptr);
      if (status.ok() && !last) status = transformer_->StoreHidden(total, hidden_.data());
    }
    if (!last && transport_ != nullptr) {
      absl::Status sent = transport_->Send(plan.step_id(), status, hidden_);
      if (status.ok()) status = sent;
    }
    if (status.ok() && last) {
      const int64_t vocab = config_.vocab_size;
      logits_.resize(rows.size() * static_cast<size_t>(vocab));
      if (!rows.empty()) status = transformer_->Logits(rows, logits_.data());
      for (int i = 0; i < plan.seqs_size(); ++i) result->add_tokens(-1);
      for (size_t r = 0; status.ok() && r < rows.size(); ++r) {
        Sequence& seq = *seqs_[plan.seqs(static_cast<int>(sample_index[r])).seq_id()];
        std::span<float> l(logits_.data() + r * static_cast<size_t>(vocab),
                           static_cast<size_t>(vocab));
        // Logprobs of the raw logits: taken before the sampler's penalties and temperature
        // rewrite them in place.
        std::optional<model::Logprobs> lp;
        std::vector<float> raw;
        if (seq.logprobs >= 0) {
          lp = model::ComputeLogprobs(l, seq.logprobs);
          raw.assign(l.begin(), l.end());
        }
        const int32_t token = seq.sampler->Sample(l, seq.prompt, seq.generated);
        seq.generated.push_back(token);
        result->set_tokens(static_cast<int>(sample_index[r]), token);
        if (lp.has_value()) {
          while (result->logprobs_size() < plan.seqs_size()) result->add_logprobs();
          v1::TokenLogprobs* out = result->mutable_logprobs(static_cast<int>(sample_index[r]));
          out->set_logprob(lp->Of(raw[static_cast<size_t>(token)]));
          for (const auto& [id, logprob] : lp->top) {
            out->add_top_ids(id);
            out->add_top_logprobs(logprob);
          }
        }
      }
    }
    const double busy = Seconds(t0, Clock::now()) - waited;
    result->set_compute_seconds(busy);
    result->set_wait_seconds(waited);
    UpdateUsage(busy);
    return status;
  }

  // Per layer of a sequence's cache: tokens retained over its KV heads, and evicted (what the
  // layer saw, less what it keeps).
  static void AddLayerCounts(const cache::KvCache& cache, std::vector<int64_t>* retained,
                             std::vector<int64_t>* evicted) {
    const cache::KvCacheShape& shape = cache.shape();
    const int64_t seen = cache.num_tokens_seen();
    retained->resize(static_cast<size_t>(shape.num_layers), 0);
    evicted->resize(static_cast<size_t>(shape.num_layers), 0);
    for (int64_t l = 0; l < shape.num_layers; ++l) {
      int64_t kept = 0;
      for (int64_t g = 0; g < shape.num_kv_heads; ++g) kept += cache.View(l, g).len;
      (*retained)[static_cast<size_t>(l)] += kept;
      (*evicted)[static_cast<size_t>(l)] += std::max<int64_t>(0, seen * shape.num_kv_heads - kept);
    }
  }

  void UpdateUsage(double busy) {
    int64_t retained = 0, evicted = 0;
    const int64_t row_bytes = 2 * config_.head_dim * static_cast<int64_t>(sizeof(float));
    std::vector<int64_t> layer_retained, layer_evicted = layer_evicted_freed_;
    for (const auto& [id, seq] : seqs_) {
      if (seq->cache == nullptr) continue;
      retained += static_cast<int64_t>(seq->cache->bytes_used()) / row_bytes;
      evicted += seq->cache->stats().evicted_tokens;
      AddLayerCounts(*seq->cache, &layer_retained, &layer_evicted);
    }
    layer_retained.resize(layer_evicted.size(), 0);
    std::lock_guard<std::mutex> lock(mu_);
    usage_.set_sequences(static_cast<int64_t>(seqs_.size()));
    usage_.set_retained_tokens(retained);
    usage_.set_evicted_tokens(evicted_freed_ + evicted);
    usage_.mutable_layer_retained_tokens()->Assign(layer_retained.begin(), layer_retained.end());
    usage_.mutable_layer_evicted_tokens()->Assign(layer_evicted.begin(), layer_evicted.end());
    usage_.set_steps(usage_.steps() + (busy >= 0 ? 1 : 0));
    usage_.set_busy_seconds(usage_.busy_seconds() + std::max(0.0, busy));
  }

  void FreeSequences(const v1::FreeRequest& req, v1::FreeResponse* resp) {
    std::vector<uint64_t> ids;
    if (req.all() && req.wiring() != 0 && req.wiring() != wiring_) return;  // came late
    if (req.all()) {
      for (const auto& [id, seq] : seqs_) ids.push_back(id);
    } else {
      ids.assign(req.seq_ids().begin(), req.seq_ids().end());
    }
    for (uint64_t id : ids) {
      auto it = seqs_.find(id);
      if (it == seqs_.end()) continue;
      v1::SequenceKvStats* st = resp->add_stats();
      st->set_seq_id(id);
      if (it->second->cache != nullptr) {
        const cache::KvCache::Stats s = it->second->cache->stats();
        st->set_max_retained_per_head(s.max_retained_per_head);
        st->set_max_held_per_head(s.max_held_per_head);
        st->set_evicted_tokens(s.evicted_tokens);
        st->set_peak_bytes(static_cast<int64_t>(s.peak_bytes));
        st->set_tokens_seen(it->second->cache->num_tokens_seen());
        st->set_budget(it->second->kv.evicts() ? it->second->kv.budget : 0);
        if (it->second->kv.evicts()) {
          for (int64_t l = 0; l < it->second->cache->shape().num_layers; ++l) {
            st->add_layer_budgets(it->second->cache->budget(l));
          }
        }
        evicted_freed_ += s.evicted_tokens;
        std::vector<int64_t> unused;
        AddLayerCounts(*it->second->cache, &unused, &layer_evicted_freed_);
      }
      std::lock_guard<std::mutex> lock(mu_);
      seqs_.erase(it);
    }
    UpdateUsage(-1);
    if (seqs_.empty()) ReturnMemory();
  }

  // An idle worker gives what it grew for its last load back to the system: the step scratch,
  // the activation buffers, and the heap's free pages (the KV slabs freed with the sequences).
  void ReturnMemory() {
    if (transformer_ != nullptr) transformer_->ReleaseScratch();
    std::vector<float>().swap(hidden_);
    std::vector<float>().swap(logits_);
    malloc_trim(0);
  }

  WorkerOptions options_;
  std::unique_ptr<TcpTransport> transport_;
  // The device's backend for the worker's lifetime; everything below that holds its memory
  // (weights, eviction weights, caches) is declared after it and so destroyed first.
  std::unique_ptr<kernels::Backend> backend_;
  DType kv_dtype_;
  // Executor thread only.
  model::ModelConfig config_;
  std::unique_ptr<model::Transformer> transformer_;
  model::EvictionWeightsCache eviction_weights_;
  std::unique_ptr<kernels::Arena> arena_;  // the KV slabs of every cache (the pool's memory)
  std::vector<float> hidden_, logits_;
  int64_t evicted_freed_ = 0;
  std::vector<int64_t> layer_evicted_freed_;  // per layer, of sequences already freed
  uint64_t wiring_ = 0;                       // the first step id of the current wiring

  std::mutex mu_;
  std::condition_variable cv_;
  std::string control_token_;                  // guarded by mu_
  std::deque<std::function<void()>> control_;  // guarded by mu_
  std::map<uint64_t, PendingStep> plans_;      // guarded by mu_
  uint64_t next_step_id_ = 1;                  // guarded by mu_
  bool stopping_ = false;                      // guarded by mu_
  // Written by the executor under mu_ (read by the heartbeat).
  std::map<uint64_t, std::unique_ptr<Sequence>> seqs_;
  std::unique_ptr<cache::KvPool> pool_;
  int stage_ = 0, num_stages_ = 1;
  v1::WorkerUsage usage_;
  std::thread executor_;
};

namespace {

// The host the coordinator and the previous stage dial: --advertise, else --host, else (a
// wildcard --host) this machine's host name.
std::string AdvertisedHost(const WorkerOptions& options) {
  if (!options.advertise.empty()) return options.advertise;
  if (options.host == "0.0.0.0" || options.host == "::" || options.host.empty()) {
    char hostname[256] = {0};
    gethostname(hostname, sizeof(hostname) - 1);
    return hostname;
  }
  return options.host;
}

}  // namespace

absl::Status CheckWorkerOptions(const WorkerOptions& options) {
  if (options.coordinator.empty()) return absl::InvalidArgumentError("--coordinator is required");
  for (const auto& [port, flag] :
       {std::pair<int, const char*>{options.port, "--port"}, {options.data_port, "--data-port"}}) {
    if (port < 0 || port > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " must be in [0, 65535] (0: any free port)"));
    }
  }
  if (options.health_port < -1 || options.health_port > 65535) {
    return absl::InvalidArgumentError("--health-port must be in [0, 65535]");
  }
  if (options.advertise.size() > 253 ||
      options.advertise.find_first_of(" :/\t\n") != std::string::npos) {
    return absl::InvalidArgumentError(
        "--advertise must be a host name or IPv4 address (no port), at most 253 characters");
  }
  if (!(options.memory_fraction >= 0 && options.memory_fraction <= 1)) {
    return absl::InvalidArgumentError("--memory-fraction must be in (0, 1]");
  }
  if (options.memory_limit < 0) return absl::InvalidArgumentError("--memory-limit must be > 0");
  RETURN_IF_ERROR(options.tls.Validate());
  if (options.cluster_token.empty() && !options.tls.mutual()) {
    return absl::InvalidArgumentError(
        "a worker needs the cluster's credential: --cluster-token-file FILE (the coordinator's) "
        "or mutual TLS (--tls-cert, --tls-key, --tls-ca)");
  }
  if (options.tls.serves_tls()) {
    RETURN_IF_ERROR(security::TlsContext::Create(options.tls).status());
    RETURN_IF_ERROR(security::CheckCertificateNames(options.tls.cert, AdvertisedHost(options)));
  }
  RETURN_IF_ERROR(security::MakeServerCredentials(options.tls, true).status());
  ASSIGN_OR_RETURN(const kernels::Device device, kernels::Device::ParseOrDefault(options.device));
  RETURN_IF_ERROR(model::ResolveKvDType(options.kv_dtype, device).status());
  return absl::OkStatus();
}

absl::Status RunWorker(const WorkerOptions& options, const std::atomic<bool>& stop) {
  RETURN_IF_ERROR(CheckWorkerOptions(options));
  // Large blocks (KV slabs, activations) straight from mmap, so that freeing one returns it to
  // the system; glibc would otherwise raise the threshold as they are freed and keep them.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  // A few heap arenas, not one per RPC thread: less memory stranded in idle arenas.
  mallopt(M_ARENA_MAX, 4);
  std::shared_ptr<const security::TlsContext> tls;
  if (options.tls.serves_tls()) {
    ASSIGN_OR_RETURN(tls, security::TlsContext::Create(options.tls));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<TcpTransport> transport,
                   TcpTransport::Listen(options.host, options.data_port, tls));
  // The addresses the coordinator and the previous stage dial: a wildcard listen address is
  // advertised as this machine's host name.
  char hostname[256] = {0};
  gethostname(hostname, sizeof(hostname) - 1);
  const std::string advertised = AdvertisedHost(options);
  const std::string data_address = absl::StrCat(
      advertised, transport->listen_address().substr(transport->listen_address().rfind(':')));
  ASSIGN_OR_RETURN(const kernels::Device device, kernels::Device::ParseOrDefault(options.device));
  ASSIGN_OR_RETURN(const DType kv_dtype, model::ResolveKvDType(options.kv_dtype, device));
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                   kernels::MakeBackend(device, options.threads));
  // The memory limit (what the coordinator plans layers by and admission stays within):
  // --memory-limit, else a fraction of the device's free memory.
  WorkerOptions resolved = options;
  if (resolved.memory_limit <= 0) {
    const bool gpu = device.type == kernels::Device::Type::kCuda;
    const double fraction =
        options.memory_fraction > 0 ? options.memory_fraction : (gpu ? 0.9 : 0.8);
    const int64_t free = gpu ? backend->FreeMemory() : AvailableMemory();
    resolved.memory_limit = static_cast<int64_t>(static_cast<double>(free) * fraction);
    log::Info(absl::StrFormat(
        "memory limit %.2f GiB: %.0f%% of the %s's %.2f GiB %s (--memory-limit sets it)",
        static_cast<double>(resolved.memory_limit) / (1 << 30), 100 * fraction,
        gpu ? "GPU" : "host", static_cast<double>(free) / (1 << 30), gpu ? "free" : "available"));
  }
  if (resolved.memory_limit <= 0) {
    return absl::ResourceExhaustedError("no memory available for this worker");
  }
  const int64_t capacity = resolved.memory_limit;
  const std::string backend_name = device.ToString();
  auto service =
      std::make_unique<WorkerService>(resolved, std::move(backend), kv_dtype, std::move(transport));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> server_credentials,
                   security::MakeServerCredentials(options.tls, /*require_client_cert=*/true));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> channel_credentials,
                   security::MakeChannelCredentials(options.tls));
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port), server_credentials,
                           &port);
  builder.RegisterService(service.get());
  builder.SetMaxReceiveMessageSize(-1);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.host, ":", options.port));
  }
  // The probes' plaintext listener: the health service only.
  std::unique_ptr<grpc::Server> health_server;
  grpc::HealthCheckServiceInterface* health = nullptr;
  if (options.health_port >= 0) {
    grpc::ServerBuilder health_builder;
    int bound = 0;
    grpc::EnableDefaultHealthCheckService(true);
    health_builder.AddListeningPort(absl::StrCat(options.host, ":", options.health_port),
                                    grpc::InsecureServerCredentials(), &bound);
    health_server = health_builder.BuildAndStart();
    if (health_server == nullptr || bound == 0) {
      return absl::UnavailableError(
          absl::StrCat("--health-port: cannot listen on ", options.host, ":", options.health_port));
    }
    health = health_server->GetHealthCheckService();
    health->SetServingStatus("liveness", true);
    health->SetServingStatus("", false);
    log::Info(absl::StrFormat("health (plaintext) on %s:%d", options.host.c_str(), bound));
  }
  auto set_registered = [health](bool registered) {
    if (health != nullptr) health->SetServingStatus("", registered);
  };
  const std::string address = absl::StrCat(advertised, ":", port);
  // A coordinator that comes back (a healed link, a restart) is redialled within a second or
  // two, not after gRPC's default backoff of up to two minutes.
  grpc::ChannelArguments coordinator_args;
  coordinator_args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
  coordinator_args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  auto stub = v1::Coordinator::NewStub(
      grpc::CreateCustomChannel(options.coordinator, channel_credentials, coordinator_args));
  std::string worker_id;
  int heartbeat_ms = 250;
  bool announced = false;
  // Registration retries back off (0.25 s doubling to 5 s, with jitter); heartbeats that fail
  // for longer than the coordinator waits for a silent worker mean it is gone (or has given up
  // on this worker): the worker drops its sequences and registers again.
  constexpr auto kMaxBackoff = std::chrono::milliseconds(5000);
  std::chrono::milliseconds backoff(250);
  std::optional<Clock::time_point> failing_since;
  std::string last_error;
  auto pause = [&](std::chrono::milliseconds d) {
    const auto until = Clock::now() + d;
    while (!stop.load() && Clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };
  while (!stop.load()) {
    if (worker_id.empty()) {
      v1::RegisterRequest req;
      req.set_address(address);
      req.set_data_address(data_address);
      req.set_memory_limit_bytes(capacity);
      req.set_backend(backend_name);
      req.set_pid(static_cast<int32_t>(getpid()));
      req.set_hostname(hostname);
      // Armed before the coordinator can call (it may, before this call returns).
      const std::string control_token = security::RandomHex(32);
      req.set_control_token(control_token);
      service->set_control_token(control_token);
      v1::RegisterResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      if (!options.cluster_token.empty()) {
        ctx.AddMetadata(security::kClusterTokenHeader, options.cluster_token);
      }
      grpc::Status s = stub->Register(&ctx, req, &resp);
      if (s.ok()) {
        worker_id = resp.worker_id();
        heartbeat_ms = std::clamp(resp.heartbeat_ms() > 0 ? resp.heartbeat_ms() : 250, 10, 10000);
        log::Info(absl::StrFormat("registered with %s as %s (listening on %s, data on %s)",
                                  options.coordinator, worker_id, address, data_address));
        announced = false;
        backoff = std::chrono::milliseconds(250);
        set_registered(true);
      } else {
        if (!announced || s.error_message() != last_error) {
          log::Warn(absl::StrFormat(
              "waiting for the coordinator at %s (%s); retrying with backoff up to %lld s",
              options.coordinator.c_str(), s.error_message().c_str(),
              static_cast<long long>(kMaxBackoff.count() / 1000)));
          announced = true;
          last_error = s.error_message();
        }
        // Jitter: workers of one coordinator do not all come back at the same instant.
        const auto jitter = std::chrono::milliseconds(
            static_cast<int64_t>(std::stoul(security::RandomHex(2), nullptr, 16) %
                                 static_cast<unsigned long>(backoff.count() / 5 + 1)));
        pause(backoff + jitter);
        backoff = std::min(kMaxBackoff, backoff * 2);
        continue;
      }
    } else {
      v1::HeartbeatRequest req;
      req.set_worker_id(worker_id);
      *req.mutable_usage() = service->Usage();
      v1::HeartbeatResponse resp;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
      if (!options.cluster_token.empty()) {
        ctx.AddMetadata(security::kClusterTokenHeader, options.cluster_token);
      }
      grpc::Status s = stub->Heartbeat(&ctx, req, &resp);
      if (s.ok()) failing_since.reset();
      if (!s.ok() && !failing_since) failing_since = Clock::now();
      const bool gone =
          !s.ok() && Clock::now() - *failing_since >
                         std::chrono::milliseconds(4 * heartbeat_ms) + std::chrono::seconds(1);
      if ((s.ok() && !resp.known()) || gone) {
        log::Info(
            absl::StrFormat("%s; dropping every sequence and registering again",
                            gone ? absl::StrCat("lost the coordinator at ", options.coordinator,
                                                " (", s.error_message(), ")")
                                       .c_str()
                                 : "the coordinator no longer knows this worker"));
        service->DropAll();
        set_registered(false);
        worker_id.clear();
        failing_since.reset();
        continue;
      }
    }
    pause(std::chrono::milliseconds(heartbeat_ms));
  }
  service->Interrupt();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->Wait();
  if (health_server != nullptr) health_server->Shutdown();
  service.reset();
  return absl::OkStatus();
}

}  // namespace kvgate::worker
