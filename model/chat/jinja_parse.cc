// JinjaTemplate::Parse: the template's text split into text and tags (with jinja2's whitespace
// rules as transformers configures them: trim_blocks, lstrip_blocks), each tag's expression
// parsed by recursive descent in jinja2's order of precedence, and the tags nested into a tree.
#include <cctype>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/chat/jinja.h"
#include "model/chat/jinja_ast.h"
#include "model/chat/jinja_builtins.h"

namespace kvgate::model::chat {
namespace jinja {
namespace {

absl::Status Error(int line, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template line ", line, ": ", what));
}

// One piece of the source: text, or the inside of a tag.
struct Segment {
  enum class Type { kText, kOutput, kStatement } type;
  std::string text;
  int line;
};

int LineAt(std::string_view source, size_t pos) {
  int line = 1;
  for (size_t i = 0; i < pos && i < source.size(); ++i) line += source[i] == '\n';
  return line;
}

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// The end of a tag opened at `from` (the index of its closer), skipping quoted strings.
size_t FindCloser(std::string_view source, size_t from, std::string_view closer) {
  char quote = 0;
  for (size_t i = from; i < source.size(); ++i) {
    const char c = source[i];
    if (quote != 0) {
      if (c == '\\') {
        ++i;
      } else if (c == quote) {
        quote = 0;
      }
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (source.compare(i, closer.size(), closer) == 0) {
      return i;
    }
  }
  return std::string_view::npos;
}

absl::StatusOr<std::vector<Segment>> Split(std::string_view source) {
  std::vector<Segment> out;
  std::string text;
  bool strip_next = false;    // the previous tag ended with '-'
  bool trim_newline = false;  // the previous tag was a block or comment (trim_blocks)
  size_t pos = 0;
  auto flush_text = [&](int line) {
    if (!text.empty()) out.push_back({Segment::Type::kText, std::move(text), line});
    text.clear();
  };
  while (pos <= source.size()) {
    size_t open = source.find('{', pos);
    while (open != std::string_view::npos && open + 1 < source.size() && source[open + 1] != '{' &&
           source[open + 1] != '%' && source[open + 1] != '#') {
      open = source.find('{', open + 1);
    }
    if (open + 1 >= source.size()) open = std::string_view::npos;
    std::string_view chunk =
        source.substr(pos, open == std::string_view::npos ? std::string_view::npos : open - pos);
    // What the previous tag's right side removes from this text.
    if (strip_next) {
      size_t k = 0;
      while (k < chunk.size() && IsSpace(chunk[k])) ++k;
      chunk.remove_prefix(k);
    } else if (trim_newline) {
      if (!chunk.empty() && chunk[0] == '\n') {
        chunk.remove_prefix(1);
      } else if (chunk.size() >= 2 && chunk[0] == '\r' && chunk[1] == '\n') {
        chunk.remove_prefix(2);
      }
    }
    text.append(chunk);
    if (open == std::string_view::npos) break;
    const char kind = source[open + 1];
    const int line = LineAt(source, open);
    size_t inner = open + 2;
    const char left = inner < source.size() ? source[inner] : 0;
    if (left == '-' || left == '+') ++inner;
    const std::string_view closer = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
    const size_t close =
        kind == '#' ? source.find(closer, inner) : FindCloser(source, inner, closer);
    if (close == std::string_view::npos) {
      return Error(line, absl::StrCat("'{", std::string(1, kind), "' is never closed"));
    }
    size_t inner_end = close;
    const char right = close > inner ? source[close - 1] : 0;
    if (right == '-' || right == '+') --inner_end;
    // The left side: '-' strips all whitespace before; lstrip_blocks strips a block's or a
    // comment's indentation on its own line.
    if (left == '-') {
      while (!text.empty() && IsSpace(text.back())) text.pop_back();
    } else if (kind != '{' && left != '+') {
      // jinja2 decides on the source: only spaces and tabs between a line start and the tag.
      size_t b = open;
      while (b > 0 && (source[b - 1] == ' ' || source[b - 1] == '\t')) --b;
      if (b == 0 || source[b - 1] == '\n') {
        size_t k = text.size();
        while (k > 0 && open - b > text.size() - k && (text[k - 1] == ' ' || text[k - 1] == '\t')) {
          --k;
        }
        text.resize(k);
      }
    }
    flush_text(line);
    if (kind != '#') {
      out.push_back({kind == '{' ? Segment::Type::kOutput : Segment::Type::kStatement,
                     std::string(source.substr(inner, inner_end - inner)), line});
    }
    strip_next = right == '-';
    trim_newline = kind != '{' && right != '+';
    pos = close + 2;
  }
  flush_text(LineAt(source, source.size()));
  return out;
}

// ---- Expressions ---------------------------------------------------------------------------

struct Token {
  enum class Type { kName, kInt, kFloat, kString, kOp, kEnd } type;
  std::string text;
  Json value;
};

absl::StatusOr<std::vector<Token>> Lex(std::string_view s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (IsSpace(c)) {
      ++i;
      continue;
    }
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      size_t j = i;
      while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      out.push_back({Token::Type::kName, std::string(s.substr(i, j - i)), nullptr});
      i = j;
      continue;
    }
    if (std::isdigit(static_cast<unsigned char>(c))) {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && (std::isdigit(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
      if (j + 1 < s.size() && s[j] == '.' && std::isdigit(static_cast<unsigned char>(s[j + 1]))) {
        is_float = true;
        ++j;
        while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) {
          is_float = true;
          j = k;
          while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
        }
      }
      std::string digits;
      for (size_t k = i; k < j; ++k) {
        if (s[k] != '_') digits.push_back(s[k]);
      }
      Token t{is_float ? Token::Type::kFloat : Token::Type::kInt, digits, nullptr};
      t.value = is_float ? Json(std::strtod(digits.c_str(), nullptr))
                         : Json(static_cast<int64_t>(std::strtoll(digits.c_str(), nullptr, 10)));
      out.push_back(std::move(t));
      i = j;
      continue;
    }
    if (c == '\'' || c == '"') {
      std::string value;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] == '\\' && j + 1 < s.size()) {
          ++j;
          switch (s[j]) {
            case 'n':
              value.push_back('\n');
              break;
            case 't':
              value.push_back('\t');
              break;
            case 'r':
              value.push_back('\r');
              break;
            case '0':
              value.push_back('\0');
              break;
            case '\\':
              value.push_back('\\');
              break;
            case '\'':
              value.push_back('\'');
              break;
            case '"':
              value.push_back('"');
              break;
            case '\n':
              break;
            default:
              value.push_back('\\');
              value.push_back(s[j]);
          }
        } else {
          value.push_back(s[j]);
        }
      }
      if (j >= s.size()) return Error(line, "a string literal is never closed");
      out.push_back({Token::Type::kString, "", Json(std::move(value))});
      i = j + 1;
      continue;
    }
    static constexpr std::string_view kOps2[] = {"==", "!=", "<=", ">=", "//", "**"};
    bool matched = false;
    for (std::string_view op : kOps2) {
      if (s.compare(i, 2, op) == 0) {
        out.push_back({Token::Type::kOp, std::string(op), nullptr});
        i += 2;
        matched = true;
        break;
      }
    }
    if (matched) continue;
    if (std::string_view("+-*/%~|.,:()[]{}<>=").find(c) != std::string_view::npos) {
      out.push_back({Token::Type::kOp, std::string(1, c), nullptr});
      ++i;
      continue;
    }
    return Error(line, absl::StrCat("unexpected character '", std::string(1, c), "'"));
  }
  out.push_back({Token::Type::kEnd, "", nullptr});
  return out;
}

