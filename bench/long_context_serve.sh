#!/usr/bin/env bash
# Long prompts end to end (chunked prefill over the paged quantized cache, YaRN past the
# trained 8k window), through `quantkv serve` + `quantkv client generate --prompt-file`
# (MODE serve, the default) or `quantkv generate --prompt-file` (MODE generate): time to
# first token (the prefill), decode speed, the process's peak RSS and the KV bytes, per
# prompt length; then the prefill time fitted as a*n + b*n^2 over the lengths (attention is
# quadratic) and evaluated at 100k. Rows of other lengths already in the results file are
# kept, so lengths can be measured in separate runs. Writes
# bench/results/long_context/MODE_long_KV.{md,json}.
#   bench/long_context_serve.sh [KV] [LENGTHS] [MODE]   e.g. int4-comp "8000 32000" generate
# (the KV MB column of MODE generate assumes the default model's 30 layers x 3 KV heads x 64)
set -euo pipefail
cd "$(dirname "$0")/.."
KV=${1:-int4-comp}
LENGTHS=${2-"8000 32000"}  # an empty LENGTHS (not unset) measures nothing
MODE=${3:-serve}
[[ $MODE == serve || $MODE == generate ]] || { echo "MODE is serve or generate, not $MODE" >&2; exit 2; }
Q=${QUANTKV_BIN:-build/launcher/quantkv}  # a copy keeps a long run safe from rebuilds
TEXT=../shared/data/wikitext-2/test.txt
OUT=bench/results/long_context/${MODE}_long_$KV
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
# Each measured row is appended here at once (not in $TMP): a run of an hour is not lost to
# a failure after it; the next run of this script merges what is left over.
ROWS=$OUT.new.jsonl
touch "$ROWS"  # LENGTHS "" re-renders the results file from its JSON
# start_server FACTOR [TIME_FILE]: `quantkv serve` in the background (SERVER, ADDRESS).
start_server() {
  local timing=()
  [[ -n ${2:-} ]] && timing=(/usr/bin/time -f "%M" -o "$2")
  "${timing[@]}" "$Q" serve --kv "$KV" --rope-scaling "yarn:$1" --listen 127.0.0.1:0 \
    --kv-budget-mb 4096 --max-running 1 --max-step-tokens 512 2>"$TMP/server.err" &
  SERVER=$!
  ADDRESS=$(wait_for_listening "$TMP/server.err" "$SERVER") || { cat "$TMP/server.err" >&2; exit 1; }
}
stop_server() {
  # SIGTERM to the server itself (GNU time does not forward it), then time writes the RSS.
  pkill -TERM -P "$SERVER" 2>/dev/null || kill -TERM "$SERVER"
  wait "$SERVER" || true
  SERVER=""
}
for n in $LENGTHS; do
  # The context 8192 * factor holds the prompt and the answer (YaRN needs factor > 1).
  factor=$(( (n + 64 + 8191) / 8192 ))
  (( factor >= 2 )) || factor=2
  if [[ $MODE == serve ]]; then start_server "$factor" "$TMP/rss.$n"; else start_server "$factor"; fi
  # n tokens of WikiText: count a generous slice, then cut it in proportion.
  head -c $(( n * 5 )) "$TEXT" >"$TMP/slice.txt"
  have=$("$Q" client tokenize --server "$ADDRESS" --prompt-file "$TMP/slice.txt" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)["ids"]))')
  chars=$(python3 -c "import os; print(int(os.path.getsize('$TMP/slice.txt') * $n / $have))")
  head -c "$chars" "$TMP/slice.txt" >"$TMP/prompt.txt"
  if [[ $MODE == serve ]]; then
    "$Q" client generate --server "$ADDRESS" --prompt-file "$TMP/prompt.txt" --max-tokens 32 \
      --ignore-eos >"$TMP/answer.$n.txt" 2>"$TMP/final.$n.err" ||
      { cat "$TMP/final.$n.err" >&2; exit 1; }
    "$Q" client stats --server "$ADDRESS" >"$TMP/stats.$n.json"
    stop_server
  else
    # The server only counted the tokens; the same settings for generate.
    stop_server
    /usr/bin/time -f "%M" -o "$TMP/rss.$n" "$Q" generate --kv "$KV" --rope-scaling "yarn:$factor" \
      --kv-budget-mb 4096 --prompt-file "$TMP/prompt.txt" --max-tokens 32 --ignore-eos \
      >"$TMP/answer.$n.txt" 2>"$TMP/final.$n.err" || { cat "$TMP/final.$n.err" >&2; exit 1; }
  fi
  python3 - "$n" "$factor" "$TMP" "$MODE" >>"$ROWS" <<'PY'
