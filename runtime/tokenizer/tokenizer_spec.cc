#include "runtime/tokenizer/tokenizer_spec.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "runtime/tokenizer/pre_tokenizer.h"
#include "runtime/util/status_macros.h"

namespace quantkv {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// GGUF
// ---------------------------------------------------------------------------------------------

absl::Status ReadTokenId(const GgufFile& gguf, const char* key, size_t n_tokens, int32_t* out) {
  QKV_ASSIGN_OR_RETURN(int64_t id, gguf.GetIntOr(key, -1));
  if (id < -1 || id >= static_cast<int64_t>(n_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        gguf.name(), ": ", key, " = ", id, " is outside the vocabulary of ", n_tokens, " tokens"));
  }
  *out = static_cast<int32_t>(id);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json
// ---------------------------------------------------------------------------------------------

absl::Status JsonError(const TokenizerSpec& spec, const std::string& field,
                       const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(spec.source, ": ", field, " ", what));
}

absl::StatusOr<json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  try {
    return json::parse(buf.str());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
}

// Field lookup that tolerates absence and null; a present field of the wrong type is an error.
const json* Field(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<bool> BoolField(const TokenizerSpec& spec, const json& obj, const char* key,
                               const std::string& path, bool fallback) {
  const json* v = Field(obj, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) return JsonError(spec, absl::StrCat(path, ".", key), "is not a boolean");
  return v->get<bool>();
}

absl::StatusOr<std::string> StringField(const TokenizerSpec& spec, const json& obj, const char* key,
                                        const std::string& path) {
  const json* v = Field(obj, key);
  if (v == nullptr) return std::string();
  if (!v->is_string()) return JsonError(spec, absl::StrCat(path, ".", key), "is not a string");
  return v->get<std::string>();
}

// Collects the regexes of a byte-level pre-tokenizer; `saw_byte_level` reports a ByteLevel.
absl::Status CollectPreTokenizer(TokenizerSpec& spec, const json& pt, const std::string& path,
                                 std::vector<std::string>* patterns, bool* saw_byte_level,
                                 bool* saw_metaspace) {
  QKV_ASSIGN_OR_RETURN(std::string type, StringField(spec, pt, "type", path));
  if (type == "Sequence") {
    const json* list = Field(pt, "pretokenizers");
    if (list == nullptr || !list->is_array()) {
      return JsonError(spec, path + ".pretokenizers", "is not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      QKV_RETURN_IF_ERROR(CollectPreTokenizer(spec, (*list)[i],
                                              absl::StrCat(path, ".pretokenizers[", i, "]"),
                                              patterns, saw_byte_level, saw_metaspace));
    }
    return absl::OkStatus();
  }
  if (type == "ByteLevel") {
    *saw_byte_level = true;
    QKV_ASSIGN_OR_RETURN(bool prefix, BoolField(spec, pt, "add_prefix_space", path, false));
    if (prefix) {
      return absl::UnimplementedError(
          absl::StrCat(spec.source, ": ", path, ".add_prefix_space = true is not supported"));
    }
    QKV_ASSIGN_OR_RETURN(bool use_regex, BoolField(spec, pt, "use_regex", path, true));
    if (use_regex) patterns->emplace_back(tokenizer::kGpt2Pattern);
    return absl::OkStatus();
  }
  if (type == "Digits") {
    QKV_ASSIGN_OR_RETURN(bool individual, BoolField(spec, pt, "individual_digits", path, false));
    patterns->push_back(individual ? R"(\p{N})" : R"(\p{N}+)");
    return absl::OkStatus();
  }
  if (type == "Split") {
    QKV_ASSIGN_OR_RETURN(std::string behavior, StringField(spec, pt, "behavior", path));
    QKV_ASSIGN_OR_RETURN(bool invert, BoolField(spec, pt, "invert", path, false));
    if (behavior != "Isolated" || invert) {
      return absl::UnimplementedError(absl::StrCat(spec.source, ": ", path, ".behavior '", behavior,
                                                   "' (invert ", invert,
                                                   ") is not supported; only Isolated is"));
    }
    const json* pattern = Field(pt, "pattern");
    if (pattern == nullptr || !pattern->is_object()) {
      return JsonError(spec, path + ".pattern", "is not an object");
    }
    if (const json* re = Field(*pattern, "Regex"); re != nullptr && re->is_string()) {
      patterns->push_back(re->get<std::string>());
    } else if (const json* s = Field(*pattern, "String"); s != nullptr && s->is_string()) {
      patterns->push_back(absl::StrCat("\\Q", s->get<std::string>(), "\\E"));
    } else {
      return JsonError(spec, path + ".pattern", "has neither a Regex nor a String");
    }
    return absl::OkStatus();
  }
  if (type == "Metaspace") {
    *saw_metaspace = true;
    QKV_ASSIGN_OR_RETURN(std::string replacement, StringField(spec, pt, "replacement", path));
    if (!replacement.empty() && replacement != "\xE2\x96\x81") {
      return absl::UnimplementedError(absl::StrCat(spec.source, ": ", path, ".replacement '",
                                                   replacement, "' is not supported; only ▁ is"));
    }
    QKV_ASSIGN_OR_RETURN(std::string scheme, StringField(spec, pt, "prepend_scheme", path));
    if (scheme.empty()) {
      // Older files spell it add_prefix_space.
      QKV_ASSIGN_OR_RETURN(bool add, BoolField(spec, pt, "add_prefix_space", path, true));
      scheme = add ? "always" : "never";
    }
    if (scheme == "always") {
      spec.space_prefix = SpacePrefix::kAlwaysIfMissing;
    } else if (scheme == "first") {
      spec.space_prefix = SpacePrefix::kFirstIfMissing;
    } else if (scheme == "never") {
      spec.space_prefix = SpacePrefix::kNever;
    } else {
      return JsonError(spec, path + ".prepend_scheme", absl::StrCat("'", scheme, "' is unknown"));
    }
    QKV_ASSIGN_OR_RETURN(spec.split_on_space_marker, BoolField(spec, pt, "split", path, true));
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat(spec.source, ": ", path, ".type '", type,
                   "' is not supported (ByteLevel, Digits, Split, Metaspace, Sequence)"));
}

