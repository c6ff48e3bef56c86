// JinjaTemplate::Render: evaluates the tree with Python's semantics where a template can see
// them (truthiness, ==, str(), slicing, negative indices), jinja2's undefined (prints as
// nothing, false, an error when used further) and scoping (a for loop's sets stay inside it;
// namespace() objects carry values out).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <memory>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "model/chat/jinja.h"
#include "model/chat/jinja_ast.h"

namespace kvgate::model::chat {
namespace jinja {
namespace {

// A value: undefined, a JSON value (shared, never copied on reads), or a namespace object.
struct Value {
  enum class Kind { kUndefined, kData, kNamespace } kind = Kind::kUndefined;
  std::shared_ptr<const Json> data;
  std::shared_ptr<Json> ns;  // a namespace's attributes (an object), shared by all copies
  std::string hint;          // what was undefined ("'foo' is undefined")

  static Value Undefined(std::string hint) {
    Value v;
    v.hint = std::move(hint);
    return v;
  }
  static Value Of(Json j) {
    Value v;
    v.kind = Kind::kData;
    v.data = std::make_shared<const Json>(std::move(j));
    return v;
  }
  bool undefined() const { return kind == Kind::kUndefined; }
  bool is_data() const { return kind == Kind::kData; }
  const Json& j() const { return *data; }
};

absl::Status Error(int line, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

std::string TypeName(const Value& v) {
  if (v.undefined()) return "undefined";
  if (v.kind == Value::Kind::kNamespace) return "namespace";
  switch (v.j().type()) {
    case Json::value_t::null:
      return "none";
    case Json::value_t::boolean:
      return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "int";
    case Json::value_t::number_float:
      return "float";
    case Json::value_t::string:
      return "string";
    case Json::value_t::array:
      return "list";
    case Json::value_t::object:
      return "dict";
    default:
      return "value";
  }
}

bool Truthy(const Value& v) {
  if (v.undefined()) return false;
  if (v.kind == Value::Kind::kNamespace) return true;
  const Json& j = v.j();
  switch (j.type()) {
    case Json::value_t::null:
      return false;
    case Json::value_t::boolean:
      return j.get<bool>();
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return j.get<int64_t>() != 0;
    case Json::value_t::number_float:
      return j.get<double>() != 0;
    case Json::value_t::string:
      return !j.get_ref<const std::string&>().empty();
    case Json::value_t::array:
    case Json::value_t::object:
      return !j.empty();
    default:
      return false;
  }
}

bool IsInt(const Json& j) { return j.is_number_integer(); }

// Python's == (1 == 1.0, True == 1, containers element-wise).
bool PyEqual(const Json& a, const Json& b) {
  if (a.is_number() || a.is_boolean()) {
    if (!(b.is_number() || b.is_boolean())) return false;
    auto num = [](const Json& x) {
      return x.is_boolean() ? (x.get<bool>() ? 1.0 : 0.0) : x.get<double>();
    };
    if ((IsInt(a) || a.is_boolean()) && (IsInt(b) || b.is_boolean())) {
      auto i = [](const Json& x) {
        return x.is_boolean() ? static_cast<int64_t>(x.get<bool>()) : x.get<int64_t>();
      };
      return i(a) == i(b);
    }
    return num(a) == num(b);
  }
  if (a.type() != b.type()) return false;
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!PyEqual(a[i], b[i])) return false;
    }
    return true;
  }
  if (a.is_object()) {
    if (a.size() != b.size()) return false;
    for (auto it = a.begin(); it != a.end(); ++it) {
      auto other = b.find(it.key());
      if (other == b.end() || !PyEqual(it.value(), *other)) return false;
    }
    return true;
  }
  return a == b;
}

bool Equal(const Value& a, const Value& b) {
  if (a.undefined() || b.undefined()) return a.undefined() && b.undefined();
  if (a.kind == Value::Kind::kNamespace || b.kind == Value::Kind::kNamespace) {
    return a.ns == b.ns;
  }
  return PyEqual(a.j(), b.j());
}

// Python's < on numbers, strings, lists.
absl::StatusOr<int> Compare(const Json& a, const Json& b, int line) {
  if ((a.is_number() || a.is_boolean()) && (b.is_number() || b.is_boolean())) {
    auto num = [](const Json& x) {
      return x.is_boolean() ? (x.get<bool>() ? 1.0 : 0.0) : x.get<double>();
    };
    const double x = num(a), y = num(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    const int c = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_array() && b.is_array()) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      ASSIGN_OR_RETURN(int c, Compare(a[i], b[i], line));
      if (c != 0) return c;
    }
    return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
  }
  return Error(line, "values of these types cannot be ordered");
}

std::string Str(const Value& v) {
  if (v.undefined()) return "";
  if (v.kind == Value::Kind::kNamespace) return "<Namespace>";
  return PyStr(v.j());
}

// Python's len() of a UTF-8 string: code points.
int64_t CodePoints(const std::string& s) {
  int64_t n = 0;
  for (const char c : s) n += (static_cast<unsigned char>(c) & 0xc0) != 0x80;
  return n;
}

// The code points of a UTF-8 string, each as its bytes.
std::vector<std::string> Chars(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    size_t j = i + 1;
    while (j < s.size() && (static_cast<unsigned char>(s[j]) & 0xc0) == 0x80) ++j;
    out.push_back(s.substr(i, j - i));
    i = j;
  }
  return out;
}

// The items iteration gives: a list's items, a dict's keys, a string's characters.
absl::StatusOr<std::vector<Json>> Items(const Value& v, int line) {
  if (v.undefined()) return std::vector<Json>{};  // jinja2: iterating undefined gives nothing
  if (v.kind == Value::Kind::kNamespace) return Error(line, "a namespace is not iterable");
  const Json& j = v.j();
  std::vector<Json> out;
  if (j.is_array()) {
    out.assign(j.begin(), j.end());
  } else if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) out.emplace_back(it.key());
  } else if (j.is_string()) {
    for (std::string& c : Chars(j.get<std::string>())) out.emplace_back(std::move(c));
  } else {
    return Error(line, absl::StrCat("a value of type ", TypeName(v), " is not iterable"));
  }
  return out;
}

struct LoopControl {
  bool break_ = false;
  bool continue_ = false;
};

