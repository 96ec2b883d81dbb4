#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine that has no Rust and no network:
# gpu-bundle/bin/{ottkv, cuda_parity} (kernels embedded as PTX for CUDA 13.0, debug info
# stripped), checked to need nothing beyond libc, libm, libgcc_s and libstdc++ (libcuda is
# loaded at run time), and to stay under 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
OTTKV_NVCC="$(./scripts/nvcc.sh)"
export OTTKV_NVCC
target="${CARGO_TARGET_DIR:-target}"

cargo build --release --locked --features cuda --bin ottkv
parity="$(cargo test --release --locked --features cuda --test cuda_parity --no-run \
  --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])')"
[ -n "$parity" ] || { echo "gpu-bundle: no cuda_parity test binary" >&2; exit 1; }

rm -rf gpu-bundle
mkdir -p gpu-bundle/bin
objcopy --strip-debug "$target/release/ottkv" gpu-bundle/bin/ottkv
objcopy --strip-debug "$parity" gpu-bundle/bin/cuda_parity

allowed='linux-vdso|libc\.so|libm\.so|libgcc_s\.so|libstdc\+\+\.so|ld-linux|libpthread\.so|libdl\.so|librt\.so|libutil\.so'
for b in gpu-bundle/bin/*; do
  extra="$(ldd "$b" | grep -Ev "$allowed" || true)"
  if [ -n "$extra" ]; then
    echo "gpu-bundle: $b needs libraries a bare GPU machine may lack:" >&2
    echo "$extra" >&2
    exit 1
  fi
done
size=$(du -sb gpu-bundle | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
  echo "gpu-bundle: $size bytes, above the 64 MiB that can be carried" >&2
  exit 1
fi
gpu-bundle/bin/ottkv info
echo "gpu-bundle: $(du -sh gpu-bundle | cut -f1) in gpu-bundle/; run scripts/gpu-check.sh on the GPU machine" >&2
