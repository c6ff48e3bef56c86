// Secrets a kvgate process holds: the cluster token, API keys, per-worker control tokens.
// They are compared in constant time, never logged and never echoed in an error.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvgate::security {

// `bytes` random bytes from the kernel's CSPRNG, as lowercase hex (2 * bytes characters).
std::string RandomHex(size_t bytes);

// Whether `a` equals `b`, in time that depends on neither's content (both are hashed first,
// so not on their lengths either).
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// Whether a file of `mode` owned by `owner` is private enough for secrets read by `reader`:
// nothing for others, and nothing for its group, except read access to a root-owned file read
// by someone else (how Kubernetes mounts a pod's Secrets for its fsGroup: root's, 0440).
bool PrivateEnough(unsigned mode, unsigned owner, unsigned reader);

// The contents of `path`, a file only its owner may read (FAILED_PRECONDITION naming `flag`
// when it is missing, not a file, unreadable, or readable by other users: chmod 600 it).
// See PrivateEnough.
absl::StatusOr<std::string> ReadPrivateFile(const std::string& path, absl::string_view flag);

// The secret in `path` (surrounding whitespace removed). FAILED_PRECONDITION when it cannot be
// read, is empty, shorter than 16 characters, or readable by other users (chmod 600 it).
absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag);

// Writes a fresh random secret to `path` (mode 0600, created anew); the secret.
absl::StatusOr<std::string> WriteSecretFile(const std::string& path);

// The metadata keys kvgate's planes carry credentials in.
inline constexpr char kAuthorizationHeader[] = "authorization";          // "Bearer KEY" (clients)
inline constexpr char kClusterTokenHeader[] = "x-kvgate-cluster-token";  // workers -> coordinator
inline constexpr char kControlTokenHeader[] = "x-kvgate-control";        // coordinator -> worker

}  // namespace kvgate::security
