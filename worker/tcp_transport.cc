#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/log.h"
#include "security/secrets.h"
#include "worker/transport.h"

namespace kvgate::worker {
namespace {

constexpr uint32_t kMagic = 0x6b764731;       // "kvG1"
constexpr uint32_t kHelloMagic = 0x6b764748;  // "kvGH"
constexpr uint32_t kMaxTokenBytes = 256;
constexpr double kHandshakeSeconds = 5;
// The largest frame a stage accepts (activations of one step; an error message).
constexpr uint64_t kMaxFrameBytes = uint64_t{1} << 32;
constexpr uint64_t kMaxMessageBytes = uint64_t{1} << 16;

struct FrameHeader {
  uint32_t magic;
  uint32_t code;  // absl::StatusCode; 0: activations follow
  uint64_t step_id;
  uint64_t bytes;
};
static_assert(sizeof(FrameHeader) == 24);

absl::Status Errno(absl::string_view what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

absl::Status WriteFull(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("sending activations to the next stage");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// Reads exactly `n` bytes from a blocking socket (its timeouts apply).
absl::Status ReadExact(int fd, security::TlsStream* tls, void* data, size_t n) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = tls != nullptr ? tls->Read(p, n) : recv(fd, p, n, 0);
    if (r < 0 && tls == nullptr && errno == EINTR) continue;
    if (r <= 0) return absl::UnauthenticatedError("no valid hello from the connecting stage");
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

void SetTimeout(int fd, double seconds) {
  timeval tv{static_cast<time_t>(seconds), 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), port)) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not host:port"));
  }
  *host = address.substr(0, colon);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpTransport>> TcpTransport::Listen(
    const std::string& host, int port, std::shared_ptr<const security::TlsContext> tls) {
  std::unique_ptr<TcpTransport> t(new TcpTransport());
  t->tls_ = std::move(tls);
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  const std::string service = std::to_string(port);
  if (int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
    return absl::InvalidArgumentError(absl::StrCat("data address ", host, ": ", gai_strerror(rc)));
  }
  int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, 4) != 0) {
    absl::Status s = Errno(absl::StrCat("listening on ", host, ":", port));
    freeaddrinfo(res);
    if (fd >= 0) close(fd);
    return s;
  }
  freeaddrinfo(res);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  t->port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  t->listen_fd_ = fd;
  t->host_ = host;
  TcpTransport* raw = t.get();
  t->acceptor_ = std::thread([raw] { raw->AcceptLoop(); });
  return t;
}

TcpTransport::~TcpTransport() {
  stopping_.store(true);
  if (acceptor_.joinable()) acceptor_.join();
  CloseIncoming();
  CloseOutgoing();
  for (Pending& p : pending_) {
    p.tls.reset();
    close(p.fd);
  }
  if (listen_fd_ >= 0) close(listen_fd_);
}

void TcpTransport::CloseIncoming() {
  in_tls_.reset();
  if (in_fd_ >= 0) close(in_fd_);
  in_fd_ = -1;
}

void TcpTransport::CloseOutgoing() {
  out_tls_.reset();
  std::lock_guard<std::mutex> lock(out_mu_);
  if (out_fd_ >= 0) close(out_fd_);
  out_fd_ = -1;
}

void TcpTransport::Interrupt() {
  interrupted_.store(true);
  std::lock_guard<std::mutex> lock(out_mu_);
  if (out_fd_ >= 0) shutdown(out_fd_, SHUT_RDWR);
}

