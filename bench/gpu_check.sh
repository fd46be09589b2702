#!/usr/bin/env bash
# The GPU check of issue 7, run on the device machine (one H200, no network) over what
# bench/gpu_bundle.sh prepared here: the GPU tests and benchmarks built for sm_80/sm_90 with
# their libraries, and the default model in parts (it is larger than one call may carry).
#   bash bench/gpu_check.sh stage   a call that only carries a model part (prints what is there)
#   bash bench/gpu_check.sh run     the last call: joins the model, runs every gpu-labelled
#                                   test (kernels against the CPU, the model against
#                                   transformers and the CPU), then bench/gpu_bench, and prints
#                                   a short table last; full results under $OUT
# Within 8 minutes: tests about 2-3 min, benchmarks about 2-3 min (--quick below 2).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
CARRY=.gpu-carry
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
say() { echo "$@" | tee -a "$LOG"; }

if [[ $MODE == stage ]]; then
  ls -la "$CARRY" 2>&1
  exit 0
fi
[[ $MODE == run ]] || { echo "gpu_check: mode is stage or run, not $MODE" >&2; exit 2; }
: > "$LOG"
say "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

# The model: joined from its parts and checked.
export QUANTKV_HOME=$PWD/$CARRY/home
mkdir -p "$QUANTKV_HOME"
MODEL=$QUANTKV_HOME/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $MODEL ]]; then
  cat $(ls "$CARRY"/model.part* | sort -V) > "$MODEL" 2>>"$LOG" || true
fi
if [[ "$(sha256sum "$MODEL" 2>/dev/null | cut -d' ' -f1)" != "$(cat "$CARRY/model.sha256" 2>/dev/null)" ]]; then
  say "gpu_check: the model parts are missing or incomplete ($(ls "$CARRY" | tr '\n' ' ')); the model tests will skip"
  rm -f "$MODEL"
fi

# The bundle: executables run through the bundled loader so that this image's glibc does not
# matter; CUDA's own libraries come from the image (toolkit or the pip wheels PyTorch uses).
B=/tmp/qkv
rm -rf "$B"
tar -C /tmp -xJf "$CARRY/bundle.tar.xz" || { say "gpu_check: no bundle ($CARRY/bundle.tar.xz)"; exit 1; }
CUDA_LIBS=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu; do
  [[ -d $d ]] && CUDA_LIBS+=":$d"
done
for pkg in cuda_runtime cublas nccl; do
  d=$(python3 -c "import nvidia.$pkg, os; print(os.path.join(list(nvidia.$pkg.__path__)[0], 'lib'))" 2>/dev/null) && CUDA_LIBS+=":$d"
done
LOADER=$(ls "$B"/lib/ld-linux-x86-64.so.2)
export QUANTKV_SOURCE_DIR=$B  # tests/fixtures for the tests

# Tests: every gpu-labelled one, each with its own time limit.
declare -A RESULT
for t in kernels_gpu_test elementwise_gpu_test gemm_gpu_test kv_encode_gpu_test \
         paged_attention_gpu_test comm_codec_gpu_test cuda_engine_gpu_test; do
  say "== $t"
  start=$(date +%s)
  timeout 150 "$LOADER" --library-path "$B/lib$CUDA_LIBS" "$B/bin/$t" > /tmp/one.log 2>&1
  rc=$?
  cat /tmp/one.log >> "$LOG"
  count() { grep -E "^\[ +$1 +\] [A-Za-z]" /tmp/one.log | sed 's/ (.*//' | sort -u | wc -l; }
  RESULT[$t]="rc=$rc $(( $(date +%s) - start ))s passed $(count OK) failed $(count FAILED) skipped $(count SKIPPED)"
  say "   ${RESULT[$t]}"
done
# The command line on the GPU: generate on the CPU, on the GPU, and at --tp 2 with both
# ranks on this one GPU (ranks over TCP, no mpirun in the bundle; the row-parallel sums go
# through pinned host memory and the TCP communicator). The texts are printed side by side:
# greedy decoding may part at a near-tie, since the GPU sums in another order.
say "== quantkv generate: cpu, cuda, cuda --tp 2"
Q=("$LOADER" --library-path "$B/lib$CUDA_LIBS" "$B/bin/quantkv")
GEN=(generate --kv int4-comp --kv-budget-mb 256 --prompt "The three primary colors are" --max-tokens 24)
for dev in cpu cuda; do
  timeout 60 "${Q[@]}" "${GEN[@]}" --device $dev > "/tmp/gen.$dev" 2>> "$LOG"
  say "   $dev: rc=$? $(cat /tmp/gen.$dev)"
done
if [[ -s $MODEL ]]; then
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "secret-$RANDOM$RANDOM" > /tmp/gen.secret
  TP=(--tp 2 --device cuda --rendezvous 127.0.0.1:$PORT --secret-file /tmp/gen.secret)
  timeout 90 "${Q[@]}" "${GEN[@]}" "${TP[@]}" --rank 0 > /tmp/gen.tp2 2>> "$LOG" &
  r0=$!
  timeout 90 "${Q[@]}" "${GEN[@]}" "${TP[@]}" --rank 1 > /dev/null 2>> "$LOG"
  rc1=$?
  wait $r0
  say "   cuda --tp 2: rc=$? (rank 1 rc=$rc1) $(cat /tmp/gen.tp2)"
  if [[ -s /tmp/gen.cuda && -s /tmp/gen.tp2 ]]; then
    cmp -s /tmp/gen.cuda /tmp/gen.tp2 && say "   cuda --tp 2 == cuda" || say "   cuda --tp 2 != cuda (see above)"
  fi
fi

# Benchmarks.
say "== gpu_bench"
timeout 240 "$LOADER" --library-path "$B/lib$CUDA_LIBS" "$B/bin/gpu_bench" --out "$OUT" \
  --model "$MODEL" ${GPU_BENCH_ARGS:---quick} 2>&1 | tee -a "$LOG"
say "== summary"
for t in "${!RESULT[@]}"; do say "$(printf '%-28s %s' "$t" "${RESULT[$t]}")"; done
[[ -f $OUT/gpu-attention.md ]] && grep -E '^\| (int4|fp16) ' "$OUT/gpu-attention.md" | tee -a "$LOG"
[[ -f $OUT/gpu-decode.md ]] && grep -E '^\| (fp16|int4-comp) \| ' "$OUT/gpu-decode.md" | tee -a "$LOG"
exit 0
