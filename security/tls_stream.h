// TLS over a connected TCP socket, with OpenSSL: the stage-to-stage data plane when the
// cluster runs with --tls-cert/--tls-key (mutual with --tls-ca). The client side verifies the
// server's certificate against the CA (the system's roots without one) and its host name or IP
// address; with a CA the server side requires a client certificate signed by it.
#pragma once

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "security/tls.h"

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace kvgate::security {

class TlsStream {
 public:
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // Up to `n` bytes, blocking until some arrive: > 0 bytes read, 0 when the peer closed, < 0
  // on an error (UNAVAILABLE from error()).
  ssize_t Read(void* data, size_t n);
  absl::Status WriteAll(const void* data, size_t n);
  // Decrypted bytes already buffered (a poll on the socket would not see them).
  bool pending() const;
  absl::Status error() const;

 private:
  friend class TlsContext;
  explicit TlsStream(SSL* ssl) : ssl_(ssl) {}
  SSL* ssl_;
};

class TlsContext {
 public:
  static absl::StatusOr<std::shared_ptr<TlsContext>> Create(const TlsFiles& files);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  // The handshake on a connected socket (which stays the caller's to close), within
  // `timeout_s`: as the server, or as the client of `host`.
  absl::StatusOr<std::unique_ptr<TlsStream>> Accept(int fd, double timeout_s) const;
  absl::StatusOr<std::unique_ptr<TlsStream>> Connect(int fd, const std::string& host,
                                                     double timeout_s) const;

 private:
  TlsContext() = default;
  SSL_CTX* server_ = nullptr;
  SSL_CTX* client_ = nullptr;
};

}  // namespace kvgate::security
