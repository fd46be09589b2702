// Router-aware elastic expert precision against uniform and random precision at equal
// memory, on SmolLM2 split into 8 experts per layer (`quantkv moefy`, the MoE test bed),
// and the policy adapting when the traffic changes domain.
//
// Part 1 (equal memory): every expert is held as Q4_0 (4.5 bits/weight) and Q8_0 (8.5);
// a budget of all-Q4_0 plus a fraction f of the upgrade. At f = 1/8 that is exactly the
// bytes of uniform Q4_1 (5.0 bits). Rows: uniform Q4_0, Q4_1, Q8_0; random choice of the
// upgraded experts (3 seeds, mean); the router-aware policy (warmed up on disjoint text).
// Quality is PPL, KL and top-1 agreement against the split model with its experts as
// loaded (gate/up the file's Q4_1 rows, down fp32), on the same windows.
// Part 2 (traffic shift): the policy at f = 1/4 fed WikiText, then the GPL-3, then WikiText
// again; its levels after every step, and on the GPL-3 windows the KL of the adapting
// policy against the levels it had frozen at the end of the WikiText phase.
//
//   moe_elastic_bench [--model PATH] [--split FILE] [--text FILE] [--shift-text FILE]
//                     [--top-k 6] [--ctx 512] [--chunks 8] [--threads 2] [--out DIR]
// Without --split it fits one with the moefy defaults on the last 250 kB of --text (the
// measured windows are at its start).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <sstream>
#include <string>

#include "absl/strings/str_format.h"
#include "bench/results.h"
#include "runtime/engine/engine.h"
#include "runtime/eval/moefy.h"
#include "runtime/eval/perplexity.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/moe_split.h"
#include "runtime/tokenizer/tokenizer.h"

