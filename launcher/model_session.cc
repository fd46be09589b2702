#include "launcher/model_session.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "runtime/comm/mpi_communicator.h"
#include "runtime/comm/nccl_communicator.h"
#include "runtime/comm/tcp_communicator.h"
#include "runtime/engine/attn_correction.h"
#include "runtime/kv/kv_policy.h"
#include "runtime/model/gguf_model.h"
#include "runtime/model/hf_model.h"
#include "runtime/model/moe_split.h"
#include "runtime/model/rope_scaling.h"
#include "runtime/util/model_cache.h"
#include "runtime/util/secret_file.h"
#include "runtime/util/status_macros.h"

namespace quantkv::launcher {
namespace {

// FNV-1a: stable across processes and builds, unlike absl::Hash.
class Fnv {
 public:
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h_ = (h_ ^ p[i]) * 1099511628211ull;
  }
  void Add(const std::string& s) {
    Add(s.data(), s.size());
    Add("\0", 1);
  }
  void AddInt(int64_t v) { Add(&v, sizeof(v)); }
  // The first `limit` bytes of a file.
  void AddFilePrefix(const std::filesystem::path& p, int64_t limit) {
    std::ifstream in(p, std::ios::binary);
    std::vector<char> buf(1 << 16);
    for (int64_t left = limit; left > 0 && in;) {
      in.read(buf.data(), std::min<int64_t>(left, static_cast<int64_t>(buf.size())));
      Add(buf.data(), static_cast<size_t>(in.gcount()));
      left -= in.gcount();
    }
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 1469598103934665603ull;
};

// What the ranks of a tensor-parallel group compare at start-up; one fixed-size record.
struct Fingerprint {
  int64_t model_bytes = 0;
  uint64_t model_hash = 0;  // GGUF: header/metadata prefix and tensor directory
  uint64_t kv_hash = 0;     // the --kv text, and the policy file's bytes for @FILE
  int32_t tp = 0;
  char kv[200] = {};       // the start of the --kv text, for the message
  uint64_t comm_hash = 0;  // the --comm-compress*, --comm-backend, ... settings
  char comm[120] = {};     // their start, for the message
};

// A GGUF file: its size, the first 8 MiB (header, metadata and tensor table for models of
// up to ~8 MB of metadata; past that the tensor table hash still covers it) and the parsed
// tensor directory. An HF directory: config.json and every file's name and size.
Fingerprint ModelFingerprint(const std::filesystem::path& path, const GgufModel* gguf) {
  Fingerprint f;
  Fnv h;
  std::error_code ec;
  if (std::filesystem::is_directory(path)) {
    std::vector<std::filesystem::path> files;
    for (const auto& e : std::filesystem::directory_iterator(path, ec)) {
      if (e.is_regular_file()) files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      const int64_t size = static_cast<int64_t>(std::filesystem::file_size(file, ec));
      h.Add(file.filename().string());
      h.AddInt(size);
      f.model_bytes += size;
    }
    h.AddFilePrefix(path / "config.json", int64_t{1} << 20);
  } else {
    f.model_bytes = static_cast<int64_t>(std::filesystem::file_size(path, ec));
    h.AddFilePrefix(path, int64_t{8} << 20);
    if (gguf != nullptr) {
      for (const GgufTensor& t : gguf->gguf().tensors()) {
        h.Add(t.name);
        h.AddInt(static_cast<int64_t>(t.type));
        for (int64_t d : t.dims) h.AddInt(d);
        h.AddInt(static_cast<int64_t>(t.offset));
      }
    }
  }
  f.model_hash = h.value();
  return f;
}

uint64_t KvFingerprint(const std::string& kv) {
  Fnv h;
  h.Add(kv);
  if (!kv.empty() && kv[0] == '@') h.AddFilePrefix(kv.substr(1), int64_t{64} << 20);
  return h.value();
}

// Every rank compares its fingerprint with rank 0's (broadcast); mismatches are reported
// by the ranks that differ, and AgreeOnStatus makes the error every rank's.
absl::Status CheckSameInputs(Communicator& comm, const Fingerprint& mine, const ModelFlags& flags,
                             const std::string& path) {
  Fingerprint root = mine;
  QKV_RETURN_IF_ERROR(comm.Broadcast(&root, sizeof(root), 0));
  absl::Status local = absl::OkStatus();
  if (root.tp != mine.tp) {
    local = absl::InvalidArgumentError(
        absl::StrFormat("--tp %d here but --tp %d on rank 0", mine.tp, root.tp));
  } else if (root.model_bytes != mine.model_bytes || root.model_hash != mine.model_hash) {
    local = absl::InvalidArgumentError(absl::StrFormat(
        "model %s (%d bytes, header hash %016x) differs from rank 0's (%d bytes, header hash "
        "%016x): every rank must load the same model file",
        path, mine.model_bytes, mine.model_hash, root.model_bytes, root.model_hash));
  } else if (root.comm_hash != mine.comm_hash) {
    local = absl::InvalidArgumentError(absl::StrFormat(
        "--comm-compress / --comm-backend / --rope-scaling / --ep settings %s differ from rank "
        "0's %s: every rank must make the same collectives over the same backend, compress "
        "them the same way and use the same RoPE",
        std::string(mine.comm, strnlen(mine.comm, sizeof(mine.comm))),
        std::string(root.comm, strnlen(root.comm, sizeof(root.comm)))));
  } else if (root.kv_hash != mine.kv_hash) {
    local = absl::InvalidArgumentError(absl::StrFormat(
        "--kv %s (hash %016x) differs from rank 0's --kv %s (hash %016x): every rank must use "
        "the same KV cache policy",
        flags.kv, mine.kv_hash, std::string(root.kv, strnlen(root.kv, sizeof(root.kv))),
        root.kv_hash));
  }
  return AgreeOnStatus(comm, local);
}

absl::Status CheckLaunch(const ModelFlags& flags, const EngineConfig& base) {
  const int world = LauncherWorldSize();
  if (!flags.rendezvous.empty()) {  // the ranks were started by something else than mpirun
    if (world > 0) {
      return absl::FailedPreconditionError(
          "--rendezvous is for ranks started without mpirun; under mpirun leave it out (MPI "
          "connects the ranks)");
    }
    if (flags.tp < 2 || flags.rank < 0 || flags.rank >= flags.tp) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "--rendezvous needs --tp N >= 2 and this process's --rank in [0, N); got --tp %d "
          "--rank %d",
          flags.tp, flags.rank));
    }
    if (flags.secret_file.empty()) {
      return absl::InvalidArgumentError(
          "--rendezvous needs --secret-file: a file with the same secret on every rank (only "
          "ranks that know it may join)");
    }
  } else if (flags.rank >= 0 || !flags.secret_file.empty()) {
    return absl::InvalidArgumentError("--rank and --secret-file go with --rendezvous");
  }
  if (flags.comm_backend == "nccl") {
    if (!flags.rendezvous.empty()) {
      // NCCL's own bootstrap opens sockets between the ranks that the shared secret does not
      // guard, and the TCP data plane is the point of --rendezvous.
      return absl::InvalidArgumentError(
          "--comm-backend nccl is for ranks started by mpirun, not with --rendezvous: NCCL "
          "connects the ranks itself, outside the --secret-file check that admits ranks to a "
          "--rendezvous job (whose data plane is TCP)");
    }
    if (flags.tp < 2) {
      return absl::InvalidArgumentError(
          "--comm-backend nccl needs --tp > 1 under mpirun (one rank has no collectives)");
    }
    if (!NcclAvailable()) {
      // Before the model is read: the NCCL group is made only after it.
      return absl::UnimplementedError(
          "--comm-backend nccl: this quantkv was built without CUDA (QUANTKV_CUDA=OFF); rebuild "
          "with nvcc and NCCL, or use --comm-backend mpi");
    }
  }
  if (flags.tp > 1 && world == 0 && flags.rendezvous.empty()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "--tp %d needs %d processes started by mpirun, but this process was not started by "
        "mpirun (run `mpirun -np %d quantkv ... --tp %d`, or start every rank yourself with "
        "--rank R --rendezvous HOST:PORT --secret-file F)",
        flags.tp, flags.tp, flags.tp, flags.tp));
  }
  if (world > 1 && world != flags.tp) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "mpirun started %d processes but --tp is %d; they must be equal (mpirun -np %d ... "
        "--tp %d)",
        world, flags.tp, world, world));
  }
  if (flags.ep != 0 && flags.ep != 1 && flags.ep != flags.tp) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--ep %d: experts are split over all --tp %d ranks (--ep %d) or split by neuron "
        "inside each expert (--ep 1)",
        flags.ep, flags.tp, flags.tp));
  }
  // At --tp 1 the flag is accepted and changes nothing (one rank runs the whole layer), so
  // that TP=1 and TP=N take the same flags.
  if (flags.ep_dispatch != "all-reduce" && flags.tp > 1 && flags.ep == 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--ep-dispatch %s sends tokens to the ranks holding their experts: it needs the "
        "experts split over the ranks (--ep %d, the default), not inside each expert (--ep 1)",
        flags.ep_dispatch, flags.tp));
  }
  if (flags.tp == 1 && flags.comm_compress != "none") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--comm-compress %s needs --tp > 1 (one rank has no all-reduce to compress)",
        flags.comm_compress));
  }
  if (flags.tp > 1 && base.kv_observer && !base.kv_observer_all_heads) {
    return absl::UnimplementedError(
        "--tp > 1 cannot observe the KV cache (each rank sees "
        "only its own KV heads)");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> ParseLayerList(std::string_view text) {
  std::vector<int64_t> layers;
  if (text.empty()) return layers;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    int64_t l = 0;
    if (!absl::SimpleAtoi(part, &l) || l < 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "'%s' is not a layer index (want comma-separated integers >= 0, like 0,29)", part));
    }
    layers.push_back(l);
  }
  return layers;
}

