// UTF-8 helpers and the GPT-2 byte-level alphabet used by the tokenizers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kvgate::model::internal {

// Whether `s` is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool IsValidUtf8(std::string_view s);

// Decodes the code point at `*pos` and advances `*pos`. On an ill-formed sequence returns false
// and advances `*pos` past its maximal valid prefix (at least one byte), as Unicode's
// "substitution of maximal subparts" (and Rust's String::from_utf8_lossy) do.
bool NextCodePoint(std::string_view s, size_t* pos, uint32_t* cp);

// Replaces every ill-formed subsequence by U+FFFD, like Rust's String::from_utf8_lossy.
std::string Utf8Lossy(std::string_view s);

// Length in bytes of the longest prefix of `s` that does not end inside an incomplete (but so
// far valid) multi-byte sequence: `s.substr(0, n)` is what can be emitted without waiting.
size_t CompleteUtf8Prefix(std::string_view s);

void AppendUtf8(uint32_t cp, std::string* out);

// Unicode White_Space (Rust's char::is_whitespace).
bool IsUnicodeWhitespace(uint32_t cp);

// GPT-2's bytes_to_unicode(): the UTF-8 string of the code point that stands for byte `b`.
const std::string& ByteToUnicode(uint8_t b);
// Inverse of ByteToUnicode on code points; -1 when `cp` stands for no byte.
int UnicodeToByte(uint32_t cp);

}  // namespace kvgate::model::internal
