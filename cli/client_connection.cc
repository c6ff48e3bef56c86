#include "cli/client_connection.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "security/secrets.h"
#include "security/tls.h"

namespace kvgate::cli {

absl::StatusOr<std::shared_ptr<grpc::Channel>> ClientConnection::Channel() const {
  security::TlsFiles files;
  files.ca = tls_ca;
  auto credentials = security::MakeChannelCredentials(files);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(server, *credentials, args);
}

void ClientConnection::Authorize(grpc::ClientContext* ctx) const {
  std::string key = api_key;
  for (const std::string& name : key_env) {
    if (!key.empty()) break;
    if (const char* v = std::getenv(name.c_str()); v != nullptr) key = v;
  }
  if (!key.empty()) ctx->AddMetadata(security::kAuthorizationHeader, "Bearer " + key);
}

std::string ServerError(const std::string& server, const grpc::Status& status) {
  static const char* const kCodes[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  const int code = static_cast<int>(status.error_code());
  std::string message = status.error_message();
  if (status.error_code() == grpc::StatusCode::UNIMPLEMENTED && message.empty()) {
    message =
        "this listener does not serve that API (public, admin and cluster APIs have "
        "their own ports; see the server's start line)";
  }
  return absl::StrCat("server ", server, ": ", code >= 0 && code <= 16 ? kCodes[code] : "?", ": ",
                      message);
}

void AddClientFlags(CLI::App* cmd, ClientConnection* c) {
  cmd->add_option("--tls-ca", c->tls_ca,
                  "The server speaks TLS: verify it against this CA certificate (PEM)");
  cmd->add_option("--api-key", c->api_key,
                  "API key sent as 'authorization: Bearer KEY' (default: $KVGATE_API_KEY)");
}

}  // namespace kvgate::cli
