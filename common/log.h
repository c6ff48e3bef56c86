// The servers' log (coordinator and workers), through spdlog: a line per event on stderr, as
// text ("2026-11-26T16:30:00.123Z info kvgate: pipeline ready: ...", fields as key=value) or
// JSON (--log-format json: {"ts", "level", "component", "msg", fields...} per line). API keys
// are never logged; prompt text only with --log-prompts.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace kvgate::log {

enum class Format { kText, kJson };
enum class Level { kDebug, kInfo, kWarn, kError };

struct Options {
  std::string component = "kvgate";  // "kvgate" (coordinator) or "kvgate worker"
  Format format = Format::kText;
  Level level = Level::kInfo;
  bool log_prompts = false;  // the per-request line may carry the prompt's text
};

// Parses --log-format / --log-level values (errors name the flag and the choices).
absl::Status ParseFormat(const std::string& text, Format* out);
absl::Status ParseLevel(const std::string& text, Level* out);

// Sets the process's log up; before any Init, lines go out as text with the default options.
void Init(const Options& options);
const Options& options();

// Structured fields: values are JSON (strings, numbers, booleans).
using Fields = std::vector<std::pair<std::string, nlohmann::json>>;

void Write(Level level, std::string_view message, const Fields& fields = {});
inline void Debug(std::string_view m, const Fields& f = {}) { Write(Level::kDebug, m, f); }
inline void Info(std::string_view m, const Fields& f = {}) { Write(Level::kInfo, m, f); }
inline void Warn(std::string_view m, const Fields& f = {}) { Write(Level::kWarn, m, f); }
inline void Error(std::string_view m, const Fields& f = {}) { Write(Level::kError, m, f); }

// The line as the sink receives it (tests).
std::string FormatLine(const Options& options, Level level, std::string_view message,
                       const Fields& fields, std::string_view timestamp);

}  // namespace kvgate::log