// --comm-compress*, already validated by their flags; "none" is not a config.
absl::StatusOr<CompressedCommConfig> CommCompressConfig(const ModelFlags& flags) {
  CompressedCommConfig c;
  QKV_ASSIGN_OR_RETURN(c.codec, kernels::ParseCommCodecConfig(flags.comm_compress));
  c.min_elements = flags.comm_compress_min_elements;
  QKV_ASSIGN_OR_RETURN(c.exact_layers, ParseLayerList(flags.comm_compress_exact_layers));
  return c;
}

// Opens the weights and tokenizer (s->path already resolved).
absl::StatusOr<std::unique_ptr<WeightSource>> OpenWeights(ModelSession& s, Fingerprint* print) {
  const std::filesystem::path path = s.path;
  std::unique_ptr<WeightSource> weights;
  if (std::filesystem::is_directory(path)) {
    QKV_ASSIGN_OR_RETURN(weights, OpenHfModelDir(s.path));
    const std::filesystem::path tok = path / "tokenizer.json";
    if (!std::filesystem::exists(tok)) {
      return absl::NotFoundError(
          absl::StrFormat("%s: no tokenizer.json in the model directory", s.path));
    }
    QKV_ASSIGN_OR_RETURN(s.tokenizer, Tokenizer::FromJson(tok.string()));
    if (print != nullptr) *print = ModelFingerprint(path, nullptr);
  } else {
    QKV_ASSIGN_OR_RETURN(std::unique_ptr<GgufModel> gguf, GgufModel::Open(s.path));
    QKV_ASSIGN_OR_RETURN(s.tokenizer, Tokenizer::FromGguf(gguf->gguf()));
    if (print != nullptr) *print = ModelFingerprint(path, gguf.get());
    weights = std::move(gguf);
  }
  if (s.tokenizer->vocab_size() > weights->config().vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: the tokenizer has %d tokens but the embedding only %d rows", s.path,
                        s.tokenizer->vocab_size(), weights->config().vocab_size));
  }
  return weights;
}

}  // namespace

