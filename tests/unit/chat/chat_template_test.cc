// The chat template interpreter against transformers: every case of
// tests/fixtures/chat_templates/expected.json (four real models' templates and the default
// model's, several conversations each, with and without the generation prompt; small feature
// templates) rendered here must equal what transformers rendered, byte for byte; what the
// template refuses must be refused with the same message; unsupported constructs fail to parse
// with the construct named.
#include "model/chat/chat_template.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "model/chat/jinja.h"
#include "model/chat/py_format.h"

namespace kvgate::model::chat {
namespace {

Json Fixtures() {
  std::ifstream in("tests/fixtures/chat_templates/expected.json");
  std::stringstream text;
  text << in.rdbuf();
  return Json::parse(text.str(), nullptr, false);
}

TEST(ChatTemplate, RealTemplatesMatchTransformers) {
  const Json f = Fixtures();
  ASSERT_FALSE(f.is_discarded()) << "tests/fixtures/chat_templates/expected.json is missing";
  ASSERT_GE(f["cases"].size(), 50u);
  int refused = 0;
  for (const Json& c : f["cases"]) {
    const std::string name = c["template"];
    SCOPED_TRACE(name + ": " + c["conversation"].get<std::string>() +
                 (c["add_generation_prompt"].get<bool>() ? " (generation prompt)" : ""));
    const Json& t = f["templates"][name];
    auto tmpl = ChatTemplate::Create(t["source"].get<std::string>(), c.value("bos_token", ""),
                                     c.value("eos_token", ""));
    ASSERT_TRUE(tmpl.ok()) << tmpl.status();
    auto got = tmpl->Apply(c["messages"], c["add_generation_prompt"].get<bool>());
    if (c.contains("error")) {
      ++refused;
      ASSERT_FALSE(got.ok()) << "rendered what transformers refused: " << *got;
      EXPECT_NE(got.status().message().find(c["error"].get<std::string>()), std::string::npos)
          << got.status();
    } else {
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, c["expected"].get<std::string>());
    }
  }
  EXPECT_GT(refused, 0);
}

TEST(ChatTemplate, FeaturesMatchJinja2) {
  const Json f = Fixtures();
  ASSERT_FALSE(f.is_discarded());
  Json context = f["feature_context"];
  context["tools"] = nullptr;
  context["documents"] = nullptr;
  context["add_generation_prompt"] = false;
  for (const Json& feature : f["features"]) {
    const std::string source = feature["source"];
    SCOPED_TRACE(source);
    auto t = JinjaTemplate::Parse(source);
    ASSERT_TRUE(t.ok()) << t.status();
    auto got = t->Render(context);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, feature["expected"].get<std::string>());
  }
}

TEST(ChatTemplate, UnsupportedConstructsAreRefusedByName) {
  const Json f = Fixtures();
  ASSERT_FALSE(f.is_discarded());
  const std::vector<std::string> named = {
      "macro", "nosuchfilter", "include", "nosuchtest", "nosuchfunction", "if", "nosuchmethod"};
  ASSERT_EQ(f["refused"].size(), named.size());
  for (size_t i = 0; i < named.size(); ++i) {
    const std::string source = f["refused"][i];
    auto t = JinjaTemplate::Parse(source);
    ASSERT_FALSE(t.ok()) << source;
    EXPECT_NE(t.status().message().find(named[i]), std::string::npos) << t.status();
    EXPECT_NE(t.status().message().find("line 1"), std::string::npos) << t.status();
  }
}

TEST(ChatTemplate, LoadsTheDefaultModelsTemplate) {
  auto t = ChatTemplate::Load("models/kvgate-default");
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE(t->has_value()) << "models/kvgate-default/tokenizer_config.json has no chat_template";
  auto text = (*t)->Apply(std::vector<ChatMessage>{{"system", "Be brief."}, {"user", "Hi"}}, true);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "Be brief.\n\nUser: Hi\nAssistant:");
  auto bad = (*t)->Apply(std::vector<ChatMessage>{{"tool", "x"}}, true);
  EXPECT_FALSE(bad.ok());
}

TEST(PyFormat, FloatsAsPythonPrintsThem) {
  EXPECT_EQ(PyFloatRepr(0.1), "0.1");
  EXPECT_EQ(PyFloatRepr(1.0), "1.0");
  EXPECT_EQ(PyFloatRepr(1e16), "1e+16");
  EXPECT_EQ(PyFloatRepr(123456789012345.6), "123456789012345.6");
  EXPECT_EQ(PyFloatRepr(1e-5), "1e-05");
  EXPECT_EQ(PyFloatRepr(-2.5e-300), "-2.5e-300");
  EXPECT_EQ(PyFloatRepr(1.0 / 3), "0.3333333333333333");
}

}  // namespace
}  // namespace kvgate::model::chat
