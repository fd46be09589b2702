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

# examples/python_client.py and its ctest (python_client_test) need grpcio and grpcio-tools;
# from PyPI, as the README says (Debian 12's python3-grpc-tools is 1.14, years older than its
# python3-grpcio 1.51).
if python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "setup: python grpcio present"
else
  echo "setup: installing grpcio grpcio-tools (PyPI)"
  PIP_ARGS=(install -q grpcio grpcio-tools)
  # A system python outside a venv: Debian 12 marks it EXTERNALLY-MANAGED (PEP 668), and pip
  # refuses to install into it without --break-system-packages; not root: --user instead
  # (the system site-packages is not writable). pyenv or venv pythons need neither.
  if python3 -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)'; then
    if python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
      PIP_ARGS+=(--break-system-packages)
    fi
    if ! python3 -c 'import os, sys, sysconfig
sys.exit(not os.access(sysconfig.get_path("purelib"), os.W_OK))'; then
      PIP_ARGS+=(--user)
    fi
  fi
  # Not fatal: without it only the Python client's test skips (saying why).
  if ! python3 -m pip "${PIP_ARGS[@]}" || ! python3 -c 'import grpc, grpc_tools'; then
    echo "setup: WARNING: could not install grpcio/grpcio-tools; python_client_test will skip"
  fi
fi

if [[ ${1:-} == --python ]]; then
  python3 -m pip install -q torch transformers tokenizers gguf numpy safetensors accelerate matplotlib
fi