void DefineModelFlags(FlagSet& flags, ModelFlags& o, ModelFlagOptions what) {
  flags
      .String("model", &o.model, "smollm2-135m",
              "GGUF file, HF model directory, or a known model name (see fetch-model --list)")
      .Placeholder("PATH|NAME");
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  flags.Int("threads", &o.threads, cores, "CPU threads for the forward pass",
            {.min = 1, .max = 256});
  std::string presets;
  for (const KvPreset& p : KvPresets()) presets += (presets.empty() ? "" : ", ") + p.name;
  flags
      .String("kv", &o.kv, "fp16",
              "KV cache policy: a preset (" + presets +
                  "), a spec like k=int4:chan,v=int4,sink=4,window=16, or @policy.json "
                  "(see `quantkv kv-presets`)",
              [](std::string_view v) { return ParseKvPolicy(v).status(); })
      .Placeholder("SPEC");
  flags.Int<int64_t>("kv-budget-mb", &o.kv_budget_mb, 1024,
                     "KV cache pool size in MiB (sets how many tokens fit)",
                     {.min = 1, .max = int64_t{1} << 20});
  flags
      .String("rope-scaling", &o.rope_scaling, "",
              "run past the trained context: linear:F (position interpolation), ntk:F "
              "(NTK-aware base), yarn:F; multiplies the context length by F (default: the "
              "model's own RoPE)",
              [](std::string_view v) {
                ModelConfig probe;
                probe.head_dim = 64;
                return ApplyRopeScaling(v, &probe);
              })
      .Placeholder("KIND:F");
  if (what.tensor_parallel) {
    flags.Int("ep", &o.ep, 0,
              "MoE models under --tp N: --ep N (default) splits the experts over the ranks "
              "(each rank computes whole experts; the combine is the layer's all-reduce), "
              "--ep 1 splits every expert's neurons over the ranks",
              {.min = 0, .max = 256});
    flags
        .String("ep-dispatch", &o.ep_dispatch, "all-reduce",
                "MoE models under --tp N --ep N: how tokens reach their experts. all-reduce: "
                "every rank runs its experts on all tokens and the layer's all-reduce combines "
                "them; all-to-all: each rank takes 1/N of the tokens, sends each to the ranks "
                "owning its top-k experts and gets their weighted outputs back (all-to-alls), "
                "then the tokens are all-gathered (fewer bytes than all-reduce from 3 ranks on "
                "with a small --moe-top-k); combine-only: all-to-all without sending the tokens "
                "(every rank already holds them), fewer bytes at 2 ranks too. The same numbers "
                "up to fp32 rounding; one-token steps send more than all-reduce",
                [](std::string_view v) { return ParseMoeDispatch(v).status(); })
        .Placeholder("MODE");
    flags
        .String("ep-payload", &o.ep_payload, "fp32",
                "with --ep-dispatch all-to-all or combine-only: how the dispatched tokens and "
                "returned expert outputs travel. fp32 (exact), a codec (int8, int4, fp8, with "
                "options like int4:g32:out2) for every record, or LOW/HIGH (e.g. int4/int8, "
                "int4/fp32): HIGH for the records of the experts that --expert-levels holds at "
                "its highest precision (the most routed mass), LOW for the others",
                [](std::string_view v) { return ParseMoePayload(v).status(); })
        .Placeholder("SPEC");
    flags.Int("tp", &o.tp, 1,
              "tensor-parallel ranks (split by KV head): run as `mpirun -np N quantkv ... --tp "
              "N`, or start each rank yourself with --rank and --rendezvous; only rank 0 "
              "prints. Give each rank --threads cores/N",
              {.min = 1, .max = 256});
    flags
        .String("rendezvous", &o.rendezvous, "",
                "without mpirun: HOST:PORT where rank 0 listens and the other ranks connect "
                "(a TCP data plane; every rank runs the same command with its own --rank)")
        .Placeholder("HOST:PORT");
    flags.Int("rank", &o.rank, -1, "this process's rank with --rendezvous (0 listens)",
              {.min = -1, .max = 255});
    flags.Path("secret-file", &o.secret_file, "",
               "with --rendezvous: a file whose first line is a secret shared by every rank; "
               "a process without it cannot join");
    flags.Choice("comm-backend", &o.comm_backend, "mpi", {"mpi", "nccl"},
                 "the collectives of ranks started by mpirun: mpi, or nccl (one GPU per rank, "
                 "picked by node-local rank; MPI only hands out NCCL's unique id; today's CPU "
                 "engine stages every collective through device memory)");
    flags
        .String("comm-compress", &o.comm_compress, "none",
                "compress the --tp all-reduces: none, int8, fp8 or int4 (group-quantized with "
                "fp16 scales; options :gN group size 32-128, default 64, :outK keep the K "
                "largest values of each group in fp16, 0 to N/8, default 2; e.g. "
                "int4:g32:out4)",
                [](std::string_view v) {
                  return v == "none" ? absl::OkStatus() : kernels::ParseCommCodecConfig(v).status();
                })
        .Placeholder("CODEC");
    flags.Int<int64_t>("comm-compress-min-elements", &o.comm_compress_min_elements, 16384,
                       "all-reduces of fewer values stay exact (decode steps are "
                       "latency-bound; the hidden size times the rows of a step)",
                       {.min = 0});
    flags
        .String("comm-compress-exact-layers", &o.comm_compress_exact_layers, "",
                "layers whose all-reduces stay exact under --comm-compress, e.g. 0,29",
                [](std::string_view v) { return ParseLayerList(v).status(); })
        .Placeholder("LIST");
  }
  flags
      .Path("kv-correction", &o.kv_correction, "",
            "attention-output correction fitted by `quantkv fit-correction` for this --kv: "
            "added to every layer's attention output before o_proj")
      .Placeholder("FILE");
  flags.Bool("kv-correction-force", &o.kv_correction_force,
             "apply --kv-correction even though it was fitted for another --kv (a warning)");
  flags
      .Path("lora", &o.lora, "",
            "PEFT LoRA adapter (directory with adapter_config.json and "
            "adapter_model.safetensors, or that .safetensors file) on q/k/v/o_proj",
            PathKind::kAny)
      .Placeholder("DIR|FILE");
  flags
      .Path("moe-split", &o.moe_split, "",
            "run a dense model as a mixture of experts: its MLP neurons split into experts "
            "with a router, as fitted by `quantkv moefy`",
            PathKind::kFile)
      .Placeholder("FILE");
  flags
      .String("kv-floor", &o.kv_floor, "",
              "elastic precision: the --kv cache's oldest blocks may be re-encoded to this "
              "lower-bit spec when KV memory runs short (serve: before preempting; each "
              "layer's K and V must fit in half a --kv block), e.g. int2-floor under "
              "int4-comp")
      .Placeholder("SPEC");
  flags.Choice("kv-promote", &o.kv_promote, "none",
               {"none", "key-norm", "attention", "snapkv", "router-entropy"},
               "with a --kv codec that keeps rows (:keepN), which tokens of each block are "
               "kept exactly: key-norm (largest ||k|| per layer), attention (most attention "
               "received so far per layer, H2O's heavy hitters), snapkv (a prompt's blocks "
               "decided at its end by the attention of its last --snapkv-window tokens; the "
               "prompt's exact rows are held until then) or router-entropy (MoE: the "
               "tokens whose routing is most uncertain across layers)");
  flags.Int<int64_t>("snapkv-window", &o.snapkv_window, 32,
                     "with --kv-promote snapkv: the prompt's last tokens whose attention scores "
                     "the others (the observation window)",
                     {.min = 1, .max = 4096});
  flags.Float("page-fraction", &o.page_fraction, 1.0,
              "decode attends, per KV head, only to this share of the encoded blocks whose key "
              "min/max bound q.k highest (Quest; sinks and the window always); 1: all",
              {.min = 0.001, .max = 1.0});
  flags.Int<int64_t>("page-min-blocks", &o.page_min_blocks, 2,
                     "with --page-fraction: attend to at least this many encoded blocks",
                     {.min = 1});
  flags.Choice("device", &o.device, "auto", {"auto", "cpu", "cuda"},
               "where the forward runs: cuda (weights and the KV pool in this rank's "
               "node-local GPU), cpu, or auto (cuda when a GPU is usable and the options are "
               "ones the GPU path runs, else cpu)");
  flags.Choice("gpu-weights", &o.gpu_weights, "bf16", {"bf16", "f32"},
               "with --device cuda: the type weights are dequantized to at load (f32: exact "
               "fp32 GEMMs, twice the memory)");
  flags.Float("gpu-memory-fraction", &o.gpu_memory_fraction, 0.9,
              "with --device cuda: the KV pool takes at most this share of the GPU memory free "
              "after the weights (and at most --kv-budget-mb)",
              {.min = 0.01, .max = 1.0});
  flags
      .String("expert-levels", &o.expert_levels, "",
              "MoE: hold every expert at these weight types, lowest precision first (e.g. "
              "q4_0,q8_0; of f32, f16, q8_0, q4_1, q4_0), the active one chosen per expert "
              "from its routing under --expert-budget-mb",
              [](std::string_view v) { return ParseExpertLevels(v).status(); })
      .Placeholder("LIST");
  flags.Float("expert-budget-mb", &o.expert_budget_mb, 0.0,
              "MoE: MiB of expert weights active at once (0: every expert at the first level)",
              {.min = 0.0});
  flags.Float("expert-half-life", &o.expert_half_life, 512.0,
              "MoE: tokens over which routing statistics halve their weight", {.min = 1.0});
  flags.Int<int64_t>("expert-decide-every", &o.expert_decide_every, 64,
                     "MoE: tokens between precision decisions", {.min = 1});
  flags.Float("expert-hysteresis", &o.expert_hysteresis, 0.2,
              "MoE: an expert keeps its precision unless a challenger scores (1 + h) times more",
              {.min = 0.0, .max = 100.0});
  flags.Int<int64_t>("moe-top-k", &o.moe_top_k, 0,
                     "MoE models: experts per token (default: the model's, or the split's)",
                     {.min = 0, .max = 4096});
}

