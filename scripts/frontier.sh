#!/usr/bin/env bash
# Regenerates README's quality-frontier tables and plots: `ottkv compare` of llama.cpp's
# f16/q8_0/q4_0 caches and our presets on SmolLM2 and stories260K, wikitext-2 (test) and Hamlet,
# n_ctx 2048 (2 chunks) and 8192 (1 chunk). Writes <model>-<text>-<ctx>.{md,json,png} to OUT_DIR
# (default benches/results/frontier). SmolLM2 and Hamlet are fetched; stories260K and wikitext
# are read from $OTTKV_SHARED (default ../shared; or set OTTKV_STORIES / OTTKV_WIKI).
# OTTKV_FRONTIER_ROWS replaces the rows. Then the robustness check: two random qwen2 models
# (query weights x4) that differ only in a massive attn_k.bias (64 vs 0.001) on four
# low-frequency RoPE channels, wikitext 1024 x 1 (outlier-{control,massive}-1024.*).
# Takes about two hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
shared="${OTTKV_SHARED:-../shared}"
stories="${OTTKV_STORIES:-$shared/models/stories260K.gguf}"
wiki="${OTTKV_WIKI:-$shared/corpus/wiki.test.raw}"
for f in "$stories" "$wiki"; do
  [ -f "$f" ] || { echo "frontier: $f not found (set OTTKV_SHARED, OTTKV_STORIES or OTTKV_WIKI)" >&2; exit 1; }
done
out="${1:-benches/results/frontier}"
rows="${OTTKV_FRONTIER_ROWS:-llama:f16,llama:q8_0,llama:q4_0,ott2,ottk4v2,ott3,ott3c,ott3c:kt=3}"
cargo build --release --locked --quiet
mkdir -p "$out"
for ctx in 2048 8192; do
  chunks=2
  [ "$ctx" = 8192 ] && chunks=1
  for model in "$stories" "${fetched[0]}"; do
    for text in "$wiki" "${fetched[1]}"; do
      m=$(basename "$model" .gguf); m=${m%%-*}; m=${m%%.*}
      t=$(basename "$text"); t=${t%%.*}
      name="$m-$t-$ctx"
      echo "frontier: $name" >&2
      ./target/release/ottkv compare -m "$model" -f "$text" -c "$ctx" --chunks "$chunks" \
        --cache "$rows" --json "$out/$name.json" --plot "$out/$name.png" | tee "$out/$name.md"
    done
  done
done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cargo build --release --locked --quiet --example write_outlier_model
for kind in control:0.001 massive:64; do
  name="outlier-${kind%%:*}-1024"
  ./target/release/examples/write_outlier_model "$tmp/$name.gguf" 1 30,31,62,63 "${kind#*:}" 4
  echo "frontier: $name" >&2
  ./target/release/ottkv compare -m "$tmp/$name.gguf" -f "$wiki" -c 1024 --chunks 1 \
    --cache llama:f16,llama:q4_0,ott2,ott3,ott3c --json "$out/$name.json" | tee "$out/$name.md"
done
