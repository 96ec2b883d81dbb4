//! CUDA cache vs the CPU cache: stored state bit for bit (codes, parameters, masks, pools,
//! outlier choices), attention within named tolerances, nothing written outside any buffer
//! (guard regions). Fresh random inputs every run; the seed is printed (`OTTKV_SEED` replays).
//! Without a device every test prints `skipping: <why>`; `OTTKV_REQUIRE_CUDA=1` fails instead.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use ottkv::cache::{CacheConfig, CacheShape, OttCache};
use ottkv::cuda::{f16_attend_ref, CudaError, CudaHeadState, CudaOttCache, Device, F16Attention};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// GPU vs the CPU scalar reference (`attend_ref`), absolute, for outputs of magnitude ~1: the
/// CPU fast path is held to 1e-4 (FAST_VS_REF_ABS, summation order); the GPU also sums in
/// another order, uses expf, and merges splits, so twice that.
const CUDA_VS_REF_ABS: f32 = 2e-4;
/// The f16 kernel vs its scalar reference: same reasons, fewer tokens, same bound.
const F16_VS_REF_ABS: f32 = 2e-4;

fn device_or_skip(test: &str) -> Option<Arc<Device>> {
    match Device::new() {
        Ok(mut d) => {
            d.set_checked(true);
            Some(d)
        }
        Err(e) => {
            if std::env::var("OTTKV_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("{test}: OTTKV_REQUIRE_CUDA=1 but no CUDA device: {e}");
            }
            println!("skipping: {test}: {e}");
            None
        }
    }
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("OTTKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: seed {seed} (OTTKV_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// K/V rows `[n][nkv][hd]` like a model's: channel offsets, and now and then a token of very
/// small magnitude (the outliers OTT traces) or a large one.
fn kv_rows(r: &mut StdRng, n: usize, nkv: usize, hd: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(n * nkv * hd);
    for _ in 0..n * nkv {
        let amp = match r.gen_range(0..40) {
            0 => 0.01,
            1 => 6.0,
            _ => 1.0,
        };
        for c in 0..hd {
            let off = if c % 17 == 3 { 2.5 } else { 0.0 };
            x.push(amp * (r.gen_range(-1.0f32..1.0) + off));
        }
    }
    x
}

fn shape(n_layer: usize, nkv: usize, hd: usize, max_tokens: usize) -> CacheShape {
    CacheShape {
        n_layer,
        n_head_kv: nkv,
        head_dim: hd,
        max_tokens,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Compares every (layer, kv-head) of the two caches field by field.
fn assert_same_state(spec: &str, cpu: &OttCache, gpu: &CudaOttCache) {
    for layer in 0..cpu.shape().n_layer {
        for h in 0..cpu.shape().n_head_kv {
            let want = CudaHeadState::from_cpu(cpu.head(layer, h).unwrap());
            let got = gpu.head_state(layer, h).unwrap();
            let ctx = format!("{spec} layer {layer} kv-head {h}");
            assert_eq!(got.n_groups, want.n_groups, "{ctx}: groups");
            assert_eq!(got.stopped_at, want.stopped_at, "{ctx}: stop rule");
            assert_eq!(got.pool, want.pool, "{ctx}: outlier pool choice");
            assert_eq!(got.extra, want.extra, "{ctx}: extra pool");
            assert_eq!(got.masks, want.masks, "{ctx}: placeholder masks");
            assert_eq!(got.key_params, want.key_params, "{ctx}: key params");
            assert_eq!(got.key_codes, want.key_codes, "{ctx}: key codes");
            assert_eq!(got.val_params, want.val_params, "{ctx}: value params");
            assert_eq!(got.val_codes, want.val_codes, "{ctx}: value codes");
            assert_eq!(got, want, "{ctx}: rows (window, sinks, pools)");
        }
    }
    gpu.check_guards().unwrap();
}

/// (spec, n_layer, n_head_kv, head_dim, tokens): 2/3/4-bit keys, L1 and L2 scores, value
/// groups below head_dim, rotation and sinks, a small extra pool that hits the stop rule,
/// untraced leading layers, token counts that are not multiples of anything.
const CASES: &[(&str, usize, usize, usize, usize)] = &[
    ("ott2:t=0", 1, 2, 64, 1000),
    ("ott2", 3, 1, 128, 331),
    ("ott2:t=0,s=l2,gv=16", 1, 3, 64, 517),
    ("ott4:t=0,g=32,r=8,p=5,e=4", 1, 2, 64, 1000),
    ("ott2:t=0,rot=1,sink=4,p=6", 1, 2, 128, 700),
    ("ott3:t=0", 1, 2, 64, 701),
    ("ottk4v2:t=0,g=48,r=5", 1, 1, 96, 403),
    ("kivi2", 1, 2, 128, 331),
];

#[test]
fn flushed_state_is_bit_exact() {
    let Some(dev) = device_or_skip("flushed_state_is_bit_exact") else {
        return;
    };
    let mut r = rng("flushed_state_is_bit_exact");
    for &(spec, nl, nkv, hd, t) in CASES {
        let config: CacheConfig = spec.parse().unwrap();
        let sh = shape(nl, nkv, hd, t);
        let mut cpu = OttCache::new(config.clone(), sh).unwrap();
        let mut gpu = CudaOttCache::new(dev.clone(), config, sh).unwrap();
        let (k, v) = (kv_rows(&mut r, t, nkv, hd), kv_rows(&mut r, t, nkv, hd));
        for layer in 0..nl {
            // chunks of random size, so flushes land anywhere inside an append
            let mut i = 0;
            while i < t {
                let n = r.gen_range(1..=60).min(t - i);
                let s = i * nkv * hd..(i + n) * nkv * hd;
                cpu.append(layer, &k[s.clone()], &v[s.clone()], n).unwrap();
                gpu.append(layer, &k[s.clone()], &v[s], n).unwrap();
                i += n;
            }
        }
        assert_same_state(spec, &cpu, &gpu);
    }
}

#[test]
fn decode_attention_matches_cpu_reference() {
    let Some(dev) = device_or_skip("decode_attention_matches_cpu_reference") else {
        return;
    };
    let mut r = rng("decode_attention_matches_cpu_reference");
    for &(spec, nl, nkv, hd, t) in CASES {
        for rep in [4usize, 3] {
            let config: CacheConfig = spec.parse().unwrap();
            let sh = shape(nl, nkv, hd, t);
            let n_head = nkv * rep;
            let mut cpu = OttCache::new(config.clone(), sh).unwrap();
            let mut gpu = CudaOttCache::new(dev.clone(), config, sh).unwrap();
            let (k, v) = (kv_rows(&mut r, t, nkv, hd), kv_rows(&mut r, t, nkv, hd));
            let layer = nl - 1;
            for l in 0..nl {
                cpu.append(l, &k, &v, t).unwrap();
                gpu.append(l, &k, &v, t).unwrap();
            }
            let q: Vec<f32> = (0..n_head * hd).map(|_| r.gen_range(-1.0..1.0)).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let rows = n_head;
            let mut want = vec![0f32; rows * hd];
            cpu.attend_ref(layer, &q, 1, n_head, scale, 0..rows, &mut want)
                .unwrap();
            let mut got = vec![0f32; rows * hd];
            gpu.attend(layer, &q, 1, n_head, scale, 0..rows, &mut got)
                .unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= CUDA_VS_REF_ABS, "{spec} GQA {rep}:1: max |diff| {d}");
            // a row range inside the batch gives the same rows
            let mut part = vec![0f32; 2 * hd];
            gpu.attend(layer, &q, 1, n_head, scale, 1..3, &mut part)
                .unwrap();
            assert_eq!(part, got[hd..3 * hd], "{spec}: row range");
            gpu.check_guards().unwrap();
        }
    }
}

#[test]
fn batched_forward_matches_cpu_reference() {
    let Some(dev) = device_or_skip("batched_forward_matches_cpu_reference") else {
        return;
    };
    let mut r = rng("batched_forward_matches_cpu_reference");
    for &(spec, nkv, rep, hd, t) in &[
        ("ott2:t=0", 2usize, 4usize, 64usize, 611usize),
        ("ott3:t=0,g=32,r=8", 1, 3, 128, 333),
        ("ott4:t=0", 2, 3, 64, 457),
        // R = 0: a batch's first token may already be flushed; sinks over several groups
        ("ott:g=16,r=0,p=3,e=2,t=0,rot=1,sink=20", 2, 4, 64, 203),
    ] {
        let config: CacheConfig = spec.parse().unwrap();
        let sh = shape(1, nkv, hd, t);
        let n_head = nkv * rep;
        let mut cpu = OttCache::new(config.clone(), sh).unwrap();
        let mut gpu = CudaOttCache::new(dev.clone(), config, sh).unwrap();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut i = 0;
        while i < t {
            // prefill-sized and decode-sized batches; forward splits them at flush points
            let n = [64usize, 1, 37, 5][r.gen_range(0..4)].min(t - i);
            let (k, v) = (kv_rows(&mut r, n, nkv, hd), kv_rows(&mut r, n, nkv, hd));
            let q: Vec<f32> = (0..n * n_head * hd)
                .map(|_| r.gen_range(-1.0..1.0))
                .collect();
            let mut want = vec![0f32; n * n_head * hd];
            let mut got = vec![0f32; n * n_head * hd];
            cpu.forward_ref(0, &q, &k, &v, n, n_head, scale, &mut want)
                .unwrap();
            gpu.forward(0, &q, &k, &v, n, n_head, scale, &mut got)
                .unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d <= CUDA_VS_REF_ABS, "{spec} at {i}+{n}: max |diff| {d}");
            i += n;
        }
        assert_same_state(spec, &cpu, &gpu);
    }
}

#[test]
fn f16_attention_matches_reference() {
    let Some(dev) = device_or_skip("f16_attention_matches_reference") else {
        return;
    };
    let mut r = rng("f16_attention_matches_reference");
    let (n_seq, nkv, rep, hd, len, n_q) = (3usize, 2usize, 3usize, 128usize, 1331usize, 5usize);
    let n_head = nkv * rep;
    let h = |r: &mut StdRng| half::f16::from_f32(r.gen_range(-2.0f32..2.0)).to_bits();
    let k: Vec<u16> = (0..n_seq * nkv * len * hd).map(|_| h(&mut r)).collect();
    let v: Vec<u16> = (0..n_seq * nkv * len * hd).map(|_| h(&mut r)).collect();
    let q: Vec<f32> = (0..n_seq * n_q * n_head * hd)
        .map(|_| r.gen_range(-1.0..1.0))
        .collect();
    let mut f = F16Attention::new(dev, n_seq, nkv, hd, len + 7).unwrap();
    f.set(&k, &v, len).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    let got = f.attend(&q, n_q, n_head, scale).unwrap();
    let want = f16_attend_ref(&k, &v, &q, n_seq, nkv, hd, len, n_q, n_head, scale);
    let d = max_abs_diff(&got, &want);
    assert!(d <= F16_VS_REF_ABS, "max |diff| {d}");
}

#[test]
fn bad_input_is_a_typed_error() {
    // Without a device this is the error itself, never a panic.
    let dev = match Device::new() {
        Ok(d) => d,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    CudaError::NoLibcuda | CudaError::NoDevice | CudaError::Driver { .. }
                ),
                "{e}"
            );
            if std::env::var("OTTKV_REQUIRE_CUDA").as_deref() == Ok("1") {
                panic!("OTTKV_REQUIRE_CUDA=1 but: {e}");
            }
            println!("skipping: bad_input_is_a_typed_error (device part): {e}");
            return;
        }
    };
    let config: CacheConfig = "ott2".parse().unwrap();
    let odd = CudaOttCache::new(dev.clone(), config.clone(), shape(1, 1, 2000, 10));
    assert!(matches!(odd, Err(CudaError::Shape(_))), "{odd:?}");
    let mut c = CudaOttCache::new(dev, config, shape(1, 1, 64, 10)).unwrap();
    let mut k = vec![0.5f32; 64];
    k[3] = f32::NAN;
    let e = c.append(0, &k, &[0.0; 64], 1).unwrap_err();
    assert!(matches!(e, CudaError::Cache(_)), "{e}");
    assert!(c.is_empty());
    let e = c.append(0, &[0.0; 63], &[0.0; 64], 1).unwrap_err();
    assert!(matches!(e, CudaError::Cache(_)), "{e}");
}