namespace {

// --kv-correction and --lora, read and checked against the model before the engine exists.
absl::Status LoadAdapters(const ModelFlags& flags, const ModelConfig& model, EngineConfig& cfg) {
  if (!flags.lora.empty()) {
    QKV_ASSIGN_OR_RETURN(LoraAdapters lora, LoadLoraAdapters(flags.lora, model));
    cfg.lora = std::make_shared<const LoraAdapters>(std::move(lora));
  }
  if (flags.kv_correction.empty()) return absl::OkStatus();
  QKV_ASSIGN_OR_RETURN(AttnCorrection corr, ReadAttnCorrection(flags.kv_correction));
  QKV_RETURN_IF_ERROR(CheckAttnCorrectionFitsModel(corr, model));
  if (absl::Status s = CheckAttnCorrectionKv(corr, flags.kv); !s.ok()) {
    if (!flags.kv_correction_force) {
      return absl::FailedPreconditionError(
          absl::StrCat(s.message(),
                       " (refit it for this --kv, or pass --kv-correction-force to apply it "
                       "anyway)"));
    }
    std::cerr << "warning: " << s.message() << "; applying it anyway (--kv-correction-force)\n";
  }
  cfg.attn_correction = std::make_shared<const AttnCorrection>(std::move(corr));
  return absl::OkStatus();
}

}  // namespace