void TcpTransport::AcceptLoop() {
  constexpr size_t kMaxPending = 8;
  while (!stopping_.load()) {
    pollfd fd{listen_fd_, POLLIN, 0};
    if (poll(&fd, 1, 100) <= 0 || (fd.revents & POLLIN) == 0) continue;
    const int conn = accept(listen_fd_, nullptr, nullptr);
    if (conn < 0) continue;
    absl::StatusOr<Pending> p = Handshake(conn);
    if (!p.ok()) {
      log::Warn(absl::StrFormat("refused a data connection: %s",
                                std::string(p.status().message()).c_str()));
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back(*std::move(p));
    while (pending_.size() > kMaxPending) {
      pending_.front().tls.reset();
      close(pending_.front().fd);
      pending_.pop_front();
    }
  }
}

absl::StatusOr<TcpTransport::Pending> TcpTransport::Handshake(int fd) {
  Pending p;
  p.fd = fd;
  p.at = std::chrono::steady_clock::now();
  if (tls_ != nullptr) {
    auto accepted = tls_->Accept(fd, kHandshakeSeconds);
    if (!accepted.ok()) {
      close(fd);
      return accepted.status();
    }
    p.tls = *std::move(accepted);
  }
  SetTimeout(fd, kHandshakeSeconds);
  uint32_t hello[2] = {0, 0};
  absl::Status s = ReadExact(fd, p.tls.get(), hello, sizeof(hello));
  if (s.ok() && (hello[0] != kHelloMagic || hello[1] > kMaxTokenBytes)) {
    s = absl::UnauthenticatedError("the connecting peer is not a kvgate stage");
  }
  if (s.ok()) {
    p.token.resize(hello[1]);
    s = ReadExact(fd, p.tls.get(), p.token.data(), p.token.size());
  }
  SetTimeout(fd, 0);
  if (!s.ok()) {
    p.tls.reset();
    close(fd);
    return s;
  }
  return p;
}

bool TcpTransport::AdoptPending() {
  constexpr auto kKeep = std::chrono::seconds(10);
  std::lock_guard<std::mutex> lock(mu_);
  if (pending_.empty()) return false;
  bool adopted = false;
  const auto now = std::chrono::steady_clock::now();
  std::deque<Pending> keep;
  // Newest first: the last connection a stage of this wiring made.
  for (auto it = pending_.rbegin(); it != pending_.rend(); ++it) {
    const bool valid = security::ConstantTimeEquals(it->token, data_token_);
    if (valid && !adopted) {
      CloseIncoming();
      SetNoDelay(it->fd);
      in_fd_ = it->fd;
      in_tls_ = std::move(it->tls);
      adopted = true;
    } else if (!valid && now - it->at < kKeep && !adopted) {
      keep.push_front(std::move(*it));
    } else {
      if (!valid) {
        log::Warn("dropped a data connection with a wrong token");
      }
      it->tls.reset();
      close(it->fd);
    }
  }
  pending_.swap(keep);
  return adopted;
}

absl::Status TcpTransport::WriteOut(const void* data, size_t n) {
  if (out_tls_ != nullptr) return out_tls_->WriteAll(data, n);
  return WriteFull(out_fd_, data, n);
}

std::string TcpTransport::listen_address() const { return absl::StrCat(host_, ":", port_); }

absl::Status TcpTransport::ConnectNext(const std::string& address, double timeout_s) {
  CloseOutgoing();
  if (address.empty()) return absl::OkStatus();
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(address, &host, &port); !s.ok()) return s;
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  while (true) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res); rc != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("next stage ", address, ": ", gai_strerror(rc)));
    }
    int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    const bool ok = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0;
    freeaddrinfo(res);
    if (ok) {
      SetNoDelay(fd);
      {
        std::lock_guard<std::mutex> lock(out_mu_);
        out_fd_ = fd;
      }
      if (tls_ != nullptr) {
        auto stream = tls_->Connect(fd, host, kHandshakeSeconds);
        if (!stream.ok()) {
          CloseOutgoing();
          return stream.status();
        }
        out_tls_ = *std::move(stream);
      }
      const uint32_t hello[2] = {kHelloMagic, static_cast<uint32_t>(data_token_.size())};
      absl::Status s = WriteOut(hello, sizeof(hello));
      if (s.ok()) s = WriteOut(data_token_.data(), data_token_.size());
      if (!s.ok()) CloseOutgoing();
      return s;
    }
    absl::Status err = Errno(absl::StrCat("connecting to the next stage at ", address));
    if (fd >= 0) close(fd);
    if (std::chrono::steady_clock::now() > give_up || stopping_.load()) return err;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void TcpTransport::ResetIncoming() {
  CloseIncoming();
  if (!stopping_.load()) interrupted_.store(false);
}

