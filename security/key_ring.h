// API keys (`--api-keys FILE`, `--admin-keys FILE`): one key per line ('#' comments and blank
// lines skipped), reloaded on SIGHUP. Clients send `authorization: Bearer KEY`; a missing or
// wrong key is UNAUTHENTICATED with nothing else said. Keys are compared in constant time and
// never logged.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/server_context.h"

namespace kvgate::security {

class KeyRing {
 public:
  // FAILED_PRECONDITION when the file cannot be read, is readable by other users, holds no key
  // or a key shorter than 16 characters.
  static absl::StatusOr<std::unique_ptr<KeyRing>> Load(const std::string& path, std::string flag);

  // Reads the file again; on any error the keys in force stay and the error is returned.
  absl::Status Reload();

  // Whether `key` is one of the keys (constant time in the key's content).
  bool Contains(const std::string& key) const;
  size_t size() const;

 private:
  KeyRing(std::string path, std::string flag) : path_(std::move(path)), flag_(std::move(flag)) {}
  static absl::StatusOr<std::vector<std::string>> Read(const std::string& path,
                                                       const std::string& flag);

  const std::string path_, flag_;
  mutable std::mutex mu_;
  std::vector<std::string> keys_;  // guarded by mu_
};

// The caller's bearer key ("" when it sent none).
std::string BearerKey(const grpc::ServerContextBase& context);

// OK when `ring` is null (no keys configured) or the caller's bearer key is in it; otherwise
// UNAUTHENTICATED. `key` (optional) receives the caller's key.
grpc::Status CheckKey(const KeyRing* ring, const grpc::ServerContextBase& context,
                      std::string* key = nullptr);

// OK when `token` is empty (not required) or the metadata `header` carries it.
grpc::Status CheckToken(const std::string& token, const char* header,
                        const grpc::ServerContextBase& context);

}  // namespace kvgate::security
