#!/usr/bin/env bash
# Runs every test: installs what the build needs, fetches the default model and text if they
# are missing, then the Rust test suite in release mode (the tests run real models), then the
# CUDA build check (kernels compiled to PTX with nvcc 13.0 from PyPI; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
export OTTKV_MODEL_DIR="${OTTKV_MODEL_DIR:-$(dirname "${fetched[0]}")}"
export OTTKV_TEXT="${OTTKV_TEXT:-${fetched[1]}}"
cargo test --release --locked "$@"
# The CUDA kernels must compile (to PTX the GPU machines can load) even where no GPU is.
./scripts/cuda-build-check.sh
