#include "model/config/model_config.h"

#include <cmath>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/json_util.h"
#include "common/status.h"

namespace kvgate::model {
namespace {

using nlohmann::json;

absl::Status FieldError(const std::string& path, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": field '", field, "' ", what));
}

// Reads an integer field. Missing and `required` -> error; missing otherwise -> `def`.
absl::StatusOr<int64_t> GetInt(const json& j, const std::string& path, const char* field,
                               bool required, int64_t def, int64_t min_value) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) {
    if (required) return FieldError(path, field, "is missing");
    return def;
  }
  if (!it->is_number_integer()) return FieldError(path, field, "must be an integer");
  const int64_t v = it->get<int64_t>();
  if (v < min_value) return FieldError(path, field, absl::StrCat("must be >= ", min_value));
  return v;
}

absl::StatusOr<double> GetDouble(const json& j, const std::string& path, const char* field,
                                 double def) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number()) return FieldError(path, field, "must be a number");
  const double v = it->get<double>();
  if (!std::isfinite(v)) return FieldError(path, field, "must be finite");
  return v;
}

absl::StatusOr<bool> GetBool(const json& j, const std::string& path, const char* field, bool def) {
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_boolean()) return FieldError(path, field, "must be true or false");
  return it->get<bool>();
}

absl::StatusOr<std::vector<double>> GetDoubleList(const json& j, const std::string& path,
                                                  const char* field) {
  auto it = j.find(field);
  if (it == j.end() || !it->is_array()) return FieldError(path, field, "must be a list of numbers");
  std::vector<double> out;
  for (const auto& v : *it) {
    if (!v.is_number()) return FieldError(path, field, "must be a list of numbers");
    out.push_back(v.get<double>());
  }
  return out;
}