class Renderer {
 public:
  explicit Renderer(const Json& context) {
    scopes_.emplace_back();
    for (auto it = context.begin(); it != context.end(); ++it) {
      scopes_.back()[it.key()] = Value::Of(it.value());
    }
  }

  absl::Status RenderBody(const Body& body, std::string* out, LoopControl* control) {
    for (const NodePtr& n : body) {
      if (control != nullptr && (control->break_ || control->continue_)) return absl::OkStatus();
      RETURN_IF_ERROR(RenderNode(*n, out, control));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status RenderNode(const Node& n, std::string* out, LoopControl* control) {
    switch (n.kind) {
      case Node::Kind::kText:
        out->append(n.text);
        return absl::OkStatus();
      case Node::Kind::kOutput: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        out->append(Str(v));
        return absl::OkStatus();
      }
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches) {
          ASSIGN_OR_RETURN(Value c, Eval(*cond));
          if (Truthy(c)) return RenderBody(body, out, control);
        }
        return RenderBody(n.else_body, out, control);
      case Node::Kind::kFor:
        return RenderFor(n, out);
      case Node::Kind::kSet: {
        ASSIGN_OR_RETURN(Value v, Eval(*n.expr));
        if (!n.attr.empty()) {
          Value target = Lookup(n.targets[0]);
          if (target.kind != Value::Kind::kNamespace) {
            return Error(n.line, absl::StrCat("cannot set an attribute of '", n.targets[0],
                                              "': only namespace() objects take attributes"));
          }
          if (v.kind == Value::Kind::kNamespace) {
            return Error(n.line, "a namespace cannot hold another namespace");
          }
          (*target.ns)[n.attr] = v.undefined() ? Json(nullptr) : v.j();
          return absl::OkStatus();
        }
        if (n.targets.size() == 1) {
          scopes_.back()[n.targets[0]] = v;
          return absl::OkStatus();
        }
        ASSIGN_OR_RETURN(std::vector<Json> items, Items(v, n.line));
        if (items.size() != n.targets.size()) {
          return Error(n.line, absl::StrCat("cannot unpack ", items.size(), " values into ",
                                            n.targets.size(), " names"));
        }
        for (size_t i = 0; i < items.size(); ++i) {
          scopes_.back()[n.targets[i]] = Value::Of(items[i]);
        }
        return absl::OkStatus();
      }
      case Node::Kind::kBreak:
        control->break_ = true;
        return absl::OkStatus();
      case Node::Kind::kContinue:
        control->continue_ = true;
        return absl::OkStatus();
      case Node::Kind::kBlock:
        return RenderBody(n.body, out, control);
    }
    return absl::OkStatus();
  }

