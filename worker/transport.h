// The data plane between pipeline stages: one step's activations, sent by a stage to the next
// in the order of the step plans' ids. A stage that fails a step sends the error instead, so
// every later stage ends that step with it rather than waiting.
//
// Implementations: the host transport (TCP, for CPU workers, below) and the NCCL transport
// (GPU workers, kernels/cuda). The coordinator wires them: each worker listens, and connects
// to the next stage's listener when told (PipelineWiring).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "security/tls_stream.h"

namespace kvgate::worker {

class Transport {
 public:
  virtual ~Transport() = default;
  // Sends step `step_id`'s activations, or `step_status` when the step failed here.
  virtual absl::Status Send(uint64_t step_id, const absl::Status& step_status,
                            std::span<const float> hidden) = 0;  // [tokens, hidden_size]
  // Receives step `step_id` from the previous stage into `hidden` (resized): OK, the error the
  // previous stage sent for that step, or the transport's own error (peer gone, timeout,
  // interrupted). Older steps' frames still in the pipe are skipped.
  virtual absl::Status Recv(uint64_t step_id, std::vector<float>* hidden) = 0;
};

// Host transport over TCP, or over TLS when given a TlsContext (mutual with a CA). A connection
// opens with a hello {magic, token bytes, token} carrying the pipeline's data token (handed to
// every stage by the coordinator when it wires them). An acceptor thread takes connections and
// runs their TLS handshake and hello at once (a stage may connect before this one is wired);
// Recv adopts the newest whose token is this wiring's and drops the others, so a stranger
// never replaces the connection in use. Then frames: a 24-byte header {magic, status code,
// step id, payload bytes}, then the payload (float32 activations, or the error message).
class TcpTransport final : public Transport {
 public:
  // Listens on `host`:`port` (0: any free port) for the previous stage; `tls`: null for
  // plaintext.
  static absl::StatusOr<std::unique_ptr<TcpTransport>> Listen(
      const std::string& host, int port, std::shared_ptr<const security::TlsContext> tls = nullptr);
  ~TcpTransport() override;

  // "host:port" the previous stage connects to.
  std::string listen_address() const;
  // The token a connection must present (and that ConnectNext presents); empty: none.
  void set_data_token(std::string token) {
    std::lock_guard<std::mutex> lock(mu_);
    data_token_ = std::move(token);
  }
  // Connects to the next stage's listener (replacing any earlier connection); empty: none
  // (the last stage). Retries for up to `timeout_s`.
  absl::Status ConnectNext(const std::string& address, double timeout_s);
  // Drops the current incoming connection (a rewired pipeline reconnects).
  void ResetIncoming();
  // Makes a blocked Recv return ABORTED soon (cleared by ResetIncoming), and a Send blocked on
  // a next stage that stopped reading (a partitioned link) fail at once: the connection to it
  // is shut down (the rewiring replaces it).
  void Interrupt();
  // The process is stopping: ConnectNext and Recv give up at once, for good.
  void Shutdown() {
    stopping_.store(true);
    Interrupt();
  }

  absl::Status Send(uint64_t step_id, const absl::Status& step_status,
                    std::span<const float> hidden) override;
  absl::Status Recv(uint64_t step_id, std::vector<float>* hidden) override;

 private:
  // A connection that finished its handshake and hello, not yet adopted.
  struct Pending {
    int fd = -1;
    std::unique_ptr<security::TlsStream> tls;
    std::string token;
    std::chrono::steady_clock::time_point at;  // when it arrived
  };

  TcpTransport() = default;
  absl::Status ReadFull(void* data, size_t n);
  absl::Status WriteOut(const void* data, size_t n);
  void AcceptLoop();
  // A new connection: its TLS handshake and hello, within a few seconds.
  absl::StatusOr<Pending> Handshake(int fd);
  // Makes the newest pending connection with this wiring's token the incoming one; whether
  // one was adopted. Others stay a while (their stage's wiring may not have reached this one
  // yet), then are dropped.
  bool AdoptPending();
  void CloseIncoming();
  void CloseOutgoing();

  std::shared_ptr<const security::TlsContext> tls_;
  std::mutex mu_;
  std::string data_token_;       // guarded by mu_
  std::deque<Pending> pending_;  // guarded by mu_
  std::atomic<bool> stopping_{false};
  std::thread acceptor_;
  std::unique_ptr<security::TlsStream> in_tls_, out_tls_;
  int listen_fd_ = -1;
  std::string host_;
  int port_ = 0;
  int in_fd_ = -1;   // from the previous stage
  int out_fd_ = -1;  // to the next stage; assigned under out_mu_ (Interrupt shuts it down)
  std::mutex out_mu_;
  std::atomic<bool> interrupted_{false};
  // Recv gives up after this long without the step's frame (DEADLINE_EXCEEDED).
  static constexpr double recv_timeout_s_ = 600;
};

}  // namespace kvgate::worker
