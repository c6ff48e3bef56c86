#include "coordinator/output_processor.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "proto/grpc_status.h"

namespace kvgate::coordinator {

OutputProcessor::OutputProcessor(const model::Generator* frontend, Metrics* metrics)
    : frontend_(frontend), metrics_(metrics) {
  thread_ = std::thread([this] { Run(); });
}

OutputProcessor::~OutputProcessor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void OutputProcessor::Token(std::shared_ptr<Job> job, int32_t token, std::string text,
                            std::optional<v1::TokenLogprobs> logprobs) {
  Push(Event{Event::kToken,
             std::move(job),
             token,
             std::move(text),
             {},
             grpc::Status::OK,
             std::move(logprobs)});
}

void OutputProcessor::Finish(std::shared_ptr<Job> job, std::vector<LayerRange> ranges) {
  Push(Event{Event::kFinish, std::move(job), 0, "", std::move(ranges), grpc::Status::OK, {}});
}

void OutputProcessor::Fail(std::shared_ptr<Job> job, grpc::Status status) {
  Push(Event{Event::kFail, std::move(job), 0, "", {}, std::move(status), {}});
}

void OutputProcessor::Push(Event e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(e));
  }
  cv_.notify_all();
}

void OutputProcessor::Run() {
  while (true) {
    std::deque<Event> events;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty() && stopping_) return;
      events.swap(queue_);
    }
    for (Event& e : events) Handle(e);
  }
}

void OutputProcessor::LogRequest(const Job& job, const grpc::Status& status,
                                 const v1::GenerateFinal* final) const {
  const auto now = std::chrono::steady_clock::now();
  const auto seconds = [](auto d) {
    return std::round(std::chrono::duration<double>(d).count() * 1e4) / 1e4;
  };
  log::Fields f = {
      {"request_id", job.id},
      {"status",
       status.ok() ? std::string("ok")
                   : absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()))},
      {"prompt_tokens", static_cast<int64_t>(job.prepared.prompt_ids.size())}};
  if (job.started != std::chrono::steady_clock::time_point{}) {
    f.emplace_back("queue_s", seconds(job.started - job.queued_at));
  }
  if (job.first_token_at != std::chrono::steady_clock::time_point{}) {
    f.emplace_back("ttft_s", seconds(job.first_token_at - job.queued_at));
  }
  f.emplace_back("e2e_s", seconds(now - job.queued_at));
  if (final != nullptr) {
    f.emplace_back("completion_tokens", final->usage().completion_tokens());
    f.emplace_back("finish_reason", final->finish_reason());
    const v1::KvStats& kv = final->kv();
    f.emplace_back("kv_policy", kv.policy());
    f.emplace_back("kv_budget", kv.budget());
    f.emplace_back("evicted_tokens", kv.evicted_tokens());
    f.emplace_back("retained_tokens", kv.retained_tokens());
    f.emplace_back("peak_kv_bytes", kv.peak_kv_bytes());
  } else if (job.run != nullptr) {
    f.emplace_back("completion_tokens", static_cast<int64_t>(job.run->result().token_ids.size()));
  }
  if (!status.ok()) f.emplace_back("error", std::string(status.error_message()));
  // The prompt's text only when the operator asked (--log-prompts); keys never.
  if (log::options().log_prompts && frontend_->tokenizer() != nullptr) {
    std::string text = frontend_->tokenizer()->Decode(job.prepared.prompt_ids, false);
    if (text.size() > kMaxLoggedPromptBytes) text.resize(kMaxLoggedPromptBytes);
    f.emplace_back("prompt", std::move(text));
  }
  log::Info("request done", f);
}

