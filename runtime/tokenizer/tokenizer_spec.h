// Everything a Tokenizer is built from, loaded from GGUF metadata or an HF tokenizer.json.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/gguf.h"

namespace quantkv {

enum class TokenizerModel {
  kByteLevelBpe,      // GGUF "gpt2": GPT-2 byte<->unicode alphabet, regex pre-tokenizer, ranks
  kSentencePieceBpe,  // GGUF "llama": "▁" for spaces, byte fallback <0xNN>, ranks or scores
};

// GGUF's numbering (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,      // special tokens: matched in text only with parse_special
  kUserDefined = 4,  // added tokens that are always matched in text
  kUnused = 5,
  kByte = 6,  // <0xNN> byte-fallback tokens
};

// How SentencePiece-style models put a "▁" in front of text segments (HF normalizer Prepend,
// Metaspace prepend_scheme, GGUF tokenizer.ggml.add_space_prefix).
enum class SpacePrefix {
  kNever,
  kAlways,           // every text segment (legacy Prepend normalizer, llama.cpp, GGUF)
  kAlwaysIfMissing,  // every segment not already starting with "▁" (Metaspace "always")
  kFirstIfMissing,   // only a segment at the start of the input (Metaspace "first")
};

struct TokenizerSpec {
  TokenizerModel model = TokenizerModel::kByteLevelBpe;
  // Pre-tokenizer name as GGUF tokenizer.ggml.pre gives it ("smollm", "llama-bpe", ...).
  std::string pre = "default";
  // Explicit pre-tokenizer regexes (from tokenizer.json), applied in order; when unset they
  // are derived from `pre`. Byte-level BPE only.
  std::optional<std::vector<std::string>> pre_patterns;

  std::vector<std::string> tokens;
  std::vector<float> scores;           // empty, or one per token
  std::vector<TokenType> token_types;  // empty (all normal), or one per token
  // Merge rules in rank order (rank = index). Optional for SentencePiece BPE, which then merges
  // by the score of the merged token as SentencePiece does.
  std::vector<std::pair<std::string, std::string>> merges;

  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;
  int32_t eot_id = -1;
  int32_t eom_id = -1;
  bool add_bos = false;
  bool add_eos = false;

  SpacePrefix space_prefix = SpacePrefix::kNever;  // SentencePiece BPE only
  // Metaspace(split=true): split text into words before each "▁".
  bool split_on_space_marker = false;
  // Decoding drops one leading space of the output (HF Strip decoder), undoing the prefix.
  bool strip_leading_space = false;
  bool byte_fallback = false;  // unknown characters become <0xNN> tokens instead of unk
  bool fuse_unk = false;       // consecutive unknown characters give one unk token
  bool ignore_merges = false;  // a piece that is itself a token is not split (Llama 3)

  std::string chat_template;
  std::string source;  // file the spec came from, to label errors
};

// Reads tokenizer.ggml.* and tokenizer.chat_template. Errors name the file and the key.
absl::StatusOr<TokenizerSpec> TokenizerSpecFromGguf(const GgufFile& gguf);

// Reads an HF tokenizer.json (model.type "BPE"; ByteLevel or Metaspace/SentencePiece-style
// pre-tokenization), and tokenizer_config.json from the same directory when present (bos/eos
// tokens, add_bos_token, chat_template). Errors name the file and the JSON field.
absl::StatusOr<TokenizerSpec> TokenizerSpecFromJson(const std::string& tokenizer_json_path);

}  // namespace quantkv
