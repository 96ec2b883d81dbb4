#!/usr/bin/env bash
# Compiles the CUDA kernels without a GPU and checks what gets embedded:
#   1. installs nvcc 13.0 from PyPI (no GPU or driver needed) unless OTTKV_NVCC is set
#      (scripts/nvcc.sh);
#   2. builds ottkv with `--features cuda`, so every kernels/*.cu is compiled to PTX;
#   3. fails when any embedded PTX is newer than ISA 9.0 (driver 580 / CUDA 13.0 cannot load
#      it) or is not PTX at all, and assembles each kernel for sm_90 to catch ptxas errors;
#   4. runs the CUDA-side tests, which skip visibly without a device.
# Any failure, a failed download included, fails the script: it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

max_isa="9.0"
OTTKV_NVCC="$(./scripts/nvcc.sh)"
export OTTKV_NVCC
"$OTTKV_NVCC" --version | tail -n1 >&2

target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --features cuda
"$target/release/ottkv" info --json > "$target/cuda-info.json"
python3 - "$target/cuda-info.json" "$max_isa" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
cap = tuple(int(x) for x in sys.argv[2].split("."))
bad = []
for k in info["kernels"]:
    if k["embedded"] != "ptx":
        bad.append(f"{k['module']}: embedded as {k['embedded']}, not PTX")
    elif tuple(int(x) for x in k["ptx_isa"].split(".")) > cap:
        bad.append(f"{k['module']}: PTX ISA {k['ptx_isa']} > {sys.argv[2]}")
if not info["kernels"]:
    bad.append("no kernels embedded")
for k in info["kernels"]:
    print(f"cuda-build-check: {k['module']}: {k['embedded']} {k.get('ptx_isa') or ''}")
if bad:
    sys.exit("cuda-build-check: " + "; ".join(bad))
PY

# ptxas for the H200 (sm_90): register use and spills, and errors PTX generation lets through.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for cu in kernels/*.cu; do
  if ! "$OTTKV_NVCC" -cubin -O3 -std=c++17 -arch=sm_90 --resource-usage -I kernels \
    -o "$tmp/k.cubin" "$cu" > "$tmp/log" 2>&1; then
    cat "$tmp/log" >&2
    echo "cuda-build-check: ptxas failed on $cu" >&2
    exit 1
  fi
  echo "cuda-build-check: $cu for sm_90:" >&2
  grep -E "Compiling entry|Used|spill" "$tmp/log" | sed 's/^/  /' >&2 || true
done

cargo test --release --locked --features cuda --lib --test cuda_parity --test info_cli
