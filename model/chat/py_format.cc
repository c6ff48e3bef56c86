#include "model/chat/py_format.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvgate::model::chat {
namespace {

void AppendRepr(const Json& value, std::string* out);

// Appends the UTF-8 code point at text[*i] as \uXXXX (a surrogate pair above the BMP).
void AppendEscapedCodePoint(const std::string& text, size_t* i, std::string* out) {
  const auto c = static_cast<unsigned char>(text[*i]);
  uint32_t cp = c;
  int extra = 0;
  if (c >= 0xf0) {
    cp = c & 0x07, extra = 3;
  } else if (c >= 0xe0) {
    cp = c & 0x0f, extra = 2;
  } else if (c >= 0xc0) {
    cp = c & 0x1f, extra = 1;
  }
  for (int k = 0; k < extra && *i + 1 < text.size(); ++k) {
    ++*i;
    cp = (cp << 6) | (static_cast<unsigned char>(text[*i]) & 0x3f);
  }
  char buf[16];
  if (cp >= 0x10000) {
    cp -= 0x10000;
    std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
  } else {
    std::snprintf(buf, sizeof(buf), "\\u%04x", cp);
  }
  out->append(buf);
}

void AppendJsonString(const std::string& text, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out->append(buf);
        } else if (c >= 0x80 && ensure_ascii) {
          AppendEscapedCodePoint(text, &i, out);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void AppendDump(const Json& value, const JsonDumpOptions& o, int depth, std::string* out) {
  const std::string item_sep =
      !o.item_separator.empty() ? o.item_separator : (o.indent ? "," : ", ");
  const std::string key_sep = !o.key_separator.empty() ? o.key_separator : ": ";
  auto newline = [&](int level) {
    if (!o.indent) return;
    out->push_back('\n');
    out->append(static_cast<size_t>(*o.indent * level), ' ');
  };
  switch (value.type()) {
    case Json::value_t::null:
      out->append("null");
      return;
    case Json::value_t::boolean:
      out->append(value.get<bool>() ? "true" : "false");
      return;
    case Json::value_t::number_integer:
      out->append(std::to_string(value.get<int64_t>()));
      return;
    case Json::value_t::number_unsigned:
      out->append(std::to_string(value.get<uint64_t>()));
      return;
    case Json::value_t::number_float: {
      const double d = value.get<double>();
      if (std::isnan(d)) {
        out->append("NaN");
      } else if (std::isinf(d)) {
        out->append(d > 0 ? "Infinity" : "-Infinity");
      } else {
        out->append(PyFloatRepr(d));
      }
      return;
    }
    case Json::value_t::string:
      AppendJsonString(value.get_ref<const std::string&>(), o.ensure_ascii, out);
      return;
    case Json::value_t::array: {
      if (value.empty()) {
        out->append("[]");
        return;
      }
      out->push_back('[');
      bool first = true;
      for (const Json& item : value) {
        if (!first) out->append(item_sep);
        first = false;
        newline(depth + 1);
        AppendDump(item, o, depth + 1, out);
      }
      newline(depth);
      out->push_back(']');
      return;
    }
    case Json::value_t::object: {
      if (value.empty()) {
        out->append("{}");
        return;
      }
      std::vector<std::string> keys;
      for (auto it = value.begin(); it != value.end(); ++it) keys.push_back(it.key());
      if (o.sort_keys) std::sort(keys.begin(), keys.end());
      out->push_back('{');
      bool first = true;
      for (const std::string& key : keys) {
        if (!first) out->append(item_sep);
        first = false;
        newline(depth + 1);
        AppendJsonString(key, o.ensure_ascii, out);
        out->append(key_sep);
        AppendDump(value.at(key), o, depth + 1, out);
      }
      newline(depth);
      out->push_back('}');
      return;
    }
    default:
      out->append("null");
      return;
  }
}

void AppendRepr(const Json& value, std::string* out) {
  switch (value.type()) {
    case Json::value_t::string:
      out->append(PyStringRepr(value.get_ref<const std::string&>()));
      return;
    case Json::value_t::array: {
      out->push_back('[');
      bool first = true;
      for (const Json& item : value) {
        if (!first) out->append(", ");
        first = false;
        AppendRepr(item, out);
      }
      out->push_back(']');
      return;
    }
    case Json::value_t::object: {
      out->push_back('{');
      bool first = true;
      for (auto it = value.begin(); it != value.end(); ++it) {
        if (!first) out->append(", ");
        first = false;
        out->append(PyStringRepr(it.key()));
        out->append(": ");
        AppendRepr(it.value(), out);
      }
      out->push_back('}');
      return;
    }
    default:
      out->append(PyStr(value));
      return;
  }
}

}  // namespace

std::string PyFloatRepr(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  if (value == 0) return std::signbit(value) ? "-0.0" : "0.0";
  // The shortest precision whose %e form reads back exactly.
  char buf[64];
  int precision = 1;
  for (; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*e", precision - 1, value);
    if (std::strtod(buf, nullptr) == value) break;
  }
  // buf: [-]d.ddde[+-]XX; split into digits and exponent.
  std::string s(buf);
  const bool negative = s[0] == '-';
  if (negative) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exponent = std::atoi(s.c_str() + e + 1);
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp[16];
    std::snprintf(exp, sizeof(exp), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + exp;
  }
  if (exponent < 0) {
    return out + "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  }
  const size_t int_digits = static_cast<size_t>(exponent) + 1;
  if (digits.size() <= int_digits) {
    return out + digits + std::string(int_digits - digits.size(), '0') + ".0";
  }
  return out + digits.substr(0, int_digits) + "." + digits.substr(int_digits);
}

std::string PyStringRepr(const std::string& text) {
  const bool has_single = text.find('\'') != std::string::npos;
  const bool has_double = text.find('"') != std::string::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (ch == quote || ch == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (ch == '\n') {
      out.append("\\n");
    } else if (ch == '\r') {
      out.append("\\r");
    } else if (ch == '\t') {
      out.append("\\t");
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out.append(buf);
    } else {
      out.push_back(ch);
    }
  }
  out.push_back(quote);
  return out;
}

std::string PyStr(const Json& value) {
  switch (value.type()) {
    case Json::value_t::null:
      return "None";
    case Json::value_t::boolean:
      return value.get<bool>() ? "True" : "False";
    case Json::value_t::number_integer:
      return std::to_string(value.get<int64_t>());
    case Json::value_t::number_unsigned:
      return std::to_string(value.get<uint64_t>());
    case Json::value_t::number_float:
      return PyFloatRepr(value.get<double>());
    case Json::value_t::string:
      return value.get<std::string>();
    default: {
      std::string out;
      AppendRepr(value, &out);
      return out;
    }
  }
}

std::string PyRepr(const Json& value) {
  std::string out;
  AppendRepr(value, &out);
  return out;
}

std::string PyJsonDumps(const Json& value, const JsonDumpOptions& options) {
  std::string out;
  AppendDump(value, options, 0, &out);
  return out;
}

}  // namespace kvgate::model::chat
