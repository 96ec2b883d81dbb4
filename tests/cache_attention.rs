//! Attention over the mixed cache: fast vs scalar reference vs exact f16 attention, batch
//! equivalence at flush points, and the outlier pool's gain on planted-outlier data.

use half::f16;
use ottkv::cache::{CacheConfig, CacheShape, OttCache};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Fast vs scalar path: same cache, different summation order (folded scales, word-wise
/// accumulation, separate min sums). Measured max abs diff ~1e-6 on unit-scale data; 1e-4
/// leaves room across presets and seeds.
const FAST_VS_REF_ABS: f32 = 1e-4;
/// Batch vs single-step: each row runs the identical computation on the identical cache state,
/// so the results are bit-identical in practice; allow only float-rounding-level noise.
const BATCH_VS_SINGLE_ABS: f32 = 1e-6;
/// Relative attention-output error budgets vs exact f16 attention on Gaussian data (T = 300,
/// head_dim 32). Measured: ott4 ~0.02, ott2 / kivi2 ~0.2–0.3 (OTT.md §8 reports 0.03 and 0.27
/// on SmolLM2); budgets are ~1.5–2× the measurement.
const BUDGET_4BIT: f64 = 0.06;
const BUDGET_2BIT: f64 = 0.5;
/// Planted outliers, near-constant values (isolates keys): ott2's error must be at most this
/// fraction of kivi2's and of ott2-p0's. Measured (seed 3): 0.246 vs 1.35 / 1.18, ratios
/// 0.18 / 0.21; OTT.md §8 saw a 45% drop from the pool on a real model.
const OTT_GAIN_MAX_RATIO: f64 = 0.35;
/// Same with Gaussian values (a shared 2-bit value-error floor): measured 0.49 vs 0.93 / 0.88,
/// ratios 0.53 / 0.56.
const OTT_GAIN_MAX_RATIO_GAUSSIAN_V: f64 = 0.75;

struct Data {
    q: Vec<f32>, // [T][n_head][hd]
    k: Vec<f32>, // [T][n_kv][hd]
    v: Vec<f32>, // [T][n_kv][hd]
    t: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box–Muller; rand 0.8 without rand_distr.
    let u1: f32 = rng.gen_range(1e-7f32..1.0);
    let u2: f32 = rng.gen_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

fn random_data(seed: u64, t: usize, n_head: usize, n_kv: usize, hd: usize) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut g = |n: usize| (0..n).map(|_| gaussian(&mut rng)).collect::<Vec<f32>>();
    Data {
        q: g(t * n_head * hd),
        k: g(t * n_kv * hd),
        v: g(t * n_kv * hd),
        t,
        n_head,
        n_kv,
        hd,
    }
}

/// Exact attention with f16-rounded K/V (what an f16 cache holds), f64 accumulation.
fn exact(d: &Data) -> Vec<f32> {
    let (nh, nkv, hd) = (d.n_head, d.n_kv, d.hd);
    let r = |x: f32| f16::from_f32(x).to_f32() as f64;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; d.t * nh * hd];
    for i in 0..d.t {
        for h in 0..nh {
            let kv = h / (nh / nkv);
            let q = &d.q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
            let s: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..hd)
                        .map(|c| q[c] as f64 * r(d.k[(j * nkv + kv) * hd + c]))
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..hd {
                let o: f64 = (0..=i)
                    .map(|j| e[j] * r(d.v[(j * nkv + kv) * hd + c]))
                    .sum::<f64>()
                    / z;
                out[(i * nh + h) * hd + c] = o as f32;
            }
        }
    }
    out
}

fn new_cache(spec: &str, d: &Data) -> OttCache {
    let c: CacheConfig = spec.parse().unwrap();
    OttCache::new(
        c,
        CacheShape {
            n_layer: 1,
            n_head_kv: d.n_kv,
            head_dim: d.hd,
            max_tokens: d.t,
        },
    )
    .unwrap()
}

