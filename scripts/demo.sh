#!/usr/bin/env bash
# The README's first command: set up, build, fetch the default model, then run the main job
# on it: a generation and a perplexity run, with their numbers printed.
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
