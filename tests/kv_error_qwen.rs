//! On real K/V of a model whose keys have strong outlier channels (Qwen2.5-Coder-0.5B), the
//! recommended preset must stay close to 4-bit keys (`ottk4v2`): the preset tuned on SmolLM2
//! alone (`ott3c`, rotated keys) was worse than llama.cpp's q4_0 on this model.

mod common;

use ottkv::eval::kv_error::{kv_error, CacheKind};
use ottkv::eval::kvdump::KvDump;
use ottkv::llama::{capture_qkv, LlamaModel};

/// The recommended preset's attention error may be at most this multiple of `ottk4v2`'s.
/// Measured here (1024 tokens of Hamlet): recommended (`ott3a`) 1.02× (0.0826 vs 0.0809; `ott3c`
/// 0.1737); on 2048 tokens of wikitext-2 1.09× (0.0852 vs 0.0780).
const RECOMMENDED_VS_K4V2_MAX: f64 = 1.5;

#[test]
fn recommended_preset_holds_on_real_outlier_channel_kv() {
    let name = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";
    let Some(model_path) = common::model_or_skip(name, "kv_error_qwen") else {
        return;
    };
    let Some(text_path) = common::text_or_skip("kv_error_qwen") else {
        return;
    };
    let text = String::from_utf8_lossy(&std::fs::read(&text_path).unwrap()).into_owned();
    let model = LlamaModel::load(&model_path, false).unwrap();
    let toks = model.tokenize(&text, true).unwrap();
    assert!(toks.len() >= 1024, "{} is too short", text_path.display());
    let cap = capture_qkv(&model, &toks[..1024], 512, 2, false).unwrap();
    let d = KvDump::from_captured(cap, name.into(), String::new());
    let caches: Vec<(String, CacheKind)> = ["recommended", "ott3a", "ottk4v2", "ott3c"]
        .iter()
        .map(|c| (c.to_string(), c.parse::<CacheKind>().unwrap()))
        .collect();
    let r = kv_error(&d, &caches, 2, |_, _| {}).unwrap();
    let err = |name: &str| {
        r.results
            .iter()
            .find(|x| x.cache == name)
            .unwrap()
            .attn_rel_err
    };
    let (rec, k4v2, old) = (err("recommended"), err("ottk4v2"), err("ott3c"));
    let ott3a = err("ott3a");
    println!(
        "{}: recommended {rec:.4} ott3a {ott3a:.4} ottk4v2 {k4v2:.4} ott3c {old:.4} (ratio {:.2})",
        text_path.display(),
        rec / k4v2
    );
    // The adaptive 3-bit preset holds where the rotated one fails.
    assert!(ott3a < old, "ott3a {ott3a} not below ott3c {old}");
    assert!(
        rec <= RECOMMENDED_VS_K4V2_MAX * k4v2,
        "recommended {rec} vs ottk4v2 {k4v2}"
    );
    assert!(rec < old, "recommended {rec} not below ott3c {old}");
    assert!(rec > 0.005 && rec < 1.0, "implausible error {rec}");
}
