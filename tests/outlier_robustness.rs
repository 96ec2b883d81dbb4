//! Issue 8's robustness check: on a model whose keys carry massive near-constant channels
//! (large `attn_k.bias` on low-frequency RoPE channels), llama.cpp's rotated q4_0 cache spreads
//! them over every channel of its blocks and degrades; our per-channel keys subtract them with
//! each group's minimum and do not. Random-weight qwen2 models from our GGUF writer, with and
//! without the planted bias, everything else equal; KLD against llama.cpp's f16 cache.

mod common;

use std::path::Path;
use std::process::Command;

use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};

/// Mean KLD of each row, in row order, from `compare --json`.
fn klds(model: &Path, text: &Path, rows: &str, dir: &Path) -> Vec<f64> {
    let json = dir.join(format!(
        "{}.json",
        model.file_stem().unwrap().to_string_lossy()
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(["compare", "-m"])
        .arg(model)
        .arg("-f")
        .arg(text)
        .args([
            "-c", "1024", "--chunks", "1", "-t", "2", "--cache", rows, "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    j["results"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|r| r["kld_mean"].as_f64().unwrap())
        .collect()
}

#[test]
fn massive_key_channels_break_q4_0_not_ott3c() {
    let Some(text) = common::text_or_skip("outlier robustness") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // bias ≈ 0: the same four channels with a negligible bias (the control).
    let mut kld = Vec::new();
    for (name, bias) in [("control", 1e-3f32), ("massive", 64.0)] {
        let spec = SyntheticSpec {
            n_layer: 4,
            n_ctx_train: 2048,
            seed: 8,
            outlier_channels: vec![30, 31, 62, 63],
            outlier_scale: 1.0,
            outlier_bias: bias,
            q_gain: 4.0,
            ..SyntheticSpec::small(Arch::Qwen2)
        };
        let path = dir.path().join(format!("{name}.gguf"));
        synthetic_model(&spec).unwrap().write_to(&path).unwrap();
        let k = klds(&path, &text, "llama:f16,llama:q4_0,ott3c", dir.path());
        println!("{name}: q4_0 KLD {:.4}, ott3c KLD {:.4}", k[0], k[1]);
        kld.push(k);
    }
    let (q4_ctl, ott_ctl) = (kld[0][0], kld[0][1]);
    let (q4_big, ott_big) = (kld[1][0], kld[1][1]);
    assert!(
        q4_big > 4.0 * q4_ctl,
        "q4_0 should degrade on massive channels: {q4_ctl} -> {q4_big}"
    );
    assert!(
        ott_big < 1.25 * ott_ctl,
        "ott3c should not: {ott_ctl} -> {ott_big}"
    );
    assert!(
        ott_big < q4_big,
        "with massive channels ott3c ({ott_big}) should beat q4_0 ({q4_big})"
    );
}
