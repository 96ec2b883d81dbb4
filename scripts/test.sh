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
# A real model with outlier key channels for the quality test on real K/V (491 MB, ~1 min);
# OTTKV_SKIP_LARGE_MODELS=1 leaves it out (that test then skips, visibly).
if [ "${OTTKV_SKIP_LARGE_MODELS:-0}" != 1 ]; then
  ./scripts/fetch.sh qwen2.5-coder-0.5b >/dev/null
fi
# The official OpenAI client drives `ottkv serve` in tests/serve.rs; without network (or pip)
# that one test skips, visibly.
if ! python3 -c "import openai" 2>/dev/null; then
  python3 -m pip install --quiet "openai>=1,<2" 2>/dev/null ||
    echo "skipping the openai client install (no network or no pip): its serve test will skip" >&2
fi
cargo test --release --locked "$@"
# The CUDA kernels must compile (to PTX the GPU machines can load) even where no GPU is.
./scripts/cuda-build-check.sh
