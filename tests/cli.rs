//! The `ottkv` binary as a user meets it: JSON facts about real models, and one-line errors
//! with exit status 1 (never a panic's 101) for missing, truncated or corrupted files.

mod common;

use std::process::Command;

fn ottkv(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect_json(path: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = ottkv(&["inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn inspect_smollm2() {
    let Some(p) = common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "inspect") else {
        return;
    };
    let j = inspect_json(&p);
    assert_eq!(j["architecture"], "llama");
    let h = &j["hparams"];
    assert_eq!(
        (h["n_layer"].as_u64(), h["n_head"].as_u64()),
        (Some(30), Some(9))
    );
    assert_eq!(
        (h["n_head_kv"].as_u64(), h["head_dim"].as_u64()),
        (Some(3), Some(64))
    );
    assert_eq!(h["vocab_size"], 49152);
    assert_eq!(j["tensor_types"]["q4_1"], 210);
    let kv = &j["kv_bytes_per_token"];
    // 30 layers x 3 kv heads x 64 x (K+V) x 2 bytes
    assert_eq!(kv["f16"], 23040.0);
    assert_eq!(kv["q4_0"], 23040.0 * 4.5 / 16.0);
    let ott = kv["ott2"].as_f64().unwrap();
    assert!(23040.0 / ott > 5.5, "ott2 {ott} bytes/token at 8192");
    // Only the header is read: far below the 98 MB file.
    let rss = j["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss < j["file_size"].as_u64().unwrap() / 3, "peak RSS {rss}");
}

#[test]
fn inspect_stories260k() {
    let Some(p) = common::model_or_skip("stories260K.gguf", "inspect") else {
        return;
    };
    let h = inspect_json(&p)["hparams"].clone();
    assert_eq!(
        (h["n_layer"].as_u64(), h["n_head"].as_u64()),
        (Some(5), Some(8))
    );
    assert_eq!(
        (h["n_head_kv"].as_u64(), h["head_dim"].as_u64()),
        (Some(4), Some(8))
    );
}

#[test]
fn bad_files_exit_1_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = ottkv::model::synthetic::synthetic_model(
        &ottkv::model::synthetic::SyntheticSpec::small(ottkv::model::synthetic::Arch::Llama),
    )
    .unwrap()
    .to_bytes();
    let mut corrupt = model.clone();
    corrupt[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", model[..model.len() / 2].to_vec()),
        ("header-only", model[..100].to_vec()),
        ("corrupt", corrupt),
        ("empty", Vec::new()),
        ("not-gguf", b"hello world, not a model".to_vec()),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, bytes).unwrap();
        let (code, out, err) = ottkv(&["inspect", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}: {err}");
        assert!(out.is_empty(), "{name}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
    }
    let (code, _, err) = ottkv(&["inspect", dir.path().join("missing.gguf").to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    let (code, _, _) = ottkv(&["inspect"]);
    assert_eq!(code, 2);
    // The intact file still works.
    let p = dir.path().join("ok.gguf");
    std::fs::write(&p, &model).unwrap();
    assert_eq!(inspect_json(&p)["hparams"]["n_layer"], 2);
}
