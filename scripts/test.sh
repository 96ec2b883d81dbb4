#!/usr/bin/env bash
# Runs every test: installs what the build needs, fetches the default model and text if they
# are missing, then the Rust test suite in release mode (the tests run real models).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
export OTTKV_MODEL_DIR="${OTTKV_MODEL_DIR:-$(dirname "${fetched[0]}")}"
export OTTKV_TEXT="${OTTKV_TEXT:-${fetched[1]}}"
cargo test --release --locked "$@"
