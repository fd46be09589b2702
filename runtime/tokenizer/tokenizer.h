// BPE tokenizer for byte-level (GPT-2 style, GGUF "gpt2") and SentencePiece-style (GGUF
// "llama") vocabularies, matching HF tokenizers' output id for id.
//
// Thread safety: a Tokenizer is immutable after Create except for an internal, locked cache of
// tokenized words, so one instance can serve concurrent Encode/Decode calls. A StreamDecoder
// belongs to one stream.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "runtime/tokenizer/pre_tokenizer.h"
#include "runtime/tokenizer/tokenizer_spec.h"

namespace quantkv {

struct EncodeOptions {
  // Adds BOS (and EOS) when the vocabulary asks for it (add_bos / add_eos).
  bool add_special = false;
  // Recognises control tokens such as <|im_start|> written in the text. User-defined added
  // tokens are always recognised, as in HF and llama.cpp.
  bool parse_special = false;
};

struct DecodeOptions {
  // Leaves control tokens (BOS, <|im_end|>, ...) out of the text.
  bool skip_special = false;
};

namespace tokenizer {
// Transparent std::string_view hashing: this abseil build's absl::string_view is not
// std::string_view, so the default StringHash cannot look up std::string_view keys.
struct StringViewHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const {
    return absl::Hash<absl::string_view>{}(absl::string_view(s.data(), s.size()));
  }
};
struct StringViewEq {
  using is_transparent = void;
  bool operator()(std::string_view a, std::string_view b) const { return a == b; }
};
template <typename V>
using StringMap = absl::flat_hash_map<std::string, V, StringViewHash, StringViewEq>;
}  // namespace tokenizer

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Create(TokenizerSpec spec);
  // Convenience: GGUF metadata or a tokenizer.json path.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromGguf(const GgufFile& gguf);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(const std::string& path);

  // Fails only on PCRE2 resource limits or a character the vocabulary cannot represent at all
  // (no byte token, no byte fallback, no unk).
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              EncodeOptions options = {}) const;

  // Raw bytes, which need not be valid UTF-8 when the ids split a character. An id out of
  // range is an error naming its position.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     DecodeOptions options = {}) const;

  // The bytes one token decodes to on its own (no leading-space stripping).
  absl::StatusOr<std::string> TokenBytes(int32_t id) const;
  // The vocabulary entry as stored ("Ġthe", "▁the", "<0x0A>"); empty for an id out of range.
  std::string_view TokenText(int32_t id) const;
  std::optional<int32_t> TokenId(std::string_view text) const;
  TokenType token_type(int32_t id) const;

  int32_t vocab_size() const { return static_cast<int32_t>(spec_.tokens.size()); }
  int32_t bos_id() const { return spec_.bos_id; }
  int32_t eos_id() const { return spec_.eos_id; }
  int32_t unk_id() const { return spec_.unk_id; }
  int32_t pad_id() const { return spec_.pad_id; }
  // End of generation: EOS, EOT, EOM and the usual end-of-turn control tokens.
  bool IsEog(int32_t id) const { return eog_ids_.contains(id); }
  const absl::flat_hash_set<int32_t>& eog_ids() const { return eog_ids_; }
  const TokenizerSpec& spec() const { return spec_; }

 private:
  friend class StreamDecoder;
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  struct SpecialToken {
    std::string text;
    int32_t id;
  };

  explicit Tokenizer(TokenizerSpec spec, tokenizer::PreTokenizer pre)
      : spec_(std::move(spec)), pre_(std::move(pre)) {}
  absl::Status Init();

  // Appends the ids of a run of ordinary text; `at_start` tells whether it begins the input.
  absl::Status EncodeText(std::string_view text, bool at_start, std::vector<int32_t>* out) const;
  absl::Status EncodeByteLevelPiece(std::string_view piece, std::vector<int32_t>* out) const;
  absl::Status EncodeSentencePieceWord(std::string_view word, std::vector<int32_t>* out) const;
  // Initial symbols of a SentencePiece word: one per character, unknown ones via byte fallback
  // or unk. Appends (id, byte length) pairs.
  absl::Status SentencePieceSymbols(std::string_view word, std::vector<int32_t>* ids,
                                    std::vector<int32_t>* lens) const;
  // HF's BPE merge loop over symbol ids, lowest rank first, leftmost on ties.
  void MergeByRank(std::vector<int32_t>* ids) const;
  // SentencePiece's loop: highest score of the merged token first, leftmost on ties.
  void MergeByScore(std::string_view word, std::vector<int32_t>* ids,
                    std::vector<int32_t>* lens) const;
  void AppendTokenBytes(int32_t id, std::string* out) const;
  const Merge* FindMerge(int32_t left, int32_t right) const;

  TokenizerSpec spec_;
  tokenizer::PreTokenizer pre_;
  tokenizer::StringMap<int32_t> vocab_;
  absl::flat_hash_map<uint64_t, Merge> merges_;
  bool merge_by_score_ = false;
  int32_t byte_ids_[256];  // token for each byte (GPT-2 alphabet or <0xNN>), -1 if none
  // Tokens recognised in text, bucketed by first byte, longest first (leftmost-longest match).
  std::vector<SpecialToken> always_special_[256];
  std::vector<SpecialToken> control_special_[256];
  bool has_always_special_ = false;
  bool has_control_special_ = false;
  absl::flat_hash_set<int32_t> eog_ids_;

  static constexpr size_t kMaxCachedPiece = 64;
  static constexpr size_t kMaxCacheEntries = 1 << 17;
  mutable absl::Mutex cache_mu_;
  mutable tokenizer::StringMap<std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

// Incremental detokenizer for streaming: Push returns only text that is complete UTF-8,
// holding back a partial multi-byte character until the tokens that finish it arrive. Bytes
// that can never become valid are replaced by U+FFFD, so every chunk is valid UTF-8. For valid
// output the concatenation of chunks (and Flush) equals Decode of all ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, DecodeOptions options = {})
      : tokenizer_(tokenizer), options_(options) {}

  absl::StatusOr<std::string> Push(int32_t id);
  // Emits whatever is held back (as U+FFFD if incomplete) and resets the stream.
  std::string Flush();

 private:
  std::string Drain(bool final);

  const Tokenizer& tokenizer_;
  DecodeOptions options_;
  std::string pending_;
  bool at_start_ = true;
};

}  // namespace quantkv