int LaunchRank(const ModelFlags& flags) {
  return flags.rendezvous.empty() ? LauncherRank() : flags.rank;
}

absl::StatusOr<ModelSession> OpenModelSession(const ModelFlags& flags, const EngineConfig& base) {
  QKV_RETURN_IF_ERROR(CheckLaunch(flags, base));
  ModelSession s;
  if (flags.tp > 1 && !flags.rendezvous.empty()) {
    TcpCommunicatorOptions tcp;
    tcp.rank = flags.rank;
    tcp.world_size = flags.tp;
    tcp.rendezvous = flags.rendezvous;
    QKV_ASSIGN_OR_RETURN(tcp.secret, ReadSecretFile(flags.secret_file, "the --secret-file"));
    QKV_ASSIGN_OR_RETURN(s.comm, CreateTcpCommunicator(tcp));
  } else if (flags.tp > 1) {
    QKV_ASSIGN_OR_RETURN(s.comm, CreateMpiCommunicator());
  }
  // Under tensor parallelism every step below ends in an agreement, so one rank's error
  // (a file missing on its host) reaches all instead of leaving them in a collective.
  auto agree = [&s](const absl::Status& local) {
    return s.comm ? AgreeOnStatus(*s.comm, local) : local;
  };
  Fingerprint print;
  absl::StatusOr<std::unique_ptr<WeightSource>> weights =
      [&]() -> absl::StatusOr<std::unique_ptr<WeightSource>> {
    QKV_ASSIGN_OR_RETURN(std::filesystem::path path, ResolveModel(flags.model));
    s.path = path.string();
    return OpenWeights(s, s.comm ? &print : nullptr);
  }();
  QKV_RETURN_IF_ERROR(agree(weights.status()));
  if (!flags.moe_split.empty()) {
    absl::StatusOr<MoeSplit> split = ReadMoeSplit(flags.moe_split);
    if (split.ok()) weights = MoefiedSource(std::move(*weights), *split);
    QKV_RETURN_IF_ERROR(agree(split.ok() ? weights.status() : split.status()));
  }
  if (s.comm) {
    print.kv_hash = KvFingerprint(flags.kv);
    std::memcpy(print.kv, flags.kv.data(), std::min(flags.kv.size(), sizeof(print.kv) - 1));
    print.tp = flags.tp;
    // Canonical settings, so that "int8" and "int8:g64" agree.
    absl::StatusOr<CompressedCommConfig> config = CompressedCommConfig{};
    std::string comm = "none";
    if (flags.comm_compress != "none") {
      config = CommCompressConfig(flags);
      if (config.ok()) {
        std::vector<int64_t> layers = config->exact_layers;
        std::sort(layers.begin(), layers.end());
        layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
        comm = absl::StrFormat("%s from %d values, exact layers [%s]", config->codec.ToString(),
                               config->min_elements, absl::StrJoin(layers, ","));
      } else {
        comm = flags.comm_compress;
      }
    }
    // RoPE scaling changes every rank's math the same way the codec does: compare it too.
    if (!flags.rope_scaling.empty()) comm += ", --rope-scaling " + flags.rope_scaling;
    // So do the expert layout and dispatch (ranks that differ would call different
    // collectives).
    if (flags.ep != 0 || flags.ep_dispatch != "all-reduce") {
      comm += absl::StrFormat(", --ep %d --ep-dispatch %s", flags.ep, flags.ep_dispatch);
    }
    if (flags.ep_payload != "fp32") comm += ", --ep-payload " + flags.ep_payload;
    // And the backend: a rank on NCCL and one on MPI would wait in different groups.
    if (flags.comm_backend != "mpi") comm += ", --comm-backend " + flags.comm_backend;
    Fnv comm_hash;
    comm_hash.Add(comm);
    print.comm_hash = comm_hash.value();
    std::memcpy(print.comm, comm.data(), std::min(comm.size(), sizeof(print.comm) - 1));
    QKV_RETURN_IF_ERROR(CheckSameInputs(*s.comm, print, flags, s.path));
    if (flags.comm_backend == "nccl") {
      // After the comparison, so that every rank is here (a rank left on MPI would not join).
      // The NCCL group owns the MPI one: its bootstrap, and what Abort ends the job with.
      QKV_ASSIGN_OR_RETURN(s.comm, CreateNcclCommunicator(std::move(s.comm)));
    }
    if (flags.comm_compress != "none") {
      // After the comparison: every rank wraps its group, or none does.
      QKV_RETURN_IF_ERROR(agree(config.status()));
      QKV_ASSIGN_OR_RETURN(std::unique_ptr<CompressedCommunicator> compressed,
                           CompressedCommunicator::Create(std::move(s.comm), *config));
      s.compressed_comm = compressed.get();
      s.comm = std::move(compressed);
    }
  }
  EngineConfig cfg = base;
  cfg.threads = flags.threads;
  cfg.kv_spec = flags.kv;
  cfg.kv_max_bytes = flags.kv_budget_mb << 20;
  cfg.rope_scaling = flags.rope_scaling;
  cfg.comm = s.comm.get();
  cfg.moe_top_k = flags.moe_top_k;
  cfg.page_fraction = flags.page_fraction;
  cfg.device = flags.device;
  cfg.gpu_weights = flags.gpu_weights;
  cfg.gpu_memory_fraction = flags.gpu_memory_fraction;
  cfg.page_min_blocks = flags.page_min_blocks;
  cfg.kv_promote = flags.kv_promote == "none" ? "" : flags.kv_promote;
  cfg.snapkv_window = flags.snapkv_window;
  cfg.kv_floor = flags.kv_floor;
  cfg.moe_tensor_parallel = flags.tp > 1 && flags.ep == 1;
  QKV_ASSIGN_OR_RETURN(cfg.moe_dispatch, ParseMoeDispatch(flags.ep_dispatch));
  QKV_ASSIGN_OR_RETURN(cfg.moe_payload, ParseMoePayload(flags.ep_payload));
  if (!flags.expert_levels.empty()) {
    QKV_ASSIGN_OR_RETURN(cfg.expert_levels, ParseExpertLevels(flags.expert_levels));
    cfg.expert_budget_bytes = static_cast<int64_t>(flags.expert_budget_mb * (1 << 20));
    cfg.expert_half_life_tokens = flags.expert_half_life;
    cfg.expert_decide_every_tokens = flags.expert_decide_every;
    cfg.expert_hysteresis = flags.expert_hysteresis;
  } else if (flags.expert_budget_mb > 0) {
    return absl::InvalidArgumentError("--expert-budget-mb needs --expert-levels");
  }
  QKV_RETURN_IF_ERROR(agree(LoadAdapters(flags, (*weights)->config(), cfg)));
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(std::move(*weights), cfg);
  QKV_RETURN_IF_ERROR(agree(engine.status()));
  s.engine = std::move(*engine);
  if (s.engine->device() != nullptr && s.rank() == 0) {
    std::cerr << "device: " << s.engine->device()->Describe() << ", KV pool "
              << (s.engine->device()->kv_pool_bytes() >> 20) << " MB\n";
  }
  if (s.compressed_comm != nullptr && s.rank() == 0) {
    s.comm_report = std::make_unique<CommStatsReporter>(s.compressed_comm);
  }
  return s;
}

