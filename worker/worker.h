// A pipeline-stage worker (`kvgate worker`): holds a contiguous layer range of the model, the
// KV caches of those layers for every live sequence, and runs its part of each step plan the
// coordinator sends (proto/kvgate/v1/internal.proto). Activations come from the previous stage
// and go to the next over a Transport; the last stage samples.
//
// Threads: gRPC's callback reactions only queue work. One executor thread owns the model and
// the caches: it runs control work (load, wire, free) between steps and the step plans
// strictly in step-id order. A heartbeat thread reports usage to the coordinator and
// registers again when the coordinator does not know this worker.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "cache/evicting_kv_cache.h"
#include "cache/eviction/policy.h"
#include "cache/kv_cache.h"
#include "cache/kv_pool.h"
#include "kernels/backend.h"
#include "kvgate/v1/internal.grpc.pb.h"
#include "model/arch/transformer.h"
#include "model/sampling/sampler.h"
#include "security/tls.h"
#include "worker/transport.h"

namespace kvgate::worker {

struct WorkerOptions {
  std::string coordinator;         // host:port
  std::string host = "127.0.0.1";  // where this worker listens (gRPC and data)
  // The name or address the coordinator and the previous stage dial ("": --host, or this
  // machine's host name when --host is a wildcard), e.g. a StatefulSet pod's stable DNS name.
  std::string advertise;
  // A plaintext gRPC health listener on --host (-1: none) for probes that cannot speak TLS
  // (Kubernetes' native gRPC probes): service "liveness" is SERVING while the process runs,
  // "" while the worker is registered with its coordinator.
  int health_port = -1;
  int port = 0;       // gRPC port (0: any free port)
  int data_port = 0;  // activation transport port (0: any free port)
  // Bytes this worker may hold (weights, KV, step scratch, the process itself); 0: a fraction
  // of the device's free memory (a GPU's) or of the machine's available memory.
  int64_t memory_limit = 0;
  // That fraction (0: 0.9 of a GPU's free memory, 0.8 of the host's available memory).
  double memory_fraction = 0;
  int threads = 0;  // CPU threads for the model (0: all cores)
  // Where the layers run: "cpu", "cuda[:N]", "guarded"; "": $KVGATE_DEVICE, else "cpu".
  std::string device;
  std::string kv_dtype;  // "f32", "bf16", "f16"; "": the device's default
  // Below this much available machine memory the worker reports pressure (asks for relief).
  int64_t memory_floor = int64_t{256} << 20;
  // The cluster's credential: the shared token (--cluster-token-file) and/or mutual TLS
  // (--tls-cert, --tls-key, --tls-ca). At least one is required.
  std::string cluster_token;
  security::TlsFiles tls;
};

// Parses "1073741824", "512M", "2G", "1.5GiB"; INVALID_ARGUMENT otherwise.
absl::StatusOr<int64_t> ParseBytes(const std::string& text);
// MemAvailable of /proc/meminfo in bytes (0 when unreadable).
int64_t AvailableMemory();
// This process's resident memory (VmRSS) in bytes (0 when unreadable).
int64_t ResidentMemory();

class WorkerService;

// Every check of `options` that needs no network, device or coordinator: flags in range, the
// TLS and credential files readable and valid. `kvgate worker --dry-run` stops after it.
absl::Status CheckWorkerOptions(const WorkerOptions& options);

// Runs a worker until `stop` becomes true; returns the reason it stopped.
absl::Status RunWorker(const WorkerOptions& options, const std::atomic<bool>& stop);

}  // namespace kvgate::worker
