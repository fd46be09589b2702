#include "runtime/tokenizer/unicode.h"

#include <array>

namespace quantkv::tokenizer {
namespace {

// Valid second-byte range for each lead byte (RFC 3629 table 3-7); it excludes overlong forms,
// surrogates and values past U+10FFFF in one check.
struct LeadInfo {
  uint8_t length;  // 0 for bytes that cannot start a sequence
  uint8_t lo, hi;  // range of the second byte
};

LeadInfo Lead(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b < 0xC2) return {0, 0, 0};
  if (b < 0xE0) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b < 0xF0) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b < 0xF4) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

struct ByteTables {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};
  ByteTables() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + extra++);
      to_cp[b] = cp;
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables tables;
  return tables;
}

}  // namespace

size_t Utf8SequenceLength(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  LeadInfo lead = Lead(p[i]);
  if (lead.length == 0) return 0;
  if (lead.length == 1) return 1;
  if (i + lead.length > s.size()) return 0;
  if (p[i + 1] < lead.lo || p[i + 1] > lead.hi) return 0;
  for (size_t k = 2; k < lead.length; ++k) {
    if ((p[i + k] & 0xC0) != 0x80) return 0;
  }
  return lead.length;
}

bool IsIncompleteUtf8Prefix(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  LeadInfo lead = Lead(p[i]);
  if (lead.length <= 1) return false;
  size_t avail = s.size() - i;
  if (avail >= lead.length) return false;
  if (avail >= 2 && (p[i + 1] < lead.lo || p[i + 1] > lead.hi)) return false;
  for (size_t k = 2; k < avail; ++k) {
    if ((p[i + k] & 0xC0) != 0x80) return false;
  }
  return true;
}

uint32_t DecodeUtf8(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + i;
  if (p[0] < 0x80) return p[0];
  if (p[0] < 0xE0) return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
  if (p[0] < 0xF0) return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
  return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void AppendValidUtf8(std::string_view s, std::string* out) {
  size_t i = 0;
  while (i < s.size()) {
    size_t n = Utf8SequenceLength(s, i);
    if (n == 0) {
      out->append("\xEF\xBF\xBD");
      ++i;
    } else {
      out->append(s.substr(i, n));
      i += n;
    }
  }
}

uint32_t ByteToCodePoint(uint8_t byte) { return Tables().to_cp[byte]; }

int CodePointToByte(uint32_t cp) {
  const auto& t = Tables().to_byte;
  return cp < t.size() ? t[cp] : -1;
}

}  // namespace quantkv::tokenizer