void OutputProcessor::Record(const Event& e) {
  if (metrics_ == nullptr) return;
  const Job& job = *e.job;
  const auto now = std::chrono::steady_clock::now();
  const auto seconds = [](auto d) { return std::chrono::duration<double>(d).count(); };
  if (e.kind == Event::kToken) {
    auto [it, first] = last_token_.emplace(&job, now);
    if (first) {
      metrics_->FirstToken(seconds(now - job.queued_at));
    } else {
      metrics_->InterToken(seconds(now - it->second));
      it->second = now;
    }
    return;
  }
  last_token_.erase(&job);
  if (e.kind == Event::kFail || job.run == nullptr || !job.run->status().ok()) {
    metrics_->Failed();
    return;
  }
  const model::GenerateResult& r = job.run->result();
  metrics_->Finished(r.finish_reason, static_cast<int64_t>(r.prompt_token_ids.size()),
                     static_cast<int64_t>(r.token_ids.size()), seconds(now - job.queued_at),
                     seconds(job.started - job.queued_at));
}

void OutputProcessor::Handle(Event& e) {
  Job& job = *e.job;
  const bool here = DetokenizesHere(job) && frontend_->tokenizer() != nullptr;
  Record(e);
  if (e.kind == Event::kToken) {
    if (job.first_token_at == std::chrono::steady_clock::time_point{}) {
      job.first_token_at = std::chrono::steady_clock::now();
    }
    std::string text = std::move(e.text);
    if (here) {
      auto it = decoders_.find(&job);
      if (it == decoders_.end()) {
        it = decoders_
                 .emplace(&job, std::make_unique<model::StreamingDecoder>(frontend_->tokenizer(),
                                                                          job.prepared.prompt_ids))
                 .first;
      }
      // Stop tokens end the sequence without text, as in a local run.
      const model::GenerateOptions& opt = job.prepared.options;
      bool stop = std::find(opt.stop_token_ids.begin(), opt.stop_token_ids.end(), e.token) !=
                  opt.stop_token_ids.end();
      if (!opt.ignore_eos) {
        const std::vector<int32_t>& eos = frontend_->eos_ids();
        stop |= std::find(eos.begin(), eos.end(), e.token) != eos.end();
      }
      if (!stop) text = it->second->Push(e.token);
    }
    v1::GenerateResponse message;
    v1::TokenChunk* chunk = message.mutable_chunk();
    chunk->add_token_ids(e.token);
    chunk->set_text(std::move(text));
    if (e.logprobs.has_value()) {
      // Each token's own text, as the API shows it beside its logprob.
      const model::Tokenizer* tok = frontend_->tokenizer();
      auto piece = [tok](int32_t id) {
        return tok != nullptr ? tok->Decode({id}, /*skip_special=*/false) : std::string();
      };
      v1::TokenLogprob* lp = chunk->add_logprobs();
      lp->set_token_id(e.token);
      lp->set_token(piece(e.token));
      lp->set_logprob(e.logprobs->logprob());
      for (int k = 0; k < e.logprobs->top_ids_size() && k < e.logprobs->top_logprobs_size(); ++k) {
        v1::TopLogprob* top = lp->add_top();
        top->set_token_id(e.logprobs->top_ids(k));
        top->set_token(piece(e.logprobs->top_ids(k)));
        top->set_logprob(e.logprobs->top_logprobs(k));
      }
    }
    job.output->Send(std::move(message));
    return;
  }
  auto decoder = decoders_.find(&job);
  std::unique_ptr<model::StreamingDecoder> owned;
  if (decoder != decoders_.end()) {
    owned = std::move(decoder->second);
    decoders_.erase(decoder);
  }
  if (e.kind == Event::kFail) {
    LogRequest(job, e.status, nullptr);
    job.output->Complete(e.status);
    return;
  }
  if (!job.run->status().ok()) {
    LogRequest(job, ToGrpc(job.run->status()), nullptr);
    job.output->Complete(ToGrpc(job.run->status()));
  } else if (job.run->result().finish_reason == "abort") {
    grpc::Status cancelled(grpc::StatusCode::CANCELLED,
                           absl::StrCat("request ", job.id, " was cancelled"));
    LogRequest(job, cancelled, nullptr);
    job.output->Complete(cancelled);
  } else {
    // The text the decoder held back for a following token.
    if (owned != nullptr) {
      std::string rest = owned->Flush();
      if (!rest.empty()) {
        v1::GenerateResponse message;
        message.mutable_chunk()->set_text(std::move(rest));
        job.output->Send(std::move(message));
      }
    }
    v1::GenerateResponse final = FinalMessage(job, frontend_->config(), e.ranges);
    LogRequest(job, grpc::Status::OK, &final.final());
    job.output->Send(std::move(final));
    job.output->Complete(grpc::Status::OK);
  }
}

