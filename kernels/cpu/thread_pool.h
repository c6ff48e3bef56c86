// The CPU ops' threads: one persistent pool per process whose workers stay alive between ops.
// A loop is handed to the workers through shared memory (no thread creation, no fork/join of a
// runtime); idle workers spin briefly for the next op (a layer's ops follow each other within
// microseconds) and then sleep on a futex until woken.
//
// The calling thread takes part as thread 0. One loop runs at a time: a loop started while
// another runs (another thread's ops, or a loop nested in a loop's body) runs inline on its
// caller, serially, with the same results.
#pragma once

#include <cstdint>

#include "absl/functional/function_ref.h"

namespace kvgate::kernels::cpu {

enum class Schedule {
  kStatic,   // thread t runs one call over the t-th contiguous share of [0, n)
  kDynamic,  // threads take the next `chunk` indices from a shared counter until none is left
};

// Runs body(begin, end) over disjoint ranges covering [0, n) and returns when all have run.
// kDynamic hands out ranges of `chunk` indices (the last one shorter).
void ParallelFor(int64_t n, Schedule schedule,
                 absl::FunctionRef<void(int64_t begin, int64_t end)> body, int64_t chunk = 1);

// The pool's size, calling thread included (>= 1). The default: OMP_NUM_THREADS when set, else
// the CPUs this process may run on. Setting it waits for a running loop, then restarts the
// workers.
void SetPoolThreads(int n);
int PoolThreads();

}  // namespace kvgate::kernels::cpu
