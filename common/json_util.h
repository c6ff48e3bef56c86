// Parsing JSON files into nlohmann::json without exceptions escaping.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace kvgate {

// Reads and parses a JSON file; errors name the file.
absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path);
// Parses JSON text; `what` names the source in errors.
absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, const std::string& what);

}  // namespace kvgate
