#include "model/weights/quantize.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "kernels/cpu/quant.h"
#include "kernels/cpu/thread_pool.h"

namespace kvgate::model {

using kernels::Quant;
using kernels::WeightView;

absl::StatusOr<Quant> ParseQuant(std::string_view text, bool all) {
  if (text.empty() || text == "none") {
    if (all) return absl::InvalidArgumentError("--quantize-all needs --quantize q8_0 or q4_0");
    return Quant::kNone;
  }
  if (text == "q8_0") return Quant::kQ8_0;
  if (text == "q4_0") return Quant::kQ4_0;
  return absl::InvalidArgumentError(
      absl::StrCat("--quantize ", std::string(text), ": must be q8_0, q4_0 or none"));
}

std::string_view QuantName(Quant quant) {
  switch (quant) {
    case Quant::kQ8_0:
      return "q8_0";
    case Quant::kQ4_0:
      return "q4_0";
    case Quant::kNone:
      break;
  }
  return "none";
}

absl::Status CheckQuantizedBackend(Quant quant, const kernels::Backend& backend) {
  if (quant == Quant::kNone || backend.host_accessible() ||
      backend.device().type == kernels::Device::Type::kGuarded) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat("--quantize ", std::string(QuantName(quant)), ": the ", backend.name(),
                   " backend has no kernels for quantized weights yet (the cpu backend has)"));
}

namespace {

// `w` as `quant` blocks owned by `weights`; false when it stays as it is.
bool QuantizeMatrix(Quant quant, WeightView* w, StageWeights* weights) {
  if (w->empty() || w->quant != Quant::kNone || w->cols % kernels::kQuantBlock != 0) return false;
  WeightView out = *w;
  out.quant = quant;
  HostBlock& blocks = weights->owned.emplace_back(static_cast<size_t>(out.bytes()));
  const WeightView src = *w;
  kernels::cpu::ParallelFor(src.rows, kernels::cpu::Schedule::kStatic,
                            [&](int64_t begin, int64_t end) {
                              std::vector<float> row(static_cast<size_t>(src.cols));
                              for (int64_t r = begin; r < end; ++r) {
                                ConvertToF32(src.dtype, src.row(r), row.data(), row.size());
                                kernels::cpu::QuantizeRow(row.data(), src.cols, quant,
                                                          blocks.data() + r * out.row_bytes());
                              }
                            });
  out.data = blocks.data();
  *w = out;
  return true;
}

}  // namespace

absl::StatusOr<int> QuantizeStageWeights(Quant quant, bool all, StageWeights* weights) {
  if (quant == Quant::kNone) return 0;
  int converted = 0;
  for (LayerWeights& layer : weights->layers) {
    for (WeightView* w :
         {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down}) {
      converted += QuantizeMatrix(quant, w, weights);
    }
  }
  if (!all) return converted;
  const bool tied = !weights->embed.empty() && weights->embed.data == weights->lm_head.data;
  converted += QuantizeMatrix(quant, &weights->embed, weights);
  if (tied) {
    weights->lm_head = weights->embed;
  } else {
    converted += QuantizeMatrix(quant, &weights->lm_head, weights);
  }
  return converted;
}

}  // namespace kvgate::model
