#include "coordinator/weights_registry.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status.h"
#include "model/weights/eviction_weights.h"

namespace kvgate::coordinator {
namespace {

constexpr size_t kMaxNameBytes = 64;

bool ValidName(const std::string& name) {
  if (name.empty() || name.size() > kMaxNameBytes) return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return true;
}

// Loads `path` as `kind`, which checks every tensor against the model.
absl::Status Check(const std::string& path, const std::string& kind,
                   const model::ModelConfig& config) {
  if (kind == "locret") return model::LoadLocretHeads(path, config).status();
  return model::LoadAttentionGates(path, config).status();
}

}  // namespace

absl::StatusOr<WeightsRegistry> WeightsRegistry::Load(const std::string& model_dir,
                                                      const std::vector<std::string>& flags,
                                                      const model::ModelConfig& config) {
  WeightsRegistry r;
  for (const auto& [file, policy] :
       {std::pair<const char*, const char*>{"locret.safetensors", "locret"},
        {"attention_gate.safetensors", "attention-gate"}}) {
    const std::filesystem::path path = std::filesystem::path(model_dir) / file;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) continue;
    // The model's own weights: a file that does not fit is reported, not served.
    if (absl::Status s = Check(path.string(), policy, config); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("model directory: ", s.message()));
    }
    r.entries_[policy] = Entry{policy, path.string()};
  }
  for (const std::string& flag : flags) {
    const size_t eq = flag.find('=');
    std::string name = eq == std::string::npos ? "" : flag.substr(0, eq);
    const std::string path = eq == std::string::npos ? flag : flag.substr(eq + 1);
    if (eq != std::string::npos && !ValidName(name)) {
      return absl::InvalidArgumentError(absl::StrCat("--kv-weights ", flag, ": a name is 1 to ",
                                                     kMaxNameBytes,
                                                     " letters, digits, '-', '_' or '.'"));
    }
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("--kv-weights: '", path, "' is not a file"));
    }
    ASSIGN_OR_RETURN(std::string kind, model::ReadEvictionWeightsKind(path));
    RETURN_IF_ERROR(Check(path, kind, config));
    if (name.empty()) name = kind;
    if (name == "locret" || name == "attention-gate") {
      if (name != kind) {
        return absl::InvalidArgumentError(absl::StrCat("--kv-weights ", flag, ": the name ", name,
                                                       " is that policy's default, but the file "
                                                       "holds ",
                                                       kind, " weights"));
      }
    }
    r.entries_[name] = Entry{kind, std::filesystem::absolute(path).string()};
  }
  return r;
}

absl::StatusOr<std::string> WeightsRegistry::Resolve(const std::string& policy,
                                                     const std::string& name) const {
  if (!name.empty() && !ValidName(name)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv.weights_name: a name is 1 to ", kMaxNameBytes, " letters, digits, '-', '_' or '.'"));
  }
  const std::string key = name.empty() ? policy : name;
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.policy != policy) {
    const std::vector<std::string> names = Describe();
    const std::string offered =
        names.empty() ? "this server registered none" : absl::StrJoin(names, ", ");
    if (name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("kv.weights_name: the server has no default ",
                                                     policy, " weights; name registered ones (",
                                                     offered, ")"));
    }
    // The name is the client's: quote at most kMaxNameBytes of it.
    return absl::InvalidArgumentError(
        absl::StrCat("kv.weights_name: no ", policy, " weights named '",
                     name.substr(0, kMaxNameBytes), "' on this server (", offered, ")"));
  }
  return it->second.path;
}

std::vector<WeightsRegistry::Entry> WeightsRegistry::Files() const {
  std::vector<Entry> out;
  for (const auto& [name, e] : entries_) {
    bool seen = false;
    for (const Entry& o : out) seen |= o.path == e.path && o.policy == e.policy;
    if (!seen) out.push_back(e);
  }
  return out;
}

std::vector<std::string> WeightsRegistry::Describe() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(absl::StrCat(name, " (", e.policy, ")"));
  return out;
}

}  // namespace kvgate::coordinator
