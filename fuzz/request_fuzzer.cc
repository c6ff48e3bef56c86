// Bytes parsed as a GenerateRequest, then validated as the coordinator's front end does
// (PrepareRequest: every field's limits, the prompt tokenized, the KV parameters and the
// registered eviction weights resolved, chat prompts rendered by the model's chat template)
// against the repository's default model.
#include <cstddef>
#include <cstdint>
#include <optional>

#include "coordinator/request.h"
#include "coordinator/weights_registry.h"
#include "fuzz/scratch_file.h"
#include "kvgate/v1/kvgate.pb.h"
#include "model/generation/generator.h"

namespace {

struct Server {
  std::unique_ptr<kvgate::model::Generator> frontend;
  kvgate::coordinator::WeightsRegistry weights;
  kvgate::cache::EvictionParams default_kv;
  std::optional<kvgate::model::chat::ChatTemplate> chat;
};

const Server& GetServer() {
  static const Server* server = [] {
    auto* s = new Server();
    const std::string dir = kvgate::fuzz::FuzzModelDir();
    auto frontend = kvgate::model::Generator::LoadFrontend(dir);
    if (!frontend.ok()) {
      std::fprintf(stderr, "request_fuzzer: %s (run from the repository root)\n",
                   std::string(frontend.status().message()).c_str());
      std::abort();
    }
    s->frontend = *std::move(frontend);
    auto weights = kvgate::coordinator::WeightsRegistry::Load(dir, {}, s->frontend->config());
    if (weights.ok()) s->weights = *std::move(weights);
    auto chat = kvgate::model::chat::ChatTemplate::Load(dir);
    if (chat.ok()) s->chat = *std::move(chat);
    return s;
  }();
  return *server;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Server& s = GetServer();
  kvgate::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto prepared = kvgate::coordinator::PrepareRequest(request, *s.frontend, s.default_kv, s.weights,
                                                      s.chat ? &*s.chat : nullptr);
  if (!prepared.ok()) {
    // Errors name the field and never echo a large one.
    if (prepared.status().message().size() > 1024) std::abort();
  }
  return 0;
}
