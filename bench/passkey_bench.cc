// Passkey retrieval inside the model's window, per KV preset: a 5-digit key hidden at a
// depth of filler text (the Landmark-attention / LongLoRA passkey test), then "What is the
// pass key? The pass key is" and 8 greedy tokens; a trial passes when they contain the key.
// Prefill runs in chunks of 512 tokens through the paged cache, as a server does, so the
// key is read back from the encoded blocks; the question's last 8 tokens and the answer
// are decode steps (where --page-fractions < 1 selects pages).
//
//   passkey_bench [--model PATH] [--presets "fp16;int4-comp;int2-comp"] [--lengths 1024,3072]
//                 [--depths 0.1,0.5,0.9] [--keys 2] [--page-fractions 1,0.25] [--threads 2]
//                 [--out DIR]
// A preset "SPEC#MODE" runs SPEC (with :keepN codecs) under --kv-promote MODE.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/results.h"
#include "runtime/engine/engine.h"
#include "runtime/model/gguf_model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace quantkv::bench {
namespace {

std::string DefaultModel() {
  if (const char* h = std::getenv("QUANTKV_HOME")) {
    return std::string(h) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  }
  return std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") +
         "/.cache/quantkv/SmolLM2-135M-Instruct.Q4_1.gguf";
}

constexpr char kIntro[] =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n";
constexpr char kFiller[] =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
    "again.";

// The prompt's token ids for a key at `depth` (0..1) of roughly `length` tokens.
absl::StatusOr<std::vector<int32_t>> Prompt(const Tokenizer& tok, int64_t length, double depth,
                                            int key) {
  auto filler = tok.Encode(kFiller, {.add_special = false});
  if (!filler.ok()) return filler.status();
  const std::string needle =
      absl::StrFormat(" The pass key is %d. Remember it. %d is the pass key.", key, key);
  const std::string question = "\nWhat is the pass key? The pass key is";
  auto fixed = tok.Encode(std::string(kIntro) + needle + question, {.add_special = false});
  if (!fixed.ok()) return fixed.status();
  const int64_t n_fill = std::max<int64_t>(
      1, (length - static_cast<int64_t>(fixed->size())) / static_cast<int64_t>(filler->size()));
  const int64_t before = static_cast<int64_t>(depth * n_fill + 0.5);
  std::string text = kIntro;
  for (int64_t i = 0; i < before; ++i) text += kFiller;
  text += needle;
  for (int64_t i = before; i < n_fill; ++i) text += kFiller;
  text += question;
  return tok.Encode(text, {.add_special = false});
}

int Main(int argc, char** argv) {
  std::string model = DefaultModel(), out = "bench/results";
  std::vector<std::string> presets = {"fp16", "int4-comp", "int3-comp", "int2-comp"};
  std::vector<int64_t> lengths = {1024, 3072};
  std::vector<double> depths = {0.1, 0.5, 0.9};
  int keys = 2, threads = 2;
  std::vector<double> pages = {1.0};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--model") {
      model = v;
    } else if (f == "--presets") {
      presets = absl::StrSplit(v, ';');
    } else if (f == "--lengths") {
      lengths.clear();
      for (absl::string_view s : absl::StrSplit(v, ','))
        lengths.push_back(std::atoll(std::string(s).c_str()));
    } else if (f == "--depths") {
      depths.clear();
      for (absl::string_view s : absl::StrSplit(v, ','))
        depths.push_back(std::atof(std::string(s).c_str()));
    } else if (f == "--page-fractions") {
      pages.clear();
      for (absl::string_view s : absl::StrSplit(v, ','))
        pages.push_back(std::atof(std::string(s).c_str()));
    } else if (f == "--keys") {
      keys = std::atoi(v.c_str());
    } else if (f == "--threads") {
      threads = std::atoi(v.c_str());
    } else if (f == "--out") {
      out = v;
    } else {
      std::cerr << "passkey_bench: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (argc % 2 == 0 || keys < 1 || threads < 1) {
    std::cerr << "passkey_bench: flags take one value each; --keys and --threads >= 1\n";
    return 2;
  }
  auto gguf = GgufModel::Open(model);
  if (!gguf.ok()) {
    std::cerr << "passkey_bench: " << gguf.status() << "\n";
    return 1;
  }
  auto tok = Tokenizer::FromGguf((*gguf)->gguf());
  if (!tok.ok()) {
    std::cerr << "passkey_bench: " << tok.status() << "\n";
    return 1;
  }
  std::mt19937 rng(20261201);
  std::uniform_int_distribution<int> key_dist(10000, 99999);
  std::vector<int> key_list;
  for (int k = 0; k < keys; ++k) key_list.push_back(key_dist(rng));
  std::string md = absl::StrFormat(
      "# Passkey retrieval per KV preset (SmolLM2-135M, %d keys per cell, 8 greedy tokens)\n\n"
      "| preset | pages | bits/element | length | %s | all |\n|---|---|---|---|",
      keys, absl::StrJoin(depths, " | ", [](std::string* o, double d) {
        absl::StrAppend(o, absl::StrFormat("depth %.1f", d));
      }));
  for (size_t i = 0; i < depths.size(); ++i) md += "---|";
  md += "---|\n";
  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& preset : presets) {
    for (double page : pages) {
      EngineConfig c;
      c.threads = threads;
      // "SPEC#MODE": the cache SPEC with --kv-promote MODE (a :keepN codec).
      const std::vector<std::string> parts = absl::StrSplit(preset, '#');
      c.kv_spec = parts[0];
      if (parts.size() > 1) c.kv_promote = parts[1];
      c.page_fraction = page;
      c.kv_max_bytes = int64_t{512} << 20;
      auto engine =
          Engine::Create(std::unique_ptr<WeightSource>(std::move(*GgufModel::Open(model))), c);
      if (!engine.ok()) {
        std::cerr << "passkey_bench: --presets " << preset << ": " << engine.status() << "\n";
        return 1;
      }
      for (int64_t length : lengths) {
        std::string cells;
        int total_ok = 0, total = 0;
        nlohmann::json by_depth = nlohmann::json::array();
        for (double depth : depths) {
          int ok = 0;
          for (int key : key_list) {
            auto ids = Prompt(**tok, length, depth, key);
            if (!ids.ok()) {
              std::cerr << ids.status() << "\n";
              return 1;
            }
            const SequenceId seq = (*engine)->NewSequence();
            std::vector<float> logits;
            // The question's last 8 tokens go in one at a time, as decode steps: page
            // selection applies to decode, and the answer is read while decoding.
            const std::span<const int32_t> all(*ids);
            absl::Status s = (*engine)->Forward(seq, all.first(all.size() - 8), false, &logits);
            for (size_t t = all.size() - 8; s.ok() && t < all.size(); ++t) {
              logits.clear();
              s = (*engine)->Forward(seq, all.subspan(t, 1), false, &logits);
            }
            if (!s.ok()) {
              std::cerr << "passkey_bench: " << s << "\n";
              return 1;
            }
            std::vector<int32_t> gen;
            const int64_t V = (*engine)->model_config().vocab_size;
            for (int step = 0; step < 8; ++step) {
              const int32_t next = static_cast<int32_t>(
                  std::max_element(logits.end() - V, logits.end()) - (logits.end() - V));
              gen.push_back(next);
              logits.clear();
              if (absl::Status s = (*engine)->Forward(seq, {&next, 1}, false, &logits); !s.ok()) {
                std::cerr << "passkey_bench: " << s << "\n";
                return 1;
              }
            }
            (void)(*engine)->Release(seq);
            auto text = (*tok)->Decode(gen);
            const bool found = text.ok() && text->find(std::to_string(key)) != std::string::npos;
            ok += found;
            std::cerr << absl::StrFormat("%s pages %g len %d (%d tokens) depth %.1f key %d: %s%s\n",
                                         preset, page, length, ids->size(), depth, key,
                                         found ? "ok" : "MISS ",
                                         found ? "" : (text.ok() ? *text : "?"));
          }
          cells += absl::StrFormat(" %d/%d |", ok, keys);
          by_depth.push_back({{"depth", depth}, {"found", ok}, {"trials", keys}});
          total_ok += ok;
          total += keys;
        }
        const double bits = (*engine)->kv_cache().BitsPerElementAt(length);
        md += absl::StrFormat("| %s | %g | %.2f | %d |%s %d/%d |\n", preset, page, bits, length,
                              cells, total_ok, total);
        rows.push_back({{"preset", preset},
                        {"page_fraction", page},
                        {"bits_per_element", bits},
                        {"length", length},
                        {"depths", by_depth},
                        {"found", total_ok},
                        {"trials", total}});
      }
    }
  }
  std::cout << md;
  return WriteResults(out, "passkey", {{"keys", key_list}, {"rows", rows}}, md) ? 0 : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
