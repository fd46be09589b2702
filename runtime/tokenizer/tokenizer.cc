#include "runtime/tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/tokenizer/unicode.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using tokenizer::AppendUtf8;
using tokenizer::Utf8CharLength;

constexpr std::string_view kSpaceMarker = "\xE2\x96\x81";  // U+2581 "▁"

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

bool IsSpecialType(TokenType t) {
  return t == TokenType::kControl || t == TokenType::kUserDefined || t == TokenType::kUnknown;
}

// A token SentencePiece-style merging may produce or a character may map to directly.
bool IsPlainType(TokenType t) {
  return t == TokenType::kNormal || t == TokenType::kUndefined || t == TokenType::kUserDefined;
}

// End-of-turn markers that chat models emit instead of (or as well as) their EOS; llama.cpp
// treats the same texts as end of generation.
constexpr std::string_view kEogTexts[] = {
    "<|endoftext|>", "<|im_end|>",    "<|eot_id|>",      "<|eom_id|>",
    "<|end|>",       "<end_of_turn>", "<|end_of_text|>", "<EOT>",
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Create(TokenizerSpec spec) {
  std::vector<std::string> patterns;
  if (spec.model == TokenizerModel::kByteLevelBpe) {
    if (spec.pre_patterns.has_value()) {
      patterns = *spec.pre_patterns;
    } else {
      absl::StatusOr<std::vector<std::string>> p = tokenizer::PreTokenizerPatterns(spec.pre);
      if (!p.ok()) {
        return absl::Status(p.status().code(),
                            absl::StrCat(spec.source, ": ", p.status().message()));
      }
      patterns = *std::move(p);
    }
  }
  absl::StatusOr<tokenizer::PreTokenizer> pre = tokenizer::PreTokenizer::Create(patterns);
  if (!pre.ok()) {
    return absl::Status(pre.status().code(),
                        absl::StrCat(spec.source, ": ", pre.status().message()));
  }
  std::unique_ptr<Tokenizer> t(new Tokenizer(std::move(spec), *std::move(pre)));
  QKV_RETURN_IF_ERROR(t->Init());
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromGguf(const GgufFile& gguf) {
  QKV_ASSIGN_OR_RETURN(TokenizerSpec spec, TokenizerSpecFromGguf(gguf));
  return Create(std::move(spec));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(const std::string& path) {
  QKV_ASSIGN_OR_RETURN(TokenizerSpec spec, TokenizerSpecFromJson(path));
  return Create(std::move(spec));
}

absl::Status Tokenizer::Init() {
  const std::string& src = spec_.source;
  const size_t n = spec_.tokens.size();
  if (n == 0) return absl::InvalidArgumentError(absl::StrCat(src, ": tokens: vocabulary is empty"));
  if (n > (size_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": tokens: ", n, " is too many"));
  }
  if (!spec_.scores.empty() && spec_.scores.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": scores: ", spec_.scores.size(), " entries for ", n, " tokens"));
  }
  if (spec_.token_types.empty()) spec_.token_types.assign(n, TokenType::kNormal);
  if (spec_.token_types.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": token_types: ", spec_.token_types.size(),
                                                   " entries for ", n, " tokens"));
  }
  struct NamedId {
    const char* name;
    int32_t id;
  };
  for (NamedId s : {NamedId{"bos_id", spec_.bos_id}, NamedId{"eos_id", spec_.eos_id},
                    NamedId{"unk_id", spec_.unk_id}, NamedId{"pad_id", spec_.pad_id},
                    NamedId{"eot_id", spec_.eot_id}, NamedId{"eom_id", spec_.eom_id}}) {
    if (s.id < -1 || s.id >= static_cast<int64_t>(n)) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": ", s.name, " = ", s.id, " is outside the vocabulary of ", n));
    }
  }
  if (spec_.add_bos && spec_.bos_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": add_bos is set without a bos_id"));
  }
  if (spec_.add_eos && spec_.eos_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": add_eos is set without an eos_id"));
  }

  vocab_.reserve(n);
  // Later duplicates win, as in the dictionaries HF and llama.cpp build from GGUF lists.
  for (size_t i = 0; i < n; ++i) vocab_.insert_or_assign(spec_.tokens[i], static_cast<int32_t>(i));

  merges_.reserve(spec_.merges.size());
  for (size_t r = 0; r < spec_.merges.size(); ++r) {
    const auto& [a, b] = spec_.merges[r];
    auto ia = vocab_.find(a);
    auto ib = vocab_.find(b);
    std::string joined = a + b;
    auto ij = vocab_.find(joined);
    const char* missing = ia == vocab_.end()   ? "its first token"
                          : ib == vocab_.end() ? "its second token"
                          : ij == vocab_.end() ? "the merged token"
                                               : nullptr;
    if (missing != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(src, ": merges[", r, "] '", a, " ", b,
                                                     "': ", missing, " is not in the vocabulary"));
    }
    // Later duplicates win, as in HF's merge map.
    merges_.insert_or_assign(PairKey(ia->second, ib->second),
                             Merge{static_cast<int32_t>(r), ij->second});
  }
  if (spec_.model == TokenizerModel::kByteLevelBpe && merges_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": merges: required for byte-level BPE"));
  }
  merge_by_score_ = spec_.model == TokenizerModel::kSentencePieceBpe && merges_.empty();
  if (merge_by_score_ && spec_.scores.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": scores: required for a SentencePiece vocabulary without merges"));
  }

  for (int b = 0; b < 256; ++b) {
    std::string text;
    if (spec_.model == TokenizerModel::kByteLevelBpe) {
      AppendUtf8(tokenizer::ByteToCodePoint(static_cast<uint8_t>(b)), &text);
    } else {
      text = absl::StrFormat("<0x%02X>", b);
    }
    auto it = vocab_.find(text);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }
  if (spec_.byte_fallback && spec_.model == TokenizerModel::kSentencePieceBpe && spec_.unk_id < 0) {
    for (int b = 0; b < 256; ++b) {
      if (byte_ids_[b] < 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s: tokens: byte fallback needs <0x%02X> (or an unk token)", src, b));
      }
    }
  }

  for (size_t i = 0; i < n; ++i) {
    const std::string& text = spec_.tokens[i];
    TokenType type = spec_.token_types[i];
    if (text.empty() || !IsSpecialType(type)) continue;
    auto& bucket = type == TokenType::kUserDefined ? always_special_ : control_special_;
    bucket[static_cast<uint8_t>(text[0])].push_back({text, static_cast<int32_t>(i)});
    (type == TokenType::kUserDefined ? has_always_special_ : has_control_special_) = true;
  }
  for (auto* buckets : {always_special_, control_special_}) {
    for (int c = 0; c < 256; ++c) {
      std::stable_sort(buckets[c].begin(), buckets[c].end(),
                       [](const SpecialToken& x, const SpecialToken& y) {
                         return x.text.size() > y.text.size();
                       });
    }
  }

  for (int32_t id : {spec_.eos_id, spec_.eot_id, spec_.eom_id}) {
    if (id >= 0) eog_ids_.insert(id);
  }
  for (std::string_view text : kEogTexts) {
    auto it = vocab_.find(text);
    if (it != vocab_.end() && spec_.token_types[it->second] == TokenType::kControl) {
      eog_ids_.insert(it->second);
    }
  }
  return absl::OkStatus();
}

