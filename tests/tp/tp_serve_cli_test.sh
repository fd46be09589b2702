#!/usr/bin/env bash
# `mpirun -np 2 quantkv serve --tp 2` end to end: the server listens (port 0, read back from
# its "listening on" line), `quantkv client generate` streams a greedy completion equal to
# the one `quantkv generate --tp 2` prints for the same prompt, ModelInfo says tp_degree 2,
# Stats has both ranks with their steps; SIGTERM to the ranks (what mpirun forwards) ends
# the job with exit 0 within 15 s and no rank left. Then the refusals: --tp 2 without mpirun,
# and an unbindable --worker-listen, each a clear message and a non-zero exit. A worker rank
# SIGKILLed mid-stream: the client gets UNAVAILABLE naming that rank, and the job ends
# within 15 s; one SIGSTOPped: the client hears of rank 0's collective timeout.
#   tp_serve_cli_test.sh QUANTKV_BINARY [MPIEXEC]
# Exit 77 (ctest SKIP_RETURN_CODE) without mpirun or the default model.
set -euo pipefail

QUANTKV=$(readlink -f "${1:?usage: $0 QUANTKV_BINARY [MPIEXEC]}")
MPIRUN=${2:-$(command -v mpirun || true)}
SKIP=77
if [[ -z $MPIRUN || ! -x $MPIRUN ]]; then
  echo "SKIP: no mpirun"
  exit $SKIP
fi
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $MODEL ]]; then
  echo "SKIP: default model not in the cache ($MODEL); run \`quantkv fetch-model\`"
  exit $SKIP
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI=("$MPIRUN" --oversubscribe -np 2)

TMP=$(mktemp -d)
JOB_PID=""
# The ranks of this test's job: children of its mpirun running QUANTKV.
ranks() { pgrep -f "^$QUANTKV serve --tp 2" || true; }
cleanup() {
  if [[ -n $JOB_PID ]]; then
    kill -KILL $(ranks) 2>/dev/null || true
    kill -KILL "$JOB_PID" 2>/dev/null || true
    wait "$JOB_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*"
  echo "--- server log:"
  cat "$TMP/server.err" 2>/dev/null || true
  exit 1
}

# shellcheck source=../testutil/serve_helpers.sh
source "$(dirname "$0")/../testutil/serve_helpers.sh"
PROMPT="The capital of France is"
ADDRESS=""
# start_server [VAR=VALUE...]: the job in the background, with those variables set.
start_server() {
  # timeout(1) bounds the job if this script is killed.
  timeout -s KILL 240 env "$@" "${MPI[@]}" "$QUANTKV" serve --tp 2 --listen 127.0.0.1:0 --kv int4-comp \
    --kv-budget-mb 64 >"$TMP/server.out" 2>"$TMP/server.err" &
  JOB_PID=$!
  ADDRESS=$(wait_for_listening "$TMP/server.err" "$JOB_PID") || fail "the job is not listening"
}
start_server
grep -q -- "--tp 2" "$TMP/server.err" || fail "the listening line does not say --tp 2"
echo "server at $ADDRESS"

"$QUANTKV" client generate --server "$ADDRESS" --prompt "$PROMPT" --max-tokens 12 \
  >"$TMP/served.txt" 2>"$TMP/client.err" || fail "client generate: $(cat "$TMP/client.err")"
printf '%s' "$PROMPT" >"$TMP/prompt.txt"
"$QUANTKV" client generate --server "$ADDRESS" --prompt-file "$TMP/prompt.txt" --max-tokens 12 \
  >"$TMP/served_file.txt" 2>"$TMP/client.err" || fail "client --prompt-file: $(cat "$TMP/client.err")"
cmp -s "$TMP/served.txt" "$TMP/served_file.txt" || fail "--prompt-file and --prompt differ"
"$QUANTKV" client info --server "$ADDRESS" >"$TMP/info.txt" 2>&1 || fail "client info"
grep -q '"tp_degree": *2' "$TMP/info.txt" || fail "ModelInfo: $(cat "$TMP/info.txt")"
"$QUANTKV" client stats --server "$ADDRESS" >"$TMP/stats.txt" 2>&1 || fail "client stats"
python3 - "$TMP/stats.txt" <<'EOF' || fail "Stats: $(cat "$TMP/stats.txt")"
import json, sys
st = json.load(open(sys.argv[1]))
ranks = st["ranks"]
assert [r.get("rank", 0) for r in ranks] == [0, 1], ranks
assert all(int(r["steps"]) == 24 for r in ranks), ranks  # 2 requests: 1 prefill + 11 decodes
assert all(r["comm_seconds"] > 0 for r in ranks), ranks
EOF

