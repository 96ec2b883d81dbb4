//! `ottkv compare` / `perplexity` end to end on the small real model: the JSON a user gets,
//! our f16 row equal to llama.cpp's, and the protocol's arithmetic.

mod common;

use std::process::Command;

fn ottkv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn compare_json_on_stories260k() {
    let Some(model) = common::model_or_skip("stories260K.gguf", "compare") else {
        return;
    };
    let Some(text) = common::text_or_skip("compare") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("c.json");
    let (ok, out, err) = ottkv(&[
        "compare",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "256",
        "--chunks",
        "3",
        "--cache",
        "llama:f16,llama:q8_0,f16,ott2,ott2:k=4,v=4,g=32,r=32,kivi2",
        "--json",
        json.to_str().unwrap(),
        "-t",
        "2",
    ]);
    assert!(ok, "{err}");
    // head_dim 8 is below a q8_0 block: llama.cpp refuses it and the row is skipped, visibly.
    assert!(err.contains("llama.cpp q8_0: skipped"), "{err}");
    assert!(out.contains("| ottkv | ott2 |"), "{out}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for k in [
        "model",
        "model_sha256",
        "text_sha256",
        "n_ctx",
        "chunks",
        "results",
    ] {
        assert!(!j[k].is_null(), "missing {k}");
    }
    assert_eq!(j["n_ctx"], 256);
    assert_eq!(j["chunks"], 3);
    let rows = j["results"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        for k in [
            "engine",
            "cache",
            "ppl",
            "ppl_se",
            "dppl",
            "kld_mean",
            "kld_p99",
            "kld_max",
            "top1",
            "bits_per_element",
            "kv_bytes_per_token",
            "seconds",
        ] {
            assert!(r.get(k).is_some(), "row lacks {k}: {r}");
        }
    }
    let row = |e: &str, c: &str| {
        rows.iter()
            .find(|r| r["engine"] == e && r["cache"] == c)
            .unwrap()
            .clone()
    };
    let (lf, of) = (row("llama.cpp", "f16"), row("ottkv", "f16"));
    // Our engine reproduces llama.cpp's logits: same PPL, zero KLD, full top-1 agreement.
    assert!((lf["ppl"].as_f64().unwrap() - of["ppl"].as_f64().unwrap()).abs() < 1e-6);
    assert!(of["kld_mean"].as_f64().unwrap() < 1e-6);
    assert_eq!(of["top1"].as_f64().unwrap(), 1.0);
    assert_eq!(of["bits_per_element"].as_f64().unwrap(), 16.0);
    // Compression costs something, and ott2 stores fewer bits than f16 even at 256 tokens.
    let ott = row("ottkv", "ott2");
    assert!(ott["kld_mean"].as_f64().unwrap() > 0.0);
    assert!(ott["bits_per_element"].as_f64().unwrap() < 16.0);
}

#[test]
fn perplexity_reports_every_row() {
    let Some(model) = common::model_or_skip("stories260K.gguf", "perplexity") else {
        return;
    };
    let Some(text) = common::text_or_skip("perplexity") else {
        return;
    };
    let (ok, out, err) = ottkv(&[
        "perplexity",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "128",
        "--chunks",
        "2",
        "--cache",
        "llama:f16,f16,kivi2",
    ]);
    assert!(ok, "{err}");
    let ppl = |label: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{out}"));
        line.split("PPL = ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(ppl("llama.cpp f16:"), ppl("ottkv f16:"));
    assert!(ppl("ottkv kivi2:").is_finite());
    // Bad input: a context the text cannot fill is an error, not a panic.
    let (ok, _, err) = ottkv(&[
        "perplexity",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "100000000",
    ]);
    assert!(
        !ok && err.lines().last().unwrap_or("").starts_with("error: "),
        "{err}"
    );
}
