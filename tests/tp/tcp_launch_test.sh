#!/usr/bin/env bash
# Ranks started without mpirun (--rank R --rendezvous HOST:PORT --secret-file F, the TCP data
# plane): `generate --tp 2` prints what it prints under mpirun; a rank with the wrong secret
# is refused with a message and the job then runs with the right one; `serve --tp 2` serves a
# client and ends on SIGTERM with both ranks exiting 0; a worker whose rank 0 is killed leaves
# on its own (the heartbeat stops); missing flags are usage errors.
#   tcp_launch_test.sh QUANTKV_BINARY [MPIEXEC]
# Exit 77 (ctest SKIP_RETURN_CODE) without the default model.
set -euo pipefail

QUANTKV=$(readlink -f "${1:?usage: $0 QUANTKV_BINARY [MPIEXEC]}")
MPIRUN=${2:-$(command -v mpirun || true)}
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $MODEL ]]; then
  echo "SKIP: default model not in the cache ($MODEL); run \`quantkv fetch-model\`"
  exit 77
fi
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  # The ranks themselves (children of timeout(1)): every one names this test's secret file.
  pkill -KILL -f -- "--secret-file $TMP/" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*"
  for f in "$TMP"/*.err; do echo "--- $f"; cat "$f"; done
  exit 1
}
# shellcheck source=../testutil/serve_helpers.sh
source "$(dirname "$0")/../testutil/serve_helpers.sh"
# A port nothing listens on (python3 binds 0 and reports it).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "secret-$RANDOM-$RANDOM" >"$TMP/secret"
echo "not-the-secret" >"$TMP/wrong"
PROMPT="The three primary colors are"
GEN=(generate --tp 2 --threads 1 --kv int4-comp --kv-budget-mb 64 --prompt "$PROMPT" --max-tokens 16)

# generate over TCP, rank 1 first with the wrong secret (refused), then the right one.
PORT=$(free_port)
R="--rendezvous 127.0.0.1:$PORT"
timeout -s KILL 120 "$QUANTKV" "${GEN[@]}" --rank 0 $R --secret-file "$TMP/secret" \
  >"$TMP/tcp.out" 2>"$TMP/rank0.err" &
RANK0=$!
PIDS+=($RANK0)
rc=0
timeout -s KILL 60 "$QUANTKV" "${GEN[@]}" --rank 1 $R --secret-file "$TMP/wrong" \
  >/dev/null 2>"$TMP/wrong.err" || rc=$?
[[ $rc != 0 ]] || fail "a rank with the wrong secret joined"
grep -q "refused" "$TMP/wrong.err" || fail "wrong secret: $(cat "$TMP/wrong.err")"
timeout -s KILL 120 "$QUANTKV" "${GEN[@]}" --rank 1 $R --secret-file "$TMP/secret" \
  >"$TMP/rank1.out" 2>"$TMP/rank1.err" || fail "rank 1 failed"
wait "$RANK0" || fail "rank 0 failed"
[[ -s $TMP/tcp.out ]] || fail "rank 0 printed nothing"
[[ ! -s $TMP/rank1.out ]] || fail "rank 1 printed results (only rank 0 does)"
echo "tcp:    $(cat "$TMP/tcp.out")"
if [[ -n $MPIRUN && -x $MPIRUN ]]; then
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout -s KILL 120 \
    "$MPIRUN" --oversubscribe -np 2 "$QUANTKV" "${GEN[@]}" >"$TMP/mpi.out" 2>"$TMP/mpi.err" ||
    fail "mpirun generate failed"
  echo "mpirun: $(cat "$TMP/mpi.out")"
  cmp -s "$TMP/tcp.out" "$TMP/mpi.out" || fail "TCP and MPI ranks generated different text"
fi

# serve over TCP.
PORT=$(free_port)
R="--rendezvous 127.0.0.1:$PORT"
SERVE=(serve --tp 2 --threads 1 --listen 127.0.0.1:0 --kv int4-comp --kv-budget-mb 64)
timeout -s KILL 240 "$QUANTKV" "${SERVE[@]}" --rank 1 $R --secret-file "$TMP/secret" \
  2>"$TMP/serve1.err" &
S1=$!
PIDS+=($S1)
timeout -s KILL 240 "$QUANTKV" "${SERVE[@]}" --rank 0 $R --secret-file "$TMP/secret" \
  2>"$TMP/serve0.err" &
S0=$!
PIDS+=($S0)
ADDRESS=$(wait_for_listening "$TMP/serve0.err" "$S0") || fail "rank 0 is not listening"
"$QUANTKV" client generate --server "$ADDRESS" --prompt "$PROMPT" --max-tokens 16 \
  >"$TMP/served.out" 2>"$TMP/client.err" || fail "client: $(cat "$TMP/client.err")"
echo "served: $(cat "$TMP/served.out")"
cmp -s "$TMP/served.out" "$TMP/tcp.out" || fail "served text differs from generate over TCP"
kill -TERM "$S0"
for p in "$S0" "$S1"; do
  rc=0
  wait "$p" || rc=$?
  [[ $rc == 0 ]] || fail "a serving rank exited with $rc after SIGTERM to rank 0"
done

# Rank 0 killed outright: nothing tells the worker but the silence of its heartbeat; with
# QUANTKV_COORDINATOR_SILENCE_S=10 it leaves within ~15 s, exit status non-zero.
PORT=$(free_port)
R="--rendezvous 127.0.0.1:$PORT"
QUANTKV_COORDINATOR_SILENCE_S=10 timeout -s KILL 240 "$QUANTKV" "${SERVE[@]}" --rank 1 $R \
  --secret-file "$TMP/secret" 2>"$TMP/orphan1.err" &
S1=$!
PIDS+=($S1)
timeout -s KILL 240 "$QUANTKV" "${SERVE[@]}" --rank 0 $R --secret-file "$TMP/secret" \
  2>"$TMP/orphan0.err" &
S0=$!
PIDS+=($S0)
wait_for_listening "$TMP/orphan0.err" "$S0" >/dev/null || fail "rank 0 is not listening"
sleep 6  # a heartbeat or two
# The rank itself, not timeout(1), which would not pass SIGKILL on.
kill -KILL $(pgrep -f -- "--rank 0 $R") 2>/dev/null || fail "no rank 0 process to kill"
start=$(date +%s)
rc=0
wait "$S1" || rc=$?
elapsed=$(( $(date +%s) - start ))
[[ $rc != 0 ]] || fail "the orphaned worker exited 0"
(( elapsed <= 20 )) || fail "the orphaned worker took ${elapsed} s to leave"
grep -q "no call from rank 0" "$TMP/orphan1.err" || fail "orphan: $(cat "$TMP/orphan1.err")"
pkill -KILL -f -- "--secret-file $TMP/" 2>/dev/null || true

# Usage errors.
rc=0
"$QUANTKV" "${GEN[@]}" --rank 0 --rendezvous 127.0.0.1:1 >/dev/null 2>"$TMP/nosecret.err" || rc=$?
[[ $rc != 0 ]] && grep -q -- "--secret-file" "$TMP/nosecret.err" ||
  fail "no --secret-file: exit $rc, $(cat "$TMP/nosecret.err")"
rc=0
"$QUANTKV" "${GEN[@]}" --rank 2 --rendezvous 127.0.0.1:1 --secret-file "$TMP/secret" \
  >/dev/null 2>"$TMP/rank.err" || rc=$?
[[ $rc != 0 ]] && grep -q -- "--rank" "$TMP/rank.err" || fail "--rank 2 of 2: exit $rc"
echo "PASS"