# SIGTERM to both ranks, as mpirun forwards it: rank 0 drains and tells rank 1 to stop.
kill -TERM $(ranks)
wait_gone "$JOB_PID" 15 || fail "the job still runs 15 s after SIGTERM"
rc=0
wait "$JOB_PID" || rc=$?
JOB_PID=""
[[ $rc == 0 ]] || fail "the job exited with $rc after SIGTERM"
[[ -z $(ranks) ]] || fail "a rank outlived the job"

# The same prompt through `quantkv generate --tp 2` (the serve defaults: per-row matmuls,
# tiled attention, so the two paths compute alike).
timeout -s KILL 120 "${MPI[@]}" "$QUANTKV" generate --tp 2 --kv int4-comp --kv-budget-mb 64 \
  --prompt "$PROMPT" --max-tokens 12 >"$TMP/generated.txt" 2>"$TMP/generate.err" ||
  fail "generate --tp 2: $(cat "$TMP/generate.err")"
echo "served:    $(cat "$TMP/served.txt")"
echo "generated: $(cat "$TMP/generated.txt")"
[[ $(cat "$TMP/served.txt") == "$(cat "$TMP/generated.txt")" ]] ||
  fail "served text differs from generate --tp 2"

# signal_rank1_mid_stream NAME SIGNAL SECONDS PATTERN [VAR=VALUE...]: a fresh job (with those
# variables), a long client stream, SIGNAL to worker rank 1 once tokens flow; then the client
# must fail within SECONDS with an error matching PATTERN, and the job must end within
# SECONDS leaving no rank.
signal_rank1_mid_stream() {
  local name=$1 signal=$2 seconds=$3 pattern=$4 rc=0
  shift 4
  start_server "$@"
  "$QUANTKV" client generate --server "$ADDRESS" --prompt "$PROMPT" --max-tokens 4000 \
    --ignore-eos >"$TMP/$name.out" 2>"$TMP/$name.err" &
  local client=$!
  for _ in $(seq 100); do
    [[ -s $TMP/$name.out ]] && break
    sleep 0.1
  done
  [[ -s $TMP/$name.out ]] || fail "($name) the long stream produced nothing"
  kill "-$signal" "$(ranks | sort -n | tail -1)"
  wait_gone "$client" "$seconds" || fail "($name) the client still waits $seconds s after SIG$signal"
  wait "$client" || rc=$?
  [[ $rc != 0 ]] || fail "($name) the client's stream ended without error after SIG$signal"
  grep -q "$pattern" "$TMP/$name.err" || fail "($name) client error: $(cat "$TMP/$name.err")"
  wait_gone "$JOB_PID" "$seconds" || fail "($name) the job still runs $seconds s after SIG$signal"
  wait "$JOB_PID" 2>/dev/null || true
  JOB_PID=""
  [[ -z $(ranks) ]] || fail "($name) a rank outlived the job"
}
# A worker rank killed while a client streams: the client hears which rank is gone
# (UNAVAILABLE naming worker rank 1), either from the step in flight, whose call to the worker
# fails, or, when mpirun's SIGTERM comes first, from rank 0's probe of its workers; never just
# a closed socket.
signal_rank1_mid_stream killed KILL 15 "UNAVAILABLE: .*tensor-parallel worker rank 1 at"
# A worker rank stopped: nothing dies, so rank 0's own time bound (5 s here) ends the job,
# and the client hears that reason first: a collective of rank 0's not completing, or, when
# the worker stopped after the step's collectives, its reply not coming.
signal_rank1_mid_stream stopped STOP 20 \
  "UNAVAILABLE: the tensor-parallel job is being aborted.*\(not complete after\|did not answer step\)" \
  QUANTKV_COMM_TIMEOUT_S=5

# --tp 2 without mpirun: refused with how to launch it.
rc=0
"$QUANTKV" serve --tp 2 --listen 127.0.0.1:0 >/dev/null 2>"$TMP/nompi.err" || rc=$?
[[ $rc != 0 ]] || fail "serve --tp 2 without mpirun succeeded"
grep -q "mpirun" "$TMP/nompi.err" || fail "no mention of mpirun: $(cat "$TMP/nompi.err")"

# A worker address that cannot be bound (TEST-NET-3, not on this machine): every rank ends
# with the worker's error.
rc=0
timeout -s KILL 120 "${MPI[@]}" "$QUANTKV" serve --tp 2 --listen 127.0.0.1:0 \
  --worker-listen 203.0.113.7 >/dev/null 2>"$TMP/bind.err" || rc=$?
[[ $rc != 0 && $rc != 137 ]] || fail "unbindable --worker-listen: exit $rc"
grep -q "worker cannot listen on 203.0.113.7" "$TMP/bind.err" ||
  fail "unbindable --worker-listen: $(cat "$TMP/bind.err")"
echo "PASS"
