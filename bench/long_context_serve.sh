#!/usr/bin/env bash
# Long prompts end to end through `quantkv serve` (chunked prefill over the paged quantized
# cache, YaRN past the trained 8k window) and `quantkv client generate --prompt-file`: time
# to first token (the prefill), decode speed, the server's peak RSS and the KV bytes, per
# prompt length; then the prefill time fitted as a*n + b*n^2 over the lengths (attention is
# quadratic) and evaluated at 100k. Writes bench/results/long_context/serve_long_KV.{md,json}.
#   bench/long_context_serve.sh [KV] [LENGTHS]      e.g. int4-comp "8000 32000"
set -euo pipefail
cd "$(dirname "$0")/.."
KV=${1:-int4-comp}
LENGTHS=${2:-"8000 32000"}
Q=build/launcher/quantkv
TEXT=../shared/data/wikitext-2/test.txt
OUT=bench/results/long_context/serve_long_$KV
[[ -x $Q ]] || { echo "build $Q first" >&2; exit 1; }
source tests/testutil/serve_helpers.sh
TMP=$(mktemp -d)
SERVER=""
cleanup() {
  [[ -n $SERVER ]] && pkill -TERM -P "$SERVER" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}
ROWS=$TMP/rows.jsonl
for n in $LENGTHS; do
  # The context 8192 * factor holds the prompt and the answer (YaRN needs factor > 1).
  factor=$(( (n + 64 + 8191) / 8192 ))
  (( factor >= 2 )) || factor=2
  /usr/bin/time -f "%M" -o "$TMP/rss.$n" "$Q" serve --kv "$KV" --rope-scaling "yarn:$factor" \
    --listen 127.0.0.1:0 --kv-budget-mb 4096 --max-running 1 --max-step-tokens 512 \
    2>"$TMP/server.$n.err" &
  SERVER=$!
  ADDRESS=$(wait_for_listening "$TMP/server.$n.err" "$SERVER") ||
    { cat "$TMP/server.$n.err" >&2; exit 1; }
  # n tokens of WikiText: count a generous slice, then cut it in proportion.
  head -c $(( n * 5 )) "$TEXT" >"$TMP/slice.txt"
  have=$("$Q" client tokenize --server "$ADDRESS" --prompt-file "$TMP/slice.txt" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["ids"]))')
  chars=$(python3 -c "import os; print(int(os.path.getsize('$TMP/slice.txt') * $n / $have))")
  head -c "$chars" "$TMP/slice.txt" >"$TMP/prompt.txt"
  "$Q" client generate --server "$ADDRESS" --prompt-file "$TMP/prompt.txt" --max-tokens 32 \
    --ignore-eos >"$TMP/answer.$n.txt" 2>"$TMP/client.$n.err" ||
    { cat "$TMP/client.$n.err" >&2; exit 1; }
  "$Q" client stats --server "$ADDRESS" >"$TMP/stats.$n.json"
  # SIGTERM to the server itself (GNU time does not forward it), then time writes the RSS.
  pkill -TERM -P "$SERVER"
  wait "$SERVER" || true
  SERVER=""
  python3 - "$n" "$factor" "$TMP" >>"$ROWS" <<'PY'
import json, re, sys
n, factor, tmp = sys.argv[1], int(sys.argv[2]), sys.argv[3]
final = open(f"{tmp}/client.{n}.err").read()
m = re.search(r"prompt (\d+) tokens, generated (\d+), finish \w+, ttft ([\d.]+) ms, ([\d.]+) tok/s, KV ([\d.]+)", final)
assert m, final
stats = json.load(open(f"{tmp}/stats.{n}.json"))
print(json.dumps({"prompt_tokens": int(m[1]), "generated": int(m[2]), "ttft_s": float(m[3]) / 1e3,
                  "tok_per_s": float(m[4]), "kv_bits_per_element": float(m[5]), "yarn": factor,
                  "kv_bytes_per_token": stats["kv_bytes_per_token"],
                  "server_peak_rss_mb": int(open(f"{tmp}/rss.{n}").read().split()[-1]) / 1024}))
PY
done
python3 - "$ROWS" "$KV" "$OUT" <<'PY'
import json, sys, datetime
import numpy as np
rows = [json.loads(l) for l in open(sys.argv[1])]
kv, out = sys.argv[2], sys.argv[3]
n = np.array([r["prompt_tokens"] for r in rows], float)
t = np.array([r["ttft_s"] for r in rows], float)
fit = ""
if len(rows) >= 2:
    a, b = np.linalg.lstsq(np.stack([n, n * n], 1), t, rcond=None)[0]
    fit = (f"Prefill fitted as a*n + b*n^2: a = {a * 1e3:.3f} ms/token, b = {b * 1e9:.3f} ns/token^2; "
           f"at 100,000 tokens {(a * 1e5 + b * 1e10) / 60:.0f} min ({b * 1e10 / (a * 1e5 + b * 1e10) * 100:.0f}% of it attention).")
lines = [f"# Long prompts through `quantkv serve` (--kv {kv})", "",
         f"{datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}, SmolLM2-135M-Instruct Q4_1, 2 threads, "
         "WikiText-2 test from its start as the prompt, 32 greedy tokens, one request at a time, "
         "`--max-step-tokens 512`, YaRN to the next multiple of 8192. Made by "
         f"`bench/long_context_serve.sh {kv} \"{' '.join(str(r['prompt_tokens']) for r in rows)}\"` (lengths rounded by the tokenizer).", "",
         "| prompt tokens | --rope-scaling | TTFT (prefill) s | prefill tok/s | decode tok/s | KV bits/elem | KV MB at this length | server peak RSS MB |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['prompt_tokens']} | yarn:{r['yarn']} | {r['ttft_s']:.1f} | {r['prompt_tokens'] / r['ttft_s']:.0f} | "
                 f"{r['tok_per_s']:.1f} | {r['kv_bits_per_element']:.2f} | "
                 f"{r['kv_bytes_per_token'] * r['prompt_tokens'] / 1e6:.0f} | {r['server_peak_rss_mb']:.0f} |")
lines += ["", fit]
open(out + ".md", "w").write("\n".join(lines) + "\n")
json.dump(rows, open(out + ".json", "w"), indent=1)
print("\n".join(lines))
PY