/// Runs `d` through a cache in batches of the given sizes (summing to T).
fn run(spec: &str, d: &Data, batches: &[usize], threads: usize, reference: bool) -> Vec<f32> {
    let mut c = new_cache(spec, d);
    let (nh, nkv, hd) = (d.n_head, d.n_kv, d.hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; d.t * nh * hd];
    let mut s = 0;
    for &n in batches {
        let (q, kv, o) = (
            s * nh * hd..(s + n) * nh * hd,
            s * nkv * hd..(s + n) * nkv * hd,
            &mut out[s * nh * hd..(s + n) * nh * hd],
        );
        if reference {
            c.forward_ref(0, &d.q[q], &d.k[kv.clone()], &d.v[kv], n, nh, scale, o)
                .unwrap();
        } else {
            c.forward(
                0,
                &d.q[q],
                &d.k[kv.clone()],
                &d.v[kv],
                n,
                nh,
                scale,
                o,
                threads,
            )
            .unwrap();
        }
        s += n;
    }
    assert_eq!(s, d.t);
    assert_eq!(c.len(), d.t);
    out
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ‖a − b‖ / ‖b‖ over rows from `from` on (to skip rows that see only the f16 window).
fn rel_err(a: &[f32], b: &[f32], from: usize) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a[from..].iter().zip(&b[from..]) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt()
}

const SPECS: &[&str] = &[
    "ott2:t=0",
    "ott4:t=0",
    "ottk4v2:t=0",
    "ott2-p0",
    "kivi2",
    "kivi4",
    "ott:k=3,v=3,g=32,r=8,p=2,e=4,t=0",
    "ott:g=16,r=0,p=3,e=2,t=0",
    // Rotation and sinks (issue 8): 3-bit keys take the per-row fast path; sinks spanning
    // more than one group (S > G with R = 0) and sinks with tracing off.
    "ott:k=3,v=2,g=32,r=8,t=0,rot=1,sink=4",
    "ott:g=16,r=0,p=3,e=2,t=0,rot=1,sink=20",
    "ott2-p0:g=32,r=4,sink=3",
    "ott3",
    // Per-layer bits (these tests have one layer): the layer's widths select the path.
    "ott3:g=32,r=8,t=0,k@0=2,v@0=3",
    "ott3:g=48,r=8,t=0,k@0=4",
    // Window, sinks and pools in q8 blocks.
    "ott3:g=32,r=8,t=0,p=3,e=4,wb=8",
    "ott:g=16,r=0,p=3,e=2,t=0,sink=20,wb=8",
    // Values per channel, as keys (2, 3 and 4 bits; groups not a multiple of 32).
    "ott3:g=48,r=8,t=0,p=3,e=4,va=c",
    "ott:k=3,v=3,g=32,r=8,t=0,rot=1,sink=4,va=c",
    "ottk4v2:g=16,r=0,p=3,e=2,t=0,va=c,wb=8",
    // A value group that does not divide head_dim is irrelevant (and allowed) per channel.
    "ott3:g=32,r=8,t=0,p=2,e=2,va=c,gv=24",
    // Key rotation and row precision chosen per head at its first flush.
    "ott3a:g=32,r=8,t=0",
    "ott4a:g=16,r=0,p=3,e=2,t=0,sink=20",
    "ott3:g=32,r=8,t=0,rot=auto,wb=auto,va=c",
    // Least-squares grids and 8-bit value pairs, alone and together, per token and per
    // channel.
    "ott3:g=32,r=8,t=0,vf=ls,kf=ls",
    "ott:g=16,r=0,p=3,e=2,t=0,vp=8",
    "ott3a:g=32,r=8,t=0,va=c",
    "ottk4v2:g=16,r=0,p=3,e=2,t=0,va=c,vf=ls",
    "ott:k=4,v=3,g=48,r=8,t=0,vp=8,kf=ls,sink=4",
];