const Tokenizer::Merge* Tokenizer::FindMerge(int32_t left, int32_t right) const {
  auto it = merges_.find(PairKey(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       EncodeOptions options) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (options.add_special && spec_.add_bos) out.push_back(spec_.bos_id);

  const bool control = options.parse_special && has_control_special_;
  if (!has_always_special_ && !control) {
    QKV_RETURN_IF_ERROR(EncodeText(text, /*at_start=*/true, &out));
  } else {
    // Leftmost-longest match of added tokens, as HF's AddedVocabulary does; the text between
    // them is tokenized normally.
    size_t seg = 0, i = 0;
    while (i < text.size()) {
      const uint8_t c = static_cast<uint8_t>(text[i]);
      const SpecialToken* best = nullptr;
      for (const auto* list : {&always_special_[c], control ? &control_special_[c] : nullptr}) {
        if (list == nullptr) continue;
        for (const SpecialToken& s : *list) {
          if (best != nullptr && s.text.size() <= best->text.size()) break;
          if (text.substr(i, s.text.size()) == s.text) {
            best = &s;
            break;
          }
        }
      }
      if (best == nullptr) {
        ++i;
        continue;
      }
      QKV_RETURN_IF_ERROR(EncodeText(text.substr(seg, i - seg), seg == 0, &out));
      out.push_back(best->id);
      i += best->text.size();
      seg = i;
    }
    QKV_RETURN_IF_ERROR(EncodeText(text.substr(seg), seg == 0, &out));
  }

  if (options.add_special && spec_.add_eos) out.push_back(spec_.eos_id);
  return out;
}

absl::Status Tokenizer::EncodeText(std::string_view text, bool at_start,
                                   std::vector<int32_t>* out) const {
  if (text.empty()) return absl::OkStatus();
  if (spec_.model == TokenizerModel::kByteLevelBpe) {
    std::vector<std::string_view> pieces;
    QKV_RETURN_IF_ERROR(pre_.Split(text, &pieces));
    for (std::string_view piece : pieces) QKV_RETURN_IF_ERROR(EncodeByteLevelPiece(piece, out));
    return absl::OkStatus();
  }

  // SentencePiece style: spaces become "▁", with a "▁" in front as the model asks.
  std::string normalized;
  normalized.reserve(text.size() + text.size() / 4 + 3);
  const bool starts_with_marker = text[0] == ' ' || text.substr(0, 3) == kSpaceMarker;
  switch (spec_.space_prefix) {
    case SpacePrefix::kNever:
      break;
    case SpacePrefix::kAlways:
      normalized.append(kSpaceMarker);
      break;
    case SpacePrefix::kAlwaysIfMissing:
      if (!starts_with_marker) normalized.append(kSpaceMarker);
      break;
    case SpacePrefix::kFirstIfMissing:
      if (at_start && !starts_with_marker) normalized.append(kSpaceMarker);
      break;
  }
  for (char c : text) {
    if (c == ' ') {
      normalized.append(kSpaceMarker);
    } else {
      normalized.push_back(c);
    }
  }
  if (!spec_.split_on_space_marker) return EncodeSentencePieceWord(normalized, out);
  // Metaspace(split=true): each word starts at a "▁" (HF's MergedWithNext).
  std::string_view rest = normalized;
  while (!rest.empty()) {
    size_t next = rest.find(kSpaceMarker, 1);
    if (next == std::string_view::npos) next = rest.size();
    QKV_RETURN_IF_ERROR(EncodeSentencePieceWord(rest.substr(0, next), out));
    rest.remove_prefix(next);
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::EncodeByteLevelPiece(std::string_view piece,
                                             std::vector<int32_t>* out) const {
  const bool cacheable = piece.size() <= kMaxCachedPiece;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  std::vector<int32_t> ids;
  bool whole = false;
  if (spec_.ignore_merges) {
    std::string mapped;
    for (char c : piece) AppendUtf8(tokenizer::ByteToCodePoint(static_cast<uint8_t>(c)), &mapped);
    auto it = vocab_.find(mapped);
    if (it != vocab_.end()) {
      ids.push_back(it->second);
      whole = true;
    }
  }
  if (!whole) {
    ids.reserve(piece.size());
    for (char c : piece) {
      int32_t id = byte_ids_[static_cast<uint8_t>(c)];
      if (id < 0) {
        if (spec_.unk_id < 0) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "%s: byte 0x%02X has no token in the byte-level alphabet and there is no unk token",
              spec_.source, static_cast<uint8_t>(c)));
        }
        if (spec_.fuse_unk && !ids.empty() && ids.back() == spec_.unk_id) continue;
        id = spec_.unk_id;
      }
      ids.push_back(id);
    }
    MergeByRank(&ids);
  }
  out->insert(out->end(), ids.begin(), ids.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    // A crude bound: unbounded inputs must not grow memory without limit.
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.try_emplace(piece, std::move(ids));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::EncodeSentencePieceWord(std::string_view word,
                                                std::vector<int32_t>* out) const {
  if (word.empty()) return absl::OkStatus();
  const bool cacheable = word.size() <= kMaxCachedPiece;
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    auto it = cache_.find(word);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return absl::OkStatus();
    }
  }
  std::vector<int32_t> ids;
  std::vector<int32_t> lens;
  if (spec_.ignore_merges) {
    auto it = vocab_.find(word);
    if (it != vocab_.end()) ids.push_back(it->second);
  }
  if (ids.empty()) {
    if (merge_by_score_) {
      MergeByScore(word, &ids, &lens);
      // Map the surviving symbols; characters outside the vocabulary fall back to bytes.
      std::vector<int32_t> mapped;
      mapped.reserve(ids.size());
      size_t pos = 0;
      for (size_t k = 0; k < lens.size(); ++k) {
        std::string_view text = word.substr(pos, lens[k]);
        pos += lens[k];
        if (ids[k] >= 0) {
          mapped.push_back(ids[k]);
          continue;
        }
        for (char c : text) {
          int32_t b = byte_ids_[static_cast<uint8_t>(c)];
          if (b < 0) {
            if (spec_.unk_id < 0) {
              return absl::InvalidArgumentError(absl::StrFormat(
                  "%s: '%s' is not in the vocabulary, which has neither <0x%02X> nor an unk token",
                  spec_.source, std::string(text), static_cast<uint8_t>(c)));
            }
            mapped.push_back(spec_.unk_id);
            break;
          }
          mapped.push_back(b);
        }
      }
      ids = std::move(mapped);
    } else {
      QKV_RETURN_IF_ERROR(SentencePieceSymbols(word, &ids, &lens));
      MergeByRank(&ids);
    }
  }
  out->insert(out->end(), ids.begin(), ids.end());
  if (cacheable) {
    absl::MutexLock lock(&cache_mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.try_emplace(word, std::move(ids));
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::SentencePieceSymbols(std::string_view word, std::vector<int32_t>* ids,
                                             std::vector<int32_t>* lens) const {
  // Mirrors HF BPE::merge_word: known characters map to their token; unknown ones to byte
  // tokens when byte fallback is on and all exist, else to unk (fused if fuse_unk).
  for (size_t i = 0; i < word.size();) {
    size_t len = Utf8CharLength(word, i);
    std::string_view ch = word.substr(i, len);
    i += len;
    auto it = vocab_.find(ch);
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      lens->push_back(static_cast<int32_t>(len));
      continue;
    }
    if (spec_.byte_fallback) {
      bool all = true;
      for (char c : ch) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : ch) {
          ids->push_back(byte_ids_[static_cast<uint8_t>(c)]);
          lens->push_back(1);
        }
        continue;
      }
    }
    if (spec_.unk_id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(spec_.source, ": '", std::string(ch),
                       "' is not in the vocabulary and there is neither byte fallback nor unk"));
    }
    if (spec_.fuse_unk && !ids->empty() && ids->back() == spec_.unk_id) {
      lens->back() += static_cast<int32_t>(len);
      continue;
    }
    ids->push_back(spec_.unk_id);
    lens->push_back(static_cast<int32_t>(len));
  }
  return absl::OkStatus();
}

