#include "tests/unit/model/test_util.h"

#include <algorithm>
#include <fstream>

#include "common/status.h"
#include "tests/unit/test_backend.h"

namespace kvgate::testing {

absl::StatusOr<LoadedModel> LoadModel(const std::string& dir) {
  ASSIGN_OR_RETURN(model::ModelConfig config, model::ModelConfig::Load(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<model::Checkpoint> ckpt, model::Checkpoint::Open(dir));
  std::shared_ptr<model::Checkpoint> shared(std::move(ckpt));
  ASSIGN_OR_RETURN(model::StageWeights w,
                   model::LoadStageWeights(config, shared, 0, config.num_layers));
  LoadedModel m;
  m.backend = TestBackend(0);
  ASSIGN_OR_RETURN(m.transformer,
                   model::Transformer::Create(config, std::move(w), m.backend.get()));
  return m;
}

absl::StatusOr<std::vector<float>> ForwardLogits(model::Transformer& t,
                                                 const std::vector<int32_t>& ids, int64_t chunk) {
  const auto& c = t.config();
  auto cache = cache::MakeFullKvCache(t.cache_shape(), c.max_position_embeddings, t.backend());
  const int64_t n = static_cast<int64_t>(ids.size());
  std::vector<float> logits(static_cast<size_t>(n * c.vocab_size));
  for (int64_t start = 0; start < n; start += chunk) {
    const int64_t len = std::min(chunk, n - start);
    std::vector<int32_t> pos(static_cast<size_t>(len));
    std::vector<int64_t> rows(static_cast<size_t>(len));
    for (int64_t i = 0; i < len; ++i) {
      pos[static_cast<size_t>(i)] = static_cast<int32_t>(start + i);
      rows[static_cast<size_t>(i)] = i;
    }
    model::SequenceStep step{cache.get(), pos.data(), len, n};
    RETURN_IF_ERROR(t.Forward({&step, 1}, ids.data() + start));
    RETURN_IF_ERROR(t.Logits(rows, logits.data() + start * c.vocab_size));
  }
  return logits;
}

absl::StatusOr<std::vector<int32_t>> GreedyDecode(model::Transformer& t,
                                                  const std::vector<int32_t>& prompt,
                                                  int64_t steps) {
  const auto& c = t.config();
  auto cache = cache::MakeFullKvCache(t.cache_shape(), c.max_position_embeddings, t.backend());
  std::vector<int32_t> ids = prompt;
  std::vector<float> logits(static_cast<size_t>(c.vocab_size));
  const int64_t n = static_cast<int64_t>(prompt.size());
  std::vector<int32_t> pos(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  model::SequenceStep step{cache.get(), pos.data(), n};
  RETURN_IF_ERROR(t.Forward({&step, 1}, ids.data()));
  int64_t row = n - 1;
  RETURN_IF_ERROR(t.Logits({&row, 1}, logits.data()));
  for (int64_t s = 0; s < steps; ++s) {
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ids.push_back(next);
    if (s + 1 == steps) break;
    const int32_t p = static_cast<int32_t>(ids.size() - 1);
    model::SequenceStep one{cache.get(), &p, 1};
    RETURN_IF_ERROR(t.Forward({&one, 1}, &next));
    row = 0;
    RETURN_IF_ERROR(t.Logits({&row, 1}, logits.data()));
  }
  return ids;
}

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in, nullptr, false);
}

}  // namespace kvgate::testing