absl::StatusOr<std::vector<kernels::GgmlType>> ParseExpertLevels(std::string_view text) {
  std::vector<kernels::GgmlType> levels;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    const std::pair<const char*, kernels::GgmlType> kTypes[] = {{"f32", kernels::GgmlType::kF32},
                                                                {"f16", kernels::GgmlType::kF16},
                                                                {"q8_0", kernels::GgmlType::kQ8_0},
                                                                {"q4_1", kernels::GgmlType::kQ4_1},
                                                                {"q4_0", kernels::GgmlType::kQ4_0}};
    bool found = false;
    for (const auto& [name, type] : kTypes) {
      if (part == name) {
        levels.push_back(type);
        found = true;
      }
    }
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrFormat("'%s' is not an expert weight type (f32, f16, q8_0, q4_1, q4_0)", part));
    }
  }
  if (levels.empty()) return absl::InvalidArgumentError("no expert weight types given");
  return levels;
}

std::string ExpertPrecisionSummary(const Engine& engine) {
  const ModelConfig& c = engine.model_config();
  if (engine.config().expert_levels.empty()) return "";
  std::vector<int64_t> per_level(engine.config().expert_levels.size(), 0);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int64_t e = 0; e < c.moe.n_experts; ++e) ++per_level[engine.expert_level(l, e)];
  }
  std::string levels;
  for (size_t i = 0; i < per_level.size(); ++i) {
    levels += absl::StrFormat("%s%s x%d", i ? ", " : "",
                              kernels::GgmlTypeInfoOf(engine.config().expert_levels[i]).name,
                              per_level[i]);
  }
  std::string policy = "fixed levels";
  if (const moe::ExpertPrecisionPolicy* p = engine.expert_policy()) {
    const moe::ExpertPrecisionStats st = p->Stats();
    policy = absl::StrFormat("budget %.2f MiB, %d decisions, %d level changes",
                             st.budget_bytes / 1048576.0, st.decisions, st.changes);
  }
  return absl::StrFormat("experts: %.2f MiB active (%s); %s",
                         engine.active_expert_bytes() / 1048576.0, levels, policy);
}

