//! Each input that used to abort, hang or mislead the `ottkv` binary, rebuilt with our GGUF
//! writer: it must now end in a one-line error naming what is wrong, with exit status 1 (bad
//! input) or 2 (bad usage), and never a signal.
//!
//! Model files: a duplicate token (also one hidden behind a NUL byte, as llama.cpp reads
//! tokens as C strings), tokenizer models libllama cannot run, 1-D weights of non-f32 types,
//! absurd block counts, an unaligned data section. Flags: a thread count far above the cores,
//! a perplexity run where no row can run, zero chunks/context/batch, NaN or negative
//! temperatures, duplicate or empty spec fields, a directory as the model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ottkv::gguf::{Array, GgmlType, GgufWriter, Value};
use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec, SyntheticVocab};

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn ottkv(args: &[&str]) -> Out {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t0.elapsed(),
    }
}

/// Exit status `code` (not a signal) and an `error:` line containing every needle.
#[track_caller]
fn refused(o: &Out, code: i32, needles: &[&str]) {
    assert_eq!(
        o.code,
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        o.stdout,
        o.stderr
    );
    let line = o
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{}", o.stderr));
    for n in needles {
        assert!(line.contains(n), "{line:?} lacks {n:?}");
    }
}

fn tiny(vocab: SyntheticVocab) -> GgufWriter {
    let spec = SyntheticSpec {
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_ff: 128,
        n_vocab: 300,
        n_ctx_train: 256,
        vocab,
        ..SyntheticSpec::small(Arch::Llama)
    };
    synthetic_model(&spec).unwrap()
}

fn write(dir: &Path, name: &str, w: &GgufWriter) -> PathBuf {
    let p = dir.join(name);
    w.write_to(&p).unwrap();
    p
}

fn generate(model: &Path) -> Out {
    let m = model.to_str().unwrap();
    ottkv(&[
        "generate",
        "-m",
        m,
        "-p",
        "Once upon a time",
        "-n",
        "2",
        "-t",
        "1",
    ])
}

fn tokens(w: &GgufWriter) -> Vec<String> {
    match w.kv("tokenizer.ggml.tokens") {
        Some(Value::Array(Array::String(t))) => t.clone(),
        other => panic!("tokens: {other:?}"),
    }
}

#[test]
fn unmodified_models_still_generate() {
    // The control: what the edits below break works before them.
    let dir = tempfile::tempdir().unwrap();
    for (name, v) in [("spm", SyntheticVocab::Spm), ("bpe", SyntheticVocab::Bpe)] {
        let o = generate(&write(dir.path(), &format!("{name}.gguf"), &tiny(v)));
        assert_eq!(o.code, Some(0), "{name}: {}", o.stderr);
        assert!(o.stdout.starts_with("Once upon a time"), "{}", o.stdout);
    }
}

#[test]
fn duplicate_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for v in [SyntheticVocab::Spm, SyntheticVocab::Bpe] {
        let base = tiny(v);
        let t = tokens(&base);
        let (i, j) = (t.len() - 5, t.len() - 9);
        // The same text twice; the same text before a NUL byte (llama.cpp stops there).
        for (what, text) in [
            ("copy", t[j].clone()),
            ("copy+NUL", format!("{}\0tail", t[j])),
        ] {
            let mut w = base.clone();
            let mut t2 = t.clone();
            t2[i] = text;
            w.set_kv("tokenizer.ggml.tokens", Array::String(t2))
                .unwrap();
            let o = generate(&write(dir.path(), "dup.gguf", &w));
            let first = format!("repeats token #{j}");
            let needles = ["tokenizer.ggml.tokens", &format!("token #{i}"), &first];
            refused(&o, 1, &needles);
            assert!(
                o.stderr.contains("NUL") == what.ends_with("NUL"),
                "{}",
                o.stderr
            );
        }
    }
}

#[test]
fn tokenizer_models_libllama_cannot_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for m in ["none", "no_vocab", "bert", "t5", "rwkv", ""] {
        let mut w = tiny(SyntheticVocab::Spm);
        w.set_kv("tokenizer.ggml.model", m).unwrap();
        let o = generate(&write(dir.path(), "tok.gguf", &w));
        refused(&o, 1, &["tokenizer.ggml.model", &format!("'{m}'")]);
    }
    // A BPE tokenizer without its merges, a SentencePiece one without byte tokens.
    let mut w = tiny(SyntheticVocab::Bpe);
    w.remove_kv("tokenizer.ggml.merges");
    refused(
        &generate(&write(dir.path(), "nomerges.gguf", &w)),
        1,
        &["tokenizer.ggml.merges"],
    );
    let mut w = tiny(SyntheticVocab::Spm);
    let mut t = tokens(&w);
    t[3 + 0xE9] = "<not-a-byte>".into(); // <0xE9> sits after unk, bos, eos
    w.set_kv("tokenizer.ggml.tokens", Array::String(t)).unwrap();
    refused(
        &generate(&write(dir.path(), "nobyte.gguf", &w)),
        1,
        &["<0xE9>"],
    );
}

