#!/usr/bin/env bash
# Prepares the GPU check (bench/gpu_check.sh) for the device machine, which has a CUDA image
# but none of this project's libraries (abseil, OpenBLAS, gtest, Open MPI, ...) and no
# network. Here: builds the GPU tests and benchmarks (CUDA for sm_80 and sm_90), bundles
# them with every shared library they load except the CUDA ones (libcuda from the driver,
# cudart / cuBLAS / NCCL from the image) and with this machine's glibc loader, so they run
# there whatever its glibc; and splits the default model, which is larger than one call may
# carry (64 MiB with the working tree), into parts for consecutive calls.
#
#   bench/gpu_bundle.sh    -> .gpu-carry/bundle.tar.xz, .gpu-carry/model.partN, .gpu-carry/PLAN
# then the calls .gpu-carry/PLAN lists (each carries one part; the machine keeps what earlier
# calls carried while it stays warm, 30 s between calls).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${QUANTKV_BUILD_DIR:-build}
MODEL=${QUANTKV_HOME:-$HOME/.cache/quantkv}/SmolLM2-135M-Instruct.Q4_1.gguf
CARRY=.gpu-carry
# Per call: 64 MiB minus the working tree minus slack.
TREE_MB=$(( ($(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) >> 20) + 1 ))
BUDGET_MB=$(( 60 - TREE_MB ))
TARGETS=(kernels_gpu_test elementwise_gpu_test gemm_gpu_test kv_encode_gpu_test
         paged_attention_gpu_test comm_codec_gpu_test cuda_engine_gpu_test gpu_bench quantkv)
[[ -f $MODEL ]] || { echo "gpu_bundle: no model at $MODEL (build/launcher/quantkv fetch-model)" >&2; exit 1; }
[[ -f $BUILD/CMakeCache.txt ]] || { echo "gpu_bundle: configure $BUILD first (scripts/build.sh)" >&2; exit 1; }
grep -q "QUANTKV_CUDA:BOOL=ON" "$BUILD/CMakeCache.txt" || { echo "gpu_bundle: $BUILD has no CUDA backend" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}"

rm -rf "$CARRY"
STAGE=$CARRY/stage/qkv
mkdir -p "$STAGE/bin" "$STAGE/lib"
for t in "${TARGETS[@]}"; do
  exe=$(find "$BUILD" -type f -name "$t" -perm -u+x | head -1)
  [[ -n $exe ]] || { echo "gpu_bundle: $t was not built" >&2; exit 1; }
  cp "$exe" "$STAGE/bin/"
done
# Every non-CUDA library the executables load, and the loader itself.
for exe in "$STAGE"/bin/*; do
  ldd "$exe" | awk '/=> \// {print $3} /^\t\/lib64\/ld-linux/ {print $1}'
done | sort -u | while read -r lib; do
  case $(basename "$lib") in
    libcuda.so*|libcudart.so*|libcublas*.so*|libnccl.so*|libnvidia*) ;;  # the device's own
    *) cp -L "$lib" "$STAGE/lib/" ;;
  esac
done
mkdir -p "$STAGE/tests" && cp -r tests/fixtures "$STAGE/tests/fixtures"
tar -C "$CARRY/stage" -cf - qkv | xz -T0 -6 > "$CARRY/bundle.tar.xz"
rm -rf "$CARRY/stage"
BUNDLE_MB=$(( ($(stat -c %s "$CARRY/bundle.tar.xz") >> 20) + 1 ))
(( BUNDLE_MB < BUDGET_MB )) || { echo "gpu_bundle: bundle of $BUNDLE_MB MB leaves no room" >&2; exit 1; }

# Model parts: the first shares its call with the bundle.
sha256sum "$MODEL" | cut -d' ' -f1 > "$CARRY/model.sha256"
SIZE=$(stat -c %s "$MODEL")
FIRST=$(( (BUDGET_MB - BUNDLE_MB) << 20 ))
REST=$(( BUDGET_MB << 20 ))
head -c "$FIRST" "$MODEL" > "$CARRY/model.part1"
tail -c +$((FIRST + 1)) "$MODEL" | split -b "$REST" -d -a 1 --numeric-suffixes=2 - "$CARRY/model.part"
PARTS=($(cd "$CARRY" && ls model.part* | sort -V))
{
  echo "# ${#PARTS[@]} calls of the device tool's run, back to back (the machine stays warm 30 s)."
  echo "# Bundle $BUNDLE_MB MB, model $((SIZE >> 20)) MB in ${#PARTS[@]} parts, tree $TREE_MB MB."
  for i in "${!PARTS[@]}"; do
    carry="[\"$CARRY/${PARTS[$i]}\", \"$CARRY/model.sha256\""
    (( i == 0 )) && carry+=", \"$CARRY/bundle.tar.xz\""
    carry+="]"
    if (( i + 1 < ${#PARTS[@]} )); then cmd="bash bench/gpu_check.sh stage"; else cmd="bash bench/gpu_check.sh run"; fi
    echo "run carry=$carry command=\"$cmd\" timeout_s=$(( i + 1 < ${#PARTS[@]} ? 60 : 540 ))"
  done
} > "$CARRY/PLAN"
cat "$CARRY/PLAN"
