#include "runtime/tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace quantkv::tokenizer {
namespace {

// Llama 3's pattern (HF Split regex of Meta-Llama-3 tokenizer.json).
constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2's pattern: Llama 3's with single digits.
constexpr std::string_view kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

std::string Pcre2Message(int code) {
  PCRE2_UCHAR buf[256];
  int n = pcre2_get_error_message(code, buf, sizeof(buf));
  if (n < 0) return absl::StrCat("PCRE2 error ", code);
  return std::string(reinterpret_cast<const char*>(buf), static_cast<size_t>(n));
}

// Per-thread JIT stack: the default 32 KiB machine stack is too small for patterns such as
// `\s+(?!\S)` on long whitespace runs, and one stack per call would cost an mmap per Encode.
struct ThreadMatchContext {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  ThreadMatchContext() {
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~ThreadMatchContext() {
    if (stack != nullptr) pcre2_jit_stack_free(stack);
    if (context != nullptr) pcre2_match_context_free(context);
  }
};

pcre2_match_context* MatchContext() {
  thread_local ThreadMatchContext ctx;
  return ctx.context;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> PreTokenizerPatterns(std::string_view pre) {
  // Names and patterns follow llama.cpp's llama-vocab.cpp, with HF's spelling of each regex
  // (HF is the reference the fixtures are made from).
  if (pre == "gpt2" || pre == "mpt" || pre == "olmo" || pre == "gpt-2") {
    return std::vector<std::string>{std::string(kGpt2Pattern)};
  }
  if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" ||
      pre == "codeshell" || pre == "exaone" || pre == "minerva-7b") {
    // Digits(individual_digits=true) then ByteLevel, as in these models' tokenizer.json.
    return std::vector<std::string>{R"(\p{N})", std::string(kGpt2Pattern)};
  }
  if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3" || pre == "falcon3" ||
      pre == "pixtral") {
    return std::vector<std::string>{std::string(kLlama3Pattern)};
  }
  if (pre == "qwen2" || pre == "deepseek-r1-qwen") {
    return std::vector<std::string>{std::string(kQwen2Pattern)};
  }
  if (pre == "default") {
    // llama.cpp's fallback for BPE vocabularies without a recognised pre-tokenizer.
    return std::vector<std::string>{
        R"([\p{P}\$\+<=>\^~\|]+)",
        R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))",
        R"(\p{N}+)",
        R"([0-9][0-9][0-9])",
    };
  }
  return absl::UnimplementedError(absl::StrCat(
      "tokenizer.ggml.pre '", std::string(pre),
      "' is not a supported pre-tokenizer (known: gpt2, mpt, olmo, smollm, starcoder, refact, "
      "command-r, codeshell, exaone, minerva-7b, llama-bpe, llama3, llama-v3, falcon3, pixtral, "
      "qwen2, deepseek-r1-qwen, default)"));
}

bool PreTokenizerIgnoresMerges(std::string_view pre) {
  return pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3" || pre == "falcon3" ||
         pre == "pixtral";
}

struct PreTokenizer::Code {
  pcre2_code* code = nullptr;
  std::string pattern;
  ~Code() {
    if (code != nullptr) pcre2_code_free(code);
  }
};

PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;
PreTokenizer::~PreTokenizer() = default;

absl::StatusOr<PreTokenizer> PreTokenizer::Create(const std::vector<std::string>& patterns) {
  PreTokenizer pt;
  for (const std::string& pattern : patterns) {
    auto code = std::make_unique<Code>();
    code->pattern = pattern;
    int err = 0;
    PCRE2_SIZE err_offset = 0;
    code->code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &err_offset, nullptr);
    if (code->code == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("pre-tokenizer regex '", pattern,
                                                     "' does not compile at offset ", err_offset,
                                                     ": ", Pcre2Message(err)));
    }
    // JIT is an optimisation only; the interpreter gives the same matches.
    (void)pcre2_jit_compile(code->code, PCRE2_JIT_COMPLETE);
    pt.codes_.push_back(std::move(code));
  }
  return pt;
}

absl::Status PreTokenizer::Split(std::string_view text, std::vector<std::string_view>* out) const {
  if (codes_.empty()) {
    if (!text.empty()) out->push_back(text);
    return absl::OkStatus();
  }
  std::vector<std::string_view> current{text};
  std::vector<std::string_view> next;
  pcre2_match_context* context = MatchContext();
  for (const auto& code : codes_) {
    next.clear();
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code->code, nullptr);
    if (md == nullptr) return absl::ResourceExhaustedError("pre-tokenizer: out of memory");
    for (std::string_view piece : current) {
      auto subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
      size_t pos = 0, gap_start = 0;
      while (pos < piece.size()) {
        int rc = pcre2_match(code->code, subject, piece.size(), pos, 0, md, context);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
          rc = pcre2_match(code->code, subject, piece.size(), pos, PCRE2_NO_JIT, md, context);
        }
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
          pcre2_match_data_free(md);
          return absl::ResourceExhaustedError(absl::StrCat("pre-tokenizer regex '", code->pattern,
                                                           "' failed on a ", piece.size(),
                                                           "-byte piece: ", Pcre2Message(rc)));
        }
        const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
        size_t start = ov[0], end = ov[1];
        if (end == start) {
          // An empty match produces no piece; step over one character to make progress.
          pos = start + 1;
          while (pos < piece.size() && (static_cast<uint8_t>(piece[pos]) & 0xC0) == 0x80) ++pos;
          continue;
        }
        if (start > gap_start) next.push_back(piece.substr(gap_start, start - gap_start));
        next.push_back(piece.substr(start, end - start));
        pos = gap_start = end;
      }
      if (gap_start < piece.size()) next.push_back(piece.substr(gap_start));
    }
    pcre2_match_data_free(md);
    current.swap(next);
  }
  out->insert(out->end(), current.begin(), current.end());
  return absl::OkStatus();
}

}  // namespace quantkv::tokenizer
