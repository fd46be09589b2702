#!/usr/bin/env bash
# Sets up, builds, fetches the default model and runs the whole test suite.
# This is the README's test command and exactly what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
BUILD_DIR=${QUANTKV_BUILD_DIR:-build}
"$BUILD_DIR"/launcher/quantkv fetch-model smollm2-135m
ctest --test-dir "$BUILD_DIR" --output-on-failure -j 2 --timeout 900
