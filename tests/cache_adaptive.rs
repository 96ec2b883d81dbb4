//! Choices the cache makes from the data at each head's first flush (`rot=auto`, `wb=auto`):
//! which form it picks on keys built to favour one or the other, that the choice is reported,
//! and that memory accounting follows it.

use ottkv::cache::{CacheConfig, CacheShape, OttCache, RowPrecision};
use rand::{rngs::StdRng, Rng, SeedableRng};

const HD: usize = 32;
const NKV: usize = 2;

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7f32..1.0);
    let u2: f32 = rng.gen_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `[t][NKV][HD]` keys: head 0 has one channel that flips between ±50 (its per-channel codes
/// hold both levels almost exactly; a rotation would spread the flips over every channel),
/// head 1 has one random channel per token spiking to ±30 (every plain channel's range
/// stretches; rotated, each spike is spread thin).
fn keys(t: usize, rng: &mut StdRng) -> Vec<f32> {
    let mut k = Vec::with_capacity(t * NKV * HD);
    for _ in 0..t {
        for c in 0..HD {
            let flip = if rng.gen_bool(0.5) { 50.0 } else { -50.0 };
            k.push(gaussian(rng) + if c == 5 { flip } else { 0.0 });
        }
        let spike = rng.gen_range(0..HD);
        for c in 0..HD {
            let s = if rng.gen_bool(0.5) { 30.0 } else { -30.0 };
            k.push(gaussian(rng) + if c == spike { s } else { 0.0 });
        }
    }
    k
}

fn cache(spec: &str, t: usize) -> OttCache {
    let config: CacheConfig = spec.parse().unwrap();
    let shape = CacheShape {
        n_layer: 1,
        n_head_kv: NKV,
        head_dim: HD,
        max_tokens: t,
    };
    OttCache::new(config, shape).unwrap()
}

#[test]
fn without_queries_key_rotation_is_chosen_from_the_first_groups_keys() {
    let mut rng = StdRng::seed_from_u64(11);
    let t = 200;
    let k = keys(t, &mut rng);
    let v: Vec<f32> = (0..t * NKV * HD).map(|_| gaussian(&mut rng)).collect();
    let mut c = cache("ott3:g=32,r=8,t=0,rot=auto", t);
    c.append(0, &k[..20 * NKV * HD], &v[..20 * NKV * HD], 20)
        .unwrap();
    let before = c.choices();
    assert_eq!(before.key_rotation_decided, 0, "no flush yet: {before}");
    c.append(0, &k[20 * NKV * HD..], &v[20 * NKV * HD..], t - 20)
        .unwrap();
    let ch = c.choices();
    println!("{ch}");
    assert_eq!(ch.key_rotation_decided, NKV);
    assert_eq!(ch.keys_rotated, vec![(0, 1)], "{ch}");
    let heads = [c.head(0, 0).unwrap(), c.head(0, 1).unwrap()];
    assert!(!heads[0].keys_rotated() && heads[1].keys_rotated());
    // Whatever the form, the caller sees its own keys back in the window.
    let pos = t - 1;
    for (h, head) in heads.iter().enumerate() {
        let got = head.full_precision_key(pos).unwrap();
        let want = &k[(pos * NKV + h) * HD..(pos * NKV + h + 1) * HD];
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
            .fold(0f32, f32::max);
        // f16 storage of the rotated row: an ulp of the ±30 spikes, spread over the channels.
        assert!(err < 1e-2, "head {h}: window key off by {err}");
    }
    // The same keys, rotation forced either way: auto takes the smaller key error per head.
    let nmse = |spec: &str, h: usize| {
        let mut c = cache(spec, t);
        c.append(0, &k, &v, t).unwrap();
        let head = c.head(0, h).unwrap();
        let deq = head.dequantized_keys();
        let (mut num, mut den) = (0f64, 0f64);
        for p in 0..head.quantized_len() {
            if head.is_masked(p) {
                continue;
            }
            for ch in 0..HD {
                let x = k[(p * NKV + h) * HD + ch] as f64;
                num += (deq[p * HD + ch] as f64 - x).powi(2);
                den += x * x;
            }
        }
        num / den
    };
    for h in 0..NKV {
        let (plain, rotated, auto) = (
            nmse("ott3:g=32,r=8,t=0,rot=0", h),
            nmse("ott3:g=32,r=8,t=0,rot=1", h),
            nmse("ott3:g=32,r=8,t=0,rot=auto", h),
        );
        println!("head {h}: key nmse plain {plain:.5} rotated {rotated:.5} auto {auto:.5}");
        assert!(auto <= plain.min(rotated) * 1.0001, "head {h}");
    }
}

#[test]
fn q8_rows_are_refused_where_a_massive_channel_makes_them_err() {
    let mut rng = StdRng::seed_from_u64(5);
    let t = 120;
    // Head 0: channel 3 sits near 200 (a massive, almost constant channel, as in
    // Qwen2.5-Coder-0.5B's first layers): q8_0 blocks scale by it and the other channels of the
    // block lose their precision, while per-channel codes remove the offset.
    let mut k = Vec::with_capacity(t * NKV * HD);
    for _ in 0..t {
        for h in 0..NKV {
            for ch in 0..HD {
                let massive = h == 0 && ch == 3;
                k.push(gaussian(&mut rng) + if massive { 200.0 } else { 0.0 });
            }
        }
    }
    let v: Vec<f32> = (0..t * NKV * HD).map(|_| gaussian(&mut rng)).collect();
    let mut c = cache("ott3:g=32,r=8,t=0,wb=auto", t);
    let empty = c.memory().total;
    c.append(0, &k, &v, t).unwrap();
    let ch = c.choices();
    println!("{ch}");
    assert_eq!(ch.rows_decided, NKV);
    assert_eq!(ch.f16_rows, vec![(0, 0)], "{ch}");
    let heads = [c.head(0, 0).unwrap(), c.head(0, 1).unwrap()];
    assert_eq!(heads[0].row_precision(), RowPrecision::F16);
    assert!(matches!(heads[1].row_precision(), RowPrecision::Q8 { .. }));
    assert!(c.memory().total < empty + 64 * 1024);
    // The closed form with the heads' choices is what the cache holds.
    assert_eq!(c.memory(), c.expected_memory_at(t).unwrap());
}

#[test]
fn adaptive_memory_follows_the_choices_at_every_length() {
    let mut rng = StdRng::seed_from_u64(9);
    let t = 300;
    let k = keys(t, &mut rng);
    let v: Vec<f32> = (0..t * NKV * HD).map(|_| gaussian(&mut rng)).collect();
    for spec in ["ott3a:g=32,r=8,t=0", "ott4a:g=16,r=0,p=3,e=2,t=0,sink=20"] {
        let mut c = cache(spec, t);
        for i in 0..t {
            let r = i * NKV * HD..(i + 1) * NKV * HD;
            c.append(0, &k[r.clone()], &v[r], 1).unwrap();
            let n = i + 1;
            assert_eq!(
                c.memory(),
                c.expected_memory_at(n).unwrap(),
                "{spec} at {n} tokens"
            );
        }
        assert_eq!(c.choices().rows_decided, NKV, "{spec}");
    }
}

#[test]
fn recommended_names_the_adaptive_preset() {
    let r: CacheConfig = "recommended".parse().unwrap();
    let a: CacheConfig = "ott3a".parse().unwrap();
    assert_eq!(r, a);
    let s = a.to_string();
    assert!(s.contains("rot=auto") && s.contains("wb=auto"), "{s}");
    assert_eq!(s.parse::<CacheConfig>().unwrap(), a);
    let o: CacheConfig = "recommended:k=4".parse().unwrap();
    assert_eq!(o, "ott4a".parse::<CacheConfig>().unwrap());
}

/// Exact causal attention of `q: [t][n_head][HD]` over `k`, `v: [t][NKV][HD]`.
fn exact_attention(q: &[f32], k: &[f32], v: &[f32], t: usize, n_head: usize) -> Vec<f32> {
    let rep = n_head / NKV;
    let scale = 1.0 / (HD as f32).sqrt();
    let mut out = vec![0f32; t * n_head * HD];
    for i in 0..t {
        for h in 0..n_head {
            let qr = &q[(i * n_head + h) * HD..][..HD];
            let kv = h / rep;
            let s: Vec<f32> = (0..=i)
                .map(|j| {
                    let kr = &k[(j * NKV + kv) * HD..][..HD];
                    scale * qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>()
                })
                .collect();
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f32 = p.iter().sum();
            let o = &mut out[(i * n_head + h) * HD..][..HD];
            for (j, pj) in p.iter().enumerate() {
                let vr = &v[(j * NKV + kv) * HD..][..HD];
                o.iter_mut().zip(vr).for_each(|(o, x)| *o += pj / sum * x);
            }
        }
    }
    out
}

#[test]
fn key_rotation_follows_the_queries_that_read_the_keys() {
    // Both heads: one of channels 0..16 spikes to ±30 per token, which stretches those
    // channels' ranges (the keys alone say: rotate, to spread the spikes thin). Head 0's
    // queries read only channels 16..32, which no spike touches: plain codes hold those
    // exactly enough, a rotation would smear the spikes into them. Head 1's queries read every
    // channel.
    let (t, n_head) = (400, 2 * NKV);
    let mut rng = StdRng::seed_from_u64(23);
    let mut k = Vec::with_capacity(t * NKV * HD);
    for _ in 0..t * NKV {
        let spike = rng.gen_range(0..HD / 2);
        for c in 0..HD {
            let s = if rng.gen_bool(0.5) { 30.0 } else { -30.0 };
            k.push(gaussian(&mut rng) + if c == spike { s } else { 0.0 });
        }
    }
    let v: Vec<f32> = (0..t * NKV * HD).map(|_| gaussian(&mut rng)).collect();
    let mut q = Vec::with_capacity(t * n_head * HD);
    for _ in 0..t {
        for h in 0..n_head {
            for c in 0..HD {
                let reads = h / 2 == 1 || c >= HD / 2;
                q.push(if reads { 2.0 * gaussian(&mut rng) } else { 0.0 });
            }
        }
    }
    let spec = |rot: &str| format!("ott3:g=32,r=8,t=0,rot={rot}");

    // Appended without queries: the keys-only rule rotates both heads.
    let mut keys_only = cache(&spec("auto"), t);
    keys_only.append(0, &k, &v, t).unwrap();
    assert_eq!(keys_only.choices().keys_rotated, vec![(0, 0), (0, 1)]);

    let exact = exact_attention(&q, &k, &v, t, n_head);
    let run = |rot: &str, batch: usize| {
        let mut c = cache(&spec(rot), t);
        let mut out = vec![0f32; t * n_head * HD];
        for s in (0..t).step_by(batch) {
            let n = batch.min(t - s);
            let (kv, qo) = (
                s * NKV * HD..(s + n) * NKV * HD,
                s * n_head * HD..(s + n) * n_head * HD,
            );
            c.forward(
                0,
                &q[qo.clone()],
                &k[kv.clone()],
                &v[kv],
                n,
                n_head,
                1.0 / (HD as f32).sqrt(),
                &mut out[qo],
                2,
            )
            .unwrap();
        }
        // Relative attention error per kv head over the second half of the queries.
        let err: Vec<f64> = (0..NKV)
            .map(|kv| {
                let (mut num, mut den) = (0f64, 0f64);
                for i in t / 2..t {
                    for h in kv * 2..kv * 2 + 2 {
                        let r = (i * n_head + h) * HD..(i * n_head + h + 1) * HD;
                        for (a, b) in out[r.clone()].iter().zip(&exact[r]) {
                            num += f64::from(a - b).powi(2);
                            den += f64::from(*b).powi(2);
                        }
                    }
                }
                (num / den).sqrt()
            })
            .collect();
        (c.choices(), err, out)
    };
    let (choices, auto, out) = run("auto", 1);
    println!("{choices}");
    assert_eq!(choices.keys_rotated, vec![(0, 1)], "{choices}");
    let (_, plain, _) = run("0", 7);
    let (_, rotated, _) = run("1", 7);
    for h in 0..NKV {
        println!(
            "head {h}: attention error plain {:.4} rotated {:.4} auto {:.4}",
            plain[h], rotated[h], auto[h]
        );
    }
    assert!(plain[0] < rotated[0] && auto[0] < rotated[0]);
    assert!(rotated[1] < plain[1] && auto[1] < plain[1]);
    // The queries are recorded per position, so a batched run decides the same.
    let (batched, _, out_b) = run("auto", 37);
    assert_eq!(batched.keys_rotated, choices.keys_rotated);
    assert_eq!(out_b, out);
}
