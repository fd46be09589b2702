#!/usr/bin/env bash
# Measures the attention-output correction adapters (`quantkv fit-correction`, --kv-correction)
# and writes bench/results/kv_correction.{md,json}: for each KV spec, perplexity of WikiText-2
# with the quantized cache alone and with corrections of several ranks fitted on a DIFFERENT
# text (GPL-3), against the FP16-cache run (ΔPPL, KL, top-1 agreement).
#
#   bench/kv_correction.sh [path/to/quantkv]      (default build/launcher/quantkv)
#
# Also, as a control, the same fits on WikiText-2 text far past the evaluated windows (the
# first 16 x 512 tokens): in-domain calibration, still disjoint from what is scored.
#
# About 1.5 hours on the 2-core development machines; a rerun skips the results already in
# $WORK. Correction files (up to ~80 MB for the full-rank one) and logs go to $WORK
# (default /tmp/quantkv_kv_correction), not the repo.
set -euo pipefail
Q=${1:-build/launcher/quantkv}
TEXT=${TEXT:-../shared/data/wikitext-2/test.txt}
CAL=${CAL:-/usr/share/common-licenses/GPL-3}
WORK=${WORK:-/tmp/quantkv_kv_correction}
RANKS=${RANKS:-8,32,64,576}
export RIDGES=${RIDGES:-0.01,0.1,1,10,100,1000}
SPECS=("int2-comp" "k=int3:chan,v=int3,sink=4,window=8,block=128")
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}  # as bench/kv_table.py
mkdir -p "$WORK"
PPL=(perplexity --text "$TEXT" --ctx 512 --chunks 16 --json)

run() {  # name, then quantkv arguments; records the command line beside the result
  local name=$1
  shift
  printf '%q ' quantkv "$@" > "$WORK/$name.cmd"
  if [[ -s "$WORK/$name.json" ]]; then return; fi
  echo "== $name: quantkv $*" >&2
  "$Q" "$@" > "$WORK/$name.json.tmp" 2> "$WORK/$name.log"
  mv "$WORK/$name.json.tmp" "$WORK/$name.json"
}

fit() {  # name, spec, calibration text: one pass, one file per rank
  local name=$1 spec=$2 cal=$3
  local args=(fit-correction --kv "$spec" --text "$cal" --tokens 4096 --holdout-tokens 2048
              --rank "$RANKS" --ridge "$RIDGES")
  printf '%q ' quantkv "${args[@]}" --out "$name.r%r.safetensors" > "$WORK/fit_$name.cmd"
  if [[ -s "$WORK/fit_$name.txt" ]]; then return; fi
  echo "== fit $name: $spec on $cal" >&2
  "$Q" "${args[@]}" --out "$WORK/$name.r%r.safetensors" > "$WORK/fit_$name.txt.tmp" \
    2> "$WORK/fit_$name.log"
  mv "$WORK/fit_$name.txt.tmp" "$WORK/fit_$name.txt"
}

