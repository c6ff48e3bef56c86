// The log line formats: JSON (one object a line, fields as keys, strings escaped, bad UTF-8
// replaced) and text (key=value with quoted strings), and the flag parsers.
#include "common/log.h"

#include <gtest/gtest.h>

#include "nlohmann/json.hpp"

namespace kvgate::log {
namespace {

TEST(Log, JsonLinesParseWithTheirFields) {
  Options o;
  o.format = Format::kJson;
  o.component = "kvgate worker";
  const std::string line =
      FormatLine(o, Level::kWarn, "a \"quoted\"\nmessage",
                 {{"request_id", "req-1"}, {"tokens", 12}, {"ok", true}, {"bad", "\xff\xfe"}},
                 "2026-11-26T00:00:00.000Z");
  EXPECT_EQ(line.find('\n'), std::string::npos);
  const nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j["msg"], "a \"quoted\"\nmessage");
  EXPECT_EQ(j["level"], "warn");
  EXPECT_EQ(j["component"], "kvgate worker");
  EXPECT_EQ(j["tokens"], 12);
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["request_id"], "req-1");
  EXPECT_TRUE(j["bad"].is_string());
}

TEST(Log, TextLinesKeepTheComponentPrefix) {
  Options o;
  const std::string line = FormatLine(o, Level::kInfo, "pipeline ready: w-1 [0, 2)",
                                      {{"n", 3}, {"s", "a b"}}, "2026-11-26T00:00:00.000Z");
  EXPECT_EQ(line, "2026-11-26T00:00:00.000Z info kvgate: pipeline ready: w-1 [0, 2) n=3 s=\"a b\"");
}

TEST(Log, FlagsAreParsedOrRefusedByName) {
  Format f;
  Level l;
  EXPECT_TRUE(ParseFormat("json", &f).ok());
  EXPECT_EQ(f, Format::kJson);
  EXPECT_FALSE(ParseFormat("yaml", &f).ok());
  EXPECT_TRUE(ParseLevel("warn", &l).ok());
  EXPECT_EQ(l, Level::kWarn);
  EXPECT_NE(ParseLevel("loud", &l).message().find("--log-level"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::log
