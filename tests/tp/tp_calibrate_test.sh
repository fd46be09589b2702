#!/usr/bin/env bash
# `mpirun -np N quantkv calibrate --tp N` (N = 2, 3): every rank gathers every KV head
# (EngineConfig::kv_observer_all_heads) and rank 0 writes the file; its static scales equal
# the one-process calibration's within 0.2% of each channel's range (TP sums round
# differently), for post- and pre-RoPE keys.
#   tp_calibrate_test.sh QUANTKV_BINARY [MPIEXEC]
# Exit 77 (ctest SKIP_RETURN_CODE) without mpirun, python3 or the default model.
set -euo pipefail
QUANTKV=$(readlink -f "${1:?usage: $0 QUANTKV_BINARY [MPIEXEC]}")
MPIRUN=${2:-$(command -v mpirun || true)}
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -n $MPIRUN && -x $MPIRUN ]] || { echo "SKIP: no mpirun"; exit 77; }
[[ -f $MODEL ]] || { echo "SKIP: default model not in the cache ($MODEL)"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: no python3"; exit 77; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Calibration text: any few thousand tokens; the test's own sources are always there.
TEXT=$TMP/text.txt
cat "$(dirname "$0")"/*.cc > "$TEXT"
for spec in "int4:static" "k=int4:static,v=int4,rope=pre"; do
  "$QUANTKV" calibrate --text "$TEXT" --kv "$spec" --tokens 1024 --out "$TMP/tp1.json" \
    >/dev/null 2>"$TMP/tp1.err" || { cat "$TMP/tp1.err"; exit 1; }
  for n in 2 3; do
    timeout -s KILL 120 "$MPIRUN" --oversubscribe -np $n "$QUANTKV" calibrate --tp $n \
      --threads 1 --text "$TEXT" --kv "$spec" --tokens 1024 --out "$TMP/tp$n.json" \
      >"$TMP/tp$n.out" 2>"$TMP/tp$n.err" || { echo "FAIL: --tp $n"; cat "$TMP/tp$n.err"; exit 1; }
    [[ $(grep -c "wrote" "$TMP/tp$n.out") == 1 ]] || { echo "FAIL: not one report"; exit 1; }
    python3 - "$TMP/tp1.json" "$TMP/tp$n.json" "$spec --tp $n" <<'PY'
import json, sys
a, b = (json.load(open(p))["static_scales"] for p in sys.argv[1:3])
assert sorted(a) == sorted(b), "layers differ"
worst = 0.0
for layer in a:
    for kv in a[layer]:
        scale = a[layer][kv]["scale"]
        for field in a[layer][kv]:
            x, y = a[layer][kv][field], b[layer][kv][field]
            assert len(x) == len(y) == len(scale), (layer, kv, field)
            for i in range(len(x)):
                worst = max(worst, abs(x[i] - y[i]) / (scale[i] * 15))
print(f"{sys.argv[3]}: largest difference {worst:.2e} of a channel's range")
if worst > 2e-3:
    sys.exit("FAIL: scales differ from the one-process calibration")
PY
  done
done
echo PASS
