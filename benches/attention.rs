//! Decode attention (one new query token) over an n-token cache: the `ott2` fast path against
//! ggml's f16 flash attention on the same shapes, in the same run; plus the flush cost per token.
//!
//! `cargo bench --bench attention` runs everything (about 2–3 minutes on 2 cores);
//! `cargo bench --bench attention -- decode/hd128/n8192` or `-- --quick` narrows it.
//! Throughput is "cache bytes read per second": the bytes the cache holds for those n tokens
//! (`OttCache::memory().total` for ott2, 2·2·n·n_kv·head_dim for f16) over the time.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use ottkv::cache::{CacheConfig, CacheShape, OttCache};
use ottkv::ggml::{sys, Context};
use rand::{rngs::StdRng, Rng, SeedableRng};

const N_HEAD: usize = 8;
const N_KV: usize = 2;
const TOKENS: [usize; 3] = [2048, 8192, 32768];
const HEAD_DIMS: [usize; 2] = [64, 128];
const THREADS: [usize; 2] = [1, 2];
/// Tracing on in the benched layer (the default `ott2` leaves layers 0–1 untraced), so the
/// pools are populated as in most layers of a real model.
const SPEC: &str = "ott2:t=0";

fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(1e-7f32..1.0);
    let u2: f32 = rng.gen_range(0.0f32..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// K/V like a real model's: N(0,1) with a few large-offset, wider channels in the keys. The
/// per-token score spread stays near 1, so no softmax weight underflows to 0 (the fast path
/// skips such tokens, which would flatter it).
struct Data {
    q: Vec<f32>, // [N_HEAD][hd]
    k: Vec<f32>, // [n][N_KV][hd]
    v: Vec<f32>, // [n][N_KV][hd]
}

fn data(n: usize, hd: usize, seed: u64) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let outliers = [3 % hd, 17 % hd, 40 % hd, 59 % hd];
    let mut k: Vec<f32> = (0..n * N_KV * hd).map(|_| gaussian(&mut rng)).collect();
    for (i, x) in k.iter_mut().enumerate() {
        if outliers.contains(&(i % hd)) {
            *x = 15.0 + 3.0 * *x;
        }
    }
    let v = (0..n * N_KV * hd).map(|_| gaussian(&mut rng)).collect();
    let q = (0..N_HEAD * hd).map(|_| gaussian(&mut rng)).collect();
    Data { q, k, v }
}

fn ott_cache(d: &Data, n: usize, hd: usize) -> OttCache {
    let config: CacheConfig = SPEC.parse().expect("valid spec");
    let shape = CacheShape {
        n_layer: 1,
        n_head_kv: N_KV,
        head_dim: hd,
        max_tokens: n,
    };
    let mut c = OttCache::new(config, shape).expect("valid shape");
    c.append(0, &d.k, &d.v, n).expect("finite data");
    c
}

/// One decode step of our cache: the 8 query rows split into `threads` contiguous ranges, so
/// with 2 threads each thread takes the 4 heads of one kv head.
fn ott_decode(c: &OttCache, q: &[f32], hd: usize, threads: usize, out: &mut [f32]) {
    let scale = 1.0 / (hd as f32).sqrt();
    if threads <= 1 {
        c.attend(0, q, 1, N_HEAD, scale, 0..N_HEAD, out)
            .expect("attend");
        return;
    }
    let per = N_HEAD.div_ceil(threads);
    std::thread::scope(|s| {
        let mut chunks = out.chunks_mut(per * hd).enumerate();
        let (_, first) = chunks.next().expect("at least one row");
        for (i, o) in chunks {
            let rows = i * per..i * per + o.len() / hd;
            s.spawn(move || c.attend(0, q, 1, N_HEAD, scale, rows, o).expect("attend"));
        }
        let rows = 0..first.len() / hd;
        c.attend(0, q, 1, N_HEAD, scale, rows, first)
            .expect("attend");
    });
}

fn f16_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .flat_map(|&a| f16::from_f32(a).to_bits().to_le_bytes())
        .collect()
}