#[test]
fn fast_matches_reference_and_both_match_exact() {
    let d = random_data(1, 300, 4, 2, 32);
    let ex = exact(&d);
    for spec in SPECS {
        let fast = run(spec, &d, &[d.t], 2, false);
        let reff = run(spec, &d, &[d.t], 1, true);
        let diff = max_abs(&fast, &reff);
        assert!(diff <= FAST_VS_REF_ABS, "{spec}: fast vs scalar {diff}");
        let e = rel_err(&reff, &ex, 0);
        let c: CacheConfig = spec.parse().unwrap();
        let budget = if c.key_bits == 4 && c.value_bits == 4 {
            BUDGET_4BIT
        } else {
            BUDGET_2BIT
        };
        println!("{spec}: fast-vs-ref max abs {diff:.2e}, rel err vs exact {e:.4}");
        assert!(e <= budget, "{spec}: rel err {e} > {budget}");
        assert!(e > 0.0 || c.group as usize + c.residual as usize > d.t);
    }
}

#[test]
fn batch_equals_single_steps_around_flush_points() {
    for spec in SPECS {
        let c: CacheConfig = spec.parse().unwrap();
        let (g, r) = (c.group as usize, c.residual as usize);
        let t = 2 * g + r + 5;
        let d = random_data(7, t, 4, 2, 16);
        let single = run(spec, &d, &vec![1; t], 1, false);
        let f = r + g; // the first flush is triggered by token f - 1
        let plans: Vec<Vec<usize>> = vec![
            vec![t],
            vec![f - 1, 1, t - f],
            vec![f, t - f],
            vec![f + 1, t - f - 1],
            vec![f - 3, 5, t - f - 2],
            vec![f + g - 2, 3, t - f - g - 1],
            vec![1, f + g + 3, t - f - g - 4],
        ];
        for plan in plans {
            if plan.iter().any(|&n| n == 0 || n > t) {
                continue;
            }
            for threads in [1, 3] {
                let b = run(spec, &d, &plan, threads, false);
                let diff = max_abs(&b, &single);
                assert!(
                    diff <= BATCH_VS_SINGLE_ABS,
                    "{spec} plan {plan:?} threads {threads}: {diff}"
                );
            }
        }
        // The reference path obeys the same schedule.
        let rb = run(spec, &d, &[f - 1, t - f + 1], 1, true);
        let rs = run(spec, &d, &vec![1; t], 1, true);
        assert!(
            max_abs(&rb, &rs) <= BATCH_VS_SINGLE_ABS,
            "{spec} reference batch"
        );
    }
}

/// Keys with a few large-offset channels (as in real models) and rare tokens whose whole key is
/// tiny: in the outlier channels those tokens sit far below the rest and stretch the range.
fn planted(seed: u64, gaussian_values: bool) -> Data {
    let (t, nh, nkv, hd) = (1024, 4, 2, 64);
    let mut d = random_data(seed, t, nh, nkv, hd);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xABCD);
    let outlier_channels = [3usize, 17, 40, 59];
    // Rare tiny tokens (a handful per sequence, as in the paper), each smaller than the last so
    // that each enters the 3-slot pool and the oldest go on to the extra pool.
    let tiny: [(usize, f32); 5] = [
        (200, 0.02),
        (333, 0.015),
        (590, 0.01),
        (700, 0.005),
        (901, 0.002),
    ];
    for j in 0..t {
        let f = tiny.iter().find(|x| x.0 == j).map(|x| x.1);
        for h in 0..nkv {
            let k = &mut d.k[(j * nkv + h) * hd..(j * nkv + h + 1) * hd];
            for (c, x) in k.iter_mut().enumerate() {
                if outlier_channels.contains(&c) {
                    *x += 40.0;
                }
                if let Some(f) = f {
                    *x *= f;
                }
            }
        }
    }
    // Queries lean on the outlier channels, so the key error there is what moves the scores.
    // The other channels get small query weights so 2-bit noise there (common to all
    // methods) does not drown the effect under test.
    for j in 0..t * nh {
        for (c, x) in d.q[j * hd..(j + 1) * hd].iter_mut().enumerate() {
            *x = if outlier_channels.contains(&c) {
                *x + 2.0
            } else {
                0.1 * *x
            };
        }
    }
    // Values nearly constant per token (v = c_t + 5% noise): value quantization is then almost
    // exact for every method, so the comparison isolates the keys, where OTT acts. With fully
    // Gaussian values all three share a ~0.5 value-error floor (reported, not asserted).
    if !gaussian_values {
        for j in 0..t * nkv {
            let c = gaussian(&mut rng);
            for x in &mut d.v[j * hd..(j + 1) * hd] {
                *x = c + 0.05 * *x;
            }
        }
    }
    d
}

