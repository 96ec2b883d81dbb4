#!/usr/bin/env bash
# Prints the path of an nvcc whose PTX the GPU machines can load (CUDA 13.0, PTX ISA 9.0):
# $OTTKV_NVCC when set, else one installed from PyPI into a cache directory (no GPU needed).
# Fails loudly when it cannot install one.
set -euo pipefail
if [ -n "${OTTKV_NVCC:-}" ]; then
  echo "$OTTKV_NVCC"
  exit 0
fi
dir="${OTTKV_NVCC_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ottkv/nvcc-13.0}"
nvcc="$(find "$dir" -path '*/bin/nvcc' -type f 2>/dev/null | head -n1 || true)"
if [ -z "$nvcc" ]; then
  echo "nvcc.sh: installing nvcc 13.0 into $dir" >&2
  # nvvm and crt must be pinned too: left free, pip takes the newest, whose PTX is too new.
  python3 -m pip install --quiet --disable-pip-version-check --target "$dir" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" >&2 \
    || { echo "nvcc.sh: pip could not install nvcc 13.0 (network?)" >&2; exit 1; }
  nvcc="$(find "$dir" -path '*/bin/nvcc' -type f | head -n1 || true)"
fi
[ -n "$nvcc" ] || { echo "nvcc.sh: no nvcc found under $dir" >&2; exit 1; }
echo "$nvcc"
