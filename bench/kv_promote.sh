#!/usr/bin/env bash
# Promoted KV tokens (--kv-promote with :keepN codecs) against the same cache without
# promotion, at ctx 512 in steps of 64 tokens (promotion acts on later steps), KL and PPL
# against the fp16 cache on the same windows: SmolLM2 (key-norm, attention; and H2O's eviction,
# drop:keepN, against keeping the evicted tokens at 2 bits) and the MoEfied SmolLM2
# at top-6 (key-norm, router-entropy, attention mass). Writes bench/results/kv_promote.md.
#   bench/kv_promote.sh [--chunks 8]   (needs build/ and, for the MoE rows, a moefy split)
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${2:-8}
Q=build/launcher/quantkv
T=../shared/data/wikitext-2/test.txt
TMP=$(mktemp -d)
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}
SPLIT=$TMP/moe8.safetensors
tail -c 250000 "$T" > "$TMP/calib.txt"
$Q moefy --text "$TMP/calib.txt" --out "$SPLIT" >/dev/null 2>&1
COMMON="--text $T --ctx 512 --chunks $CHUNKS --step-tokens 64"
KV8="k=int2:chan:clip0.7:keep8,v=int2:g64:asym:clip0.9:keep8,sink=4,window=8,block=128"
KV4="k=int2:chan:clip0.7:keep4,v=int2:g64:asym:clip0.9,sink=4,window=8,block=128"
DROP8="k=drop:keep8,v=drop:keep8,sink=4,window=8,block=128"
DROP32="k=drop:keep32,v=drop:keep32,sink=4,window=8,block=128"
row() {  # name, extra flags, baseline
  local out
  out=$($Q perplexity $COMMON $2 --kl-base "$3" --json)
  python3 - "$1" "$out" <<'PY'
import json, sys
j = json.loads(sys.argv[2])
print("| %s | %.2f | %.4f | %.5f | %.2f%% |" % (sys.argv[1], j["kv_bits_per_element"], j["ppl"],
      j["kl_mean"], 100 * j["top1_agreement"]))
PY
}
{
  echo "# Promoted KV tokens (--kv-promote), WikiText-2, $CHUNKS windows of 512 in steps of 64"
  echo
  echo "KL and top-1 against the fp16 cache of the same model on the same windows."
  echo
  echo "| model, cache | bits/element | PPL | KL | top-1 |"
  echo "|---|---|---|---|---|"
  $Q perplexity $COMMON --kv fp16 --save-logits "$TMP/fp16.logits" >/dev/null
  row "SmolLM2, int2-comp" "--kv int2-comp" "$TMP/fp16.logits"
  row "SmolLM2, int2-comp + keep4 K, key-norm" "--kv $KV4 --kv-promote key-norm" "$TMP/fp16.logits"
  row "SmolLM2, int2-comp + keep4 K, attention" "--kv $KV4 --kv-promote attention" "$TMP/fp16.logits"
  row "SmolLM2, int2-comp + keep8 K,V, no promotion" "--kv $KV8" "$TMP/fp16.logits"
  row "SmolLM2, int2-comp + keep8 K,V, key-norm" "--kv $KV8 --kv-promote key-norm" "$TMP/fp16.logits"
  row "SmolLM2, int2-comp + keep8 K,V, attention" "--kv $KV8 --kv-promote attention" "$TMP/fp16.logits"
  # H2O proper: the tokens not promoted are evicted (drop), against keeping them at 2 bits
  # above (MiKV); with no promotion only the sinks and the window remain (StreamingLLM).
  row "SmolLM2, drop + keep8 K,V, no promotion (sinks + window only)" "--kv $DROP8" "$TMP/fp16.logits"
  row "SmolLM2, drop + keep8 K,V, attention (H2O)" "--kv $DROP8 --kv-promote attention" "$TMP/fp16.logits"
  row "SmolLM2, drop + keep32 K,V, attention (H2O)" "--kv $DROP32 --kv-promote attention" "$TMP/fp16.logits"
  M="--moe-split $SPLIT --moe-top-k 6"
  $Q perplexity $COMMON $M --kv fp16 --save-logits "$TMP/moe.logits" >/dev/null
  row "MoEfied top-6, keep8 K,V, no promotion" "$M --kv $KV8" "$TMP/moe.logits"
  row "MoEfied top-6, keep8 K,V, key-norm" "$M --kv $KV8 --kv-promote key-norm" "$TMP/moe.logits"
  row "MoEfied top-6, keep8 K,V, router-entropy" "$M --kv $KV8 --kv-promote router-entropy" "$TMP/moe.logits"
  row "MoEfied top-6, keep8 K,V, attention" "$M --kv $KV8 --kv-promote attention" "$TMP/moe.logits"
} | tee bench/results/kv_promote.md
rm -rf "$TMP"
