// How the client commands (generate --server, info, abort, budget) reach a kvgate server:
// `--server HOST:PORT`, `--tls-ca FILE` (TLS, verifying the server against that CA) and
// `--api-key KEY` (else $KVGATE_API_KEY; `budget` also reads $KVGATE_ADMIN_KEY), sent as
// `authorization: Bearer KEY`.
#pragma once

#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"

namespace kvgate::cli {

struct ClientConnection {
  std::string server;
  std::string tls_ca;
  std::string api_key;
  // The environment variables the key is read from when --api-key is not given, in order.
  std::vector<std::string> key_env = {"KVGATE_API_KEY"};

  // The channel to `server` (FAILED_PRECONDITION when the CA file is unreadable).
  absl::StatusOr<std::shared_ptr<grpc::Channel>> Channel() const;
  // Adds the API key (if any) to a call.
  void Authorize(grpc::ClientContext* ctx) const;
};

// "server HOST: CODE: message", naming the status code (and what an UNIMPLEMENTED service or
// an UNAUTHENTICATED call most likely means).
std::string ServerError(const std::string& server, const grpc::Status& status);

// Adds --tls-ca and --api-key to `cmd` (--server is the command's own).
void AddClientFlags(CLI::App* cmd, ClientConnection* c);

}  // namespace kvgate::cli
