#!/usr/bin/env bash
# --ep-payload on the MoEfied SmolLM2 (8 experts, top-6) under `mpirun -np 2 ... --tp 2`,
# experts split over the ranks with all-to-all dispatch and router-aware elastic precision
# (q4_0/q8_0 under a 48 MB budget): quality (PPL, KL and top-1 against the exact-payload run of
# the same dispatch) and rank 0's bytes in the MoE layers' collectives, per payload. Writes
# bench/results/moe_ep_payload.{md,json}.
#   bench/moe_ep_payload.sh [SPLIT]    (SPLIT: a `quantkv moefy` file; made if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
Q=build/launcher/quantkv
SPLIT=${1:-/tmp/moe8.safetensors}
TEXT=../shared/data/wikitext-2/test.txt
OUT=bench/results/moe_ep_payload
[[ -x $Q ]] || { echo "build $Q first" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Cooperlake}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [[ ! -f $SPLIT ]]; then
  # Calibration text disjoint from the evaluated windows (the file's last 250 KB).
  tail -c 250000 "$TEXT" >"$TMP/calib.txt"
  "$Q" moefy --text "$TMP/calib.txt" --experts 8 --top-k 2 --out "$SPLIT" >/dev/null
fi
COMMON=(perplexity --text "$TEXT" --ctx 512 --chunks 4 --json --tp 2 --moe-split "$SPLIT"
  --moe-top-k 6 --expert-levels q4_0,q8_0 --expert-budget-mb 48)
PAYLOADS=(int8 int4 int4/int8 int4/fp32)
run() { mpirun --oversubscribe -np 2 "$Q" "${COMMON[@]}" "$@"; }
run --ep-dispatch all-reduce >"$TMP/all-reduce.json"
for d in all-to-all combine-only; do
  run --ep-dispatch $d --ep-payload fp32 --save-logits "$TMP/base.$d.logits" >"$TMP/$d.fp32.json"
  for p in "${PAYLOADS[@]}"; do
    run --ep-dispatch $d --ep-payload "$p" --kl-base "$TMP/base.$d.logits" \
      >"$TMP/$d.${p//\//_}.json"
  done
done
python3 - "$TMP" "$OUT" "${PAYLOADS[@]}" <<'PY'
import datetime, json, sys
tmp, out, payloads = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
ar = json.load(open(f"{tmp}/all-reduce.json"))
rows.append(dict(dispatch="all-reduce", payload="(the layer's all-reduce, exact)", **ar))
for d in ["all-to-all", "combine-only"]:
    for p in ["fp32"] + payloads:
        r = json.load(open(f"{tmp}/{d}.{p.replace('/', '_')}.json"))
        rows.append(dict(dispatch=d, payload=p, **r))
lines = ["# MoE all-to-all payloads by expert sensitivity (--ep-payload)", "",
         f"{datetime.datetime.utcnow():%Y-%m-%dT%H:%MZ}, SmolLM2-135M-Instruct Q4_1 split into 8 experts "
         "(`quantkv moefy`, top-6), `mpirun -np 2 quantkv perplexity --tp 2` (experts split over the "
         "ranks), elastic expert precision q4_0/q8_0 under 48 MB, WikiText-2 test, 4 windows of 512 "
         "(1020 scored tokens). KL and top-1 against the exact (fp32) payload of the same dispatch. "
         "MoE MB: rank 0's bytes sent in the MoE layers' collectives (dispatch, combine and "
         "all-gather, or the all-reduce), all 30 layers. LOW/HIGH: HIGH for the records of experts "
         "elastic precision holds at q8_0. Made by `bench/moe_ep_payload.sh`.", "",
         "| --ep-dispatch | --ep-payload | PPL | ΔPPL % vs exact | KL | top-1 | MoE MB (rank 0) | vs exact payload |",
         "|---|---|---|---|---|---|---|---|"]
base = {}
for r in rows:
    if r["payload"] == "fp32":
        base[r["dispatch"]] = r
for r in rows:
    b = base.get(r["dispatch"])
    dppl = f"{(r['ppl'] / b['ppl'] - 1) * 100:+.3f}" if b else ""
    ratio = f"{r['moe_bytes_sent_rank0'] / b['moe_bytes_sent_rank0']:.3f}x" if b else ""
    kl = f"{r['kl_mean']:.5f}" if "kl_mean" in r else ""
    top1 = f"{100 * r['top1_agreement']:.2f}%" if "top1_agreement" in r else ""
    lines.append(f"| {r['dispatch']} | `{r['payload']}` | {r['ppl']:.4f} | {dppl} | {kl} | {top1} | "
                 f"{r['moe_bytes_sent_rank0'] / 1e6:.2f} | {ratio} |")
open(out + ".md", "w").write("\n".join(lines) + "\n")
json.dump(rows, open(out + ".json", "w"), indent=1)
print("\n".join(lines))
PY
