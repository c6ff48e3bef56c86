#include "security/key_ring.h"

#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "security/secrets.h"

namespace kvgate::security {
namespace {

constexpr size_t kMinKeyChars = 16;
constexpr size_t kMaxKeyChars = 4096;

std::string Metadata(const grpc::ServerContextBase& context, const char* header) {
  const auto& md = context.client_metadata();
  auto it = md.find(header);
  if (it == md.end()) return "";
  return std::string(it->second.data(), it->second.size());
}

}  // namespace

absl::StatusOr<std::vector<std::string>> KeyRing::Read(const std::string& path,
                                                       const std::string& flag) {
  absl::StatusOr<std::string> text = ReadPrivateFile(path, flag);
  if (!text.ok()) return text.status();
  std::istringstream in(*text);
  std::vector<std::string> keys;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    const std::string key(absl::StripAsciiWhitespace(line));
    if (key.empty() || key[0] == '#') continue;
    // The line number only: a key is never quoted.
    if (key.size() < kMinKeyChars || key.size() > kMaxKeyChars) {
      return absl::FailedPreconditionError(
          absl::StrCat(flag, ": ", path, " line ", number, ": a key has 16 to 4096 characters"));
    }
    for (char c : key) {
      if (c < 0x21 || c > 0x7e) {
        return absl::FailedPreconditionError(absl::StrCat(
            flag, ": ", path, " line ", number, ": a key is printable ASCII without spaces"));
      }
    }
    keys.push_back(key);
  }
  if (keys.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(flag, ": ", path, " holds no key"));
  }
  return keys;
}

absl::StatusOr<std::unique_ptr<KeyRing>> KeyRing::Load(const std::string& path, std::string flag) {
  std::unique_ptr<KeyRing> ring(new KeyRing(path, std::move(flag)));
  if (absl::Status s = ring->Reload(); !s.ok()) return s;
  return ring;
}

absl::Status KeyRing::Reload() {
  auto keys = Read(path_, flag_);
  if (!keys.ok()) return keys.status();
  std::lock_guard<std::mutex> lock(mu_);
  keys_ = *std::move(keys);
  return absl::OkStatus();
}

bool KeyRing::Contains(const std::string& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  bool found = false;
  for (const std::string& k : keys_) found |= ConstantTimeEquals(k, key);  // no early exit
  return found;
}

size_t KeyRing::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return keys_.size();
}

std::string BearerKey(const grpc::ServerContextBase& context) {
  const std::string value = Metadata(context, kAuthorizationHeader);
  constexpr absl::string_view kBearer = "Bearer ";
  if (value.size() <= kBearer.size() || !absl::StartsWithIgnoreCase(value, kBearer)) return "";
  return std::string(absl::StripAsciiWhitespace(value.substr(kBearer.size())));
}

grpc::Status CheckKey(const KeyRing* ring, const grpc::ServerContextBase& context,
                      std::string* key) {
  const std::string presented = BearerKey(context);
  if (key != nullptr) *key = presented;
  if (ring == nullptr || (!presented.empty() && ring->Contains(presented))) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "a valid API key is required");
}

grpc::Status CheckToken(const std::string& token, const char* header,
                        const grpc::ServerContextBase& context) {
  if (token.empty() || ConstantTimeEquals(Metadata(context, header), token)) {
    return grpc::Status::OK;
  }
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "not a member of this cluster");
}

}  // namespace kvgate::security
