#!/usr/bin/env python3
"""PyTorch scaled_dot_product_attention on f16, timed with CUDA events, on the decode shapes
of `ottkv cuda-bench` (one query token per sequence, GQA): the outside reference for the f16
and ott2 kernels. Prints JSON."""
import argparse
import json

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--n-head", type=int, default=32)
    ap.add_argument("--n-head-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for b in map(int, a.batch.split(",")):
        for t in map(int, a.tokens.split(",")):
            q = torch.randn(b, a.n_head, 1, a.head_dim, device=dev, dtype=torch.float16)
            k = torch.randn(b, a.n_head_kv, t, a.head_dim, device=dev, dtype=torch.float16)
            v = torch.randn_like(k)
            try:
                run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                run()
                gqa = "enable_gqa"
            except TypeError:
                rep = a.n_head // a.n_head_kv
                ke, ve = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
                run = lambda: F.scaled_dot_product_attention(q, ke, ve)
                gqa = "repeat_interleave (older PyTorch: reads the KV cache 4x)"
            for _ in range(3):
                run()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(a.iters):
                run()
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e) / a.iters
            rows.append({"batch": b, "tokens": t, "ms": ms, "gqa": gqa,
                         "cache_bytes": 2 * k.numel() * 2})
            del q, k, v
            torch.cuda.empty_cache()
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
