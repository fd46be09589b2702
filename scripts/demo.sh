#!/usr/bin/env bash
# The README's first command: set up, build, fetch the default model, then run the main job
# on it: a generation and a perplexity run, then `quantkv serve` with a 4-bit KV cache and
# a streamed gRPC client request against it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
BUILD_DIR=${QUANTKV_BUILD_DIR:-build}
Q="$BUILD_DIR"/launcher/quantkv
"$Q" fetch-model smollm2-135m
"$Q" generate --model smollm2-135m --chat --prompt "What is the capital of France?" \
  --max-tokens 64 --threads "$(nproc)"
"$Q" perplexity --model smollm2-135m --text ../shared/data/wikitext-2/test.txt --ctx 512 \
  --chunks 8 --threads "$(nproc)"

# Serving: the server on a local port, one streamed request, then SIGTERM (clean drain).
PORT=${QUANTKV_DEMO_PORT:-50551}
"$Q" serve --model smollm2-135m --kv int4-comp --listen 127.0.0.1:"$PORT" \
  --threads "$(nproc)" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  "$Q" client info --server 127.0.0.1:"$PORT" --timeout-s 2 >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { echo "demo: quantkv serve exited" >&2; exit 1; }
  sleep 0.5
done
"$Q" client generate --server 127.0.0.1:"$PORT" --chat \
  --prompt "Write one sentence about the sea." --max-tokens 48
"$Q" client stats --server 127.0.0.1:"$PORT"
kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