absl::Status ParseRopeScaling(const json& j, const std::string& path, ModelConfig& c) {
  auto it = j.find("rope_scaling");
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_object()) return FieldError(path, "rope_scaling", "must be an object or null");
  const json& rs = *it;
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto t = rs.find(key);
    if (t != rs.end() && t->is_string()) {
      type = t->get<std::string>();
      break;
    }
  }
  RopeScaling& r = c.rope_scaling;
  ASSIGN_OR_RETURN(r.factor, GetDouble(rs, path, "factor", 1.0));
  if (type == "default" || type.empty()) {
    r.type = RopeType::kDefault;
  } else if (type == "linear") {
    r.type = RopeType::kLinear;
    if (r.factor <= 0) return FieldError(path, "rope_scaling.factor", "must be > 0");
  } else if (type == "llama3") {
    r.type = RopeType::kLlama3;
    ASSIGN_OR_RETURN(r.low_freq_factor, GetDouble(rs, path, "low_freq_factor", 1.0));
    ASSIGN_OR_RETURN(r.high_freq_factor, GetDouble(rs, path, "high_freq_factor", 4.0));
    ASSIGN_OR_RETURN(r.original_max_position_embeddings,
                     GetInt(rs, path, "original_max_position_embeddings", true, 0, 1));
    if (r.factor <= 0) return FieldError(path, "rope_scaling.factor", "must be > 0");
    if (r.high_freq_factor <= r.low_freq_factor) {
      return FieldError(path, "rope_scaling.high_freq_factor", "must exceed low_freq_factor");
    }
  } else if (type == "longrope" || type == "su") {
    r.type = RopeType::kLongRope;
    ASSIGN_OR_RETURN(r.short_factor, GetDoubleList(rs, path, "short_factor"));
    ASSIGN_OR_RETURN(r.long_factor, GetDoubleList(rs, path, "long_factor"));
    // original_max_position_embeddings lives at the top level for Phi-3, in rope_scaling for
    // some later configs.
    // As Hugging Face's Phi3Config: the top-level value wins over one inside rope_scaling.
    ASSIGN_OR_RETURN(int64_t orig_inner,
                     GetInt(rs, path, "original_max_position_embeddings", false, 0, 1));
    ASSIGN_OR_RETURN(r.original_max_position_embeddings,
                     GetInt(j, path, "original_max_position_embeddings", false, orig_inner, 1));
    if (r.original_max_position_embeddings == 0) {
      return FieldError(path, "original_max_position_embeddings",
                        "is missing (needed by longrope)");
    }
    const size_t half = static_cast<size_t>(c.rotary_dim / 2);
    if (r.short_factor.size() != half) {
      return FieldError(path, "rope_scaling.short_factor",
                        absl::StrCat("must have ", half, " entries (rotary_dim / 2), has ",
                                     r.short_factor.size()));
    }
    if (r.long_factor.size() != half) {
      return FieldError(path, "rope_scaling.long_factor",
                        absl::StrCat("must have ", half, " entries (rotary_dim / 2), has ",
                                     r.long_factor.size()));
    }
    const double scale = rs.contains("factor") && rs["factor"].is_number()
                             ? r.factor
                             : static_cast<double>(c.max_position_embeddings) /
                                   static_cast<double>(r.original_max_position_embeddings);
    auto af = rs.find("attention_factor");
    if (af != rs.end() && af->is_number()) {
      r.attention_factor = af->get<double>();
    } else if (scale <= 1.0) {
      r.attention_factor = 1.0;
    } else {
      r.attention_factor =
          std::sqrt(1.0 + std::log(scale) /
                              std::log(static_cast<double>(r.original_max_position_embeddings)));
    }
  } else {
    return FieldError(path, "rope_scaling.rope_type",
                      absl::StrCat("'", type,
                                   "' is not supported (supported: default, linear, "
                                   "llama3, longrope, su)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> GetTokenIds(const json& j, const std::string& path,
                                                 const char* field) {
  std::vector<int32_t> ids;
  auto it = j.find(field);
  if (it == j.end() || it->is_null()) return ids;
  if (it->is_number_integer()) {
    ids.push_back(it->get<int32_t>());
  } else if (it->is_array()) {
    for (const auto& v : *it) {
      if (!v.is_number_integer()) return FieldError(path, field, "must be an integer or a list");
      ids.push_back(v.get<int32_t>());
    }
  } else {
    return FieldError(path, field, "must be an integer or a list of integers");
  }
  return ids;
}

}  // namespace

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const json& j, const std::string& path) {
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  ModelConfig c;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->empty() || !(*arch)[0].is_string()) {
    return FieldError(path, "architectures", "is missing or not a list of names");
  }
  c.architecture_name = (*arch)[0].get<std::string>();
  if (c.architecture_name == "LlamaForCausalLM") {
    c.architecture = Architecture::kLlama;
  } else if (c.architecture_name == "MistralForCausalLM") {
    c.architecture = Architecture::kMistral;
  } else if (c.architecture_name == "Qwen2ForCausalLM") {
    c.architecture = Architecture::kQwen2;
  } else if (c.architecture_name == "Phi3ForCausalLM") {
    c.architecture = Architecture::kPhi3;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        path, ": architecture '", c.architecture_name,
        "' is not supported (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "Phi3ForCausalLM)"));
  }
  ASSIGN_OR_RETURN(c.hidden_size, GetInt(j, path, "hidden_size", true, 0, 1));
  ASSIGN_OR_RETURN(c.intermediate_size, GetInt(j, path, "intermediate_size", true, 0, 1));
  ASSIGN_OR_RETURN(c.num_layers, GetInt(j, path, "num_hidden_layers", true, 0, 1));
  ASSIGN_OR_RETURN(c.num_heads, GetInt(j, path, "num_attention_heads", true, 0, 1));
  ASSIGN_OR_RETURN(c.num_kv_heads, GetInt(j, path, "num_key_value_heads", false, c.num_heads, 1));
  if (c.num_heads % c.num_kv_heads != 0) {
    return FieldError(
        path, "num_key_value_heads",
        absl::StrCat("(", c.num_kv_heads, ") must divide num_attention_heads (", c.num_heads, ")"));
  }
  const int64_t default_head_dim = c.hidden_size / c.num_heads;
  ASSIGN_OR_RETURN(c.head_dim, GetInt(j, path, "head_dim", false, default_head_dim, 1));
  if (c.head_dim % 2 != 0) return FieldError(path, "head_dim", "must be even");
  ASSIGN_OR_RETURN(double partial, GetDouble(j, path, "partial_rotary_factor", 1.0));
  if (partial <= 0 || partial > 1) {
    return FieldError(path, "partial_rotary_factor", "must be in (0, 1]");
  }
  c.rotary_dim = static_cast<int64_t>(static_cast<double>(c.head_dim) * partial);
  c.rotary_dim -= c.rotary_dim % 2;
  ASSIGN_OR_RETURN(c.vocab_size, GetInt(j, path, "vocab_size", true, 0, 1));
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   GetInt(j, path, "max_position_embeddings", false, 2048, 1));
  // Positions travel and index as int32 (the step plans, RoPE, the caches' token counts).
  if (c.max_position_embeddings > kMaxPositions) {
    return FieldError(path, "max_position_embeddings",
                      absl::StrCat("(", c.max_position_embeddings,
                                   ") is beyond the positions this engine can index (at most ",
                                   kMaxPositions, ")"));
  }
  ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(j, path, "rms_norm_eps", 1e-6));
  if (c.rms_norm_eps <= 0) return FieldError(path, "rms_norm_eps", "must be > 0");
  ASSIGN_OR_RETURN(c.rope_theta, GetDouble(j, path, "rope_theta", 10000.0));
  if (c.rope_theta <= 0) return FieldError(path, "rope_theta", "must be > 0");
  ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(j, path, "tie_word_embeddings", false));
  ASSIGN_OR_RETURN(c.attention_bias, GetBool(j, path, "attention_bias", false));
  ASSIGN_OR_RETURN(bool mlp_bias, GetBool(j, path, "mlp_bias", false));
  if (mlp_bias) return FieldError(path, "mlp_bias", "true is not supported");
  if (c.architecture == Architecture::kQwen2) c.attention_bias = true;
  c.fused_qkv = c.architecture == Architecture::kPhi3;
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null()) {
    if (!act->is_string()) return FieldError(path, "hidden_act", "must be a string");
    const std::string a = act->get<std::string>();
    if (a != "silu" && a != "swish") {
      return FieldError(path, "hidden_act", absl::StrCat("'", a, "' is not supported (silu)"));
    }
  }
  // Mistral/Qwen2 sliding windows. Qwen2 applies it only with use_sliding_window.
  ASSIGN_OR_RETURN(c.sliding_window, GetInt(j, path, "sliding_window", false, 0, 0));
  if (c.architecture == Architecture::kQwen2) {
    ASSIGN_OR_RETURN(bool use_sw, GetBool(j, path, "use_sliding_window", false));
    if (!use_sw) c.sliding_window = 0;
  }
  if (c.architecture == Architecture::kLlama) c.sliding_window = 0;
  RETURN_IF_ERROR(ParseRopeScaling(j, path, c));
  ASSIGN_OR_RETURN(std::vector<int32_t> bos, GetTokenIds(j, path, "bos_token_id"));
  if (!bos.empty()) c.bos_token_id = bos[0];
  ASSIGN_OR_RETURN(c.eos_token_ids, GetTokenIds(j, path, "eos_token_id"));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::Load(const std::string& model_dir) {
  const std::string path = absl::StrCat(model_dir, "/config.json");
  ASSIGN_OR_RETURN(json j, ReadJsonFile(path));
  return FromJson(j, path);
}