class ExprParser {
 public:
  ExprParser(std::vector<Token> tokens, int line) : t_(std::move(tokens)), line_(line) {}

  bool AtEnd() const { return t_[i_].type == Token::Type::kEnd; }
  bool IsName(std::string_view name) const {
    return t_[i_].type == Token::Type::kName && t_[i_].text == name;
  }
  bool IsOp(std::string_view op) const {
    return t_[i_].type == Token::Type::kOp && t_[i_].text == op;
  }
  const Token& Peek() const { return t_[i_]; }
  const Token& Next() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }
  absl::Status Expect(std::string_view op) {
    if (!IsOp(op))
      return Error(line_, absl::StrCat("expected '", std::string(op), "', found ", Describe()));
    ++i_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (t_[i_].type != Token::Type::kName) {
      return Error(line_, absl::StrCat("expected a name, found ", Describe()));
    }
    return Next().text;
  }
  std::string Describe() const {
    const Token& t = t_[i_];
    switch (t.type) {
      case Token::Type::kEnd:
        return "the end of the tag";
      case Token::Type::kString:
        return absl::StrCat("string ", PyRepr(t.value));
      default:
        return absl::StrCat("'", t.text, "'");
    }
  }
  absl::Status ExpectEnd() {
    if (!AtEnd()) return Error(line_, absl::StrCat("unexpected ", Describe()));
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> Expression() { return CondExpr(); }

  // name or name, name (for and set targets).
  absl::StatusOr<std::vector<std::string>> Targets() {
    std::vector<std::string> names;
    ASSIGN_OR_RETURN(std::string first, ExpectName());
    names.push_back(first);
    while (IsOp(",")) {
      ++i_;
      ASSIGN_OR_RETURN(std::string next, ExpectName());
      names.push_back(next);
    }
    return names;
  }

  // An expression without a trailing conditional (a for loop's iterable, before 'if').
  absl::StatusOr<ExprPtr> OrExpression() { return Or(); }

 private:
  ExprPtr Make(Expr::Kind kind) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line_;
    return e;
  }
  ExprPtr Make(Expr::Kind kind, std::string name, ExprPtr a, ExprPtr b = nullptr) {
    ExprPtr e = Make(kind);
    e->name = std::move(name);
    e->args.push_back(std::move(a));
    if (b) e->args.push_back(std::move(b));
    return e;
  }

  absl::StatusOr<ExprPtr> CondExpr() {
    ASSIGN_OR_RETURN(ExprPtr value, Or());
    while (IsName("if")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr cond, Or());
      ExprPtr otherwise;
      if (IsName("else")) {
        ++i_;
        ASSIGN_OR_RETURN(otherwise, CondExpr());
      }
      ExprPtr e = Make(Expr::Kind::kCond);
      e->args.push_back(std::move(value));
      e->args.push_back(std::move(cond));
      e->args.push_back(std::move(otherwise));
      value = std::move(e);
    }
    return value;
  }
  absl::StatusOr<ExprPtr> Or() {
    ASSIGN_OR_RETURN(ExprPtr left, And());
    while (IsName("or")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr right, And());
      left = Make(Expr::Kind::kOr, "or", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> And() {
    ASSIGN_OR_RETURN(ExprPtr left, Not());
    while (IsName("and")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr right, Not());
      left = Make(Expr::Kind::kAnd, "and", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Not() {
    if (IsName("not")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr operand, Not());
      return Make(Expr::Kind::kNot, "not", std::move(operand));
    }
    return Compare();
  }
  absl::StatusOr<ExprPtr> Compare() {
    ASSIGN_OR_RETURN(ExprPtr left, Math1());
    for (;;) {
      std::string op;
      if (Peek().type == Token::Type::kOp &&
          (IsOp("==") || IsOp("!=") || IsOp("<") || IsOp(">") || IsOp("<=") || IsOp(">="))) {
        op = Next().text;
      } else if (IsName("in")) {
        ++i_;
        op = "in";
      } else if (IsName("not") && t_[i_ + 1].type == Token::Type::kName &&
                 t_[i_ + 1].text == "in") {
        i_ += 2;
        op = "not in";
      } else {
        return left;
      }
      ASSIGN_OR_RETURN(ExprPtr right, Math1());
      left = Make(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
  }
  absl::StatusOr<ExprPtr> Math1() {
    ASSIGN_OR_RETURN(ExprPtr left, Concat());
    while (IsOp("+") || IsOp("-")) {
      const std::string op = Next().text;
      ASSIGN_OR_RETURN(ExprPtr right, Concat());
      left = Make(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Concat() {
    ASSIGN_OR_RETURN(ExprPtr left, Math2());
    while (IsOp("~")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr right, Math2());
      left = Make(Expr::Kind::kBinary, "~", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Math2() {
    ASSIGN_OR_RETURN(ExprPtr left, Pow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const std::string op = Next().text;
      ASSIGN_OR_RETURN(ExprPtr right, Pow());
      left = Make(Expr::Kind::kBinary, op, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Pow() {
    ASSIGN_OR_RETURN(ExprPtr left, Unary(true));
    while (IsOp("**")) {
      ++i_;
      ASSIGN_OR_RETURN(ExprPtr right, Unary(true));
      left = Make(Expr::Kind::kBinary, "**", std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> Unary(bool with_filter) {
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      const std::string op = Next().text;
      ASSIGN_OR_RETURN(ExprPtr operand, Unary(false));
      node = Make(Expr::Kind::kUnary, op, std::move(operand));
    } else {
      ASSIGN_OR_RETURN(node, Primary());
    }
    ASSIGN_OR_RETURN(node, Postfix(std::move(node)));
    if (with_filter) return FilterExpr(std::move(node));
    return node;
  }
  absl::StatusOr<ExprPtr> Primary() {
    const Token& t = Peek();
    switch (t.type) {
      case Token::Type::kName: {
        const std::string name = Next().text;
        ExprPtr e = Make(Expr::Kind::kLiteral);
        if (name == "true" || name == "True") {
          e->literal = true;
        } else if (name == "false" || name == "False") {
          e->literal = false;
        } else if (name == "none" || name == "None") {
          e->literal = nullptr;
        } else {
          e->kind = Expr::Kind::kName;
          e->name = name;
        }
        return e;
      }
      case Token::Type::kString: {
        std::string value;
        while (Peek().type == Token::Type::kString) value += Next().value.get<std::string>();
        ExprPtr e = Make(Expr::Kind::kLiteral);
        e->literal = std::move(value);
        return e;
      }
      case Token::Type::kInt:
      case Token::Type::kFloat: {
        ExprPtr e = Make(Expr::Kind::kLiteral);
        e->literal = Next().value;
        return e;
      }
      case Token::Type::kOp:
        if (IsOp("(")) {
          ++i_;
          ASSIGN_OR_RETURN(ExprPtr inner, Expression());
          if (IsOp(",")) return Error(line_, "tuples are not supported; use a list [...]");
          RETURN_IF_ERROR(Expect(")"));
          return inner;
        }
        if (IsOp("[")) {
          ++i_;
          ExprPtr e = Make(Expr::Kind::kList);
          while (!IsOp("]")) {
            ASSIGN_OR_RETURN(ExprPtr item, Expression());
            e->args.push_back(std::move(item));
            if (!IsOp(",")) break;
            ++i_;
          }
          RETURN_IF_ERROR(Expect("]"));
          return e;
        }
        if (IsOp("{")) {
          ++i_;
          ExprPtr e = Make(Expr::Kind::kDict);
          while (!IsOp("}")) {
            ASSIGN_OR_RETURN(ExprPtr key, Expression());
            RETURN_IF_ERROR(Expect(":"));
            ASSIGN_OR_RETURN(ExprPtr value, Expression());
            e->args.push_back(std::move(key));
            e->args.push_back(std::move(value));
            if (!IsOp(",")) break;
            ++i_;
          }
          RETURN_IF_ERROR(Expect("}"));
          return e;
        }
        break;
      default:
        break;
    }
    return Error(line_, absl::StrCat("expected an expression, found ", Describe()));
  }
  absl::Status CallArgs(Expr* e) {
    RETURN_IF_ERROR(Expect("("));
    while (!IsOp(")")) {
      if (Peek().type == Token::Type::kName && t_[i_ + 1].type == Token::Type::kOp &&
          t_[i_ + 1].text == "=") {
        std::string key = Next().text;
        ++i_;
        ASSIGN_OR_RETURN(ExprPtr value, Expression());
        e->kwargs.emplace_back(std::move(key), std::move(value));
      } else {
        if (!e->kwargs.empty()) return Error(line_, "a positional argument after a keyword one");
        ASSIGN_OR_RETURN(ExprPtr value, Expression());
        e->args.push_back(std::move(value));
      }
      if (!IsOp(",")) break;
      ++i_;
    }
    return Expect(")");
  }
  absl::StatusOr<ExprPtr> Postfix(ExprPtr node) {
    for (;;) {
      if (IsOp(".")) {
        ++i_;
        if (Peek().type == Token::Type::kInt) {  // foo.0 is foo[0]
          ExprPtr index = Make(Expr::Kind::kLiteral);
          index->literal = Next().value;
          node = Make(Expr::Kind::kItem, "", std::move(node), std::move(index));
          continue;
        }
        ASSIGN_OR_RETURN(std::string attr, ExpectName());
        if (IsOp("(")) {
          if (!Known(kMethods, attr)) {
            return Error(line_, absl::StrCat("unsupported method '", attr, "()'"));
          }
          ExprPtr call = Make(Expr::Kind::kMethodCall, attr, std::move(node));
          RETURN_IF_ERROR(CallArgs(call.get()));
          node = std::move(call);
        } else {
          node = Make(Expr::Kind::kAttr, attr, std::move(node));
        }
      } else if (IsOp("[")) {
        ++i_;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            ASSIGN_OR_RETURN(parts[k], Expression());
          }
          if (k < 2 && IsOp(":")) {
            ++i_;
            slice = true;
          } else {
            break;
          }
        }
        RETURN_IF_ERROR(Expect("]"));
        if (slice) {
          ExprPtr e = Make(Expr::Kind::kSlice);
          e->args.push_back(std::move(node));
          for (auto& p : parts) e->args.push_back(std::move(p));
          node = std::move(e);
        } else {
          if (!parts[0]) return Error(line_, "empty subscript []");
          node = Make(Expr::Kind::kItem, "", std::move(node), std::move(parts[0]));
        }
      } else if (IsOp("(")) {
        if (node->kind != Expr::Kind::kName) {
          return Error(line_, "only named functions can be called");
        }
        if (!Known(kFunctions, node->name)) {
          return Error(line_, absl::StrCat("unsupported function '", node->name, "()'"));
        }
        ExprPtr call = Make(Expr::Kind::kCall);
        call->name = node->name;
        RETURN_IF_ERROR(CallArgs(call.get()));
        node = std::move(call);
      } else {
        return node;
      }
    }
  }
  absl::StatusOr<ExprPtr> FilterExpr(ExprPtr node) {
    for (;;) {
      if (IsOp("|")) {
        ++i_;
        ASSIGN_OR_RETURN(std::string name, ExpectName());
        if (!Known(kFilters, name)) {
          return Error(line_, absl::StrCat("unsupported filter '", name, "'"));
        }
        ExprPtr f = Make(Expr::Kind::kFilter, name, std::move(node));
        if (IsOp("(")) RETURN_IF_ERROR(CallArgs(f.get()));
        node = std::move(f);
      } else if (IsName("is")) {
        ++i_;
        bool negated = false;
        if (IsName("not")) {
          ++i_;
          negated = true;
        }
        std::string name;
        if (Peek().type == Token::Type::kName) {
          name = Next().text;
        } else if (Peek().type == Token::Type::kOp) {
          name = Next().text;  // is == x, is >= x
        }
        if (!Known(kTests, name)) {
          return Error(line_, absl::StrCat("unsupported test '", name, "'"));
        }
        ExprPtr test = Make(Expr::Kind::kTest, name, std::move(node));
        test->negated = negated;
        if (IsOp("(")) {
          RETURN_IF_ERROR(CallArgs(test.get()));
        } else if (Peek().type == Token::Type::kString || Peek().type == Token::Type::kInt ||
                   Peek().type == Token::Type::kFloat || IsOp("[") || IsOp("{") ||
                   (Peek().type == Token::Type::kName && !IsName("else") && !IsName("or") &&
                    !IsName("and") && !IsName("if") && !IsName("in") && !IsName("not"))) {
          ASSIGN_OR_RETURN(ExprPtr arg, Primary());
          ASSIGN_OR_RETURN(arg, Postfix(std::move(arg)));
          test->args.push_back(std::move(arg));
        }
        node = std::move(test);
      } else {
        return node;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int line_;
};

// ---- Statements ----------------------------------------------------------------------------

struct OpenBlock {
  Node* node;
  std::string tag;  // "if", "for", "generation"
  Body* body;       // where the next nodes go
};

absl::StatusOr<Body> Build(const std::vector<Segment>& segments) {
  Body root;
  std::vector<OpenBlock> open;
  auto current = [&]() -> Body* { return open.empty() ? &root : open.back().body; };
  for (const Segment& seg : segments) {
    if (seg.type == Segment::Type::kText) {
      auto n = std::make_unique<Node>();
      n->kind = Node::Kind::kText;
      n->line = seg.line;
      n->text = seg.text;
      current()->push_back(std::move(n));
      continue;
    }
    ASSIGN_OR_RETURN(std::vector<Token> tokens, Lex(seg.text, seg.line));
    ExprParser p(std::move(tokens), seg.line);
    if (seg.type == Segment::Type::kOutput) {
      auto n = std::make_unique<Node>();
      n->kind = Node::Kind::kOutput;
      n->line = seg.line;
      ASSIGN_OR_RETURN(n->expr, p.Expression());
      RETURN_IF_ERROR(p.ExpectEnd());
      current()->push_back(std::move(n));
      continue;
    }
    if (p.AtEnd()) return Error(seg.line, "empty {% %} tag");
    ASSIGN_OR_RETURN(std::string tag, p.ExpectName());
    auto n = std::make_unique<Node>();
    n->line = seg.line;
    if (tag == "if") {
      n->kind = Node::Kind::kIf;
      ASSIGN_OR_RETURN(ExprPtr cond, p.Expression());
      RETURN_IF_ERROR(p.ExpectEnd());
      n->branches.emplace_back(std::move(cond), Body());
      Node* raw = n.get();
      current()->push_back(std::move(n));
      open.push_back({raw, "if", &raw->branches.back().second});
    } else if (tag == "elif" || tag == "else") {
      if (open.empty() || (open.back().tag != "if" && open.back().tag != "for")) {
        return Error(seg.line, absl::StrCat("'", tag, "' outside an if or for block"));
      }
      Node* block = open.back().node;
      if (tag == "elif") {
        if (open.back().tag != "if") return Error(seg.line, "'elif' inside a for block");
        ASSIGN_OR_RETURN(ExprPtr cond, p.Expression());
        block->branches.emplace_back(std::move(cond), Body());
        open.back().body = &block->branches.back().second;
      } else {
        open.back().body = &block->else_body;
      }
      RETURN_IF_ERROR(p.ExpectEnd());
    } else if (tag == "endif" || tag == "endfor" || tag == "endgeneration") {
      const std::string want = tag.substr(3);
      if (open.empty() || open.back().tag != want) {
        return Error(seg.line, absl::StrCat("'", tag, "' without a matching '", want, "'"));
      }
      RETURN_IF_ERROR(p.ExpectEnd());
      open.pop_back();
    } else if (tag == "for") {
      n->kind = Node::Kind::kFor;
      ASSIGN_OR_RETURN(n->targets, p.Targets());
      if (!p.IsName("in")) return Error(seg.line, "expected 'in' in a for tag");
      p.Next();
      ASSIGN_OR_RETURN(n->expr, p.OrExpression());
      if (p.IsName("if")) {
        p.Next();
        ASSIGN_OR_RETURN(n->cond, p.OrExpression());
      }
      if (p.IsName("recursive")) return Error(seg.line, "unsupported: recursive for loops");
      RETURN_IF_ERROR(p.ExpectEnd());
      Node* raw = n.get();
      current()->push_back(std::move(n));
      open.push_back({raw, "for", &raw->body});
    } else if (tag == "set") {
      n->kind = Node::Kind::kSet;
      ASSIGN_OR_RETURN(n->targets, p.Targets());
      if (n->targets.size() == 1 && p.IsOp(".")) {
        p.Next();
        ASSIGN_OR_RETURN(n->attr, p.ExpectName());
      }
      if (!p.IsOp("=")) {
        return Error(seg.line, "unsupported: block set ({% set x %}...{% endset %})");
      }
      p.Next();
      ASSIGN_OR_RETURN(n->expr, p.Expression());
      RETURN_IF_ERROR(p.ExpectEnd());
      current()->push_back(std::move(n));
    } else if (tag == "break" || tag == "continue") {
      bool in_loop = false;
      for (const OpenBlock& b : open) in_loop = in_loop || b.tag == "for";
      if (!in_loop) return Error(seg.line, absl::StrCat("'", tag, "' outside a for loop"));
      RETURN_IF_ERROR(p.ExpectEnd());
      n->kind = tag == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      current()->push_back(std::move(n));
    } else if (tag == "generation") {
      RETURN_IF_ERROR(p.ExpectEnd());
      n->kind = Node::Kind::kBlock;
      Node* raw = n.get();
      current()->push_back(std::move(n));
      open.push_back({raw, "generation", &raw->body});
    } else {
      return Error(seg.line, absl::StrCat("unsupported statement '", tag, "'"));
    }
  }
  if (!open.empty()) {
    return Error(open.back().node->line, absl::StrCat("'", open.back().tag, "' is never closed"));
  }
  return root;
}

}  // namespace
}  // namespace jinja

absl::StatusOr<JinjaTemplate> JinjaTemplate::Parse(std::string_view source) {
  ASSIGN_OR_RETURN(std::vector<jinja::Segment> segments, jinja::Split(source));
  ASSIGN_OR_RETURN(jinja::Body body, jinja::Build(segments));
  JinjaTemplate t;
  t.root_ = std::make_shared<const jinja::Body>(std::move(body));
  return t;
}

}  // namespace kvgate::model::chat
