// A Jinja template engine for the subset that Hugging Face chat templates use, rendering as
// transformers' apply_chat_template does (jinja2 with trim_blocks and lstrip_blocks, loop
// controls, raise_exception, strftime_now, and a tojson of json.dumps' format).
//
// Supported: {{ }}, {% %}, {# #} with '-' / '+' whitespace control; if / elif / else, for
// (with else, an if filter, loop.*, break, continue, tuple targets), set (names and
// namespace attributes), generation blocks; literals, lists, dicts, attribute and item access,
// slices, the arithmetic, comparison and logic operators, 'in', '~', conditional expressions;
// the filters, tests, global functions and methods listed in jinja_builtins.h. Anything else
// (macros, call blocks, includes, an unknown filter...) is refused by Parse, naming it.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "model/chat/py_format.h"

namespace kvgate::model::chat {

namespace jinja {
struct Node;
}

class JinjaTemplate {
 public:
  // Errors name the line and the construct ("line 3: unsupported statement 'macro'").
  static absl::StatusOr<JinjaTemplate> Parse(std::string_view source);

  // Renders with `context` (a JSON object) as the template's variables. Errors: what
  // raise_exception() said, or the line and the failed operation.
  absl::StatusOr<std::string> Render(const Json& context) const;

 private:
  std::shared_ptr<const std::vector<std::unique_ptr<jinja::Node>>> root_;
};

}  // namespace kvgate::model::chat
