// The front end's edge: a GenerateRequest becomes generation options and prompt ids, every
// field validated once, here (limits, ranges, the tokenizer, the registered eviction weights).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/eviction/policy.h"
#include "coordinator/weights_registry.h"
#include "kvgate/v1/kvgate.pb.h"
#include "model/chat/chat_template.h"
#include "model/generation/generator.h"

namespace kvgate::coordinator {

struct PreparedRequest {
  std::vector<int32_t> prompt_ids;
  model::GenerateOptions options;
};

// INVALID_ARGUMENT naming the field when something is wrong; errors never echo a large field.
// `chat_template`: what renders prompt.chat (null: chat prompts are refused).
absl::StatusOr<PreparedRequest> PrepareRequest(const v1::GenerateRequest& request,
                                               const model::Generator& generator,
                                               const cache::EvictionParams& default_kv,
                                               const WeightsRegistry& weights,
                                               const model::chat::ChatTemplate* chat_template);

// A server-made request id: "req-" and 128 random bits, so no client can guess another's.
std::string RandomRequestId();

}  // namespace kvgate::coordinator
