//! `ottkv cuda-bench`: decode attention kernel timings on the GPU (see `cuda::bench`).

use crate::error::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Sequences per call (decode batch), comma-separated.
    #[arg(long, default_value = "1,8,64")]
    batch: String,
    /// Cached tokens per sequence, comma-separated.
    #[arg(long, default_value = "8192,32768")]
    tokens: String,
    #[arg(long, default_value_t = 32)]
    n_head: usize,
    #[arg(long, default_value_t = 8)]
    n_head_kv: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// OTT cache spec to time.
    #[arg(long, default_value = "ott2")]
    cache: String,
    /// Timed calls per configuration (after 3 warmup calls).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| crate::Error::InvalidArgument(format!("--{what}: {x:?}")))
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
pub fn run(a: &Args) -> Result<()> {
    let _ = (list(&a.batch, "batch")?, list(&a.tokens, "tokens")?);
    let _ = (&a.cache, a.n_head, a.n_head_kv, a.head_dim, a.iters, a.json);
    Err(crate::cuda::CudaError::NotCompiled.into())
}

#[cfg(feature = "cuda")]
pub fn run(a: &Args) -> Result<()> {
    use crate::cuda::bench::{copy_gbps, f16_decode, ott_decode, BenchRow};
    let config: crate::cache::CacheConfig = a.cache.parse()?;
    let (batches, tokens) = (list(&a.batch, "batch")?, list(&a.tokens, "tokens")?);
    if a.n_head_kv == 0 || a.n_head % a.n_head_kv != 0 {
        return Err(crate::Error::InvalidArgument(format!(
            "n_head {} is not a multiple of n_head_kv {}",
            a.n_head, a.n_head_kv
        )));
    }
    let dev = crate::cuda::Device::new()?;
    let info = dev.info()?;
    let copy = copy_gbps(&dev, 1 << 30)?;
    let mut rows = Vec::new();
    for &b in &batches {
        for &t in &tokens {
            let (ms, bytes) = ott_decode(
                &dev,
                &config,
                b,
                t,
                a.n_head,
                a.n_head_kv,
                a.head_dim,
                a.iters,
            )?;
            let (fms, fbytes) = f16_decode(&dev, b, t, a.n_head, a.n_head_kv, a.head_dim, a.iters)?;
            for (kernel, ms, bytes) in [(a.cache.clone(), ms, bytes), ("f16".into(), fms, fbytes)] {
                let gbps = bytes as f64 / (ms * 1e-3) / 1e9;
                rows.push(BenchRow {
                    kernel,
                    batch: b,
                    tokens: t,
                    ms,
                    cache_bytes: bytes,
                    cache_gbps: gbps,
                    frac_of_copy: gbps / copy,
                });
            }
        }
    }
    if a.json {
        let j = serde_json::json!({
            "device": info,
            "copy_gbps_read_plus_write": copy,
            "n_head": a.n_head, "n_head_kv": a.n_head_kv, "head_dim": a.head_dim,
            "rows": rows,
        });
        println!("{j:#}");
        return Ok(());
    }
    println!(
        "{} (cc {}.{}); device-to-device copy {copy:.0} GB/s (read + write)",
        info.name, info.compute_capability.0, info.compute_capability.1
    );
    println!(
        "decode attention, {} q heads / {} kv heads, head_dim {}",
        a.n_head, a.n_head_kv, a.head_dim
    );
    println!(
        "{:<10} {:>5} {:>7} {:>10} {:>12} {:>9} {:>8}",
        "kernel", "batch", "tokens", "ms", "cache MB", "GB/s", "of copy"
    );
    for r in &rows {
        println!(
            "{:<10} {:>5} {:>7} {:>10.4} {:>12.1} {:>9.0} {:>7.0}%",
            r.kernel,
            r.batch,
            r.tokens,
            r.ms,
            r.cache_bytes as f64 / 1e6,
            r.cache_gbps,
            100.0 * r.frac_of_copy
        );
    }
    Ok(())
}