#[test]
fn outlier_pool_beats_kivi_and_no_pool_on_planted_outliers() {
    let from = 160 * 4 * 64; // rows before the first flush see only f16
    let d = planted(3, true);
    let ex = exact(&d);
    let err = |spec: &str| rel_err(&run(spec, &d, &[d.t], 2, false), &ex, from);
    let (ott, kivi, p0) = (err("ott2:t=0"), err("kivi2"), err("ott2-p0"));
    println!("planted outliers, gaussian values: ott2 {ott:.4}  kivi2 {kivi:.4}  ott2-p0 {p0:.4}");
    assert!(
        ott <= OTT_GAIN_MAX_RATIO_GAUSSIAN_V * kivi.min(p0),
        "{ott} vs {kivi} / {p0}"
    );
    // The tiny tokens are what tracing kept: in the pool or the extra pool (or still f16).
    let mut c = new_cache("ott2:t=0", &d);
    c.append(0, &d.k, &d.v, d.t).unwrap();
    for h in 0..d.n_kv {
        let hc = c.head(0, h).unwrap();
        let mut kept: Vec<i32> = hc.pool().iter().chain(hc.extra()).map(|s| s.pos).collect();
        kept.sort();
        for p in [200, 333, 590, 700, 901] {
            let in_window = p as usize >= hc.quantized_len();
            assert!(
                kept.contains(&p) || in_window,
                "head {h}: {p} not traced ({kept:?})"
            );
        }
    }
    let d = planted(3, false);
    let ex = exact(&d);
    let err = |spec: &str| rel_err(&run(spec, &d, &[d.t], 2, false), &ex, from);
    let (ott, kivi, p0) = (err("ott2:t=0"), err("kivi2"), err("ott2-p0"));
    println!(
        "planted outliers: ott2 {ott:.4}  kivi2 {kivi:.4}  ott2-p0 {p0:.4}  ratios {:.3} {:.3}",
        ott / kivi,
        ott / p0
    );
    assert!(
        ott <= OTT_GAIN_MAX_RATIO * kivi,
        "ott2 {ott} vs kivi2 {kivi}"
    );
    assert!(ott <= OTT_GAIN_MAX_RATIO * p0, "ott2 {ott} vs ott2-p0 {p0}");
}

#[test]
fn fast_path_matches_reference_on_decode_shape() {
    // Decode-shaped: one query token, 4 heads over 2048 cached tokens, head_dim 64. Speed is
    // measured by the criterion bench (benches/attention.rs), never here.
    let d = random_data(9, 2049, 4, 2, 64);
    let mut c = new_cache("ott2:t=0", &d);
    let kvn = (d.t - 1) * d.n_kv * d.hd;
    c.append(0, &d.k[..kvn], &d.v[..kvn], d.t - 1).unwrap();
    c.append(0, &d.k[kvn..], &d.v[kvn..], 1).unwrap();
    let q = &d.q[(d.t - 1) * d.n_head * d.hd..];
    let mut o1 = vec![0f32; d.n_head * d.hd];
    let mut o2 = o1.clone();
    c.attend(0, q, 1, d.n_head, 0.125, 0..d.n_head, &mut o1)
        .unwrap();
    c.attend_ref(0, q, 1, d.n_head, 0.125, 0..d.n_head, &mut o2)
        .unwrap();
    assert!(max_abs(&o1, &o2) <= FAST_VS_REF_ABS);
}
