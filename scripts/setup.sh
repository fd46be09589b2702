#!/usr/bin/env bash
# Installs what QuantKV needs on a Debian machine (idempotent: a second run with everything
# present only checks and returns). Run as root, or with sudo available.
#   scripts/setup.sh           system packages
#   scripts/setup.sh --python  also the PyPI reference tools used by tools/fixtures/*.py
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git unzip
  libabsl-dev libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  libopenmpi-dev openmpi-bin libopenblas-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libpcre2-dev libssl-dev
  python3 python3-pip
)

missing=()
for p in "${PACKAGES[@]}"; do
  # python3/pip may come from elsewhere (pyenv); only install them when absent entirely.
  if [[ $p == python3 ]] && command -v python3 >/dev/null; then continue; fi
  if [[ $p == python3-pip ]] && python3 -m pip --version >/dev/null 2>&1; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: system packages present"
fi

if [[ ${1:-} == --python ]]; then
  python3 -m pip install -q torch transformers tokenizers gguf numpy safetensors accelerate matplotlib
fi
