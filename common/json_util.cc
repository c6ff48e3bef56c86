#include "common/json_util.h"

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status.h"

namespace kvgate {

absl::StatusOr<nlohmann::json> ParseJson(std::string_view text, const std::string& what) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(what, ": invalid JSON"));
  return j;
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return ParseJson(text, path);
}

}  // namespace kvgate
