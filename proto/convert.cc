#include "proto/convert.h"

namespace kvgate::proto {

v1::EvictionConfig ToProto(const cache::EvictionParams& p, int64_t budget) {
  v1::EvictionConfig c;
  c.set_policy(p.policy);
  c.set_budget(budget);
  c.set_chunk(p.chunk);
  c.set_sinks(p.sinks);
  c.set_decode_slack(p.decode_slack);
  c.set_window(p.window);
  c.set_pool_kernel(p.pool_kernel);
  c.set_pool_max(p.pool_max);
  c.set_position(p.position);
  c.set_stabilizers(p.stabilizers);
  c.set_protected_tail(p.protected_tail);
  c.set_weights(p.weights);
  c.set_allocation(p.allocation);
  c.set_prefill(p.prefill);
  c.set_prompt_tokens(p.prompt_tokens);
  c.set_ea_future(p.ea_future);
  c.set_ea_covariance(p.ea_covariance);
  return c;
}

cache::EvictionParams FromProto(const v1::EvictionConfig& c) {
  cache::EvictionParams p;
  p.policy = c.policy();
  p.budget = c.budget();
  p.chunk = c.chunk();
  p.sinks = c.sinks();
  p.decode_slack = c.decode_slack();
  p.window = c.window();
  p.pool_kernel = c.pool_kernel();
  p.pool_max = c.pool_max();
  p.position = c.position();
  p.stabilizers = c.stabilizers();
  p.protected_tail = c.protected_tail();
  p.weights = c.weights();
  if (!c.allocation().empty()) p.allocation = c.allocation();
  if (!c.prefill().empty()) p.prefill = c.prefill();
  p.prompt_tokens = c.prompt_tokens();
  if (c.ea_future() > 0) p.ea_future = c.ea_future();
  p.ea_covariance = c.ea_covariance();
  return p;
}

v1::SamplingConfig ToProto(const model::SamplingParams& p) {
  v1::SamplingConfig c;
  c.set_temperature(p.temperature);
  c.set_top_k(p.top_k);
  c.set_top_p(p.top_p);
  c.set_min_p(p.min_p);
  c.set_repetition_penalty(p.repetition_penalty);
  c.set_presence_penalty(p.presence_penalty);
  c.set_frequency_penalty(p.frequency_penalty);
  c.set_has_seed(p.seed.has_value());
  c.set_seed(p.seed.value_or(0));
  c.set_logprobs(p.logprobs);
  return c;
}

model::SamplingParams FromProto(const v1::SamplingConfig& c) {
  model::SamplingParams p;
  p.temperature = c.temperature();
  p.top_k = c.top_k();
  p.top_p = c.top_p();
  p.min_p = c.min_p();
  p.repetition_penalty = c.repetition_penalty();
  p.presence_penalty = c.presence_penalty();
  p.frequency_penalty = c.frequency_penalty();
  if (c.has_seed()) p.seed = c.seed();
  p.logprobs = c.logprobs();
  return p;
}

}  // namespace kvgate::proto
