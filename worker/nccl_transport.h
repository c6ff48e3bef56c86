// The NCCL transport between GPU pipeline stages: one step's activations in device memory go
// to the next stage with ncclSend and come from the previous one with ncclRecv, on a
// communicator of all the pipeline's stages (rank = stage). Each step is a 3-word header
// {step id, status code, float count} and then, when the status is OK, the floats; a stage that
// failed a step sends only the header, so later stages fail it too instead of waiting.
//
// The NCCL unique id is made by stage 0 (UniqueId) and handed to the others by the coordinator
// over gRPC (internal.proto: ShardLoaded.nccl_unique_id, PipelineWiring.nccl_unique_id).
// Compiled when CUDA is present; exercised on a GPU by tests/unit/worker/nccl_transport_test.cc
// (ctest label gpu; multi_gpu for two stages on two GPUs).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/transport.h"

namespace kvgate::worker {

class NcclTransport final : public Transport {
 public:
  // A fresh unique id (stage 0), as bytes for the wire.
  static absl::StatusOr<std::string> UniqueId();
  // Joins the communicator of `nranks` stages as `rank` on `device`. `prev` / `next`: the peer
  // ranks activations come from / go to (-1: none). A one-GPU loop has prev = next = rank.
  static absl::StatusOr<std::unique_ptr<NcclTransport>> Create(const std::string& unique_id,
                                                               int rank, int nranks, int device,
                                                               int prev, int next);
  ~NcclTransport() override;

  // Device buffers on this transport's stream. Send / Recv of the Transport interface stage
  // host data through device memory.
  absl::Status SendDevice(uint64_t step_id, const absl::Status& step_status,
                          const float* hidden,  // device [count]
                          int64_t count);
  // Receives into `hidden` (device [capacity]); the count received in *count.
  absl::Status RecvDevice(uint64_t step_id, float* hidden, int64_t capacity, int64_t* count);
  // A send and a receive in one NCCL group (required when a rank sends to itself).
  absl::Status SendRecvDevice(uint64_t send_step, const float* send, int64_t send_count,
                              uint64_t recv_step, float* recv, int64_t recv_capacity,
                              int64_t* recv_count);

  absl::Status Send(uint64_t step_id, const absl::Status& step_status,
                    std::span<const float> hidden) override;
  absl::Status Recv(uint64_t step_id, std::vector<float>* hidden) override;

  cudaStream_t stream() const { return stream_; }

 private:
  NcclTransport() = default;
  absl::Status Reserve(int64_t count);
  // The general step: send (send_count >= 0) and/or receive (receiving) in NCCL groups: the
  // headers, then the floats into recv_buffer(count) (nullptr: no room; taken off the wire
  // into the staging buffer and reported as an error).
  absl::Status Exchange(uint64_t send_step, const float* send, int64_t send_count,
                        uint64_t recv_step, const std::function<float*(int64_t)>& recv_buffer,
                        bool receiving, int64_t* recv_count);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int prev_ = -1, next_ = -1;
  uint64_t* header_ = nullptr;  // device [6]: the send header, then the receive header
  float* staging_ = nullptr;    // device [staging_count_] for the host Send / Recv
  int64_t staging_count_ = 0;
};

}  // namespace kvgate::worker