run fp16 "${PPL[@]}" --kv fp16 --save-logits "$WORK/fp16.logits"
dd if="$TEXT" of="$WORK/wikitext_calibration.txt" bs=1000 skip=400 count=400 status=none
for i in "${!SPECS[@]}"; do
  spec=${SPECS[$i]}
  run "s$i" "${PPL[@]}" --kv "$spec" --kl-base "$WORK/fp16.logits"
  # One pass over 4096 calibration tokens fits every rank; the ridge is chosen per layer on
  # the next 2048 tokens of the same text (never on the evaluated windows).
  for cal in gpl wiki; do
    name="s$i.$cal"
    if [[ $cal == gpl ]]; then fit "$name" "$spec" "$CAL"
    else fit "$name" "$spec" "$WORK/wikitext_calibration.txt"; fi
    for r in ${RANKS//,/ }; do
      run "$name.r$r" "${PPL[@]}" --kv "$spec" --kv-correction "$WORK/$name.r$r.safetensors" \
        --kl-base "$WORK/fp16.logits"
    done
  done
done

python3 - "$WORK" "$RANKS" "${SPECS[@]}" <<'PY'
import json, os, re, sys, datetime, platform
work, ranks, specs = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        j = json.load(f)
    with open(os.path.join(work, name + ".cmd")) as f:
        j["cmd"] = f.read().strip().replace(work + "/", "")
    return j
def fit_summary(name, r):
    text = open(os.path.join(work, f"fit_{name}.txt")).read()
    blocks = text.split("layer     rows")[1:]
    block = blocks[ranks.index(r)]
    m = re.search(r"relative attention-output error ([\d.]+) -> ([\d.]+) on them, "
                  r"([\d.]+) -> ([\d.]+) on (\d+) held-out", block)
    off = len(re.findall(r"^\d+\s+\d+\s+off ", block, re.M))
    return {"train": (float(m[1]), float(m[2])), "holdout": (float(m[3]), float(m[4])),
            "layers_off": off}
base = load("fp16")
rows, out = [], {"baseline": base, "specs": []}
for i, spec in enumerate(specs):
    plain = load(f"s{i}")
    entry = {"spec": spec, "uncorrected": plain, "corrected": {}}
    rows.append((spec, "-", "none", plain, None))
    for cal, label in (("gpl", "GPL-3"), ("wiki", "WikiText-2 (disjoint)")):
        entry["corrected"][cal] = {}
        for r in ranks:
            j = load(f"s{i}.{cal}.r{r}")
            f = fit_summary(f"s{i}.{cal}", r)
            j["fit"] = f
            entry["corrected"][cal][r] = j
            rows.append((spec, label, r, j, f))
    out["specs"].append(entry)
lines = ["# kv_correction", "",
         f"{datetime.datetime.utcnow().strftime('%Y-%m-%dT%H:%M:%SZ')}, {platform.machine()}, "
         "SmolLM2-135M-Instruct Q4_1, WikiText-2 test, ctx 512, 16 windows, "
         f"{base['tokens_scored']} scored tokens. Corrections fitted by `quantkv fit-correction` "
         "on 4096 tokens of the calibration text, /usr/share/common-licenses/GPL-3 or, as an "
         "in-domain control, WikiText-2 test text 400-800 KB into the file (far past the "
         "evaluated windows), with the ridge picked per layer from "
         f"{os.environ.get('RIDGES', '0.01,0.1,1,10,100,1000')} on the next 2048 tokens of the "
         "same text (layers it did not help there left uncorrected), aiming at the fp16 cache. "
         "KL and top-1 agreement against the fp16-cache run. `attn err` is the relative "
         "attention-output error Σ|a_exact - a|²/Σ|a_exact|² over all layers on those held-out "
         "calibration tokens, before -> after the correction (rows that read quantized blocks). "
         "Made by `bench/kv_correction.sh`.", "",
         f"fp16 baseline: PPL {base['ppl']:.4f}.", "",
         "| --kv | fitted on | rank | layers corrected | PPL | ΔPPL % | KL mean | top-1 agree | attn err (held-out) |",
         "|---|---|---|---|---|---|---|---|---|"]
for spec, cal, r, j, f in rows:
    d = 100 * (j["ppl"] / base["ppl"] - 1)
    err = "-" if f is None else f"{f['holdout'][0]:.4f} -> {f['holdout'][1]:.4f}"
    layers = "-" if f is None else f"{30 - f['layers_off']}/30"
    lines.append(f"| `{spec}` | {cal} | {r} | {layers} | {j['ppl']:.4f} | {d:+.2f} | "
                 f"{j['kl_mean']:.5f} ± {j['kl_stderr']:.5f} | {100 * j['top1_agreement']:.2f}% | {err} |")
lines += ["", "Commands (quantkv = the built binary; files relative to the work directory; "
          "wikitext_calibration.txt = bytes 400000-799999 of test.txt):", ""]
lines.append("```sh")
lines.append(base["cmd"])
for i, spec in enumerate(specs):
    lines.append(load(f"s{i}")["cmd"])
    for cal in ("gpl", "wiki"):
        lines.append(open(os.path.join(work, f"fit_s{i}.{cal}.cmd")).read().strip()
                     .replace(work + "/", ""))
        lines.append(load(f"s{i}.{cal}.r{ranks[0]}")["cmd"] + "  # and the other ranks")
lines.append("```")
os.makedirs("bench/results", exist_ok=True)
md = "bench/results/kv_correction.md"
# The "## Findings" section is written by hand from the numbers: a rerun keeps it.
findings = ""
if os.path.exists(md):
    old = open(md).read()
    if "\n## Findings" in old:
        findings = old[old.index("\n## Findings"):]
with open(md, "w") as f:
    f.write("\n".join(lines) + "\n" + findings)
with open("bench/results/kv_correction.json", "w") as f:
    json.dump(out, f, indent=1)
print("\n".join(lines))
PY