namespace quantkv::bench {
namespace {

using kernels::GgmlType;

struct Args {
  std::string model, split, text = "../shared/data/wikitext-2/test.txt",
                            shift_text = "/usr/share/common-licenses/GPL-3";
  int64_t top_k = 6, ctx = 512, chunks = 8;
  int threads = 2;
  std::string out = "bench/results";
};

std::string DefaultModel() {
  if (const char* h = std::getenv("QUANTKV_HOME")) {
    return std::string(h) + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  }
  return std::string(std::getenv("HOME") ? std::getenv("HOME") : ".") +
         "/.cache/quantkv/SmolLM2-135M-Instruct.Q4_1.gguf";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class Bed {
 public:
  absl::Status Init(const Args& a) {
    args_ = a;
    auto model = GgufModel::Open(a.model);
    if (!model.ok()) return model.status();
    auto tok = Tokenizer::FromGguf((*model)->gguf());
    if (!tok.ok()) return tok.status();
    tokenizer_ = std::move(*tok);
    const std::string text = ReadFile(a.text), shift = ReadFile(a.shift_text);
    if (text.size() < 300000 || shift.empty()) {
      return absl::NotFoundError("moe_elastic_bench: --text (>= 300 kB) or --shift-text missing");
    }
    auto ids = tokenizer_->Encode(text.substr(0, text.size() - 250000));
    auto calib = tokenizer_->Encode(text.substr(text.size() - 250000));
    auto gpl = tokenizer_->Encode(shift);
    if (!ids.ok() || !calib.ok() || !gpl.ok()) return absl::InternalError("tokenizing failed");
    eval_ = *ids;
    calib_ = *calib;
    gpl_ = *gpl;
    if (!a.split.empty()) {
      auto s = ReadMoeSplit(a.split);
      if (!s.ok()) return s.status();
      split_ = *s;
    } else {
      MoefyOptions o;
      MoefyReport report;
      auto s = FitMoeSplit(
          [&](const EngineConfig& c) -> absl::StatusOr<std::unique_ptr<Engine>> {
            EngineConfig cc = c;
            cc.threads = a.threads;
            cc.pack_weights = false;
            return Engine::Create(Dense(), cc);
          },
          calib_, o, &report);
      if (!s.ok()) return s.status();
      split_ = *s;
    }
    return absl::OkStatus();
  }

  std::unique_ptr<WeightSource> Dense() const {
    return std::unique_ptr<WeightSource>(std::move(*GgufModel::Open(args_.model)));
  }

  absl::StatusOr<std::unique_ptr<Engine>> MakeEngine(EngineConfig c, int64_t top_k = 0) const {
    auto w = MoefiedSource(Dense(), split_);
    if (!w.ok()) return w.status();
    c.threads = args_.threads;
    c.kv_spec = "fp16";
    c.kv_max_bytes = 256 << 20;
    c.moe_top_k = top_k > 0 ? top_k : args_.top_k;
    return Engine::Create(std::move(*w), c);
  }

  const Args& args() const { return args_; }
  const std::vector<int32_t>& eval() const { return eval_; }
  const std::vector<int32_t>& calib() const { return calib_; }
  const std::vector<int32_t>& gpl() const { return gpl_; }
  int64_t n_layers() const { return split_.n_layers; }
  int64_t n_experts() const { return split_.n_experts; }
  int64_t shared() const { return split_.shared; }

 private:
  Args args_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<int32_t> eval_, calib_, gpl_;
  MoeSplit split_;
};

struct Row {
  std::string name;
  double ppl = 0, kl = 0, top1 = 0, tok_s = 0, mib = 0, bits = 0;
  int64_t changes = 0;
};

// Feeds `tokens` through the engine in windows of ctx, steps of `step` tokens, discarding
// logits: warms up the policy's statistics.
absl::Status Feed(Engine& e, const std::vector<int32_t>& tokens, int64_t windows, int64_t ctx,
                  const std::function<void()>& after_step = nullptr) {
  for (int64_t w = 0; w < windows && (w + 1) * ctx <= static_cast<int64_t>(tokens.size()); ++w) {
    const SequenceId seq = e.NewSequence();
    const int64_t step = e.config().max_chunk_tokens;
    for (int64_t p = 0; p < ctx; p += step) {
      std::vector<float> logits;
      StepInput in{seq,
                   std::span<const int32_t>(tokens).subspan(w * ctx + p, std::min(step, ctx - p)),
                   false};
      if (absl::Status s = e.Step({&in, 1}, &logits); !s.ok()) return s;
      if (after_step) after_step();
    }
    if (absl::Status s = e.Release(seq); !s.ok()) return s;
  }
  return absl::OkStatus();
}

int64_t WeightCount(const Engine& e) {
  // Expert weights per layer: 3 matrices of hidden x expert_intermediate, times experts.
  const ModelConfig& c = e.model_config();
  return c.n_layers * c.moe.n_experts * 3 * c.hidden * c.moe.expert_intermediate;
}

int Main(int argc, char** argv) {
  Args a;
  a.model = DefaultModel();
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--model")
      a.model = v;
    else if (f == "--split")
      a.split = v;
    else if (f == "--text")
      a.text = v;
    else if (f == "--shift-text")
      a.shift_text = v;
    else if (f == "--top-k")
      a.top_k = std::atoll(v.c_str());
    else if (f == "--ctx")
      a.ctx = std::atoll(v.c_str());
    else if (f == "--chunks")
      a.chunks = std::atoll(v.c_str());
    else if (f == "--threads")
      a.threads = std::atoi(v.c_str());
    else if (f == "--out")
      a.out = v;
    else {
      std::cerr << "moe_elastic_bench: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (argc % 2 == 0) {
    std::cerr << "moe_elastic_bench: flag " << argv[argc - 1] << " needs a value\n";
    return 2;
  }
  Bed bed;
  if (absl::Status s = bed.Init(a); !s.ok()) {
    std::cerr << "moe_elastic_bench: " << s << "\n";
    return 1;
  }
  const int64_t L = bed.n_layers(), E = bed.n_experts();
  PerplexityOptions po;
  po.ctx = a.ctx;
  po.max_chunks = a.chunks;
  // Part 0: the test bed itself, the split at several top-k against the dense model.
  std::string bed_md =
      "## The test bed: the MoEfied model against the dense one\n\n"
      "| model | PPL | KL vs dense | top-1 vs dense |\n|---|---|---|---|\n";
  nlohmann::json bed_rows = nlohmann::json::array();
  {
    LogitsBaseline dense_base;
    EngineConfig dc;
    dc.threads = a.threads;
    dc.kv_spec = "fp16";
    auto d = Engine::Create(bed.Dense(), dc);
    if (!d.ok()) {
      std::cerr << d.status() << "\n";
      return 1;
    }
    po.save_logits = &dense_base;
    auto r = ComputePerplexity(**d, bed.eval(), po);
    po.save_logits = nullptr;
    if (!r.ok()) {
      std::cerr << r.status() << "\n";
      return 1;
    }
    bed_md += absl::StrFormat("| dense SmolLM2 | %.4f | 0 | 100%% |\n", r->ppl);
    bed_rows.push_back({{"name", "dense"}, {"ppl", r->ppl}});
    po.kl_base = &dense_base;
    std::vector<int64_t> ks = {E};  // all experts (the dense model), then fewer
    for (int64_t k : {6, 4, 2}) {
      if (k < E) ks.push_back(k);
    }
    for (int64_t k : ks) {
      auto e = bed.MakeEngine({}, k);
      auto m = ComputePerplexity(**e, bed.eval(), po);
      if (!m.ok()) {
        std::cerr << m.status() << "\n";
        return 1;
      }
      bed_md += absl::StrFormat(
          "| split%s, top-%d of %d | %.4f | %.5f | %.2f%% |\n",
          bed.shared() > 0 ? absl::StrFormat(" (+%d shared neurons)", bed.shared()) : "", k, E,
          m->ppl, m->kl_mean, 100 * m->top1_agreement);
      bed_rows.push_back({{"name", absl::StrFormat("top-%d", k)},
                          {"ppl", m->ppl},
                          {"kl_vs_dense", m->kl_mean},
                          {"top1_vs_dense", m->top1_agreement}});
      std::cerr << absl::StrFormat("split top-%d: PPL %.4f KL vs dense %.5f\n", k, m->ppl,
                                   m->kl_mean);
    }
    po.kl_base = nullptr;
  }
  // Reference: the split model with its experts as loaded.
  LogitsBaseline base;
  PerplexityResult ref;
  {
    auto e = bed.MakeEngine({});
    if (!e.ok()) {
      std::cerr << "moe_elastic_bench: " << e.status() << "\n";
      return 1;
    }
    po.save_logits = &base;
    auto r = ComputePerplexity(**e, bed.eval(), po);
    if (!r.ok()) {
      std::cerr << r.status() << "\n";
      return 1;
    }
    ref = *r;
    po.save_logits = nullptr;
  }
  po.kl_base = &base;
  std::vector<Row> rows;
  auto measure = [&](const std::string& name, EngineConfig c, bool warm) -> absl::StatusOr<Row> {
    auto e = bed.MakeEngine(c);
    if (!e.ok()) return e.status();
    if (warm) {
      if (absl::Status s = Feed(**e, bed.calib(), 4, a.ctx); !s.ok()) return s;
    }
    auto r = ComputePerplexity(**e, bed.eval(), po);
    if (!r.ok()) return r.status();
    Row row;
    row.name = name;
    row.ppl = r->ppl;
    row.kl = r->kl_mean;
    row.top1 = r->top1_agreement;
    row.tok_s = r->tokens_per_s;
    row.mib = (*e)->active_expert_bytes() / 1048576.0;
    row.bits = 8.0 * (*e)->active_expert_bytes() / static_cast<double>(WeightCount(**e));
    if ((*e)->expert_policy() != nullptr) row.changes = (*e)->expert_policy()->Stats().changes;
    std::cerr << absl::StrFormat("%-34s PPL %.4f KL %.5f top1 %.2f%% %.2f MiB\n", name, row.ppl,
                                 row.kl, 100 * row.top1, row.mib);
    return row;
  };
  auto add = [&](absl::StatusOr<Row> r) {
    if (!r.ok()) {
      std::cerr << "moe_elastic_bench: " << r.status() << "\n";
      std::exit(1);
    }
    rows.push_back(*r);
  };
  const std::vector<GgmlType> two = {GgmlType::kQ4_0, GgmlType::kQ8_0};
  EngineConfig c;
  c.expert_levels = {GgmlType::kQ4_0};
  add(measure("uniform Q4_0", c, false));
  const int64_t low_bytes = static_cast<int64_t>(rows.back().mib * 1048576.0 + 0.5);
  c.expert_levels = {GgmlType::kQ4_1};
  add(measure("uniform Q4_1 (= f 1/8 bytes)", c, false));
  c.expert_levels = {GgmlType::kQ8_0};
  add(measure("uniform Q8_0", c, false));
  const int64_t high_bytes = static_cast<int64_t>(rows.back().mib * 1048576.0 + 0.5);
  for (double f : {0.125, 0.25}) {
    const int64_t budget = low_bytes + static_cast<int64_t>(f * (high_bytes - low_bytes));
    const int64_t n_high = static_cast<int64_t>(f * L * E + 0.5);
    Row mean;
    mean.name = absl::StrFormat("random, f %.3f (mean of 3)", f);
    for (int seed = 1; seed <= 3; ++seed) {
      std::vector<int> levels(L * E, 0);
      std::fill(levels.begin(), levels.begin() + n_high, 1);
      std::mt19937 rng(seed);
      std::shuffle(levels.begin(), levels.end(), rng);
      EngineConfig rc;
      rc.expert_levels = two;
      rc.expert_fixed_levels = levels;
      absl::StatusOr<Row> r =
          measure(absl::StrFormat("random seed %d, f %.3f", seed, f), rc, false);
      if (!r.ok()) add(r);
      mean.ppl += r->ppl / 3;
      mean.kl += r->kl / 3;
      mean.top1 += r->top1 / 3;
      mean.tok_s += r->tok_s / 3;
      mean.mib = r->mib;
      mean.bits = r->bits;
    }
    rows.push_back(mean);
    EngineConfig pc;
    pc.expert_levels = two;
    pc.expert_budget_bytes = budget;
    add(measure(absl::StrFormat("router-aware, f %.3f", f), pc, true));
    pc.expert_weight_error_sensitivity = true;
    add(measure(absl::StrFormat("router-aware x weight error, f %.3f", f), pc, true));
  }

  // Part 2: traffic shift, decisions every 64 tokens.
  const int64_t shift_ctx = 256, shift_windows = 6;
  EngineConfig sc;
  sc.expert_levels = two;
  sc.expert_budget_bytes = low_bytes + (high_bytes - low_bytes) / 4;
  sc.max_chunk_tokens = 64;
  sc.expert_decide_every_tokens = 64;
  sc.expert_half_life_tokens = 256;
  auto e = bed.MakeEngine(sc);
  if (!e.ok()) {
    std::cerr << e.status() << "\n";
    return 1;
  }
  nlohmann::json timeline = nlohmann::json::array();
  std::string phase;
  auto snapshot = [&]() {
    std::vector<int> lv(L * E);
    for (int64_t i = 0; i < L * E; ++i) lv[i] = (*e)->expert_level(i / E, i % E);
    return lv;
  };
  auto record = [&]() { timeline.push_back({{"phase", phase}, {"levels", snapshot()}}); };
  std::vector<int> end_of[3];
  const std::pair<const char*, const std::vector<int32_t>*> phases[3] = {
      {"wikitext", &bed.eval()}, {"gpl3", &bed.gpl()}, {"wikitext again", &bed.calib()}};
  for (int p = 0; p < 3; ++p) {
    phase = phases[p].first;
    if (absl::Status s = Feed(**e, *phases[p].second, shift_windows, shift_ctx, record); !s.ok()) {
      std::cerr << s << "\n";
      return 1;
    }
    end_of[p] = snapshot();
  }
  auto high_set = [&](const std::vector<int>& lv) {
    std::set<int> s;
    for (int64_t i = 0; i < L * E; ++i) {
      if (lv[i] == 1) s.insert(static_cast<int>(i));
    }
    return s;
  };
  auto jaccard = [&](const std::vector<int>& x, const std::vector<int>& y) {
    const std::set<int> a1 = high_set(x), b1 = high_set(y);
    int inter = 0;
    for (int v : a1) inter += b1.count(v);
    const size_t uni = a1.size() + b1.size() - inter;
    return uni == 0 ? 1.0 : static_cast<double>(inter) / uni;
  };
  const double j_wiki_gpl = jaccard(end_of[0], end_of[1]);
  const double j_wiki_wiki = jaccard(end_of[0], end_of[2]);
  // On GPL-3 windows: adapting policy (warmed on GPL) vs levels frozen after WikiText.
  LogitsBaseline gpl_base;
  PerplexityOptions gpo;
  gpo.ctx = a.ctx;
  gpo.max_chunks = 4;
  double gpl_ref_ppl = 0;
  {
    auto r = bed.MakeEngine({});
    gpo.save_logits = &gpl_base;
    auto g = ComputePerplexity(**r, bed.gpl(), gpo);
    if (!g.ok()) {
      std::cerr << g.status() << "\n";
      return 1;
    }
    gpl_ref_ppl = g->ppl;
    gpo.save_logits = nullptr;
  }
  gpo.kl_base = &gpl_base;
  EngineConfig frozen;
  frozen.expert_levels = two;
  frozen.expert_fixed_levels = end_of[0];
  auto fe = bed.MakeEngine(frozen);
  auto fr = ComputePerplexity(**fe, bed.gpl(), gpo);
  EngineConfig adapt = sc;
  adapt.max_chunk_tokens = 512;
  std::vector<int32_t> gpl_tail(bed.gpl().begin() + 4 * a.ctx, bed.gpl().end());
  // Warm on a disjoint part of the GPL-3 (its tail), then score its first windows.
  auto ae2 = bed.MakeEngine(adapt);
  (void)Feed(**ae2, gpl_tail, 4, a.ctx);
  auto ar = ComputePerplexity(**ae2, bed.gpl(), gpo);
  if (!fr.ok() || !ar.ok()) {
    std::cerr << "moe_elastic_bench: GPL-3 comparison failed\n";
    return 1;
  }

  // Table.
  std::string md = absl::StrFormat(
      "# Router-aware elastic expert precision (MoEfied SmolLM2, %d experts/layer, top-%d)\n\n"
      "Reference: the split model with experts as loaded; PPL %.4f on %d WikiText-2 windows of "
      "%d (second halves, %d tokens). Budget = all Q4_0 + f x (all Q8_0 - all Q4_0).\n\n"
      "| experts | bits/weight | MiB | PPL | ΔPPL | KL | top-1 | tok/s "
      "|\n|---|---|---|---|---|---|---|---|\n",
      E, a.top_k, ref.ppl, ref.chunks, a.ctx, ref.tokens_scored);
  nlohmann::json jrows = nlohmann::json::array();
  for (const Row& r : rows) {
    md += absl::StrFormat("| %s | %.3f | %.2f | %.4f | %+.2f%% | %.5f | %.2f%% | %.1f |\n", r.name,
                          r.bits, r.mib, r.ppl, 100 * (r.ppl / ref.ppl - 1), r.kl, 100 * r.top1,
                          r.tok_s);
    jrows.push_back({{"name", r.name},
                     {"bits_per_weight", r.bits},
                     {"mib", r.mib},
                     {"ppl", r.ppl},
                     {"kl", r.kl},
                     {"top1", r.top1},
                     {"tokens_per_s", r.tok_s},
                     {"changes", r.changes}});
  }
  md += absl::StrFormat(
      "\n## Traffic shift (f = 1/4, decisions every 64 tokens, half-life 256)\n\n"
      "%d windows of %d tokens each of WikiText-2, GPL-3, WikiText-2 (another part).\n"
      "High-precision experts: Jaccard overlap of the set at the end of the WikiText phase "
      "with the end of the GPL-3 phase %.3f, with the end of the second WikiText phase %.3f; "
      "%d level changes in all.\n\n"
      "On GPL-3 (%d windows of %d): levels frozen after WikiText KL %.5f (PPL %.4f) vs the "
      "policy warmed on other GPL-3 text KL %.5f (PPL %.4f); reference PPL %.4f.\n",
      shift_windows, shift_ctx, j_wiki_gpl, j_wiki_wiki, (*e)->expert_policy()->Stats().changes,
      fr->chunks, a.ctx, fr->kl_mean, fr->ppl, ar->kl_mean, ar->ppl, gpl_ref_ppl);
  md += "\n" + bed_md;
  std::cout << md;
  nlohmann::json j = {{"reference_ppl", ref.ppl},
                      {"test_bed", bed_rows},
                      {"top_k", a.top_k},
                      {"experts", E},
                      {"rows", jrows},
                      {"shift",
                       {{"windows", shift_windows},
                        {"ctx", shift_ctx},
                        {"jaccard_wiki_gpl", j_wiki_gpl},
                        {"jaccard_wiki_wiki", j_wiki_wiki},
                        {"frozen_kl_on_gpl", fr->kl_mean},
                        {"adapted_kl_on_gpl", ar->kl_mean},
                        {"timeline", timeline}}}};
  return WriteResults(a.out, "moe_elastic", j, md) ? 0 : 1;
}

}  // namespace
}  // namespace quantkv::bench

int main(int argc, char** argv) { return quantkv::bench::Main(argc, argv); }
