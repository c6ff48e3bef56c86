// The names a chat template may use (internal to model/chat): the parser refuses any other
// filter, test, global function or method, so an unsupported template fails at startup.
#pragma once

#include <string_view>

namespace kvgate::model::chat::jinja {

inline constexpr std::string_view kFilters[] = {
    "abs",      "capitalize", "count",   "d",       "default", "first",  "float",  "indent",
    "int",      "items",      "join",    "last",    "length",  "list",   "lower",  "map",
    "reject",   "rejectattr", "replace", "reverse", "round",   "safe",   "select", "selectattr",
    "sort",     "string",     "title",   "tojson",  "trim",    "unique", "upper",  "wordcount",
    "dictsort", "max",        "min",     "sum"};
inline constexpr std::string_view kTests[] = {
    "boolean",  "callable", "defined", "divisibleby", "eq",      "equalto", "escaped",
    "even",     "false",    "float",   "ge",          "gt",      "in",      "integer",
    "iterable", "le",       "lower",   "lt",          "mapping", "ne",      "none",
    "number",   "odd",      "sameas",  "sequence",    "string",  "true",    "undefined",
    "upper",    "==",       "!=",      ">",           "<",       ">=",      "<="};
inline constexpr std::string_view kFunctions[] = {"raise_exception", "namespace", "range",
                                                  "strftime_now", "dict"};
inline constexpr std::string_view kMethods[] = {
    "strip",  "lstrip",  "rstrip", "split",      "startswith", "endswith", "lower",
    "upper",  "replace", "title",  "capitalize", "find",       "items",    "keys",
    "values", "get",     "count",  "index",      "join"};

template <size_t N>
bool Known(const std::string_view (&names)[N], std::string_view name) {
  for (std::string_view n : names) {
    if (n == name) return true;
  }
  return false;
}

}  // namespace kvgate::model::chat::jinja
