#!/usr/bin/env bash
# Regenerates README's quality-frontier tables and plots: `ottkv compare` of llama.cpp's
# f16/q8_0/q4_0 caches and our presets on SmolLM2 and stories260K, wikitext-2 (test) and Hamlet,
# n_ctx 2048 (2 chunks) and 8192 (1 chunk). Writes <model>-<text>-<ctx>.{md,json,png} to OUT_DIR
# (default benches/results/frontier). SmolLM2 and Hamlet are fetched; stories260K and wikitext
# are read from $OTTKV_SHARED (default ../shared; or set OTTKV_STORIES / OTTKV_WIKI).
# OTTKV_FRONTIER_ROWS replaces the rows. Takes about an hour on 2 cores.
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