#[test]
fn vector_weights_of_other_types_than_f32_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgmlType::I32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0] {
        for name in ["blk.0.attn_norm.weight", "output_norm.weight"] {
            let mut w = tiny(SyntheticVocab::Spm);
            let bytes = ty.bytes_for(64).unwrap() as usize;
            w.replace_tensor(name, &[64], ty, vec![0u8; bytes]).unwrap();
            let o = generate(&write(dir.path(), "norm.gguf", &w));
            refused(&o, 1, &[name, &format!("type {ty}"), "f32"]);
            // llama.cpp's own engine (perplexity with a llama: row) is guarded the same way.
            let text = dir.path().join("t.txt");
            std::fs::write(&text, "Once upon a time there was a cat. ".repeat(20)).unwrap();
            let m = dir.path().join("norm.gguf");
            let o = ottkv(&[
                "perplexity",
                "-m",
                m.to_str().unwrap(),
                "-f",
                text.to_str().unwrap(),
                "-c",
                "16",
                "--chunks",
                "1",
                "-t",
                "1",
                "--cache",
                "llama:f16",
            ]);
            refused(&o, 1, &[name]);
        }
    }
    // A matrix of a type ggml's CPU backend cannot multiply.
    let mut w = tiny(SyntheticVocab::Spm);
    w.replace_tensor(
        "blk.1.ffn_up.weight",
        &[64, 128],
        GgmlType::I32,
        vec![0u8; 64 * 128 * 4],
    )
    .unwrap();
    refused(
        &generate(&write(dir.path(), "mat.gguf", &w)),
        1,
        &["blk.1.ffn_up.weight", "cannot multiply"],
    );
}

#[test]
fn absurd_block_counts_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for n in [1u32 << 31, u32::MAX, 513] {
        let mut w = tiny(SyntheticVocab::Spm);
        w.set_kv("llama.block_count", n).unwrap();
        let p = write(dir.path(), "layers.gguf", &w);
        refused(&generate(&p), 1, &["llama.block_count", "512"]);
        // inspect describes the file, says why there are no hyperparameters, and prices no
        // KV cache (it used to spin for seconds, then print an absurd size).
        let o = ottkv(&["inspect", p.to_str().unwrap()]);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        assert!(
            o.stdout.contains("hparams        unavailable"),
            "{}",
            o.stdout
        );
        assert!(o.stdout.contains("llama.block_count"), "{}", o.stdout);
        assert!(!o.stdout.contains("KV bytes/token"), "{}", o.stdout);
        assert!(o.took < Duration::from_secs(5), "inspect took {:?}", o.took);
    }
    // One layer more than the file has tensors for names the first missing tensor.
    let mut w = tiny(SyntheticVocab::Spm);
    w.set_kv("llama.block_count", 3u32).unwrap();
    refused(
        &generate(&write(dir.path(), "layers.gguf", &w)),
        1,
        &["blk.2.attn_norm.weight"],
    );
}

#[test]
fn unaligned_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny(SyntheticVocab::Spm);
    w.set_alignment(8).unwrap();
    refused(
        &generate(&write(dir.path(), "align.gguf", &w)),
        1,
        &["alignment", "32"],
    );
}

#[test]
fn thread_counts_above_the_cores_are_clamped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.gguf", &tiny(SyntheticVocab::Spm));
    let m = p.to_str().unwrap();
    let o = ottkv(&["generate", "-m", m, "-p", "Once", "-n", "4", "-t", "100000"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("--threads 100000"), "{}", o.stderr);
    assert!(o.took < Duration::from_secs(60), "took {:?}", o.took);
    refused(
        &ottkv(&["generate", "-m", m, "-p", "Once", "-t", "0"]),
        2,
        &["at least 1"],
    );
}

#[test]
fn bad_numbers_and_specs_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "m.gguf", &tiny(SyntheticVocab::Spm));
    let m = p.to_str().unwrap();
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "Once upon a time there was a cat. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut a = vec!["generate", "-m", m, "-p", "Once", "-n", "2", "-t", "1"];
        a.extend_from_slice(extra);
        ottkv(&a)
    };
    for (flag, value, needle) in [
        ("-c", "0", "at least 1"),
        ("--temp", "nan", "temperature"),
        ("--temp", "-1", "temperature"),
        ("--temp", "inf", "temperature"),
        ("--top-p", "0", "(0, 1]"),
        ("--top-p", "nan", "(0, 1]"),
        ("--top-p", "-0.5", "(0, 1]"),
    ] {
        refused(&gen(&[flag, value]), 2, &[needle]);
    }
    // A prompt longer than the context is an error, not a silently larger context.
    refused(&gen(&["-c", "1"]), 1, &["context overflow"]);
    // A malformed cache spec is a usage error, as a malformed flag is.
    for (spec, field) in [("ott2:k=3,k=4", "given twice"), ("ott2:", "nothing after")] {
        refused(&gen(&["--cache", spec]), 2, &[field]);
    }
    let ppl = |extra: &[&str]| {
        let mut a = vec!["perplexity", "-m", m, "-f", t, "-c", "16", "-t", "1"];
        a.extend_from_slice(extra);
        ottkv(&a)
    };
    refused(&ppl(&["--chunks", "0"]), 2, &["--chunks", "at least 1"]);
    refused(&ppl(&["-b", "0"]), 2, &["--batch", "at least 1"]);
    // Every row skipped (llama.cpp refuses q8_0 caches at head_dim 16): no results, exit 1.
    let o = ppl(&["--cache", "llama:q8_0,llama:q4_0"]);
    refused(
        &o,
        1,
        &["no row could run", "llama.cpp q8_0", "llama.cpp q4_0"],
    );
    // ... while one row that runs is a result.
    assert_eq!(ppl(&["--cache", "llama:q8_0,f16"]).code, Some(0));
}

#[test]
fn a_directory_is_not_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    refused(&ottkv(&["inspect", d]), 1, &["a directory"]);
    refused(
        &ottkv(&["generate", "-m", d, "-p", "x"]),
        1,
        &["a directory"],
    );
}
