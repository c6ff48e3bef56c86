// Learned eviction weights by name: what a server registers at start, what a request may name.
#include "coordinator/weights_registry.h"

#include <gtest/gtest.h>

#include <filesystem>

namespace kvgate::coordinator {
namespace {

const char kStories[] = "../shared/models/stories260K";
const char kLocret[] = "tests/testdata/eviction/stories260K-random-locret.safetensors";
const char kGates[] = "tests/testdata/eviction/stories260K-random-gates.safetensors";

class WeightsRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = model::ModelConfig::Load(kStories);
    ASSERT_TRUE(c.ok()) << c.status();
    config_ = *c;
  }
  model::ModelConfig config_;
};

TEST_F(WeightsRegistryTest, NamesPickRegisteredFilesOnly) {
  auto r = WeightsRegistry::Load(kStories, {kLocret, std::string("gates-v2=") + kGates}, config_);
  ASSERT_TRUE(r.ok()) << r.status();
  auto p = r->Resolve("locret", "");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, std::filesystem::absolute(kLocret).string());
  EXPECT_TRUE(r->Resolve("attention-gate", "gates-v2").ok());
  // No default gates; a name of the wrong policy; a path; an unknown name.
  for (const auto& [policy, name] :
       std::vector<std::pair<std::string, std::string>>{{"attention-gate", ""},
                                                        {"locret", "gates-v2"},
                                                        {"locret", "/etc/shadow"},
                                                        {"locret", "../locret"},
                                                        {"locret", std::string(100, 'x')},
                                                        {"locret", "nope"}}) {
    auto bad = r->Resolve(policy, name);
    ASSERT_FALSE(bad.ok()) << policy << " " << name;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(bad.status().message().rfind("kv.weights_name:", 0), 0u) << bad.status();
    EXPECT_EQ(bad.status().message().find("tests/testdata"), std::string::npos)
        << "an error never shows a server path";
    EXPECT_LT(bad.status().message().size(), 300u);
  }
}

TEST_F(WeightsRegistryTest, BadFilesAreRefusedAtStart) {
  // Not safetensors, another kind than its name says, a bad name, a missing file.
  EXPECT_FALSE(WeightsRegistry::Load(kStories, {"/etc/hostname"}, config_).ok());
  EXPECT_FALSE(WeightsRegistry::Load(kStories, {std::string("locret=") + kGates}, config_).ok());
  EXPECT_FALSE(WeightsRegistry::Load(kStories, {std::string("a/b=") + kLocret}, config_).ok());
  EXPECT_FALSE(WeightsRegistry::Load(kStories, {"/nonexistent.safetensors"}, config_).ok());
  // Weights made for another model.
  auto r = WeightsRegistry::Load(kStories, {"models/kvgate-default/locret.safetensors"}, config_);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("another model"), std::string::npos) << r.status();
}

TEST_F(WeightsRegistryTest, TheModelDirectorysOwnAreDefaults) {
  auto c = model::ModelConfig::Load("models/kvgate-default");
  ASSERT_TRUE(c.ok());
  auto r = WeightsRegistry::Load("models/kvgate-default", {}, *c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->Resolve("locret", "").ok());
  EXPECT_TRUE(r->Resolve("attention-gate", "").ok());
  EXPECT_TRUE(r->Resolve("locret", "locret").ok());
}

}  // namespace
}  // namespace kvgate::coordinator
