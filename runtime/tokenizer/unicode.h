// UTF-8 helpers and the GPT-2 byte<->unicode table shared by the tokenizer's pieces.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace quantkv::tokenizer {

// Length of the well-formed UTF-8 sequence starting at s[i] (1..4), or 0 when the bytes there
// are not a complete well-formed sequence (a stray continuation byte, an overlong form, a
// surrogate, a value past U+10FFFF, or a sequence cut short by the end of `s`).
size_t Utf8SequenceLength(std::string_view s, size_t i);

// True when s[i..] is a proper prefix of some well-formed sequence, i.e. more bytes could still
// complete it (a streaming decoder must wait rather than emit a replacement character).
bool IsIncompleteUtf8Prefix(std::string_view s, size_t i);

// Length to advance over s[i]: the sequence length when well formed, else 1 (an invalid byte
// is treated as a character of its own, so every input can be split into "characters").
inline size_t Utf8CharLength(std::string_view s, size_t i) {
  size_t n = Utf8SequenceLength(s, i);
  return n == 0 ? 1 : n;
}

// Decodes the well-formed sequence at s[i] (Utf8SequenceLength(s, i) must be > 0).
uint32_t DecodeUtf8(std::string_view s, size_t i);

void AppendUtf8(uint32_t code_point, std::string* out);

// Appends `s` with every ill-formed byte replaced by U+FFFD.
void AppendValidUtf8(std::string_view s, std::string* out);

// GPT-2's reversible byte -> printable code point mapping (bytes.json in the original repo):
// printable Latin-1 bytes map to themselves, the rest to U+0100 onwards.
uint32_t ByteToCodePoint(uint8_t byte);
// The inverse, or -1 for a code point that no byte maps to.
int CodePointToByte(uint32_t code_point);

}  // namespace quantkv::tokenizer