namespace {
struct NamedShape {
  const char* name;
  const char* json;
};
// Shapes copied from the public config.json files of these models (and one of our own).
constexpr NamedShape kShapes[] = {
    {"llama-3.2-1b",
     R"({"architectures":["LlamaForCausalLM"],"hidden_size":2048,"intermediate_size":8192,
         "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
         "vocab_size":128256,"max_position_embeddings":131072,"rms_norm_eps":1e-5,
         "rope_theta":500000.0,"tie_word_embeddings":true,"bos_token_id":128000,
         "eos_token_id":128001,"rope_scaling":{"rope_type":"llama3","factor":32.0,
         "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})"},
    {"llama-3.1-8b",
     R"({"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
         "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
         "vocab_size":128256,"max_position_embeddings":131072,"rms_norm_eps":1e-5,
         "rope_theta":500000.0,"tie_word_embeddings":false,"bos_token_id":128000,
         "eos_token_id":128001,"rope_scaling":{"rope_type":"llama3","factor":8.0,
         "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})"},
    {"llama-2-7b",
     R"({"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":11008,
         "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,
         "vocab_size":32000,"max_position_embeddings":4096,"rms_norm_eps":1e-5,
         "bos_token_id":1,"eos_token_id":2})"},
    {"mistral-7b",
     R"({"architectures":["MistralForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
         "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
         "vocab_size":32768,"max_position_embeddings":32768,"rms_norm_eps":1e-5,
         "rope_theta":1000000.0,"bos_token_id":1,"eos_token_id":2})"},
    {"qwen2-0.5b",
     R"({"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,
         "num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,
         "vocab_size":151936,"max_position_embeddings":32768,"rms_norm_eps":1e-6,
         "rope_theta":1000000.0,"tie_word_embeddings":true,"bos_token_id":151643,
         "eos_token_id":151643})"},
    // Not a public model: a small long-context Llama shape (128K positions, GQA 2:1) for
    // benchmarks whose prompts must reach 64K tokens on a CPU.
    {"tiny-long",
     R"({"architectures":["LlamaForCausalLM"],"hidden_size":256,"intermediate_size":704,
         "num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":64,
         "vocab_size":4096,"max_position_embeddings":131072,"rms_norm_eps":1e-5,
         "rope_theta":500000.0,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2})"},
    {"phi-3-mini",
     R"({"architectures":["Phi3ForCausalLM"],"hidden_size":3072,"intermediate_size":8192,
         "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,
         "vocab_size":32064,"max_position_embeddings":4096,"rms_norm_eps":1e-5,
         "bos_token_id":1,"eos_token_id":32000})"},
};
}  // namespace

absl::StatusOr<ModelConfig> SyntheticConfig(const std::string& name) {
  for (const auto& s : kShapes) {
    if (name == s.name)
      return ModelConfig::FromJson(json::parse(s.json), absl::StrCat("<", name, ">"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown synthetic shape '", name, "' (known: ",
                                                 absl::StrJoin(SyntheticConfigNames(), ", "), ")"));
}

std::vector<std::string> SyntheticConfigNames() {
  std::vector<std::string> names;
  for (const auto& s : kShapes) names.push_back(s.name);
  return names;
}

}  // namespace kvgate::model