// The SentencePiece-style normalizer: Prepend("▁") and Replace(" " -> "▁") in any nesting.
absl::Status CollectNormalizer(TokenizerSpec& spec, const json& n, const std::string& path,
                               bool* saw_sentencepiece) {
  QKV_ASSIGN_OR_RETURN(std::string type, StringField(spec, n, "type", path));
  if (type == "Sequence") {
    const json* list = Field(n, "normalizers");
    if (list == nullptr || !list->is_array()) {
      return JsonError(spec, path + ".normalizers", "is not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      QKV_RETURN_IF_ERROR(CollectNormalizer(
          spec, (*list)[i], absl::StrCat(path, ".normalizers[", i, "]"), saw_sentencepiece));
    }
    return absl::OkStatus();
  }
  if (type == "Prepend") {
    QKV_ASSIGN_OR_RETURN(std::string prepend, StringField(spec, n, "prepend", path));
    if (prepend != "\xE2\x96\x81") {
      return absl::UnimplementedError(absl::StrCat(spec.source, ": ", path, ".prepend '", prepend,
                                                   "' is not supported; only ▁ is"));
    }
    spec.space_prefix = SpacePrefix::kAlways;
    *saw_sentencepiece = true;
    return absl::OkStatus();
  }
  if (type == "Replace") {
    const json* pattern = Field(n, "pattern");
    const json* s = pattern != nullptr ? Field(*pattern, "String") : nullptr;
    QKV_ASSIGN_OR_RETURN(std::string content, StringField(spec, n, "content", path));
    if (s == nullptr || !s->is_string() || s->get<std::string>() != " " ||
        content != "\xE2\x96\x81") {
      return absl::UnimplementedError(absl::StrCat(
          spec.source, ": ", path, " is not supported; only Replace(\" \" -> \"▁\") is"));
    }
    *saw_sentencepiece = true;
    return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat(spec.source, ": ", path, ".type '", type,
                   "' is not supported (only the SentencePiece Prepend/Replace normalizers are)"));
}