absl::Status TcpTransport::Send(uint64_t step_id, const absl::Status& step_status,
                                std::span<const float> hidden) {
  if (out_fd_ < 0) return absl::FailedPreconditionError("not connected to a next stage");
  const std::string message(step_status.message());
  FrameHeader h{kMagic, static_cast<uint32_t>(step_status.code()), step_id,
                step_status.ok() ? hidden.size() * sizeof(float) : message.size()};
  if (absl::Status s = WriteOut(&h, sizeof(h)); !s.ok()) return s;
  return step_status.ok() ? WriteOut(hidden.data(), h.bytes) : WriteOut(message.data(), h.bytes);
}

absl::Status TcpTransport::ReadFull(void* data, size_t n) {
  char* p = static_cast<char*>(data);
  const auto give_up = std::chrono::steady_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(recv_timeout_s_ * 1000));
  while (n > 0) {
    if (stopping_.load()) return absl::UnavailableError("the worker is stopping");
    if (interrupted_.load()) return absl::AbortedError("the pipeline is being rewired");
    // A new connection with this wiring's token replaces the current one.
    if (AdoptPending() && p != static_cast<char*>(data)) {
      return absl::UnavailableError("the previous stage reconnected in the middle of a frame");
    }
    if (std::chrono::steady_clock::now() > give_up) {
      return absl::DeadlineExceededError(
          absl::StrCat("no activations from the previous stage within ", recv_timeout_s_, " s"));
    }
    if (in_fd_ < 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      continue;
    }
    // Bytes TLS already decrypted are not seen by poll.
    pollfd fds{in_fd_, POLLIN, 0};
    const bool buffered = in_tls_ != nullptr && in_tls_->pending();
    const int rc = buffered ? 1 : poll(&fds, 1, 100);
    if (buffered) fds.revents = POLLIN;
    if (rc < 0 && errno != EINTR) return Errno("waiting for the previous stage");
    if (rc <= 0) continue;
    if ((fds.revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
    const ssize_t r = in_tls_ != nullptr ? in_tls_->Read(p, n) : recv(in_fd_, p, n, 0);
    if (r == 0) {
      CloseIncoming();
      return absl::UnavailableError("the previous stage closed its connection (worker gone?)");
    }
    if (r < 0) {
      if (in_tls_ != nullptr) {
        absl::Status s = in_tls_->error();
        CloseIncoming();
        return s;
      }
      if (errno == EINTR || errno == EAGAIN) continue;
      return Errno("receiving from the previous stage");
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::Status TcpTransport::Recv(uint64_t step_id, std::vector<float>* hidden) {
  while (true) {
    FrameHeader h{};
    if (absl::Status s = ReadFull(&h, sizeof(h)); !s.ok()) return s;
    if (h.magic != kMagic) {
      return absl::DataLossError("bad frame from the previous stage (not a kvgate transport?)");
    }
    std::string message;
    if (h.bytes > (h.code == 0 ? kMaxFrameBytes : kMaxMessageBytes)) {
      CloseIncoming();
      return absl::DataLossError("an oversized frame from the previous stage");
    }
    if (h.code == 0) {
      if (h.bytes % sizeof(float) != 0) return absl::DataLossError("torn activation frame");
      hidden->resize(h.bytes / sizeof(float));
      if (absl::Status s = ReadFull(hidden->data(), h.bytes); !s.ok()) return s;
    } else {
      message.resize(h.bytes);
      if (absl::Status s = ReadFull(message.data(), h.bytes); !s.ok()) return s;
    }
    if (h.step_id < step_id) continue;  // a dropped step's frame
    if (h.step_id > step_id) {
      return absl::InternalError(absl::StrCat("the previous stage sent step ", h.step_id,
                                              " while step ", step_id, " was expected"));
    }
    if (h.code != 0) return absl::Status(static_cast<absl::StatusCode>(h.code), message);
    return absl::OkStatus();
  }
}

}  // namespace kvgate::worker
