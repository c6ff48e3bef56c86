// --quantize: a stage's matrix weights converted at load into q8_0 or q4_0 blocks
// (kernels/tensor.h, kernels/cpu/quant.h), which the CPU backends multiply with integer dot
// products. The embedding and the LM head keep their stored dtype unless --quantize-all; the
// norms and biases always do.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/tensor.h"
#include "model/weights/stage_weights.h"

namespace kvgate::model {

// "" or "none": none; "q8_0"; "q4_0". Errors name the flag and the choices; `all`
// (--quantize-all) needs a format.
absl::StatusOr<kernels::Quant> ParseQuant(std::string_view text, bool all = false);
std::string_view QuantName(kernels::Quant quant);

// Whether `backend` runs the CPU kernels, which have the quantized products (cpu, and guarded:
// the same kernels over guarded memory); FAILED_PRECONDITION naming --quantize and the backend
// otherwise (cuda, until it has kernels for them).
absl::Status CheckQuantizedBackend(kernels::Quant quant, const kernels::Backend& backend);

// Quantizes q, k, v, o, gate, up and down of every layer of `weights` in place (the blocks are
// owned by `weights`), and with `all` the embedding and the LM head too (tied: converted once,
// both views on the same blocks). A matrix whose columns are not a multiple of 32 stays as it
// is. How many matrices were converted.
absl::StatusOr<int> QuantizeStageWeights(kernels::Quant quant, bool all, StageWeights* weights);

}  // namespace kvgate::model