// Decoders only tell whether one leading space is stripped; the rest follows from the model.
absl::Status CollectDecoder(TokenizerSpec& spec, const json& d, const std::string& path) {
  QKV_ASSIGN_OR_RETURN(std::string type, StringField(spec, d, "type", path));
  if (type == "Sequence") {
    const json* list = Field(d, "decoders");
    if (list == nullptr || !list->is_array()) {
      return JsonError(spec, path + ".decoders", "is not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      QKV_RETURN_IF_ERROR(
          CollectDecoder(spec, (*list)[i], absl::StrCat(path, ".decoders[", i, "]")));
    }
  } else if (type == "Strip") {
    const json* start = Field(d, "start");
    if (start != nullptr && start->is_number_integer() && start->get<int64_t>() > 0) {
      spec.strip_leading_space = true;
    }
  } else if (type == "Metaspace") {
    QKV_ASSIGN_OR_RETURN(std::string scheme, StringField(spec, d, "prepend_scheme", path));
    if (scheme.empty()) {
      QKV_ASSIGN_OR_RETURN(bool add, BoolField(spec, d, "add_prefix_space", path, true));
      scheme = add ? "always" : "never";
    }
    if (scheme != "never") spec.strip_leading_space = true;
  }
  return absl::OkStatus();
}

// A token named by tokenizer_config.json: a string, or an AddedToken object with "content".
absl::StatusOr<int32_t> ConfigTokenId(const TokenizerSpec& spec,
                                      const absl::flat_hash_map<std::string, int32_t>& ids,
                                      const json& config, const char* key,
                                      const std::string& config_path) {
  const json* v = Field(config, key);
  if (v == nullptr) return -1;
  std::string text;
  if (v->is_string()) {
    text = v->get<std::string>();
  } else if (const json* c = Field(*v, "content"); c != nullptr && c->is_string()) {
    text = c->get<std::string>();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": ", key, " is neither a string nor {\"content\": ...}"));
  }
  auto it = ids.find(text);
  if (it == ids.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": ", key, " '", text, "' is not a token of ", spec.source));
  }
  return it->second;
}

absl::Status CollectPostProcessor(TokenizerSpec& spec,
                                  const absl::flat_hash_map<std::string, int32_t>& ids,
                                  const json& post, const std::string& path) {
  QKV_ASSIGN_OR_RETURN(std::string type, StringField(spec, post, "type", path));
  if (type == "Sequence") {
    const json* list = Field(post, "processors");
    if (list == nullptr || !list->is_array()) {
      return JsonError(spec, path + ".processors", "is not an array");
    }
    for (size_t i = 0; i < list->size(); ++i) {
      QKV_RETURN_IF_ERROR(
          CollectPostProcessor(spec, ids, (*list)[i], absl::StrCat(path, ".processors[", i, "]")));
    }
    return absl::OkStatus();
  }
  const json* single = Field(post, "single");
  if (type != "TemplateProcessing" || single == nullptr || !single->is_array()) {
    return absl::OkStatus();  // ByteLevel offsets and the like change no ids
  }
  bool seen_sequence = false;
  for (const json& item : *single) {
    if (Field(item, "Sequence") != nullptr) {
      seen_sequence = true;
      continue;
    }
    const json* st = Field(item, "SpecialToken");
    const json* id = st != nullptr ? Field(*st, "id") : nullptr;
    if (id == nullptr || !id->is_string()) continue;
    auto it = ids.find(id->get<std::string>());
    if (it == ids.end()) {
      return JsonError(spec, path + ".single",
                       absl::StrCat("names unknown token '", id->get<std::string>(), "'"));
    }
    if (seen_sequence) {
      spec.eos_id = it->second;
      spec.add_eos = true;
    } else {
      spec.bos_id = it->second;
      spec.add_bos = true;
    }
  }
  return absl::OkStatus();
}

bool IsByteToken(std::string_view t) {
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'); };
  return t.size() == 6 && t.substr(0, 3) == "<0x" && hex(t[3]) && hex(t[4]) && t[5] == '>';
}