v1::GenerateResponse FinalMessage(const Job& job, const model::ModelConfig& c,
                                  const std::vector<LayerRange>& ranges) {
  const model::GenerateResult& result = job.run->result();
  const model::GenerateOptions& opt = job.prepared.options;
  v1::GenerateResponse message;
  v1::GenerateFinal* f = message.mutable_final();
  f->set_request_id(job.id);
  f->set_finish_reason(result.finish_reason);
  f->mutable_usage()->set_prompt_tokens(static_cast<int64_t>(result.prompt_token_ids.size()));
  f->mutable_usage()->set_completion_tokens(static_cast<int64_t>(result.token_ids.size()));
  for (int32_t id : result.prompt_token_ids) f->add_prompt_token_ids(id);
  f->set_prefill_tokens_per_s(result.prefill_tokens_per_s());
  f->set_decode_tokens_per_s(result.decode_tokens_per_s());
  f->set_prefill_seconds(result.prefill_seconds);
  f->set_decode_seconds(result.decode_seconds);
  f->set_queue_seconds(std::chrono::duration<double>(job.started - job.queued_at).count());
  const cache::EvictionParams& kv = opt.kv;
  const bool full = !kv.evicts();
  v1::KvStats* k = f->mutable_kv();
  k->set_policy(kv.policy);
  k->set_budget(full ? 0 : kv.budget);
  k->set_chunk(full ? opt.prefill_chunk : kv.chunk);
  k->set_position(full ? "original" : kv.position_mode());
  k->set_allocation(full ? "" : kv.allocation);
  k->set_prefill(full ? "" : kv.prefill);
  int64_t evicted = 0, retained = 0, peak = 0, max_retained = 0, max_held = 0, seen = 0;
  for (size_t s = 0; s < ranges.size(); ++s) {
    auto it = job.stage_stats.find(static_cast<int>(s));
    const int64_t layers = ranges[s].second - ranges[s].first;
    v1::StageBudget* stage = k->add_stages();
    stage->set_stage(static_cast<int32_t>(s));
    stage->set_first_layer(ranges[s].first);
    stage->set_last_layer(ranges[s].second);
    if (it == job.stage_stats.end()) continue;
    const v1::SequenceKvStats& st = it->second;
    stage->set_budget(st.budget());
    stage->mutable_layer_budgets()->CopyFrom(st.layer_budgets());
    evicted += st.evicted_tokens();
    peak += st.peak_bytes();
    max_retained = std::max(max_retained, st.max_retained_per_head());
    max_held = std::max(max_held, st.max_held_per_head());
    seen = std::max(seen, st.tokens_seen());
    retained += st.tokens_seen() * layers * c.num_kv_heads - st.evicted_tokens();
  }
  k->set_max_retained_per_head(max_retained);
  k->set_max_held_per_head(max_held);
  k->set_evicted_tokens(evicted);
  cache::KvCache::Stats total;
  total.evicted_tokens = evicted;
  k->set_eviction_ratio(model::EvictionRatio(total, seen, c));
  k->set_peak_kv_bytes(peak);
  k->set_retained_tokens(retained);
  return message;
}

}  // namespace kvgate::coordinator
