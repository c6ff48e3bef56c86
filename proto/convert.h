// The one place kvgate's domain types become their wire messages and back (coordinator and
// workers alike): a sequence's eviction and sampling parameters. Status codes: grpc_status.h.
#pragma once

#include <cstdint>

#include "cache/eviction/policy.h"
#include "kvgate/v1/internal.pb.h"
#include "model/sampling/sampler.h"

namespace kvgate::proto {

// `budget`: what this stage granted (the policy's own budget for a full cache).
v1::EvictionConfig ToProto(const cache::EvictionParams& params, int64_t budget);
cache::EvictionParams FromProto(const v1::EvictionConfig& config);

v1::SamplingConfig ToProto(const model::SamplingParams& params);
model::SamplingParams FromProto(const v1::SamplingConfig& config);

}  // namespace kvgate::proto