std::string CommStatsSummary(const CompressedCommunicator& comm) {
  const CompressedCommStats& st = comm.stats();
  const double mb = 1.0 / (1 << 20);
  return absl::StrFormat(
      "comm-compress %s: %d of %d all-reduces compressed (from %d values); rank %d sent "
      "%.2f MiB instead of %.2f MiB raw (%.2fx less); %.3f s in collectives, %.3f s in the "
      "codec",
      comm.config().codec.ToString(), st.compressed_calls, st.calls, comm.config().min_elements,
      comm.rank(), st.wire_bytes * mb, st.raw_bytes * mb,
      st.wire_bytes > 0 ? static_cast<double>(st.raw_bytes) / st.wire_bytes : 1.0,
      st.comm_ns * 1e-9, st.codec_ns * 1e-9);
}

CommStatsReporter::~CommStatsReporter() {
  if (comm_ != nullptr) std::cerr << CommStatsSummary(*comm_) << "\n" << std::flush;
}

std::ostream& ModelSession::ResultStream(std::ostream& out) const {
  static std::ostream discard(nullptr);  // no buffer: every write is dropped
  return rank() == 0 ? out : discard;
}

int ReportSessionFailure(CommandContext& ctx, const ModelSession& session,
                         const absl::Status& status) {
  if (!session.comm || session.comm->size() == 1) return ReportFailure(ctx, status);
  ctx.err << ctx.command << ": error on rank " << session.rank() << ": " << status.message()
          << " (aborting all ranks)\n"
          << std::flush;
  session.comm->Abort(kExitFailure);
  return kExitFailure;  // not reached: Abort ends the process
}

}  // namespace quantkv::launcher