absl::Status FillFromJson(TokenizerSpec& spec, const json& root, const std::string& path) {
  if (!root.is_object()) return JsonError(spec, "(root)", "is not an object");
  const json* model = Field(root, "model");
  if (model == nullptr || !model->is_object()) return JsonError(spec, "model", "is missing");
  QKV_ASSIGN_OR_RETURN(std::string type, StringField(spec, *model, "type", "model"));
  if (type != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat(spec.source, ": model.type '", type, "' is not supported; only BPE is"));
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    QKV_ASSIGN_OR_RETURN(std::string v, StringField(spec, *model, key, "model"));
    if (!v.empty()) {
      return absl::UnimplementedError(
          absl::StrCat(spec.source, ": model.", key, " '", v, "' is not supported"));
    }
  }
  if (const json* dropout = Field(*model, "dropout");
      dropout != nullptr && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return absl::UnimplementedError(
        absl::StrCat(spec.source, ": model.dropout is set; BPE dropout is not supported"));
  }
  QKV_ASSIGN_OR_RETURN(spec.byte_fallback,
                       BoolField(spec, *model, "byte_fallback", "model", false));
  QKV_ASSIGN_OR_RETURN(spec.fuse_unk, BoolField(spec, *model, "fuse_unk", "model", false));
  QKV_ASSIGN_OR_RETURN(spec.ignore_merges,
                       BoolField(spec, *model, "ignore_merges", "model", false));

  // Vocabulary: model.vocab plus added_tokens (which may extend it).
  const json* vocab = Field(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) {
    return JsonError(spec, "model.vocab", "is not an object");
  }
  std::vector<std::pair<std::string, int64_t>> entries;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer()) {
      return JsonError(spec, absl::StrCat("model.vocab['", it.key(), "']"), "is not an integer");
    }
    entries.emplace_back(it.key(), it.value().get<int64_t>());
  }
  struct Added {
    std::string content;
    int64_t id;
    bool special;
  };
  std::vector<Added> added;
  if (const json* list = Field(root, "added_tokens")) {
    if (!list->is_array()) return JsonError(spec, "added_tokens", "is not an array");
    for (size_t i = 0; i < list->size(); ++i) {
      const json& a = (*list)[i];
      std::string field = absl::StrCat("added_tokens[", i, "]");
      const json* id = Field(a, "id");
      const json* content = Field(a, "content");
      if (id == nullptr || !id->is_number_integer() || content == nullptr ||
          !content->is_string()) {
        return JsonError(spec, field, "needs an integer id and a string content");
      }
      QKV_ASSIGN_OR_RETURN(bool special, BoolField(spec, a, "special", field, false));
      added.push_back({content->get<std::string>(), id->get<int64_t>(), special});
    }
  }
  int64_t n = 0;
  for (const auto& [text, id] : entries) n = std::max(n, id + 1);
  for (const Added& a : added) n = std::max(n, a.id + 1);
  constexpr int64_t kMaxVocab = int64_t{1} << 24;
  for (const auto& [text, id] : entries) {
    if (id < 0 || id >= kMaxVocab) {
      return JsonError(spec, absl::StrCat("model.vocab['", text, "']"),
                       absl::StrCat("= ", id, " is not a valid token id"));
    }
  }
  for (const Added& a : added) {
    if (a.id < 0 || a.id >= kMaxVocab) {
      return JsonError(spec, absl::StrCat("added_tokens '", a.content, "'"),
                       absl::StrCat("has invalid id ", a.id));
    }
  }
  spec.tokens.assign(n, std::string());
  std::vector<bool> have(n, false);
  for (auto& [text, id] : entries) {
    if (have[id]) {
      return JsonError(
          spec, "model.vocab",
          absl::StrCat("gives id ", id, " to both '", spec.tokens[id], "' and '", text, "'"));
    }
    have[id] = true;
    spec.tokens[id] = std::move(text);
  }
  spec.token_types.assign(n, TokenType::kNormal);
  QKV_ASSIGN_OR_RETURN(std::string unk_token, StringField(spec, *model, "unk_token", "model"));
  for (const Added& a : added) {
    if (have[a.id] && spec.tokens[a.id] != a.content) {
      return JsonError(
          spec, absl::StrCat("added_tokens '", a.content, "'"),
          absl::StrCat("has id ", a.id, ", which model.vocab gives to '", spec.tokens[a.id], "'"));
    }
    have[a.id] = true;
    spec.tokens[a.id] = a.content;
    spec.token_types[a.id] = !a.special               ? TokenType::kUserDefined
                             : a.content == unk_token ? TokenType::kUnknown
                                                      : TokenType::kControl;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!have[i]) {
      return JsonError(spec, "model.vocab", absl::StrCat("has no token with id ", i));
    }
  }
  absl::flat_hash_map<std::string, int32_t> ids;
  for (int64_t i = 0; i < n; ++i) ids[spec.tokens[i]] = static_cast<int32_t>(i);
  if (!unk_token.empty()) {
    auto it = ids.find(unk_token);
    if (it == ids.end()) {
      return JsonError(spec, "model.unk_token", absl::StrCat("'", unk_token, "' is not a token"));
    }
    spec.unk_id = it->second;
  }

  // Merges: "a b" strings (older files) or ["a", "b"] pairs.
  if (const json* merges = Field(*model, "merges")) {
    if (!merges->is_array()) return JsonError(spec, "model.merges", "is not an array");
    spec.merges.reserve(merges->size());
    for (size_t i = 0; i < merges->size(); ++i) {
      const json& m = (*merges)[i];
      if (m.is_string()) {
        const std::string& s = m.get_ref<const std::string&>();
        size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          return JsonError(spec, absl::StrCat("model.merges[", i, "]"),
                           absl::StrCat("'", s, "' is not two tokens separated by a space"));
        }
        spec.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        spec.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      } else {
        return JsonError(spec, absl::StrCat("model.merges[", i, "]"),
                         "is neither \"a b\" nor [\"a\", \"b\"]");
      }
    }
  }

  // Pre-tokenizer, normalizer and decoder decide between the two BPE flavours.
  std::vector<std::string> patterns;
  bool byte_level = false, metaspace = false, sp_normalizer = false;
  if (const json* pt = Field(root, "pre_tokenizer")) {
    QKV_RETURN_IF_ERROR(
        CollectPreTokenizer(spec, *pt, "pre_tokenizer", &patterns, &byte_level, &metaspace));
  }
  if (const json* norm = Field(root, "normalizer")) {
    QKV_RETURN_IF_ERROR(CollectNormalizer(spec, *norm, "normalizer", &sp_normalizer));
  }
  if (const json* dec = Field(root, "decoder")) {
    QKV_RETURN_IF_ERROR(CollectDecoder(spec, *dec, "decoder"));
    QKV_ASSIGN_OR_RETURN(std::string dec_type, StringField(spec, *dec, "type", "decoder"));
    if (dec_type == "ByteLevel") byte_level = true;
  }
  if (byte_level && (metaspace || sp_normalizer)) {
    return JsonError(spec, "pre_tokenizer",
                     "mixes ByteLevel with SentencePiece-style Metaspace/normalizer");
  }
  if (byte_level) {
    spec.model = TokenizerModel::kByteLevelBpe;
    spec.pre = "tokenizer.json";
    spec.pre_patterns = std::move(patterns);
    spec.strip_leading_space = false;
    if (spec.merges.empty()) return JsonError(spec, "model.merges", "is missing or empty");
  } else if (metaspace || sp_normalizer || spec.byte_fallback) {
    spec.model = TokenizerModel::kSentencePieceBpe;
    if (!patterns.empty()) {
      return absl::UnimplementedError(absl::StrCat(
          spec.source, ": pre_tokenizer: regex splits are not supported for SentencePiece BPE"));
    }
    if (spec.byte_fallback) {
      for (int64_t i = 0; i < n; ++i) {
        if (spec.token_types[i] == TokenType::kNormal && IsByteToken(spec.tokens[i])) {
          spec.token_types[i] = TokenType::kByte;
        }
      }
    }
  } else {
    return JsonError(spec, "pre_tokenizer",
                     "has neither ByteLevel nor Metaspace (nor a SentencePiece normalizer): "
                     "cannot tell which BPE flavour this is");
  }

  // Special tokens the post-processor adds with add_special_tokens=True (TemplateProcessing,
  // possibly inside a Sequence of processors as in Llama 3).
  if (const json* post = Field(root, "post_processor")) {
    QKV_RETURN_IF_ERROR(CollectPostProcessor(spec, ids, *post, "post_processor"));
  }

  // tokenizer_config.json next to it carries what tokenizer.json does not.
  std::filesystem::path config_path =
      std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    const std::string cpath = config_path.string();
    QKV_ASSIGN_OR_RETURN(json config, ReadJsonFile(cpath));
    if (!config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(cpath, ": is not an object"));
    }
    struct IdKey {
      const char* key;
      int32_t* out;
    };
    for (IdKey k : {IdKey{"bos_token", &spec.bos_id}, IdKey{"eos_token", &spec.eos_id},
                    IdKey{"unk_token", &spec.unk_id}, IdKey{"pad_token", &spec.pad_id}}) {
      QKV_ASSIGN_OR_RETURN(int32_t id, ConfigTokenId(spec, ids, config, k.key, cpath));
      if (id >= 0) *k.out = id;
    }
    for (auto [key, out] : {std::pair<const char*, bool*>{"add_bos_token", &spec.add_bos},
                            std::pair<const char*, bool*>{"add_eos_token", &spec.add_eos}}) {
      const json* v = Field(config, key);
      if (v == nullptr) continue;
      if (!v->is_boolean()) {
        return absl::InvalidArgumentError(absl::StrCat(cpath, ": ", key, " is not a boolean"));
      }
      *out = v->get<bool>();
    }
    if (const json* tmpl = Field(config, "chat_template")) {
      if (tmpl->is_string()) {
        spec.chat_template = tmpl->get<std::string>();
      } else if (tmpl->is_array()) {
        // Named templates: [{"name": "default", "template": ...}, ...].
        for (const json& t : *tmpl) {
          const json* name = Field(t, "name");
          const json* body = Field(t, "template");
          if (body == nullptr || !body->is_string()) continue;
          bool is_default = name != nullptr && name->is_string() && *name == "default";
          if (spec.chat_template.empty() || is_default)
            spec.chat_template = body->get<std::string>();
        }
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(cpath, ": chat_template is neither a string nor a list"));
      }
    }
  }
  if (spec.add_bos && spec.bos_id < 0) spec.add_bos = false;
  if (spec.add_eos && spec.eos_id < 0) spec.add_eos = false;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenizerSpec> TokenizerSpecFromGguf(const GgufFile& gguf) {
  TokenizerSpec spec;
  spec.source = gguf.name();
  QKV_ASSIGN_OR_RETURN(std::string model, gguf.GetString("tokenizer.ggml.model"));
  if (model == "gpt2") {
    spec.model = TokenizerModel::kByteLevelBpe;
  } else if (model == "llama") {
    spec.model = TokenizerModel::kSentencePieceBpe;
  } else {
    return absl::UnimplementedError(absl::StrCat(gguf.name(), ": tokenizer.ggml.model '", model,
                                                 "' is not supported (gpt2, llama)"));
  }
  QKV_ASSIGN_OR_RETURN(spec.pre, gguf.GetStringOr("tokenizer.ggml.pre", "default"));
  spec.ignore_merges =
      spec.model == TokenizerModel::kByteLevelBpe && tokenizer::PreTokenizerIgnoresMerges(spec.pre);
  QKV_ASSIGN_OR_RETURN(std::vector<std::string_view> tokens,
                       gguf.GetStringArray("tokenizer.ggml.tokens"));
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(gguf.name(), ": tokenizer.ggml.tokens is empty"));
  }
  if (tokens.size() > (size_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(gguf.name(), ": tokenizer.ggml.tokens has ",
                                                   tokens.size(), " entries (too many)"));
  }
  spec.tokens.assign(tokens.begin(), tokens.end());
  const size_t n = spec.tokens.size();

  if (gguf.Has("tokenizer.ggml.scores")) {
    QKV_ASSIGN_OR_RETURN(std::vector<double> scores, gguf.GetFloatArray("tokenizer.ggml.scores"));
    if (scores.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(gguf.name(), ": tokenizer.ggml.scores has ",
                                                     scores.size(), " entries for ", n, " tokens"));
    }
    spec.scores.assign(scores.begin(), scores.end());
  }
  if (gguf.Has("tokenizer.ggml.token_type")) {
    QKV_ASSIGN_OR_RETURN(std::vector<int64_t> types, gguf.GetIntArray("tokenizer.ggml.token_type"));
    if (types.size() != n) {
      return absl::InvalidArgumentError(absl::StrCat(gguf.name(),
                                                     ": tokenizer.ggml.token_type has ",
                                                     types.size(), " entries for ", n, " tokens"));
    }
    spec.token_types.resize(n);
    for (size_t i = 0; i < n; ++i) {
      if (types[i] < 0 || types[i] > 6) {
        return absl::InvalidArgumentError(absl::StrCat(gguf.name(), ": tokenizer.ggml.token_type[",
                                                       i, "] = ", types[i],
                                                       " is not a token type (0..6)"));
      }
      spec.token_types[i] = static_cast<TokenType>(types[i]);
    }
  }
  if (gguf.Has("tokenizer.ggml.merges")) {
    QKV_ASSIGN_OR_RETURN(std::vector<std::string_view> merges,
                         gguf.GetStringArray("tokenizer.ggml.merges"));
    spec.merges.reserve(merges.size());
    for (size_t i = 0; i < merges.size(); ++i) {
      // The first token never contains a space, but may start with one in some vocabularies;
      // llama.cpp splits at the first space after the first byte.
      size_t space = merges[i].size() > 1 ? merges[i].find(' ', 1) : std::string_view::npos;
      if (space == std::string_view::npos) {
        return absl::InvalidArgumentError(absl::StrCat(gguf.name(), ": tokenizer.ggml.merges[", i,
                                                       "] '", std::string(merges[i]),
                                                       "' is not two tokens separated by a space"));
      }
      spec.merges.emplace_back(std::string(merges[i].substr(0, space)),
                               std::string(merges[i].substr(space + 1)));
    }
  } else if (spec.model == TokenizerModel::kByteLevelBpe) {
    return absl::NotFoundError(
        absl::StrCat(gguf.name(), ": tokenizer.ggml.merges is missing (required for gpt2)"));
  }

  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.bos_token_id", n, &spec.bos_id));
  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.eos_token_id", n, &spec.eos_id));
  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.unknown_token_id", n, &spec.unk_id));
  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.padding_token_id", n, &spec.pad_id));
  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.eot_token_id", n, &spec.eot_id));
  QKV_RETURN_IF_ERROR(ReadTokenId(gguf, "tokenizer.ggml.eom_token_id", n, &spec.eom_id));

  const bool spm = spec.model == TokenizerModel::kSentencePieceBpe;
  // llama.cpp's defaults when the keys are absent: SentencePiece vocabularies add BOS.
  QKV_ASSIGN_OR_RETURN(spec.add_bos, gguf.GetBoolOr("tokenizer.ggml.add_bos_token", spm));
  QKV_ASSIGN_OR_RETURN(spec.add_eos, gguf.GetBoolOr("tokenizer.ggml.add_eos_token", false));
  if (spec.add_bos && spec.bos_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        gguf.name(), ": tokenizer.ggml.add_bos_token is set but there is no bos_token_id"));
  }
  if (spec.add_eos && spec.eos_id < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        gguf.name(), ": tokenizer.ggml.add_eos_token is set but there is no eos_token_id"));
  }
  if (spm) {
    QKV_ASSIGN_OR_RETURN(bool prefix, gguf.GetBoolOr("tokenizer.ggml.add_space_prefix", true));
    spec.space_prefix = prefix ? SpacePrefix::kAlways : SpacePrefix::kNever;
    spec.strip_leading_space = prefix;
    spec.byte_fallback = true;
  }
  QKV_ASSIGN_OR_RETURN(spec.chat_template, gguf.GetStringOr("tokenizer.chat_template", ""));
  return spec;
}

absl::StatusOr<TokenizerSpec> TokenizerSpecFromJson(const std::string& tokenizer_json_path) {
  TokenizerSpec spec;
  spec.source = tokenizer_json_path;
  QKV_ASSIGN_OR_RETURN(json root, ReadJsonFile(tokenizer_json_path));
  try {
    QKV_RETURN_IF_ERROR(FillFromJson(spec, root, tokenizer_json_path));
  } catch (const json::exception& e) {
    // The accessors check types first; this is a backstop so nothing escapes.
    return absl::InvalidArgumentError(
        absl::StrCat(tokenizer_json_path, ": unexpected JSON structure: ", e.what()));
  }
  return spec;
}

}  // namespace quantkv
