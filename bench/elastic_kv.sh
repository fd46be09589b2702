#!/usr/bin/env bash
# Elastic KV precision under memory pressure (--kv-floor): what the floor costs and what it
# buys. (1) Quality: PPL and KL against the fp16 cache on WikiText-2 (ctx 512, steps of 64)
# for int4-comp, int4-comp with every full block pair requantized to int2-floor after each
# step (--requantize-all: the cost at full pressure), and the 2-bit presets as caches of
# their own. (2) Serving: `quantkv serve --kv int4-comp` on a KV budget too small for the
# load (6 streams of 318 + 300 tokens on 11 blocks), without and with --kv-floor
# int2-floor: preemptions, requantized blocks, aggregate output tok/s (the bound: the same
# load without a floor, in this run). Writes bench/results/elastic_kv.md.
#   bench/elastic_kv.sh [--chunks 8]   (needs build/)
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNKS=${2:-8}
Q=$(readlink -f build/launcher/quantkv)
T=../shared/data/wikitext-2/test.txt
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}
COMMON="--text $T --ctx 512 --chunks $CHUNKS --step-tokens 64"
row() {  # name, flags
  local out
  # shellcheck disable=SC2086
  out=$($Q perplexity $COMMON $2 --kl-base "$TMP/fp16.logits" --json 2>/dev/null)
  python3 - "$1" "$out" <<'PY'
import json, sys
j = json.loads(sys.argv[2])
print("| %s | %.2f | %.4f | %.5f | %.2f%% |" % (sys.argv[1], j["kv_bits_per_element"], j["ppl"],
      j["kl_mean"], 100 * j["top1_agreement"]))
PY
}

load() {  # extra serve flags -> "preemptions requantized tok/s"
  # shellcheck disable=SC2086
  timeout -s KILL 600 "$Q" serve --listen 127.0.0.1:0 --kv int4-comp --kv-budget-mb 9 \
    --max-step-tokens 128 --threads 2 $1 >/dev/null 2>"$TMP/serve.err" &
  local pid=$! address=""
  for _ in $(seq 240); do
    address=$(sed -n 's/^.*: listening on \([^ ]*\) .*$/\1/p' "$TMP/serve.err")
    [[ -n $address ]] && break
    sleep 0.25
  done
  [[ -n $address ]] || { cat "$TMP/serve.err" >&2; exit 1; }
  local prompt start end
  prompt=$(head -c 3000 "$T" | tail -c 1200 | tr '\n' ' ')
  start=$(date +%s.%N)
  local clients=()
  for i in 1 2 3 4 5 6; do
    "$Q" client generate --server "$address" --prompt "$i $prompt" --max-tokens 300 \
      --ignore-eos >/dev/null 2>"$TMP/client_$i.err" &
    clients+=($!)
  done
  for c in "${clients[@]}"; do wait "$c"; done
  end=$(date +%s.%N)
  "$Q" client stats --server "$address" >"$TMP/stats.json"
  kill -TERM "$pid"
  wait "$pid" || true
  python3 - "$TMP/stats.json" "$start" "$end" <<'PY'
import json, sys
st = json.load(open(sys.argv[1]))
secs = float(sys.argv[3]) - float(sys.argv[2])
print(int(st.get("preemptions", 0)), int(st.get("kv_requantized_blocks", 0)),
      int(st.get("kv_requantized_bytes_freed", 0)), "%.1f" % (6 * 300 / secs))
PY
}

{
  echo "# Elastic KV precision under memory pressure (--kv-floor)"
  echo
  echo "$(date -u +%FT%TZ), $(nproc) cores, SmolLM2-135M Q4_1."
  echo
  echo "## Quality: WikiText-2, $CHUNKS windows of 512 in steps of 64, KL against the fp16 cache"
  echo
  echo "| cache | bits/element (policy) | PPL | KL | top-1 |"
  echo "|---|---|---|---|---|"
  # shellcheck disable=SC2086
  $Q perplexity $COMMON --kv fp16 --save-logits "$TMP/fp16.logits" >/dev/null 2>&1
  row "int4-comp" "--kv int4-comp"
  row "int4-comp, every full block pair requantized to int2-floor (full pressure)" \
    "--kv int4-comp --kv-floor int2-floor --requantize-all"
  row "int2-floor as the cache" "--kv int2-floor"
  row "int2-comp as the cache" "--kv int2-comp"
  echo
  echo "The requantized row reads all but the newest (unpaired) blocks at 2 bits, re-encoded"
  echo "from their 4-bit codes; its bits/element column is the int4-comp policy's (the blocks"
  echo "actually held are ~half that size once requantized)."
  echo
  echo "## Serving under a budget too small for the load"
  echo
  echo "\`quantkv serve --kv int4-comp --kv-budget-mb 9\` (11 blocks of 128 tokens), 6 concurrent"
  echo "\`client generate\` streams of a 318-token prompt + 300 tokens (ignore_eos)."
  echo
  echo "| --kv-floor | preemptions | blocks requantized | bytes freed | output tok/s | vs no floor |"
  echo "|---|---|---|---|---|---|"
  read -r p0 r0 b0 t0 < <(load "")
  read -r p1 r1 b1 t1 < <(load "--kv-floor int2-floor")
  echo "| none | $p0 | $r0 | $b0 | $t0 | 1.00x |"
  echo "| int2-floor | $p1 | $r1 | $b1 | $t1 | $(python3 -c "print('%.2fx' % ($t1 / $t0))") |"
} | tee bench/results/elastic_kv.md