import json, re, sys
n, factor, tmp, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
final = open(f"{tmp}/final.{n}.err").read()
rss = int(open(f"{tmp}/rss.{n}").read().split()[-1]) / 1024
if mode == "serve":
    m = re.search(r"prompt (\d+) tokens, generated (\d+), finish \w+, ttft ([\d.]+) ms, ([\d.]+) tok/s, KV ([\d.]+)", final)
    assert m, final
    stats = json.load(open(f"{tmp}/stats.{n}.json"))
    row = {"prompt_tokens": int(m[1]), "generated": int(m[2]), "ttft_s": float(m[3]) / 1e3,
           "tok_per_s": float(m[4]), "kv_bits_per_element": float(m[5]),
           "kv_bytes_per_token": stats["kv_bytes_per_token"]}
else:
    m = re.search(r"\[prompt (\d+) tokens in ([\d.]+) ms \([\d.]+ tok/s\); generated (\d+) tokens in [\d.]+ ms \(([\d.]+) tok/s\).*, ([\d.]+) bits/element\]", final)
    assert m, final
    row = {"prompt_tokens": int(m[1]), "generated": int(m[3]), "ttft_s": float(m[2]) / 1e3,
           "tok_per_s": float(m[4]), "kv_bits_per_element": float(m[5])}
    # KV bytes per token from the bits: 2 (K, V) x layers x KV heads x head_dim elements.
    row["kv_bytes_per_token"] = row["kv_bits_per_element"] / 8 * 2 * 30 * 3 * 64
row.update({"target": int(n), "yarn": factor, "peak_rss_mb": rss})
print(json.dumps(row))
PY
done
python3 - "$ROWS" "$KV" "$OUT" "$MODE" <<'PY'
import json, os, sys, datetime
new = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kv, out, mode = sys.argv[2], sys.argv[3], sys.argv[4]
old = json.load(open(out + ".json")) if os.path.exists(out + ".json") else []
for r in old:  # rows from before "target" was recorded: the length asked for, to the thousand
    r.setdefault("target", int(round(r["prompt_tokens"], -3)))
    if "server_peak_rss_mb" in r:
        r["peak_rss_mb"] = r.pop("server_peak_rss_mb")
done = {r["target"] for r in new}
rows = sorted([r for r in old if r["target"] not in done] + new, key=lambda r: r["prompt_tokens"])
n = [float(r["prompt_tokens"]) for r in rows]
t = [r["ttft_s"] for r in rows]
fit = ""
if len(rows) >= 2:
    # Least squares for t = a n + b n^2 (the 2x2 normal equations; no numpy needed).
    s2 = sum(x * x for x in n); s3 = sum(x ** 3 for x in n); s4 = sum(x ** 4 for x in n)
    y1 = sum(x * y for x, y in zip(n, t)); y2 = sum(x * x * y for x, y in zip(n, t))
    det = s2 * s4 - s3 * s3
    a, b = (y1 * s4 - y2 * s3) / det, (s2 * y2 - s3 * y1) / det
    fit = (f"Prefill fitted as a*n + b*n^2: a = {a * 1e3:.3f} ms/token, b = {b * 1e9:.3f} ns/token^2; "
           f"at 100,000 tokens {(a * 1e5 + b * 1e10) / 60:.0f} min ({b * 1e10 / (a * 1e5 + b * 1e10) * 100:.0f}% of it attention).")
how = ("`quantkv serve` + `quantkv client generate --prompt-file`, one request at a time, "
       "`--max-step-tokens 512`" if mode == "serve" else
       "`quantkv generate --prompt-file` (prefill chunks of the engine's default size)")
lines = [f"# Long prompts through {'`quantkv serve`' if mode == 'serve' else '`quantkv generate`'} (--kv {kv})", "",
         f"Updated {datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}, SmolLM2-135M-Instruct Q4_1, 2 threads, "
         f"WikiText-2 test from its start as the prompt, 32 greedy tokens, {how}, "
         "YaRN to the next multiple of 8192. Made by "
         f"`bench/long_context_serve.sh {kv} \"LENGTHS\" {mode}` (lengths rounded by the tokenizer; "
         "each row keeps the time it was measured at in the JSON's order of runs).", "",
         "| prompt tokens | --rope-scaling | TTFT (prefill) s | prefill tok/s | decode tok/s | KV bits/elem | KV MB at this length | peak RSS MB |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['prompt_tokens']} | yarn:{r['yarn']} | {r['ttft_s']:.1f} | {r['prompt_tokens'] / r['ttft_s']:.0f} | "
                 f"{r['tok_per_s']:.1f} | {r['kv_bits_per_element']:.2f} | "
                 f"{r['kv_bytes_per_token'] * r['prompt_tokens'] / 1e6:.0f} | {r['peak_rss_mb']:.0f} |")
lines += ["", fit]
open(out + ".md", "w").write("\n".join(lines) + "\n")
json.dump(rows, open(out + ".json", "w"), indent=1)
print("\n".join(lines))
PY
rm -f "$ROWS"  # merged