void Tokenizer::MergeByRank(std::vector<int32_t>* ids) const {
  const int32_t n = static_cast<int32_t>(ids->size());
  if (n < 2) return;
  struct Sym {
    int32_t id, prev, next;
    bool alive;
  };
  struct Cand {
    int32_t rank, pos, new_id;
  };
  // Min-heap on (rank, pos): lowest rank first, leftmost among equal ranks (HF's order).
  auto later = [](const Cand& x, const Cand& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  std::vector<Sym> syms(n);
  std::vector<Cand> heap;
  heap.reserve(n);
  for (int32_t i = 0; i < n; ++i) syms[i] = {(*ids)[i], i - 1, i + 1 < n ? i + 1 : -1, true};
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const Merge* m = FindMerge(syms[i].id, syms[i + 1].id)) heap.push_back({m->rank, i, m->id});
  }
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    Cand top = heap.back();
    heap.pop_back();
    Sym& s = syms[top.pos];
    if (!s.alive || s.next < 0) continue;
    // Stale entries (either side already merged differently) no longer match the pair.
    const Merge* m = FindMerge(s.id, syms[s.next].id);
    if (m == nullptr || m->id != top.new_id) continue;
    Sym& right = syms[s.next];
    s.id = top.new_id;
    right.alive = false;
    s.next = right.next;
    if (s.next >= 0) syms[s.next].prev = top.pos;
    if (s.prev >= 0) {
      if (const Merge* pm = FindMerge(syms[s.prev].id, s.id)) {
        heap.push_back({pm->rank, s.prev, pm->id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (s.next >= 0) {
      if (const Merge* nm = FindMerge(s.id, syms[s.next].id)) {
        heap.push_back({nm->rank, top.pos, nm->id});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
  ids->clear();
  for (int32_t i = 0; i >= 0; i = syms[i].next) ids->push_back(syms[i].id);
}

void Tokenizer::MergeByScore(std::string_view word, std::vector<int32_t>* ids,
                             std::vector<int32_t>* lens) const {
  // llama.cpp's llm_tokenizer_spm (SentencePiece BPE): start from characters, repeatedly merge
  // the adjacent pair whose concatenation is the highest-scoring token, leftmost on ties.
  struct Sym {
    int32_t start, len, prev, next;
  };
  struct Bigram {
    float score;
    int32_t left, right, size;
  };
  auto worse = [](const Bigram& x, const Bigram& y) {
    return x.score != y.score ? x.score < y.score : x.left > y.left;
  };
  std::vector<Sym> syms;
  for (size_t i = 0; i < word.size();) {
    int32_t len = static_cast<int32_t>(Utf8CharLength(word, i));
    int32_t idx = static_cast<int32_t>(syms.size());
    syms.push_back({static_cast<int32_t>(i), len, idx - 1, -1});
    if (idx > 0) syms[idx - 1].next = idx;
    i += len;
  }
  std::vector<Bigram> heap;
  auto try_add = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    std::string_view text = word.substr(syms[l].start, syms[l].len + syms[r].len);
    auto it = vocab_.find(text);
    if (it == vocab_.end() || !IsPlainType(spec_.token_types[it->second])) return;
    heap.push_back({spec_.scores[it->second], l, r, static_cast<int32_t>(text.size())});
    std::push_heap(heap.begin(), heap.end(), worse);
  };
  for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add(i - 1, i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    Bigram b = heap.back();
    heap.pop_back();
    Sym& left = syms[b.left];
    Sym& right = syms[b.right];
    if (left.len == 0 || right.len == 0 || left.len + right.len != b.size || left.next != b.right) {
      continue;
    }
    left.len += right.len;
    right.len = 0;
    left.next = right.next;
    if (right.next >= 0) syms[right.next].prev = b.left;
    try_add(left.prev, b.left);
    try_add(b.left, left.next);
  }
  for (int32_t i = syms.empty() ? -1 : 0; i >= 0; i = syms[i].next) {
    std::string_view text = word.substr(syms[i].start, syms[i].len);
    auto it = vocab_.find(text);
    bool ok = it != vocab_.end() && IsPlainType(spec_.token_types[it->second]);
    ids->push_back(ok ? it->second : -1);
    lens->push_back(syms[i].len);
  }
}

void Tokenizer::AppendTokenBytes(int32_t id, std::string* out) const {
  const std::string& text = spec_.tokens[id];
  TokenType type = spec_.token_types[id];
  if (IsSpecialType(type)) {
    out->append(text);
    return;
  }
  if (spec_.model == TokenizerModel::kByteLevelBpe) {
    for (size_t i = 0; i < text.size();) {
      size_t len = tokenizer::Utf8SequenceLength(text, i);
      if (len == 0) {
        out->push_back(text[i++]);
        continue;
      }
      int b = tokenizer::CodePointToByte(tokenizer::DecodeUtf8(text, i));
      if (b >= 0) {
        out->push_back(static_cast<char>(b));
      } else {
        out->append(text, i, len);  // not from the byte alphabet: keep it as written
      }
      i += len;
    }
    return;
  }
  if (type == TokenType::kByte && text.size() == 6) {
    unsigned value = 0;
    if (std::sscanf(text.c_str() + 3, "%2X", &value) == 1) {
      out->push_back(static_cast<char>(value));
      return;
    }
  }
  for (size_t i = 0; i < text.size();) {
    if (text.compare(i, kSpaceMarker.size(), kSpaceMarker) == 0) {
      out->push_back(' ');
      i += kSpaceMarker.size();
    } else {
      out->push_back(text[i++]);
    }
  }
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              DecodeOptions options) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t id = ids[i];
    if (id < 0 || id >= vocab_size()) {
      return absl::OutOfRangeError(absl::StrCat("Decode: token id ", id, " at position ", i,
                                                " is outside the vocabulary [0, ", vocab_size(),
                                                ") of ", spec_.source));
    }
    if (options.skip_special && spec_.token_types[id] == TokenType::kControl) continue;
    AppendTokenBytes(id, &out);
  }
  if (spec_.strip_leading_space && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

absl::StatusOr<std::string> Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) {
    return absl::OutOfRangeError(absl::StrCat("TokenBytes: token id ", id,
                                              " is outside the vocabulary [0, ", vocab_size(),
                                              ") of ", spec_.source));
  }
  std::string out;
  AppendTokenBytes(id, &out);
  return out;
}

std::string_view Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return {};
  return spec_.tokens[id];
}

std::optional<int32_t> Tokenizer::TokenId(std::string_view text) const {
  auto it = vocab_.find(text);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

TokenType Tokenizer::token_type(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return TokenType::kUndefined;
  return spec_.token_types[id];
}

absl::StatusOr<std::string> StreamDecoder::Push(int32_t id) {
  const Tokenizer& t = tokenizer_;
  if (id < 0 || id >= t.vocab_size()) {
    return absl::OutOfRangeError(absl::StrCat("StreamDecoder: token id ", id,
                                              " is outside the vocabulary [0, ", t.vocab_size(),
                                              ") of ", t.spec_.source));
  }
  if (options_.skip_special && t.spec_.token_types[id] == TokenType::kControl) return std::string();
  size_t before = pending_.size();
  t.AppendTokenBytes(id, &pending_);
  if (at_start_ && pending_.size() > before) {
    // Decode strips one leading space of the whole output; here that is the first byte ever.
    if (t.spec_.strip_leading_space && pending_[before] == ' ') pending_.erase(before, 1);
    at_start_ = false;
  }
  return Drain(/*final=*/false);
}

std::string StreamDecoder::Flush() {
  std::string out = Drain(/*final=*/true);
  pending_.clear();
  at_start_ = true;
  return out;
}

std::string StreamDecoder::Drain(bool final) {
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    size_t len = tokenizer::Utf8SequenceLength(pending_, i);
    if (len > 0) {
      out.append(pending_, i, len);
      i += len;
      continue;
    }
    if (!final && tokenizer::IsIncompleteUtf8Prefix(pending_, i)) break;
    out.append("\xEF\xBF\xBD");
    ++i;
  }
  pending_.erase(0, i);
  return out;
}

}  // namespace quantkv
