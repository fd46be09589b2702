#!/usr/bin/env bash
# End-to-end check of examples/python_client.py against the built `quantkv serve`: starts
# the server on 127.0.0.1 (port 0, read back from its "listening on" line), then runs the
# client's info, generate and stats and checks what they print. The greedy text must equal
# what `quantkv client` gets for the same request, so a client that mangles the stream or
# the request fails here rather than only "connecting".
#   python_client_test.sh QUANTKV_BINARY SOURCE_DIR
# Exit 77 (ctest SKIP_RETURN_CODE) when python3's grpc modules or the model are absent.
set -euo pipefail

QUANTKV=${1:?usage: $0 QUANTKV_BINARY SOURCE_DIR}
SRC=${2:?usage: $0 QUANTKV_BINARY SOURCE_DIR}
CLIENT=$SRC/examples/python_client.py
SKIP=77

if ! command -v python3 >/dev/null; then
  echo "SKIP: no python3"
  exit $SKIP
fi
if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "SKIP: python3 has no grpc / grpc_tools modules (scripts/setup.sh installs grpcio and" \
    "grpcio-tools; or: python3 -m pip install grpcio grpcio-tools)"
  exit $SKIP
fi
# Where `quantkv fetch-model` stores the default model (an empty QUANTKV_HOME is unset).
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $MODEL ]]; then
  echo "SKIP: default model not in the cache ($MODEL); run \`quantkv fetch-model\`"
  exit $SKIP
fi

TMP=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    # SIGTERM ends in-flight streams and exits within the 5 s gRPC grace; KILL after that.
    for _ in $(seq 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "FAIL: $*"
  echo "--- server log:"
  cat "$TMP/server.err" || true
  exit 1
}

# `timeout` bounds the server's life even if this script is killed with SIGKILL (a ctest
# timeout), so no server outlives the test; it forwards our SIGTERM to the server.
timeout -s TERM 240 "$QUANTKV" serve --listen 127.0.0.1:0 --kv int4-comp --kv-budget-mb 64 \
  --threads 2 >"$TMP/server.out" 2>"$TMP/server.err" &
SERVER_PID=$!

# shellcheck source=../testutil/serve_helpers.sh
source "$(dirname "$0")/../testutil/serve_helpers.sh"
ADDRESS=$(wait_for_listening "$TMP/server.err" "$SERVER_PID" 60) || fail "server not listening"
[[ $ADDRESS =~ ^127\.0\.0\.1:[0-9]+$ ]] || fail "unexpected address '$ADDRESS'"
echo "server at $ADDRESS"

client() { python3 "$CLIENT" --server "$ADDRESS" "$@"; }

# info: the server's model and KV preset, in protobuf text format.
client info >"$TMP/info.out" 2>"$TMP/info.err" || fail "info: $(cat "$TMP/info.err")"
cat "$TMP/info.out"
grep -qx 'architecture: "llama"' "$TMP/info.out" || fail "info: no llama architecture"
grep -qx 'kv_presets: "int4-comp"' "$TMP/info.out" || fail "info: KV preset is not int4-comp"
grep -qx 'block_tokens: [1-9][0-9]*' "$TMP/info.out" || fail "info: no block_tokens"

# generate: 8 greedy tokens, text on stdout, the final statistics on stderr.
PROMPT="The capital of France is"
client generate --prompt "$PROMPT" --max-tokens 8 >"$TMP/gen.out" 2>"$TMP/gen.err" ||
  fail "generate: $(cat "$TMP/gen.err")"
echo "python generate: $(cat "$TMP/gen.out")"
cat "$TMP/gen.err"
grep -q 'Paris' "$TMP/gen.out" || fail "generate: greedy text lacks 'Paris'"
grep -q 'FINISH_REASON_LENGTH, prompt [1-9][0-9]*, generated 8,' "$TMP/gen.err" ||
  fail "generate: final line does not report 8 generated tokens ending by length"
"$QUANTKV" client generate --server "$ADDRESS" --prompt "$PROMPT" --max-tokens 8 \
  >"$TMP/cxx.out" 2>"$TMP/cxx.err" || fail "quantkv client generate: $(cat "$TMP/cxx.err")"
cmp -s "$TMP/gen.out" "$TMP/cxx.out" ||
  fail "python and quantkv client greedy text differ: '$(cat "$TMP/gen.out")' vs '$(cat "$TMP/cxx.out")'"

# A request the server refuses: the client exits non-zero naming the code and the field.
if client generate --prompt "$PROMPT" --max-tokens 0 >/dev/null 2>"$TMP/bad.err"; then
  fail "generate --max-tokens 0 succeeded"
fi
grep -q 'INVALID_ARGUMENT: GenerateRequest.max_tokens' "$TMP/bad.err" ||
  fail "generate --max-tokens 0: $(cat "$TMP/bad.err")"

# stats: both requests finished, 16 tokens generated, nothing running and no KV block held.
# proto3 text format leaves out zero fields, so "not printed" is "0".
client stats >"$TMP/stats.out" 2>"$TMP/stats.err" || fail "stats: $(cat "$TMP/stats.err")"
cat "$TMP/stats.out"
grep -qx 'finished: 2' "$TMP/stats.out" || fail "stats: finished is not 2"
grep -qx 'generated_tokens: 16' "$TMP/stats.out" || fail "stats: generated_tokens is not 16"
grep -qx 'kv_blocks_free: [1-9][0-9]*' "$TMP/stats.out" || fail "stats: no free KV blocks"
if grep -qE '^(running|queued|kv_blocks_used):' "$TMP/stats.out"; then
  fail "stats: requests or KV blocks still held after both finished"
fi
echo "PASS"
