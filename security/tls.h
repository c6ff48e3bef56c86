// TLS for kvgate's gRPC listeners and channels (`--tls-cert`, `--tls-key`, `--tls-ca`).
//
// With a certificate and key every listener of the process speaks TLS. With a CA as well, the
// internal planes (the coordinator's cluster listener, a worker's control listener, the
// stage-to-stage data plane) require a client certificate signed by that CA: mutual TLS. The
// public and admin listeners never ask clients for certificates (they use API keys).
// Plaintext on loopback stays the default.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace kvgate::security {

struct TlsFiles {
  std::string cert;  // PEM certificate chain of this process
  std::string key;   // PEM private key
  std::string ca;    // PEM CA certificates that peers' certificates must chain to

  bool serves_tls() const { return !cert.empty(); }
  bool mutual() const { return !ca.empty(); }
  // --tls-cert and --tls-key come together, --tls-ca needs them, every file is readable.
  absl::Status Validate() const;
};

// The contents of a PEM file (FAILED_PRECONDITION naming `flag` when unreadable or not PEM).
absl::StatusOr<std::string> ReadPem(const std::string& path, const std::string& flag);

// Whether the certificate in `cert_path` (its first PEM certificate) names `host`, a host name or
// an IP address, as peers verify it: a subject alternative name equal to it, or a wildcard
// ("*.a.b") over two labels or more (gRPC and OpenSSL refuse "*.a"). FAILED_PRECONDITION
// saying which names it has otherwise: a process advertising a name its certificate lacks is
// refused at start rather than by every peer that dials it.
absl::Status CheckCertificateNames(const std::string& cert_path, const std::string& host);

// Plaintext without a certificate; TLS with it, and a verified client certificate required
// when `require_client_cert` (and a CA is given).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files, bool require_client_cert);

// A channel to a kvgate listener: plaintext when `files` has neither a CA nor a certificate;
// otherwise TLS verifying the server against the CA (the system's roots without one), showing
// this process's certificate when it has one.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const TlsFiles& files);

}  // namespace kvgate::security