  absl::Status RenderFor(const Node& n, std::string* out) {
    ASSIGN_OR_RETURN(Value iterable, Eval(*n.expr));
    ASSIGN_OR_RETURN(std::vector<Json> all, Items(iterable, n.line));
    // The loop's filter picks items first (loop.length counts only those).
    std::vector<Json> items;
    if (n.cond) {
      for (Json& item : all) {
        scopes_.emplace_back();
        RETURN_IF_ERROR(Bind(n, item));
        auto keep = Eval(*n.cond);
        scopes_.pop_back();
        if (!keep.ok()) return keep.status();
        if (Truthy(*keep)) items.push_back(std::move(item));
      }
    } else {
      items = std::move(all);
    }
    if (items.empty()) return RenderBody(n.else_body, out, nullptr);
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      scopes_.emplace_back();
      Json loop = {{"index0", i},
                   {"index", i + 1},
                   {"revindex0", length - i - 1},
                   {"revindex", length - i},
                   {"first", i == 0},
                   {"last", i == length - 1},
                   {"length", length}};
      if (i > 0) loop["previtem"] = items[static_cast<size_t>(i - 1)];
      if (i + 1 < length) loop["nextitem"] = items[static_cast<size_t>(i + 1)];
      scopes_.back()["loop"] = Value::Of(std::move(loop));
      absl::Status s = Bind(n, items[static_cast<size_t>(i)]);
      LoopControl control;
      if (s.ok()) s = RenderBody(n.body, out, &control);
      scopes_.pop_back();
      RETURN_IF_ERROR(s);
      if (control.break_) break;
    }
    return absl::OkStatus();
  }

  absl::Status Bind(const Node& n, const Json& item) {
    if (n.targets.size() == 1) {
      scopes_.back()[n.targets[0]] = Value::Of(item);
      return absl::OkStatus();
    }
    if (!item.is_array() || item.size() != n.targets.size()) {
      return Error(n.line, absl::StrCat("cannot unpack an item into ", n.targets.size(), " names"));
    }
    for (size_t k = 0; k < n.targets.size(); ++k) scopes_.back()[n.targets[k]] = Value::Of(item[k]);
    return absl::OkStatus();
  }

  Value Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = it->find(name);
      if (found != it->end()) return found->second;
    }
    return Value::Undefined(absl::StrCat("'", name, "' is undefined"));
  }

  absl::Status Undefined(const Expr& e, const Value& v, const std::string& what) {
    return Error(e.line,
                 absl::StrCat(v.hint.empty() ? "a value is undefined" : v.hint, " (", what, ")"));
  }

  // obj.name / obj[key]: a dict's key, a namespace's attribute, a list's or string's index.
  Value GetItem(const Value& obj, const Json& key) {
    if (obj.kind == Value::Kind::kNamespace) {
      if (key.is_string() && obj.ns->contains(key.get<std::string>())) {
        return Value::Of((*obj.ns)[key.get<std::string>()]);
      }
      return Value::Undefined(absl::StrCat("namespace has no attribute ", PyRepr(key)));
    }
    const Json& j = obj.j();
    if (j.is_object() && key.is_string()) {
      auto it = j.find(key.get<std::string>());
      if (it != j.end()) return Value::Of(*it);
      return Value::Undefined(absl::StrCat("dict has no key ", PyRepr(key)));
    }
    if ((j.is_array() || j.is_string()) && IsInt(key)) {
      int64_t i = key.get<int64_t>();
      if (j.is_array()) {
        const int64_t n = static_cast<int64_t>(j.size());
        if (i < 0) i += n;
        if (i >= 0 && i < n) return Value::Of(j[static_cast<size_t>(i)]);
      } else {
        std::vector<std::string> chars = Chars(j.get<std::string>());
        const int64_t n = static_cast<int64_t>(chars.size());
        if (i < 0) i += n;
        if (i >= 0 && i < n) return Value::Of(chars[static_cast<size_t>(i)]);
      }
      return Value::Undefined(absl::StrCat("index ", key.get<int64_t>(), " is out of range"));
    }
    return Value::Undefined(absl::StrCat(TypeName(obj), " has no item ", PyRepr(key)));
  }

  absl::StatusOr<Value> Eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return Value::Of(e.literal);
      case Expr::Kind::kName:
        return Lookup(e.name);
      case Expr::Kind::kList: {
        Json list = Json::array();
        for (const ExprPtr& item : e.args) {
          ASSIGN_OR_RETURN(Value v, Eval(*item));
          ASSIGN_OR_RETURN(Json j, Data(e, v));
          list.push_back(std::move(j));
        }
        return Value::Of(std::move(list));
      }
      case Expr::Kind::kDict: {
        Json dict = Json::object();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          ASSIGN_OR_RETURN(Value k, Eval(*e.args[i]));
          ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1]));
          if (!k.is_data() || !k.j().is_string()) return Error(e.line, "dict keys must be strings");
          ASSIGN_OR_RETURN(Json j, Data(e, v));
          dict[k.j().get<std::string>()] = std::move(j);
        }
        return Value::Of(std::move(dict));
      }
      case Expr::Kind::kAttr:
      case Expr::Kind::kItem: {
        ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        Json key;
        if (e.kind == Expr::Kind::kAttr) {
          key = e.name;
        } else {
          ASSIGN_OR_RETURN(Value k, Eval(*e.args[1]));
          if (!k.is_data()) return Undefined(e, k, "used as a subscript");
          key = k.j();
        }
        if (obj.undefined()) {
          return Undefined(e, obj, absl::StrCat("looking up ", PyRepr(key), " in it"));
        }
        if (obj.is_data() && obj.j().is_null()) {
          return Error(e.line, absl::StrCat("none has no attribute or item ", PyRepr(key)));
        }
        return GetItem(obj, key);
      }
      case Expr::Kind::kSlice:
        return EvalSlice(e);
      case Expr::Kind::kCall:
        return Call(e);
      case Expr::Kind::kMethodCall:
        return Method(e);
      case Expr::Kind::kFilter:
        return Filter(e);
      case Expr::Kind::kTest: {
        ASSIGN_OR_RETURN(bool result, Test(e));
        return Value::Of(result != e.negated);
      }
      case Expr::Kind::kUnary: {
        ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
        if (!v.is_data() || !v.j().is_number()) {
          return Error(e.line, absl::StrCat("unary ", e.name, " of a ", TypeName(v)));
        }
        if (e.name == "+") return v;
        if (IsInt(v.j())) return Value::Of(-v.j().get<int64_t>());
        return Value::Of(-v.j().get<double>());
      }
      case Expr::Kind::kAnd: {
        ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
        if (!Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kOr: {
        ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
        if (Truthy(a)) return a;
        return Eval(*e.args[1]);
      }
      case Expr::Kind::kNot: {
        ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
        return Value::Of(!Truthy(a));
      }
      case Expr::Kind::kCond: {
        ASSIGN_OR_RETURN(Value c, Eval(*e.args[1]));
        if (Truthy(c)) return Eval(*e.args[0]);
        if (!e.args[2]) return Value::Undefined("the conditional expression had no else");
        return Eval(*e.args[2]);
      }
      case Expr::Kind::kBinary:
        return Binary(e);
    }
    return Error(e.line, "unknown expression");
  }

  absl::StatusOr<Json> Data(const Expr& e, const Value& v) {
    if (v.undefined()) return Undefined(e, v, "stored in a list or dict");
    if (v.kind == Value::Kind::kNamespace) return *v.ns;
    return v.j();
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e) {
    ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
    std::optional<int64_t> bounds[3];
    for (int k = 0; k < 3; ++k) {
      if (!e.args[static_cast<size_t>(k + 1)]) continue;
      ASSIGN_OR_RETURN(Value b, Eval(*e.args[static_cast<size_t>(k + 1)]));
      if (b.is_data() && b.j().is_null()) continue;
      if (!b.is_data() || !IsInt(b.j())) return Error(e.line, "slice bounds must be integers");
      bounds[k] = b.j().get<int64_t>();
    }
    if (obj.undefined()) return Undefined(e, obj, "sliced");
    const bool is_string = obj.is_data() && obj.j().is_string();
    if (!obj.is_data() || !(obj.j().is_array() || is_string)) {
      return Error(e.line, absl::StrCat("a ", TypeName(obj), " cannot be sliced"));
    }
    std::vector<Json> items;
    if (is_string) {
      for (std::string& c : Chars(obj.j().get<std::string>())) items.emplace_back(std::move(c));
    } else {
      items.assign(obj.j().begin(), obj.j().end());
    }
    const int64_t n = static_cast<int64_t>(items.size());
    const int64_t step = bounds[2].value_or(1);
    if (step == 0) return Error(e.line, "slice step cannot be zero");
    auto clamp = [&](std::optional<int64_t> b, int64_t dflt, int64_t lo, int64_t hi) {
      if (!b) return dflt;
      int64_t x = *b < 0 ? *b + n : *b;
      return std::clamp(x, lo, hi);
    };
    int64_t start, stop;
    if (step > 0) {
      start = clamp(bounds[0], 0, 0, n);
      stop = clamp(bounds[1], n, 0, n);
    } else {
      start = clamp(bounds[0], n - 1, -1, n - 1);
      stop = clamp(bounds[1], -1, -1, n - 1);
    }
    Json out = Json::array();
    std::string text;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (is_string) {
        text += items[static_cast<size_t>(i)].get<std::string>();
      } else {
        out.push_back(items[static_cast<size_t>(i)]);
      }
    }
    if (is_string) return Value::Of(std::move(text));
    return Value::Of(std::move(out));
  }

  absl::StatusOr<Value> Binary(const Expr& e) {
    ASSIGN_OR_RETURN(Value a, Eval(*e.args[0]));
    ASSIGN_OR_RETURN(Value b, Eval(*e.args[1]));
    const std::string& op = e.name;
    if (op == "~") return Value::Of(Str(a) + Str(b));
    if (op == "==") return Value::Of(Equal(a, b));
    if (op == "!=") return Value::Of(!Equal(a, b));
    if (op == "in" || op == "not in") {
      ASSIGN_OR_RETURN(bool in, Contains(e, b, a));
      return Value::Of(in == (op == "in"));
    }
    if (a.undefined()) return Undefined(e, a, absl::StrCat("operand of '", op, "'"));
    if (b.undefined()) return Undefined(e, b, absl::StrCat("operand of '", op, "'"));
    if (!a.is_data() || !b.is_data()) {
      return Error(e.line, absl::StrCat("'", op, "' of a namespace"));
    }
    const Json& x = a.j();
    const Json& y = b.j();
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      ASSIGN_OR_RETURN(int c, Compare(x, y, e.line));
      const bool r = op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0;
      return Value::Of(r);
    }
    if (op == "+") {
      if (x.is_string() && y.is_string()) {
        return Value::Of(x.get<std::string>() + y.get<std::string>());
      }
      if (x.is_array() && y.is_array()) {
        Json out = x;
        for (const Json& item : y) out.push_back(item);
        return Value::Of(std::move(out));
      }
    }
    if (op == "*" && ((x.is_string() && IsInt(y)) || (IsInt(x) && y.is_string()))) {
      const std::string& s =
          x.is_string() ? x.get_ref<const std::string&>() : y.get_ref<const std::string&>();
      const int64_t times = IsInt(x) ? x.get<int64_t>() : y.get<int64_t>();
      std::string out;
      for (int64_t i = 0; i < times && out.size() < (1u << 20); ++i) out += s;
      return Value::Of(std::move(out));
    }
    if (!(x.is_number() || x.is_boolean()) || !(y.is_number() || y.is_boolean())) {
      return Error(e.line, absl::StrCat("unsupported operand types for ", op, ": ", TypeName(a),
                                        " and ", TypeName(b)));
    }
    const bool ints = !x.is_number_float() && !y.is_number_float();
    auto num = [](const Json& j) {
      return j.is_boolean() ? (j.get<bool>() ? 1.0 : 0.0) : j.get<double>();
    };
    auto integer = [](const Json& j) {
      return j.is_boolean() ? static_cast<int64_t>(j.get<bool>()) : j.get<int64_t>();
    };
    if (op == "/") {
      if (num(y) == 0) return Error(e.line, "division by zero");
      return Value::Of(num(x) / num(y));
    }
    if (ints) {
      const int64_t p = integer(x), q = integer(y);
      if (op == "+") return Value::Of(p + q);
      if (op == "-") return Value::Of(p - q);
      if (op == "*") return Value::Of(p * q);
      if (op == "//" || op == "%") {
        if (q == 0) return Error(e.line, "division by zero");
        int64_t d = p / q, m = p % q;
        if (m != 0 && ((m < 0) != (q < 0))) d -= 1, m += q;  // Python floors
        return Value::Of(op == "//" ? d : m);
      }
      if (op == "**") {
        if (q < 0) return Value::Of(std::pow(static_cast<double>(p), static_cast<double>(q)));
        int64_t r = 1;
        for (int64_t i = 0; i < q && i < 64; ++i) r *= p;
        return Value::Of(r);
      }
    } else {
      const double p = num(x), q = num(y);
      if (op == "+") return Value::Of(p + q);
      if (op == "-") return Value::Of(p - q);
      if (op == "*") return Value::Of(p * q);
      if (op == "**") return Value::Of(std::pow(p, q));
      if (op == "//" || op == "%") {
        if (q == 0) return Error(e.line, "division by zero");
        const double d = std::floor(p / q);
        return Value::Of(op == "//" ? d : p - d * q);
      }
    }
    return Error(e.line, absl::StrCat("unsupported operator ", op));
  }

  absl::StatusOr<bool> Contains(const Expr& e, const Value& container, const Value& item) {
    if (container.undefined()) return Undefined(e, container, "right side of 'in'");
    if (container.kind == Value::Kind::kNamespace) {
      return item.is_data() && item.j().is_string() &&
             container.ns->contains(item.j().get<std::string>());
    }
    const Json& c = container.j();
    if (c.is_string()) {
      if (!item.is_data() || !item.j().is_string()) {
        return Error(e.line, "'in <string>' needs a string on the left");
      }
      return c.get_ref<const std::string&>().find(item.j().get_ref<const std::string&>()) !=
             std::string::npos;
    }
    if (c.is_object()) {
      return item.is_data() && item.j().is_string() && c.contains(item.j().get<std::string>());
    }
    if (c.is_array()) {
      if (!item.is_data()) return false;
      for (const Json& x : c) {
        if (PyEqual(x, item.j())) return true;
      }
      return false;
    }
    return Error(e.line, absl::StrCat("'in' a ", TypeName(container)));
  }

  // Positional and keyword arguments, evaluated.
  struct Args {
    std::vector<Value> pos;
    std::map<std::string, Value> kw;
    const Value* Get(size_t i, const char* name) const {
      auto it = kw.find(name);
      if (it != kw.end()) return &it->second;
      return i < pos.size() ? &pos[i] : nullptr;
    }
  };
  absl::StatusOr<Args> EvalArgs(const Expr& e, size_t first) {
    Args a;
    for (size_t i = first; i < e.args.size(); ++i) {
      ASSIGN_OR_RETURN(Value v, Eval(*e.args[i]));
      a.pos.push_back(std::move(v));
    }
    for (const auto& [key, expr] : e.kwargs) {
      ASSIGN_OR_RETURN(Value v, Eval(*expr));
      a.kw[key] = std::move(v);
    }
    return a;
  }

  absl::StatusOr<Value> Call(const Expr& e) {
    ASSIGN_OR_RETURN(Args a, EvalArgs(e, 0));
    if (e.name == "raise_exception") {
      return absl::InvalidArgumentError(a.pos.empty() ? "raise_exception()" : Str(a.pos[0]));
    }
    if (e.name == "namespace" || e.name == "dict") {
      auto attrs = std::make_shared<Json>(Json::object());
      for (const Value& p : a.pos) {  // namespace({...})
        if (p.is_data() && p.j().is_object()) attrs->update(p.j());
      }
      for (const auto& [key, v] : a.kw) {
        ASSIGN_OR_RETURN(Json j, Data(e, v));
        (*attrs)[key] = std::move(j);
      }
      if (e.name == "dict") return Value::Of(std::move(*attrs));
      Value v;
      v.kind = Value::Kind::kNamespace;
      v.ns = std::move(attrs);
      return v;
    }
    if (e.name == "range") {
      std::vector<int64_t> n;
      for (const Value& p : a.pos) {
        if (!p.is_data() || !IsInt(p.j())) return Error(e.line, "range() takes integers");
        n.push_back(p.j().get<int64_t>());
      }
      if (n.empty() || n.size() > 3) return Error(e.line, "range() takes 1 to 3 integers");
      const int64_t start = n.size() == 1 ? 0 : n[0];
      const int64_t stop = n.size() == 1 ? n[0] : n[1];
      const int64_t step = n.size() == 3 ? n[2] : 1;
      if (step == 0) return Error(e.line, "range() step cannot be zero");
      Json out = Json::array();
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (out.size() >= 100000) return Error(e.line, "range() of more than 100000 items");
        out.push_back(i);
      }
      return Value::Of(std::move(out));
    }
    if (e.name == "strftime_now") {
      const Value* fmt = a.Get(0, "format");
      if (fmt == nullptr || !fmt->is_data() || !fmt->j().is_string()) {
        return Error(e.line, "strftime_now() takes a format string");
      }
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char buf[256];
      const size_t len =
          std::strftime(buf, sizeof(buf), fmt->j().get<std::string>().c_str(), &local);
      return Value::Of(std::string(buf, len));
    }
    return Error(e.line, absl::StrCat("unsupported function '", e.name, "()'"));
  }

  absl::StatusOr<Value> Method(const Expr& e) {
    ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
    ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
    if (obj.undefined()) return Undefined(e, obj, absl::StrCat("calling .", e.name, "()"));
    auto str_arg = [&](size_t i) -> std::optional<std::string> {
      if (i < a.pos.size() && a.pos[i].is_data() && a.pos[i].j().is_string()) {
        return a.pos[i].j().get<std::string>();
      }
      return std::nullopt;
    };
    const std::string& m = e.name;
    if (obj.is_data() && obj.j().is_string()) {
      const std::string s = obj.j().get<std::string>();
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        const std::string chars = str_arg(0).value_or(" \t\n\r\f\v");
        size_t b = 0, end = s.size();
        if (m != "rstrip") b = s.find_first_not_of(chars);
        if (b == std::string::npos) return Value::Of(std::string());
        if (m != "lstrip") end = s.find_last_not_of(chars) + 1;
        return Value::Of(s.substr(b, end - b));
      }
      if (m == "lower") return Value::Of(absl::AsciiStrToLower(s));
      if (m == "upper") return Value::Of(absl::AsciiStrToUpper(s));
      if (m == "title" || m == "capitalize") return Filter1(e, m, obj, a);
      if (m == "startswith" || m == "endswith") {
        auto p = str_arg(0);
        if (!p) return Error(e.line, absl::StrCat(".", m, "() takes a string"));
        return Value::Of(m == "startswith" ? absl::StartsWith(s, *p) : absl::EndsWith(s, *p));
      }
      if (m == "split") {
        Json out = Json::array();
        if (auto sep = str_arg(0); sep && !sep->empty()) {
          for (absl::string_view piece : absl::StrSplit(s, *sep)) out.push_back(std::string(piece));
        } else {
          for (absl::string_view piece :
               absl::StrSplit(s, absl::ByAnyChar(" \t\n\r\f\v"), absl::SkipEmpty())) {
            out.push_back(std::string(piece));
          }
        }
        return Value::Of(std::move(out));
      }
      if (m == "replace") {
        auto from = str_arg(0), to = str_arg(1);
        if (!from || !to) return Error(e.line, ".replace() takes two strings");
        return Value::Of(absl::StrReplaceAll(s, {{*from, *to}}));
      }
      if (m == "find" || m == "index" || m == "count") {
        auto p = str_arg(0);
        if (!p) return Error(e.line, absl::StrCat(".", m, "() takes a string"));
        if (m == "count") {
          int64_t n = 0;
          if (p->empty()) return Value::Of(CodePoints(s) + 1);
          for (size_t at = s.find(*p); at != std::string::npos; at = s.find(*p, at + p->size()))
            ++n;
          return Value::Of(n);
        }
        const size_t at = s.find(*p);
        if (at == std::string::npos) {
          if (m == "index") return Error(e.line, "substring not found");
          return Value::Of(int64_t{-1});
        }
        return Value::Of(CodePoints(s.substr(0, at)));
      }
      if (m == "join") {
        if (a.pos.empty()) return Error(e.line, ".join() takes a list");
        ASSIGN_OR_RETURN(std::vector<Json> items, Items(a.pos[0], e.line));
        std::vector<std::string> parts;
        for (const Json& j : items) parts.push_back(PyStr(j));
        return Value::Of(absl::StrJoin(parts, s));
      }
    }
    if (obj.is_data() && obj.j().is_object()) {
      const Json& d = obj.j();
      if (m == "items") {
        Json out = Json::array();
        for (auto it = d.begin(); it != d.end(); ++it)
          out.push_back(Json::array({it.key(), it.value()}));
        return Value::Of(std::move(out));
      }
      if (m == "keys" || m == "values") {
        Json out = Json::array();
        for (auto it = d.begin(); it != d.end(); ++it) {
          out.push_back(m == "keys" ? Json(it.key()) : it.value());
        }
        return Value::Of(std::move(out));
      }
      if (m == "get") {
        auto key = str_arg(0);
        if (!key) return Error(e.line, ".get() takes a string key");
        auto it = d.find(*key);
        if (it != d.end()) return Value::Of(*it);
        return a.pos.size() > 1 ? a.pos[1] : Value::Of(nullptr);
      }
    }
    if (obj.kind == Value::Kind::kNamespace && m == "get") {
      auto key = str_arg(0);
      if (key && obj.ns->contains(*key)) return Value::Of((*obj.ns)[*key]);
      return a.pos.size() > 1 ? a.pos[1] : Value::Of(nullptr);
    }
    if (obj.is_data() && obj.j().is_array() && (m == "count" || m == "index")) {
      if (a.pos.empty() || !a.pos[0].is_data())
        return Error(e.line, absl::StrCat(".", m, "() takes a value"));
      int64_t n = 0, first = -1, i = 0;
      for (const Json& x : obj.j()) {
        if (PyEqual(x, a.pos[0].j())) {
          ++n;
          if (first < 0) first = i;
        }
        ++i;
      }
      if (m == "count") return Value::Of(n);
      if (first < 0) return Error(e.line, "value not in list");
      return Value::Of(first);
    }
    return Error(e.line, absl::StrCat("a ", TypeName(obj), " has no method .", m, "()"));
  }

  // A test by name on a value (for 'is' and select/reject).
  absl::StatusOr<bool> ApplyTest(const Expr& e, const std::string& name, const Value& v,
                                 const std::vector<Value>& args) {
    const bool data = v.is_data();
    const Json* j = data ? &v.j() : nullptr;
    auto arg = [&](size_t i) -> absl::StatusOr<const Value*> {
      if (i >= args.size())
        return Error(e.line, absl::StrCat("test '", name, "' takes an argument"));
      return &args[i];
    };
    if (name == "defined") return !v.undefined();
    if (name == "undefined") return v.undefined();
    if (name == "none") return data && j->is_null();
    if (name == "boolean") return data && j->is_boolean();
    if (name == "false") return data && j->is_boolean() && !j->get<bool>();
    if (name == "true") return data && j->is_boolean() && j->get<bool>();
    if (name == "string") return data && j->is_string();
    if (name == "number") return data && j->is_number();
    if (name == "integer") return data && j->is_number_integer();
    if (name == "float") return data && j->is_number_float();
    if (name == "mapping") return (data && j->is_object()) || v.kind == Value::Kind::kNamespace;
    if (name == "iterable") return data && (j->is_array() || j->is_object() || j->is_string());
    if (name == "sequence") return data && (j->is_array() || j->is_object() || j->is_string());
    if (name == "callable") return false;
    if (name == "escaped") return false;
    if (name == "lower" || name == "upper") {
      if (!data || !j->is_string()) return false;
      const std::string& s = j->get_ref<const std::string&>();
      return name == "lower" ? s == absl::AsciiStrToLower(s) : s == absl::AsciiStrToUpper(s);
    }
    if (name == "even" || name == "odd" || name == "divisibleby") {
      if (!data || !j->is_number_integer())
        return Error(e.line, absl::StrCat("test '", name, "' needs an integer"));
      const int64_t x = j->get<int64_t>();
      if (name == "even") return x % 2 == 0;
      if (name == "odd") return x % 2 != 0;
      ASSIGN_OR_RETURN(const Value* d, arg(0));
      if (!d->is_data() || !d->j().is_number_integer() || d->j().get<int64_t>() == 0) {
        return Error(e.line, "divisibleby takes a non-zero integer");
      }
      return x % d->j().get<int64_t>() == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==" || name == "sameas") {
      ASSIGN_OR_RETURN(const Value* other, arg(0));
      return Equal(v, *other);
    }
    if (name == "ne" || name == "!=") {
      ASSIGN_OR_RETURN(const Value* other, arg(0));
      return !Equal(v, *other);
    }
    if (name == "in") {
      ASSIGN_OR_RETURN(const Value* other, arg(0));
      return Contains(e, *other, v);
    }
    if (name == "lt" || name == "le" || name == "gt" || name == "ge" || name == "<" ||
        name == "<=" || name == ">" || name == ">=") {
      ASSIGN_OR_RETURN(const Value* other, arg(0));
      if (!data || !other->is_data()) return Error(e.line, "comparing an undefined value");
      ASSIGN_OR_RETURN(int c, Compare(*j, other->j(), e.line));
      if (name == "lt" || name == "<") return c < 0;
      if (name == "le" || name == "<=") return c <= 0;
      if (name == "gt" || name == ">") return c > 0;
      return c >= 0;
    }
    return Error(e.line, absl::StrCat("unsupported test '", name, "'"));
  }

  absl::StatusOr<bool> Test(const Expr& e) {
    ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
    ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
    return ApplyTest(e, e.name, v, a.pos);
  }

  absl::StatusOr<Value> Filter(const Expr& e) {
    ASSIGN_OR_RETURN(Value v, Eval(*e.args[0]));
    ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
    return Filter1(e, e.name, v, a);
  }

  // obj.attr for map/selectattr/sort (dotted paths allowed).
  Value Attribute(const Value& obj, const std::string& path) {
    Value cur = obj;
    for (absl::string_view part : absl::StrSplit(path, '.')) {
      if (cur.undefined() || (cur.is_data() && cur.j().is_null()))
        return Value::Undefined("attribute");
      cur = GetItem(cur, Json(std::string(part)));
    }
    return cur;
  }

  absl::StatusOr<Value> Filter1(const Expr& e, const std::string& f, const Value& v,
                                const Args& a) {
    auto need_data = [&]() -> absl::Status {
      if (v.undefined()) return Undefined(e, v, absl::StrCat("filter '", f, "'"));
      if (!v.is_data()) return Error(e.line, absl::StrCat("filter '", f, "' of a namespace"));
      return absl::OkStatus();
    };
    if (f == "default" || f == "d") {
      const Value* dflt = a.Get(0, "default_value");
      const Value* boolean = a.Get(1, "boolean");
      const bool use = v.undefined() || (boolean != nullptr && Truthy(*boolean) && !Truthy(v));
      if (use) return dflt != nullptr ? *dflt : Value::Of(std::string());
      return v;
    }
    if (f == "safe") return v;
    if (f == "string") return Value::Of(Str(v));
    if (f == "trim") {
      RETURN_IF_ERROR(need_data());
      const Value* chars = a.Get(0, "chars");
      std::string s = Str(v);
      const std::string set = chars != nullptr && chars->is_data() && chars->j().is_string()
                                  ? chars->j().get<std::string>()
                                  : " \t\n\r\f\v";
      const size_t b = s.find_first_not_of(set);
      if (b == std::string::npos) return Value::Of(std::string());
      return Value::Of(s.substr(b, s.find_last_not_of(set) + 1 - b));
    }
    if (f == "lower") return Value::Of(absl::AsciiStrToLower(Str(v)));
    if (f == "upper") return Value::Of(absl::AsciiStrToUpper(Str(v)));
    if (f == "capitalize") {
      std::string s = absl::AsciiStrToLower(Str(v));
      if (!s.empty()) s[0] = absl::ascii_toupper(s[0]);
      return Value::Of(std::move(s));
    }
    if (f == "title") {
      std::string s = Str(v);
      bool start = true;
      for (char& c : s) {
        if (absl::ascii_isalpha(c)) {
          c = start ? absl::ascii_toupper(c) : absl::ascii_tolower(c);
          start = false;
        } else {
          start = true;
        }
      }
      return Value::Of(std::move(s));
    }
    if (f == "replace") {
      if (a.pos.size() < 2) return Error(e.line, "replace takes two strings");
      return Value::Of(absl::StrReplaceAll(Str(v), {{Str(a.pos[0]), Str(a.pos[1])}}));
    }
    if (f == "indent") {
      const Value* width = a.Get(0, "width");
      const Value* first = a.Get(1, "first");
      const Value* blank = a.Get(2, "blank");
      std::string pad(4, ' ');
      if (width != nullptr && width->is_data()) {
        pad = width->j().is_string()
                  ? width->j().get<std::string>()
                  : std::string(static_cast<size_t>(width->j().get<int64_t>()), ' ');
      }
      std::vector<std::string> lines = absl::StrSplit(Str(v), '\n');
      std::string out;
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i > 0) out += "\n";
        const bool indent = (i > 0 || (first != nullptr && Truthy(*first))) &&
                            (!lines[i].empty() || (blank != nullptr && Truthy(*blank)));
        if (indent) out += pad;
        out += lines[i];
      }
      return Value::Of(std::move(out));
    }
    if (f == "tojson") {
      if (v.undefined()) return Undefined(e, v, "filter 'tojson'");
      JsonDumpOptions o;
      if (const Value* indent = a.Get(0, "indent");
          indent != nullptr && indent->is_data() && indent->j().is_number_integer()) {
        o.indent = static_cast<int>(indent->j().get<int64_t>());
      }
      if (const Value* sort = a.Get(99, "sort_keys"); sort != nullptr) o.sort_keys = Truthy(*sort);
      if (const Value* ascii = a.Get(99, "ensure_ascii"); ascii != nullptr) {
        o.ensure_ascii = Truthy(*ascii);
      }
      if (const Value* sep = a.Get(99, "separators");
          sep != nullptr && sep->is_data() && sep->j().is_array() && sep->j().size() == 2) {
        o.item_separator = PyStr(sep->j()[0]);
        o.key_separator = PyStr(sep->j()[1]);
      }
      return Value::Of(PyJsonDumps(v.kind == Value::Kind::kNamespace ? *v.ns : v.j(), o));
    }
    if (f == "int" || f == "float") {
      const Value* dflt = a.Get(0, "default");
      double d = 0;
      bool ok = false;
      if (v.is_data() && (v.j().is_number() || v.j().is_boolean())) {
        d = v.j().is_boolean() ? v.j().get<bool>() : v.j().get<double>();
        ok = true;
      } else if (v.is_data() && v.j().is_string()) {
        char* end = nullptr;
        const std::string s(absl::StripAsciiWhitespace(v.j().get<std::string>()));
        d = std::strtod(s.c_str(), &end);
        ok = !s.empty() && end == s.c_str() + s.size();
      }
      if (!ok) {
        if (dflt != nullptr) return *dflt;
        return f == "int" ? Value::Of(int64_t{0}) : Value::Of(0.0);
      }
      if (f == "int") return Value::Of(static_cast<int64_t>(std::trunc(d)));
      return Value::Of(d);
    }
    if (f == "abs") {
      RETURN_IF_ERROR(need_data());
      if (v.j().is_number_integer()) return Value::Of(std::llabs(v.j().get<int64_t>()));
      if (v.j().is_number()) return Value::Of(std::fabs(v.j().get<double>()));
      return Error(e.line, "abs of a non-number");
    }
    if (f == "round") {
      RETURN_IF_ERROR(need_data());
      if (!v.j().is_number()) return Error(e.line, "round of a non-number");
      const Value* precision = a.Get(0, "precision");
      const int64_t p =
          precision != nullptr && precision->is_data() && precision->j().is_number_integer()
              ? precision->j().get<int64_t>()
              : 0;
      const double scale = std::pow(10.0, static_cast<double>(p));
      return Value::Of(std::nearbyint(v.j().get<double>() * scale) / scale);
    }
    if (f == "wordcount") {
      int64_t n = 0;
      for (absl::string_view w :
           absl::StrSplit(Str(v), absl::ByAnyChar(" \t\n\r"), absl::SkipEmpty())) {
        (void)w;
        ++n;
      }
      return Value::Of(n);
    }
    if (f == "length" || f == "count") {
      if (v.undefined()) return Value::Of(int64_t{0});
      if (v.kind == Value::Kind::kNamespace) return Value::Of(static_cast<int64_t>(v.ns->size()));
      if (v.j().is_string()) return Value::Of(CodePoints(v.j().get<std::string>()));
      if (v.j().is_array() || v.j().is_object())
        return Value::Of(static_cast<int64_t>(v.j().size()));
      return Error(e.line, absl::StrCat("length of a ", TypeName(v)));
    }
    // Filters over the items of an iterable.
    ASSIGN_OR_RETURN(std::vector<Json> items, Items(v, e.line));
    if (v.undefined() && f != "list" && f != "join" && f != "items") {
      return Undefined(e, v, absl::StrCat("filter '", f, "'"));
    }
    if (f == "list") return Value::Of(Json(items));
    if (f == "items") {
      if (!v.is_data() || !v.j().is_object()) {
        if (v.undefined()) return Value::Of(Json::array());
        return Error(e.line, "items of a non-dict");
      }
      Json out = Json::array();
      for (auto it = v.j().begin(); it != v.j().end(); ++it)
        out.push_back(Json::array({it.key(), it.value()}));
      return Value::Of(std::move(out));
    }
    if (f == "join") {
      const Value* sep = a.Get(0, "d");
      const Value* attr = a.Get(1, "attribute");
      std::vector<std::string> parts;
      for (const Json& item : items) {
        parts.push_back(attr != nullptr ? Str(Attribute(Value::Of(item), Str(*attr)))
                                        : PyStr(item));
      }
      return Value::Of(absl::StrJoin(parts, sep != nullptr ? Str(*sep) : ""));
    }
    if (f == "first" || f == "last") {
      if (items.empty()) return Value::Undefined(absl::StrCat(f, " of an empty sequence"));
      return Value::Of(f == "first" ? items.front() : items.back());
    }
    if (f == "reverse") {
      if (v.j().is_string()) {
        std::vector<std::string> chars = Chars(v.j().get<std::string>());
        std::reverse(chars.begin(), chars.end());
        return Value::Of(absl::StrJoin(chars, ""));
      }
      std::reverse(items.begin(), items.end());
      return Value::Of(Json(items));
    }
    if (f == "unique") {
      Json out = Json::array();
      for (const Json& item : items) {
        bool seen = false;
        for (const Json& o : out) seen = seen || PyEqual(o, item);
        if (!seen) out.push_back(item);
      }
      return Value::Of(std::move(out));
    }
    if (f == "sum") {
      const Value* attr = a.Get(0, "attribute");
      Json total = int64_t{0};
      for (const Json& item : items) {
        const Json x = attr != nullptr ? (Attribute(Value::Of(item), Str(*attr)).is_data()
                                              ? Attribute(Value::Of(item), Str(*attr)).j()
                                              : Json(0))
                                       : item;
        if (!x.is_number()) return Error(e.line, "sum of non-numbers");
        if (total.is_number_integer() && x.is_number_integer()) {
          total = total.get<int64_t>() + x.get<int64_t>();
        } else {
          total = total.get<double>() + x.get<double>();
        }
      }
      return Value::Of(std::move(total));
    }
    if (f == "sort" || f == "dictsort" || f == "max" || f == "min") {
      const Value* reverse = a.Get(0, "reverse");
      const Value* attr = a.Get(2, "attribute");
      std::vector<Json> sorted = items;
      if (f == "dictsort") {
        if (!v.j().is_object()) return Error(e.line, "dictsort of a non-dict");
        sorted.clear();
        for (auto it = v.j().begin(); it != v.j().end(); ++it)
          sorted.push_back(Json::array({it.key(), it.value()}));
      }
      auto key = [&](const Json& x) -> Json {
        if (attr != nullptr) {
          Value got = Attribute(Value::Of(x), Str(*attr));
          return got.is_data() ? got.j() : Json(nullptr);
        }
        return f == "dictsort" ? x[0] : x;
      };
      absl::Status failed;
      std::stable_sort(sorted.begin(), sorted.end(), [&](const Json& x, const Json& y) {
        auto c = Compare(key(x), key(y), e.line);
        if (!c.ok()) {
          failed = c.status();
          return false;
        }
        return *c < 0;
      });
      RETURN_IF_ERROR(failed);
      if (f == "max" || f == "min") {
        if (sorted.empty()) return Value::Undefined(absl::StrCat(f, " of an empty sequence"));
        return Value::Of(f == "max" ? sorted.back() : sorted.front());
      }
      if (reverse != nullptr && Truthy(*reverse)) std::reverse(sorted.begin(), sorted.end());
      return Value::Of(Json(sorted));
    }
    if (f == "map") {
      Json out = Json::array();
      if (const Value* attr = a.Get(99, "attribute"); attr != nullptr) {
        const Value* dflt = a.Get(99, "default");
        for (const Json& item : items) {
          Value got = Attribute(Value::Of(item), Str(*attr));
          if (got.undefined()) {
            if (dflt == nullptr) return Undefined(e, got, "map(attribute=...)");
            got = *dflt;
          }
          ASSIGN_OR_RETURN(Json j, Data(e, got));
          out.push_back(std::move(j));
        }
        return Value::Of(std::move(out));
      }
      if (a.pos.empty()) return Error(e.line, "map takes a filter name or attribute=");
      const std::string filter = Str(a.pos[0]);
      Args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (const Json& item : items) {
        ASSIGN_OR_RETURN(Value got, Filter1(e, filter, Value::Of(item), rest));
        ASSIGN_OR_RETURN(Json j, Data(e, got));
        out.push_back(std::move(j));
      }
      return Value::Of(std::move(out));
    }
    if (f == "select" || f == "reject" || f == "selectattr" || f == "rejectattr") {
      const bool by_attr = f == "selectattr" || f == "rejectattr";
      const bool keep_when = f == "select" || f == "selectattr";
      size_t next = 0;
      std::string attr;
      if (by_attr) {
        if (a.pos.empty()) return Error(e.line, absl::StrCat(f, " takes an attribute name"));
        attr = Str(a.pos[0]);
        next = 1;
      }
      std::string test;
      std::vector<Value> test_args;
      if (next < a.pos.size()) {
        test = Str(a.pos[next]);
        test_args.assign(a.pos.begin() + static_cast<std::ptrdiff_t>(next + 1), a.pos.end());
      }
      Json out = Json::array();
      for (const Json& item : items) {
        Value subject = by_attr ? Attribute(Value::Of(item), attr) : Value::Of(item);
        bool pass;
        if (test.empty()) {
          pass = Truthy(subject);
        } else {
          ASSIGN_OR_RETURN(pass, ApplyTest(e, test, subject, test_args));
        }
        if (pass == keep_when) out.push_back(item);
      }
      return Value::Of(std::move(out));
    }
    return Error(e.line, absl::StrCat("unsupported filter '", f, "'"));
  }

  std::vector<std::map<std::string, Value>> scopes_;
};

}  // namespace
}  // namespace jinja

absl::StatusOr<std::string> JinjaTemplate::Render(const Json& context) const {
  if (!context.is_object()) return absl::InvalidArgumentError("the context must be an object");
  jinja::Renderer r(context);
  std::string out;
  RETURN_IF_ERROR(r.RenderBody(*root_, &out, nullptr));
  return out;
}

}  // namespace kvgate::model::chat
