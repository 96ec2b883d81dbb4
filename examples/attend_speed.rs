//! Decode-shape attention time of one layer's cache at a filled context, for a few cache specs:
//! `cargo run --release --example attend_speed -- [TOKENS] [SPEC;SPEC;...]` (SmolLM2's shape:
//! 9 query / 3 kv heads, head_dim 64). Separates the cache's attention cost from the model.

use std::time::Instant;

use ottkv::cache::{CacheConfig, CacheShape, OttCache};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let t: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(8192);
    let specs = args
        .next()
        .unwrap_or_else(|| "ott2;ott3;ottk4v2;ott2:k=3,g=64,rot=1,s=4".into());
    let (n_head, n_kv, hd) = (9usize, 3usize, 64usize);
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let k: Vec<f32> = (0..t * n_kv * hd).map(|_| rnd()).collect();
    let v: Vec<f32> = (0..t * n_kv * hd).map(|_| rnd()).collect();
    let q: Vec<f32> = (0..n_head * hd).map(|_| rnd()).collect();
    for spec in specs.split(';') {
        let config: CacheConfig = spec.parse()?;
        let shape = CacheShape {
            n_layer: 1,
            n_head_kv: n_kv,
            head_dim: hd,
            max_tokens: t,
        };
        let mut c = OttCache::new(config, shape)?;
        c.append(0, &k, &v, t)?;
        let mut out = vec![0f32; n_head * hd];
        let reps = 200;
        let start = Instant::now();
        for _ in 0..reps {
            c.attend(0, &q, 1, n_head, 0.125, 0..n_head, &mut out)?;
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / reps as f64;
        println!("{spec:<32} {t} tokens: {us:8.1} us per decode step (one layer, 1 thread)");
    }
    Ok(())
}
