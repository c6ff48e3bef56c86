// Python's text forms of JSON-like values, as a Jinja template rendered by Python prints them:
// str() (None, True, 1.5, ['a', 1]), repr() of strings, and json.dumps() with the options of
// Hugging Face's `tojson` filter (ensure_ascii=False, indent, separators, sort_keys).
#pragma once

#include <optional>
#include <string>

#include "nlohmann/json.hpp"

namespace kvgate::model::chat {

using Json = nlohmann::ordered_json;

// Python's repr(float): the shortest digits that read back the same double, "1.0", "1e-05",
// "1e+16", "inf", "nan".
std::string PyFloatRepr(double value);
// Python's repr(str): single quotes unless the text has ' and no ".
std::string PyStringRepr(const std::string& text);
// Python's str(value): strings as they are, containers as their repr.
std::string PyStr(const Json& value);
// Python's repr(value).
std::string PyRepr(const Json& value);

struct JsonDumpOptions {
  std::optional<int> indent;   // json.dumps(indent=...): newlines and this many spaces a level
  std::string item_separator;  // empty: ", " without indent, "," with it (Python's defaults)
  std::string key_separator;   // empty: ": "
  bool sort_keys = false;
  bool ensure_ascii = false;
};
// Python's json.dumps(value, ...).
std::string PyJsonDumps(const Json& value, const JsonDumpOptions& options);

}  // namespace kvgate::model::chat
