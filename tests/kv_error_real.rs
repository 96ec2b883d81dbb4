//! On real K/V captured from SmolLM2, the outlier pool earns its place: `ott2`'s attention
//! error is clearly below `ott2-p0`'s (the paper's ablation) and `kivi2`'s.

mod common;

use ottkv::eval::kv_error::{kv_error, CacheKind};
use ottkv::eval::kvdump::KvDump;
use ottkv::llama::{capture_qkv, LlamaModel};

/// Measured with 1024 tokens: ott2/ott2-p0 = 0.43 (Hamlet), 0.56 (wiki.test.raw); the issue's
/// 2048-token target is 0.6.
const OTT_VS_P0_MAX: f64 = 0.7;
/// Measured with 1024 tokens: ott2/kivi2 = 0.66 (Hamlet), 0.83 (wiki.test.raw).
const OTT_VS_KIVI_MAX: f64 = 0.92;

#[test]
fn outlier_pool_beats_ablation_and_kivi_on_real_kv() {
    let Some(model_path) =
        common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "kv_error_real")
    else {
        return;
    };
    let Some(text_path) = common::text_or_skip("kv_error_real") else {
        return;
    };
    let text = String::from_utf8_lossy(&std::fs::read(&text_path).unwrap()).into_owned();
    let model = LlamaModel::load(&model_path, false).unwrap();
    let toks = model.tokenize(&text, true).unwrap();
    assert!(
        toks.len() >= 1024,
        "{} has only {} tokens",
        text_path.display(),
        toks.len()
    );
    let cap = capture_qkv(&model, &toks[..1024], 512, 2, false).unwrap();
    let d = KvDump::from_captured(cap, "smollm2".into(), String::new());
    let caches: Vec<(String, CacheKind)> = ["ott2", "ott2-p0", "kivi2"]
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
    let (ott, p0, kivi) = (err("ott2"), err("ott2-p0"), err("kivi2"));
    println!(
        "{}: ott2 {ott:.4} ott2-p0 {p0:.4} kivi2 {kivi:.4}",
        text_path.display()
    );
    assert!(ott <= OTT_VS_P0_MAX * p0, "ott2 {ott} vs ott2-p0 {p0}");
    assert!(ott <= OTT_VS_KIVI_MAX * kivi, "ott2 {ott} vs kivi2 {kivi}");
    // Sanity: the errors are real, not zero.
    assert!(ott > 0.01 && ott < 1.0);
}
