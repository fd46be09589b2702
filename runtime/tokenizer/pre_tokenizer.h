// Regex pre-tokenizer: splits text into the pieces BPE runs on, with PCRE2 (UTF + UCP, JIT).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace quantkv::tokenizer {

// The patterns behind a GGUF `tokenizer.ggml.pre` name for byte-level BPE, in the form HF
// tokenizers applies them. Errors name the field and list the known names.
absl::StatusOr<std::vector<std::string>> PreTokenizerPatterns(std::string_view pre);

// Whether the named pre-tokenizer's models skip BPE for pieces that are whole tokens (HF's
// ignore_merges; Llama 3 and its relatives).
bool PreTokenizerIgnoresMerges(std::string_view pre);

// GPT-2's pattern as HF's ByteLevel(use_regex=true) uses it.
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class PreTokenizer {
 public:
  // Compiles each pattern; an error names the pattern and the offset PCRE2 complains about.
  static absl::StatusOr<PreTokenizer> Create(const std::vector<std::string>& patterns);

  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;
  ~PreTokenizer();

  // Appends the pieces of `text` (views into it) to `out`. Each pattern is applied in turn to
  // every piece the previous one produced, keeping both the matches and the text between them
  // (HF's Split with behavior "Isolated"). With no patterns the whole text is one piece.
  // Ill-formed UTF-8 never matches, so it ends up in the gaps; nothing is dropped. Fails only
  // when PCRE2 reports a resource limit.
  absl::Status Split(std::string_view text, std::vector<std::string_view>* out) const;

  bool empty() const { return codes_.empty(); }

 private:
  struct Code;
  PreTokenizer() = default;
  std::vector<std::unique_ptr<Code>> codes_;
};

}  // namespace quantkv::tokenizer
