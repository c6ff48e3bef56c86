#include "common/log.h"

#include <chrono>
#include <ctime>
#include <memory>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "spdlog/sinks/stdout_sinks.h"
#include "spdlog/spdlog.h"

namespace kvgate::log {
namespace {

struct State {
  Options options;
  std::shared_ptr<spdlog::logger> logger;
};

State& GetState() {
  static State* state = [] {
    auto* s = new State();
    // stderr, unbuffered lines; the formatting is ours (the pattern prints the line as given).
    s->logger = std::make_shared<spdlog::logger>("kvgate",
                                                 std::make_shared<spdlog::sinks::stderr_sink_mt>());
    s->logger->set_pattern("%v");
    s->logger->set_level(spdlog::level::trace);
    s->logger->flush_on(spdlog::level::trace);
    return s;
  }();
  return *state;
}

std::mutex& OptionsMutex() {
  static std::mutex mu;
  return mu;
}

const char* LevelName(Level level) {
  switch (level) {
    case Level::kDebug:
      return "debug";
    case Level::kInfo:
      return "info";
    case Level::kWarn:
      return "warn";
    case Level::kError:
      return "error";
  }
  return "info";
}

spdlog::level::level_enum ToSpd(Level level) {
  switch (level) {
    case Level::kDebug:
      return spdlog::level::debug;
    case Level::kInfo:
      return spdlog::level::info;
    case Level::kWarn:
      return spdlog::level::warn;
    case Level::kError:
      return spdlog::level::err;
  }
  return spdlog::level::info;
}

std::string Now() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm utc{};
  gmtime_r(&t, &utc);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &utc);
  return absl::StrFormat("%s.%03dZ", buf, static_cast<int>(ms));
}

}  // namespace

absl::Status ParseFormat(const std::string& text, Format* out) {
  if (text == "text") {
    *out = Format::kText;
  } else if (text == "json") {
    *out = Format::kJson;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--log-format ", text, ": must be text or json"));
  }
  return absl::OkStatus();
}

absl::Status ParseLevel(const std::string& text, Level* out) {
  if (text == "debug") {
    *out = Level::kDebug;
  } else if (text == "info") {
    *out = Level::kInfo;
  } else if (text == "warn" || text == "warning") {
    *out = Level::kWarn;
  } else if (text == "error") {
    *out = Level::kError;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--log-level ", text, ": must be debug, info, warn or error"));
  }
  return absl::OkStatus();
}

void Init(const Options& options) {
  std::lock_guard<std::mutex> lock(OptionsMutex());
  GetState().options = options;
}

const Options& options() { return GetState().options; }

std::string FormatLine(const Options& o, Level level, std::string_view message,
                       const Fields& fields, std::string_view timestamp) {
  if (o.format == Format::kJson) {
    nlohmann::json line = {{"ts", timestamp},
                           {"level", LevelName(level)},
                           {"component", o.component},
                           {"msg", message}};
    for (const auto& [key, value] : fields) line[key] = value;
    // Invalid UTF-8 (a prompt cut mid-character) is replaced, never thrown on.
    return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  std::string out = absl::StrCat(std::string(timestamp), " ", LevelName(level), " ", o.component,
                                 ": ", std::string(message));
  for (const auto& [key, value] : fields) {
    absl::StrAppend(
        &out, " ", key, "=",
        value.is_string()
            ? nlohmann::json(value).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)
            : value.dump());
  }
  return out;
}

void Write(Level level, std::string_view message, const Fields& fields) {
  State& s = GetState();
  Options o;
  {
    std::lock_guard<std::mutex> lock(OptionsMutex());
    o = s.options;
  }
  if (level < o.level) return;
  s.logger->log(ToSpd(level), "{}", FormatLine(o, level, message, fields, Now()));
}

}  // namespace kvgate::log
