#!/usr/bin/env python3
"""Replays an `ottkv dump-kv` file in numpy to ask which key form each (layer, kv head) should
use: plain or Hadamard-rotated 3-bit per-channel codes (G 128, 4 sinks and the 12
smallest-L1 tokens of each group exact, as the cache keeps them). For every head it prints the
attention-output error of every 4th query of the second half with all groups stored each way ("full") and of
the queries seen before the first flush with the first group stored each way ("early": what
`rot=auto` decides from), then how often the early choice matches the full one and the mean
full error of always-plain, always-rotated, the early choice and the per-head oracle.

Usage: python3 scripts/rotation_replay.py DUMP.kv [KEY_BITS]   (needs numpy and gguf)"""
import numpy as np, gguf, sys
import numpy as np, gguf, sys
r = gguf.GGUFReader(sys.argv[1])
T = {t.name: t for t in r.tensors}
get = lambda l, n: np.array(T[f"blk.{l}.{n}"].data, dtype=np.float32)
nl = max(int(k.split('.')[1]) for k in T) + 1
def hadamard(n):
    H = np.array([[1.0]])
    while H.shape[0] < n: H = np.block([[H, H], [H, -H]])
    return H / np.sqrt(n)
b = int(sys.argv[2]) if len(sys.argv) > 2 else 3
G, R, S, P = 128, 24, 4, 12
def qgroup(x, b):
    L = 2**b - 1
    mn, mx = x.min(0), x.max(0); s = (mx - mn) / L
    s16 = np.where(s > 0, s, 1)
    c = np.clip(np.round((x - mn) / s16), 0, L)
    return np.where(s > 0, c * s + mn, mn)
def qall(K, b, H, n):  # groups of G over the first n tokens, sinks+P smallest-L1 exact per group
    Y = K.copy()
    for g in range(n // G):
        sl = slice(g*G, (g+1)*G); x = K[sl].copy()
        l1 = np.abs(x).sum(1); sel = np.zeros(G, bool)
        if g == 0: sel[:S] = True
        cand = [i for i in np.argsort(l1, kind='stable') if not sel[i]][:P]
        sel[cand] = True
        x[sel] = x[~sel].mean(0)
        xr = x @ H if H is not None else x
        d = qgroup(xr, b)
        d = d @ H.T if H is not None else d
        d[sel] = K[sl][sel]
        Y[sl] = d
    return Y
def attn(Q, K, V, ts):
    D = K.shape[1]; out = []
    for t in ts:
        s = Q[t] @ K[:t+1].T / np.sqrt(D)
        s -= s.max(1, keepdims=True); p = np.exp(s); p /= p.sum(1, keepdims=True)
        out.append(p @ V[:t+1])
    return np.array(out)
def err(Q, K, Kq, V, ts):
    o = attn(Q, K, V, ts); e = attn(Q, Kq, V, ts)
    return np.linalg.norm(e - o, axis=-1).mean() / np.linalg.norm(o, axis=-1).mean()
tot = dict(n=0.0, R=0.0, proxy=0.0, oracle=0.0); agree = 0; cnt = 0
for l in range(nl):
    q, k, v = get(l, 'q'), get(l, 'k'), get(l, 'v')
    Tn, nh, D = q.shape; nkv = k.shape[1]; gq = nh // nkv
    H = hadamard(D); n = (Tn // G) * G
    out = []
    for h in range(nkv):
        K = k[:, h]; V = v[:, h]; Q = q[:, h*gq:(h+1)*gq]
        late = range(Tn // 2, Tn, 4)
        e0 = err(Q, K, qall(K, b, None, n), V, late); e1 = err(Q, K, qall(K, b, H, n), V, late)
        early = range(S, G + R - 1)
        p0 = err(Q, K, qall(K, b, None, G), V, early); p1 = err(Q, K, qall(K, b, H, G), V, early)
        c = 'R' if p1 < p0 else 'n'; o = 'R' if e1 < e0 else 'n'
        agree += c == o; cnt += 1
        tot['n'] += e0; tot['R'] += e1; tot['proxy'] += e1 if c == 'R' else e0; tot['oracle'] += min(e0, e1)
        out.append(f"h{h} full {e0:.3f}/{e1:.3f} {o} early {p0:.3f}/{p1:.3f} {c}")
    print(l, " | ".join(out), flush=True)
print(f"agree {agree}/{cnt}; mean full error: " + ", ".join(f"{k} {v/cnt:.4f}" for k, v in tot.items()))
