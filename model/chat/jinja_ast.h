// The syntax tree of a parsed Jinja template (internal to model/chat): expressions and
// statements of the subset that chat templates use.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/chat/py_format.h"

namespace kvgate::model::chat::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,     // literal
    kName,        // name
    kList,        // args: the items
    kDict,        // args: key, value, key, value, ...
    kAttr,        // args[0].name
    kItem,        // args[0][args[1]]
    kSlice,       // args[0][args[1]:args[2]:args[3]] (null: absent)
    kCall,        // name(args, kwargs): a global function
    kMethodCall,  // args[0].name(args[1:], kwargs)
    kFilter,      // args[0] | name(args[1:], kwargs)
    kTest,        // args[0] is [not] name(args[1:])
    kUnary,       // name ("-", "+") args[0]
    kBinary,      // args[0] name args[1]: + - * / // % ** ~ == != < > <= >= in "not in"
    kAnd,
    kOr,
    kNot,
    kCond,  // args[0] if args[1] else args[2] (null: undefined)
  };
  Kind kind;
  int line = 0;
  Json literal;
  std::string name;
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    kText,    // text
    kOutput,  // {{ expr }}
    kIf,      // branches, else_body
    kFor,     // {% for targets in expr [if cond] %} body {% else %} else_body
    kSet,     // {% set target[.attr] = expr %}
    kBreak,
    kContinue,
    kBlock,  // body as it is ({% generation %})
  };
  Kind kind;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr cond;
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
  std::vector<std::string> targets;
  std::string attr;
};

}  // namespace kvgate::model::chat::jinja
