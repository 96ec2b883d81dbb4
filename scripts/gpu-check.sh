#!/usr/bin/env bash
# The one script for a GPU machine (no Rust, no network; Python with PyTorch): run it from the
# repository root with gpu-bundle/ (built by scripts/gpu-bundle.sh) beside it.
#   1. ottkv info: the device as ottkv sees it;
#   2. the CUDA parity tests with OTTKV_REQUIRE_CUDA=1 (a missing device is a failure);
#   3. decode attention timings: ott2 and our f16 kernel (ottkv cuda-bench), PyTorch
#      scaled_dot_product_attention on f16 (scripts/sdpa_bench.py), same shapes;
#   4. one table of all three.
# Writes JSON results to $OUT (or gpu-results/). Meant to finish well under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
if [ ! -x "$bundle/bin/ottkv" ] || [ ! -x "$bundle/bin/cuda_parity" ]; then
  echo "gpu-check: no $bundle/bin; build it with scripts/gpu-bundle.sh where Rust is" >&2
  exit 1
fi
status=0
step() { echo; echo "== $* ($(date +%T))"; }

step "ottkv info"
timeout 60 "$bundle/bin/ottkv" info --json | tee "$out/info.json" || status=1

step "CUDA parity tests (OTTKV_REQUIRE_CUDA=1)"
OTTKV_REQUIRE_CUDA=1 timeout 240 "$bundle/bin/cuda_parity" --test-threads=1 --nocapture \
  2>&1 | tee "$out/parity.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "kernel benchmark: ott2 and f16 (ottkv cuda-bench)"
timeout 150 "$bundle/bin/ottkv" cuda-bench --json > "$out/cuda_bench.json" || status=1

step "PyTorch scaled_dot_product_attention, f16"
timeout 150 python3 scripts/sdpa_bench.py > "$out/sdpa.json" || status=1

step "table"
python3 - "$out/cuda_bench.json" "$out/sdpa.json" <<'PY' | tee "$out/table.md"
import json, sys
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:
        print(f"(no {p}: {e})")
        return None
ours, sdpa = load(sys.argv[1]), load(sys.argv[2])
if ours is None:
    sys.exit(0)
copy = ours["copy_gbps_read_plus_write"]
print(f"device: {ours['device']['name']}; device-to-device copy {copy:.0f} GB/s (read + write)")
print(f"decode attention, {ours['n_head']} q heads / {ours['n_head_kv']} kv heads, head_dim {ours['head_dim']}, 1 query token per sequence")
print()
print("| batch | tokens | ott2 ms | f16 (ours) ms | SDPA f16 ms | ott2 cache GB/s | of copy | vs f16 ours | vs SDPA |")
print("|---|---|---|---|---|---|---|---|---|")
by = {}
for r in ours["rows"]:
    by.setdefault((r["batch"], r["tokens"]), {})["f16" if r["kernel"] == "f16" else "ott"] = r
sd = {(r["batch"], r["tokens"]): r["ms"] for r in (sdpa or {}).get("rows", [])}
for (b, t), k in sorted(by.items()):
    o, f = k.get("ott"), k.get("f16")
    s = sd.get((b, t))
    fmt = lambda x: f"{x:.4f}" if x is not None else "-"
    print(f"| {b} | {t} | {fmt(o and o['ms'])} | {fmt(f and f['ms'])} | {fmt(s)} | "
          f"{o['cache_gbps']:.0f} | {100 * o['frac_of_copy']:.0f}% | "
          f"{f['ms'] / o['ms']:.2f}x | " + (f"{s / o['ms']:.2f}x" if s else "-") + " |")
PY
echo
[ "$status" -eq 0 ] && echo "gpu-check: all steps passed" || echo "gpu-check: a step FAILED (see above)"
exit "$status"
