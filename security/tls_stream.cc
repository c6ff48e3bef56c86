#include "security/tls_stream.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <cerrno>

#include "absl/strings/str_cat.h"

namespace kvgate::security {
namespace {

std::string OpenSslError(const char* what) {
  const unsigned long e = ERR_get_error();
  char buf[256];
  ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return absl::StrCat(what, ": ", e == 0 ? "connection closed or timed out" : buf);
}

void SetTimeouts(int fd, double seconds) {
  timeval tv{static_cast<time_t>(seconds),
             static_cast<suseconds_t>((seconds - static_cast<time_t>(seconds)) * 1e6)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

absl::Status LoadCertAndKey(SSL_CTX* ctx, const TlsFiles& files) {
  if (SSL_CTX_use_certificate_chain_file(ctx, files.cert.c_str()) != 1) {
    return absl::FailedPreconditionError(OpenSslError("--tls-cert"));
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, files.key.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(ctx) != 1) {
    return absl::FailedPreconditionError(OpenSslError("--tls-key"));
  }
  return absl::OkStatus();
}

absl::Status LoadTrust(SSL_CTX* ctx, const TlsFiles& files) {
  const int ok = files.ca.empty() ? SSL_CTX_set_default_verify_paths(ctx)
                                  : SSL_CTX_load_verify_locations(ctx, files.ca.c_str(), nullptr);
  if (ok != 1) return absl::FailedPreconditionError(OpenSslError("--tls-ca"));
  return absl::OkStatus();
}

}  // namespace

TlsStream::~TlsStream() { SSL_free(ssl_); }

ssize_t TlsStream::Read(void* data, size_t n) {
  while (true) {
    size_t got = 0;
    if (SSL_read_ex(ssl_, data, n, &got) == 1) return static_cast<ssize_t>(got);
    const int err = SSL_get_error(ssl_, 0);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) continue;
    if (err == SSL_ERROR_ZERO_RETURN) return 0;
    if (err == SSL_ERROR_SYSCALL && errno == EINTR) continue;
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) return 0;  // EOF without close_notify
    return -1;
  }
}

absl::Status TlsStream::WriteAll(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    size_t wrote = 0;
    if (SSL_write_ex(ssl_, p, n, &wrote) != 1) {
      const int err = SSL_get_error(ssl_, 0);
      if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) continue;
      return absl::UnavailableError(OpenSslError("sending over TLS to the next stage"));
    }
    p += wrote;
    n -= wrote;
  }
  return absl::OkStatus();
}

bool TlsStream::pending() const { return SSL_pending(ssl_) > 0; }

absl::Status TlsStream::error() const {
  return absl::UnavailableError(OpenSslError("receiving over TLS from the previous stage"));
}

absl::StatusOr<std::shared_ptr<TlsContext>> TlsContext::Create(const TlsFiles& files) {
  std::shared_ptr<TlsContext> t(new TlsContext());
  t->server_ = SSL_CTX_new(TLS_server_method());
  t->client_ = SSL_CTX_new(TLS_client_method());
  if (t->server_ == nullptr || t->client_ == nullptr) {
    return absl::InternalError(OpenSslError("TLS context"));
  }
  for (SSL_CTX* ctx : {t->server_, t->client_}) {
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (absl::Status s = LoadCertAndKey(ctx, files); !s.ok()) return s;
  }
  if (absl::Status s = LoadTrust(t->client_, files); !s.ok()) return s;
  SSL_CTX_set_verify(t->client_, SSL_VERIFY_PEER, nullptr);
  if (files.mutual()) {
    if (absl::Status s = LoadTrust(t->server_, files); !s.ok()) return s;
    SSL_CTX_set_verify(t->server_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  return t;
}

TlsContext::~TlsContext() {
  SSL_CTX_free(server_);
  SSL_CTX_free(client_);
}

absl::StatusOr<std::unique_ptr<TlsStream>> TlsContext::Accept(int fd, double timeout_s) const {
  SSL* ssl = SSL_new(server_);
  if (ssl == nullptr) return absl::InternalError(OpenSslError("TLS session"));
  std::unique_ptr<TlsStream> stream(new TlsStream(ssl));
  SSL_set_fd(ssl, fd);
  SetTimeouts(fd, timeout_s);
  const int rc = SSL_accept(ssl);
  SetTimeouts(fd, 0);
  if (rc != 1) return absl::UnauthenticatedError(OpenSslError("TLS handshake with a stage"));
  return stream;
}

absl::StatusOr<std::unique_ptr<TlsStream>> TlsContext::Connect(int fd, const std::string& host,
                                                               double timeout_s) const {
  SSL* ssl = SSL_new(client_);
  if (ssl == nullptr) return absl::InternalError(OpenSslError("TLS session"));
  std::unique_ptr<TlsStream> stream(new TlsStream(ssl));
  SSL_set_fd(ssl, fd);
  // The next stage must prove it is `host`.
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  in6_addr addr6;
  in_addr addr4;
  const bool is_ip = inet_pton(AF_INET, host.c_str(), &addr4) == 1 ||
                     inet_pton(AF_INET6, host.c_str(), &addr6) == 1;
  if (is_ip) {
    X509_VERIFY_PARAM_set1_ip_asc(param, host.c_str());
  } else {
    X509_VERIFY_PARAM_set1_host(param, host.c_str(), 0);
    SSL_set_tlsext_host_name(ssl, host.c_str());
  }
  SetTimeouts(fd, timeout_s);
  const int rc = SSL_connect(ssl);
  SetTimeouts(fd, 0);
  if (rc != 1) {
    const long verify = SSL_get_verify_result(ssl);
    if (verify != X509_V_OK) {
      return absl::UnauthenticatedError(absl::StrCat("TLS: the next stage's certificate: ",
                                                     X509_verify_cert_error_string(verify)));
    }
    return absl::UnauthenticatedError(OpenSslError("TLS handshake with the next stage"));
  }
  return stream;
}

}  // namespace kvgate::security
