//! Writes a random-weight model with planted outlier key channels (issue 8's robustness check:
//! llama.cpp's q4_0 cache degrades on such keys, a per-channel cache should not).
//!
//! `cargo run --release --example write_outlier_model -- OUT.gguf [SCALE] [CHANNELS] [BIAS] [QGAIN]`
//! (defaults: scale 16, channels `3,17,42` of every kv head, bias 0, q gain 1). SCALE multiplies the
//! channels' `attn_k` rows (llama); a non-zero BIAS writes a qwen2 model whose `attn_k.bias` is
//! BIAS on those channels (pick low-frequency RoPE channels, e.g. `30,31,62,63` at head_dim 64,
//! for the near-constant massive channels real models have); QGAIN multiplies the query weights
//! so that attention is sharp enough for key errors to matter. The model is larger than
//! `SyntheticSpec::small` (4 layers, 2048 context) so that `compare -c 512` has several groups
//! to quantize per chunk.

use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = args
        .next()
        .ok_or("usage: write_outlier_model OUT.gguf [SCALE] [CHANNELS] [BIAS] [QGAIN]")?;
    let scale: f32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16.0);
    let channels: Vec<u32> = args
        .next()
        .unwrap_or_else(|| "3,17,42".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let bias: f32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0.0);
    let q_gain: f32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let arch = if bias != 0.0 {
        Arch::Qwen2
    } else {
        Arch::Llama
    };
    let spec = SyntheticSpec {
        n_layer: 4,
        n_ctx_train: 2048,
        seed: 8,
        outlier_channels: channels,
        outlier_scale: scale,
        outlier_bias: bias,
        q_gain,
        ..SyntheticSpec::small(arch)
    };
    synthetic_model(&spec)?.write_to(std::path::Path::new(&out))?;
    eprintln!("wrote {out}: {spec:?}");
    Ok(())
}
