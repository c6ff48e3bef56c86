#include "worker/nccl_transport.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "absl/strings/str_cat.h"
#include "common/cuda/nccl_check.h"

namespace kvgate::worker {

absl::StatusOr<std::string> NcclTransport::UniqueId() {
  ncclUniqueId id;
  KVGATE_NCCL_RETURN_IF_ERROR(ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclTransport>> NcclTransport::Create(const std::string& unique_id,
                                                                     int rank, int nranks,
                                                                     int device, int prev,
                                                                     int next) {
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(id.internal),
                                                   " bytes, not ", unique_id.size()));
  }
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  std::unique_ptr<NcclTransport> t(new NcclTransport());
  t->prev_ = prev;
  t->next_ = next;
  KVGATE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&t->stream_, cudaStreamNonBlocking));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMalloc(&t->header_, 6 * sizeof(uint64_t)));
  KVGATE_NCCL_RETURN_IF_ERROR(ncclCommInitRank(&t->comm_, nranks, id, rank));
  return t;
}

NcclTransport::~NcclTransport() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
  if (header_ != nullptr) cudaFree(header_);
  if (staging_ != nullptr) cudaFree(staging_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status NcclTransport::Reserve(int64_t count) {
  if (count <= staging_count_) return absl::OkStatus();
  if (staging_ != nullptr) KVGATE_CUDA_RETURN_IF_ERROR(cudaFree(staging_));
  staging_ = nullptr;
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMalloc(&staging_, static_cast<size_t>(count) * sizeof(float)));
  staging_count_ = count;
  return absl::OkStatus();
}

absl::Status NcclTransport::SendRecvDevice(uint64_t send_step, const float* send,
                                           int64_t send_count, uint64_t recv_step, float* recv,
                                           int64_t recv_capacity, int64_t* recv_count) {
  return Exchange(
      send_step, send, send_count, recv_step,
      [&](int64_t n) -> float* { return n <= recv_capacity ? recv : nullptr; },
      recv != nullptr || recv_count != nullptr, recv_count);
}

absl::Status NcclTransport::Exchange(uint64_t send_step, const float* send, int64_t send_count,
                                     uint64_t recv_step,
                                     const std::function<float*(int64_t)>& recv_buffer,
                                     bool receiving, int64_t* recv_count) {
  // The headers first (one group), then the payloads (a second group), so the receiver
  // knows the count and the status before it receives floats.
  const bool sending = send_count >= 0;
  uint64_t host[3] = {send_step, 0, static_cast<uint64_t>(std::max<int64_t>(send_count, 0))};
  if (sending) {
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(header_, host, sizeof(host), cudaMemcpyHostToDevice, stream_));
  }
  KVGATE_NCCL_RETURN_IF_ERROR(ncclGroupStart());
  if (sending) KVGATE_NCCL_RETURN_IF_ERROR(ncclSend(header_, 3, ncclUint64, next_, comm_, stream_));
  if (receiving) {
    KVGATE_NCCL_RETURN_IF_ERROR(ncclRecv(header_ + 3, 3, ncclUint64, prev_, comm_, stream_));
  }
  KVGATE_NCCL_RETURN_IF_ERROR(ncclGroupEnd());
  uint64_t got[3] = {0, 0, 0};
  if (receiving) {
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(got, header_ + 3, sizeof(got), cudaMemcpyDeviceToHost, stream_));
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  const int64_t incoming = static_cast<int64_t>(got[2]);
  float* recv = receiving && got[1] == 0 && incoming > 0 ? recv_buffer(incoming) : nullptr;
  if (receiving && got[1] == 0 && incoming > 0 && recv == nullptr) {
    // The floats must still be taken off the wire, or the sender waits forever.
    if (absl::Status s = Reserve(incoming); !s.ok()) return s;
    recv = staging_;
    got[1] = static_cast<uint64_t>(absl::StatusCode::kInternal);
  }
  KVGATE_NCCL_RETURN_IF_ERROR(ncclGroupStart());
  if (sending && send_count > 0) {
    KVGATE_NCCL_RETURN_IF_ERROR(
        ncclSend(send, static_cast<size_t>(send_count), ncclFloat32, next_, comm_, stream_));
  }
  if (recv != nullptr) {
    KVGATE_NCCL_RETURN_IF_ERROR(
        ncclRecv(recv, static_cast<size_t>(incoming), ncclFloat32, prev_, comm_, stream_));
  }
  KVGATE_NCCL_RETURN_IF_ERROR(ncclGroupEnd());
  KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  if (!receiving) return absl::OkStatus();
  if (recv_count != nullptr) *recv_count = incoming;
  if (got[0] != recv_step) {
    return absl::InternalError(absl::StrCat("the previous stage sent step ", got[0], " while step ",
                                            recv_step, " was expected"));
  }
  if (got[1] != 0) {
    return absl::Status(
        static_cast<absl::StatusCode>(got[1]),
        "the previous stage failed this step, or sent more than there was room for");
  }
  return absl::OkStatus();
}

absl::Status NcclTransport::SendDevice(uint64_t step_id, const absl::Status& step_status,
                                       const float* hidden, int64_t count) {
  if (!step_status.ok()) {
    uint64_t host[3] = {step_id, static_cast<uint64_t>(step_status.code()), 0};
    KVGATE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(header_, host, sizeof(host), cudaMemcpyHostToDevice, stream_));
    KVGATE_NCCL_RETURN_IF_ERROR(ncclSend(header_, 3, ncclUint64, next_, comm_, stream_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  return SendRecvDevice(step_id, hidden, count, 0, nullptr, 0, nullptr);
}

absl::Status NcclTransport::RecvDevice(uint64_t step_id, float* hidden, int64_t capacity,
                                       int64_t* count) {
  return SendRecvDevice(0, nullptr, -1, step_id, hidden, capacity, count);
}

absl::Status NcclTransport::Send(uint64_t step_id, const absl::Status& step_status,
                                 std::span<const float> hidden) {
  const int64_t n = static_cast<int64_t>(hidden.size());
  if (absl::Status s = Reserve(n); !s.ok()) return s;
  if (n > 0) {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_, hidden.data(), n * sizeof(float),
                                                cudaMemcpyHostToDevice, stream_));
  }
  return SendDevice(step_id, step_status, staging_, n);
}

absl::Status NcclTransport::Recv(uint64_t step_id, std::vector<float>* hidden) {
  int64_t count = 0;
  absl::Status s = Exchange(
      0, nullptr, -1, step_id, [this](int64_t n) { return Reserve(n).ok() ? staging_ : nullptr; },
      /*receiving=*/true, &count);
  if (!s.ok()) return s;
  hidden->resize(static_cast<size_t>(count));
  if (count > 0) {
    KVGATE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(hidden->data(), staging_, count * sizeof(float),
                                                cudaMemcpyDeviceToHost, stream_));
    KVGATE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  }
  return absl::OkStatus();
}

}  // namespace kvgate::worker