/// `[n][N_KV][hd]` → `[N_KV][n][hd]` (ggml's `[hd, n, n_kv]`).
fn kv_major(x: &[f32], n: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()]; // [N_KV][n][hd]
    for t in 0..n {
        for h in 0..N_KV {
            let src = &x[(t * N_KV + h) * hd..(t * N_KV + h + 1) * hd];
            out[(h * n + t) * hd..(h * n + t + 1) * hd].copy_from_slice(src);
        }
    }
    out
}

fn bench_decode(c: &mut Criterion) {
    for hd in HEAD_DIMS {
        for n in TOKENS {
            let d = data(n, hd, 1 + n as u64 + hd as u64);
            let cache = ott_cache(&d, n, hd);
            let ott_bytes = cache.memory().total;
            let f16_bytes_total = 2 * 2 * n * N_KV * hd;

            let ctx = Context::new(2 * f16_bytes_total + (16 << 20), false).expect("ggml ctx");
            let (n64, hd64) = (n as i64, hd as i64);
            let q = ctx.new_f32(&[hd64, 1, N_HEAD as i64]).expect("q");
            let k = ctx
                .new_tensor(sys::GGML_TYPE_F16, &[hd64, n64, N_KV as i64])
                .expect("k");
            let v = ctx
                .new_tensor(sys::GGML_TYPE_F16, &[hd64, n64, N_KV as i64])
                .expect("v");
            q.set_f32(&d.q).expect("set q");
            k.set_bytes(&f16_bytes(&kv_major(&d.k, n, hd)))
                .expect("set k");
            v.set_bytes(&f16_bytes(&kv_major(&d.v, n, hd)))
                .expect("set v");
            let scale = 1.0 / (hd as f32).sqrt();
            let fa = ctx.flash_attn_ext(q, k, v, None, scale).expect("fa");
            let graph = ctx.build_graph(fa).expect("graph");

            // Both paths must compute the same attention before either is timed.
            graph.compute(1).expect("compute");
            let want = fa.to_vec_f32().expect("fa out"); // [N_HEAD][hd] (n_q = 1)
            let mut got = vec![0f32; N_HEAD * hd]; // [N_HEAD][hd]
            ott_decode(&cache, &d.q, hd, 2, &mut got);
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // 2-bit quantization error, not a bug bound: a broken kernel is off by O(1).
            assert!(err < 0.5, "hd {hd} n {n}: ott2 vs ggml max abs {err}");

            let mut g = c.benchmark_group(format!("decode/hd{hd}/n{n}"));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_millis(1000));
            for t in THREADS {
                g.throughput(Throughput::Bytes(ott_bytes as u64));
                g.bench_with_input(BenchmarkId::new("ott2", format!("t{t}")), &t, |b, &t| {
                    b.iter(|| ott_decode(&cache, &d.q, hd, t, &mut got))
                });
                g.throughput(Throughput::Bytes(f16_bytes_total as u64));
                g.bench_with_input(
                    BenchmarkId::new("ggml_f16", format!("t{t}")),
                    &t,
                    |b, &t| b.iter(|| graph.compute(t).expect("compute")),
                );
            }
            g.finish();
        }
    }
}

/// Appending n tokens (quantization and tracing at every flush) reported per token.
fn bench_flush(c: &mut Criterion) {
    let n = 2048;
    for hd in HEAD_DIMS {
        let d = data(n, hd, 7);
        let mut g = c.benchmark_group(format!("append/hd{hd}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500))
            .throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("ott2", format!("n{n}")), |b| {
            b.iter_batched(
                || {
                    let config: CacheConfig = SPEC.parse().expect("valid spec");
                    let shape = CacheShape {
                        n_layer: 1,
                        n_head_kv: N_KV,
                        head_dim: hd,
                        max_tokens: n,
                    };
                    OttCache::new(config, shape).expect("valid shape")
                },
                |mut c| {
                    c.append(0, &d.k, &d.v, n).expect("append");
                    c
                },
                criterion::BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench_decode, bench_flush);
criterion_main!(benches);
