//! What the engine runs of each architecture and what it refuses, on random-weight files from
//! our GGUF writer, before any weight is bound or any graph computed: RoPE scaling types and
//! factors we do not apply, per-layer head sizes, tensors of another architecture; how our
//! cache treats layers whose window is shorter than the context. Also what `inspect` shows.

use std::path::{Path, PathBuf};
use std::process::Command;

use ottkv::gguf::{Array, GgmlType, GgufError, GgufFile, GgufWriter, Value};
use ottkv::kind::CacheKind;
use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};
use ottkv::model::{check_model, Logits, Model, Session, SessionParams};
use ottkv::Error;

fn spec(arch: Arch) -> SyntheticSpec {
    let mut s = SyntheticSpec::small(arch);
    s.n_layer = 2;
    s.n_embd = 64;
    s.n_head = 2;
    s.n_head_kv = 1;
    s.n_ff = 96;
    if arch == Arch::Gemma3 {
        s.n_layer = 3;
        s.sliding_window = 32;
        s.sliding_window_pattern = Some(3);
    }
    s
}

fn write(dir: &Path, name: &str, w: &GgufWriter) -> PathBuf {
    let p = dir.join(name);
    w.write_to(&p).unwrap();
    p
}

/// `check_model`'s verdict on `w`, as the error's text.
fn refusal(w: &GgufWriter) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.gguf", w);
    let f = GgufFile::open(&path).unwrap();
    match check_model(f.gguf()) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_refused(w: &GgufWriter, needles: &[&str]) {
    let msg = refusal(w);
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

#[test]
fn every_new_architecture_passes_the_checks() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let mut s = spec(arch);
        s.rope_freqs = arch == Arch::Llama;
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "m.gguf", &synthetic_model(&s).unwrap());
        let f = GgufFile::open(&path).unwrap();
        let c = check_model(f.gguf()).unwrap();
        assert_eq!(c.arch, arch);
        if arch == Arch::Gemma3 {
            // Period 3: every third layer attends over everything.
            assert_eq!(c.hparams.swa_layers, vec![true, true, false]);
            assert_eq!(c.hparams.n_swa, 32);
        } else {
            assert_eq!(c.hparams.n_swa, 0);
        }
    }
}

#[test]
fn rope_scaling_we_do_not_apply_is_refused() {
    for t in ["yarn", "longrope"] {
        let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
        w.add_kv("llama.rope.scaling.type", t).unwrap();
        w.add_kv("llama.rope.scaling.factor", 4.0f32).unwrap();
        assert_refused(&w, &["llama.rope.scaling.type", t, "not supported"]);
    }
    let mut w = synthetic_model(&spec(Arch::Qwen3)).unwrap();
    w.add_kv("qwen3.rope.scaling.attn_factor", 1.5f32).unwrap();
    assert_refused(&w, &["qwen3.rope.scaling.attn_factor", "1.5"]);
    // The types we run pass.
    for t in ["none", "linear"] {
        let mut w = synthetic_model(&spec(Arch::Qwen3)).unwrap();
        w.add_kv("qwen3.rope.scaling.type", t).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "m.gguf", &w);
        check_model(GgufFile::open(&path).unwrap().gguf()).unwrap();
    }
}

#[test]
fn rope_freqs_only_as_llama_reads_them() {
    // On an architecture whose graph libllama builds without them.
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Gemma3] {
        let mut w = synthetic_model(&spec(arch)).unwrap();
        w.add_tensor("rope_freqs.weight", &[32], GgmlType::F32, vec![0; 128])
            .unwrap();
        assert_refused(&w, &["rope_freqs.weight", arch.name()]);
    }
    // Wrong length, wrong type.
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_tensor("rope_freqs.weight", &[16], GgmlType::F32, vec![0; 64])
        .unwrap();
    assert_refused(&w, &["rope_freqs.weight", "[16]", "[32]"]);
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_tensor("rope_freqs.weight", &[32], GgmlType::F16, vec![0; 64])
        .unwrap();
    assert_refused(&w, &["rope_freqs.weight", "f32"]);
    // Per-layer LongRoPE factors.
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_tensor(
        "rope_factors_long.weight",
        &[32],
        GgmlType::F32,
        vec![0; 128],
    )
    .unwrap();
    assert_refused(&w, &["rope_factors_long.weight"]);
}

#[test]
fn tensors_of_the_wrong_architecture_are_refused() {
    // qwen3 has q/k norms and no biases.
    let mut w = synthetic_model(&spec(Arch::Qwen3)).unwrap();
    w.remove_tensor("blk.1.attn_k_norm.weight");
    assert_refused(&w, &["blk.1.attn_k_norm.weight", "not found"]);
    let mut w = synthetic_model(&spec(Arch::Qwen3)).unwrap();
    w.add_tensor("blk.0.attn_q.bias", &[128], GgmlType::F32, vec![0; 512])
        .unwrap();
    assert_refused(&w, &["blk.0.attn_q.bias"]);
    // A q norm over the whole q row instead of one head.
    let mut w = synthetic_model(&spec(Arch::Qwen3)).unwrap();
    w.replace_tensor(
        "blk.0.attn_q_norm.weight",
        &[128],
        GgmlType::F32,
        vec![0; 512],
    )
    .unwrap();
    assert_refused(&w, &["blk.0.attn_q_norm.weight", "[128]", "[64]"]);
    // gemma3 needs its post-norms.
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.remove_tensor("blk.2.post_ffw_norm.weight");
    assert_refused(&w, &["blk.2.post_ffw_norm.weight", "not found"]);
    // An architecture we do not run, named.
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.set_kv("general.architecture", "gemma2").unwrap();
    assert_refused(&w, &["gemma2", "unsupported architecture"]);
}

#[test]
fn sliding_window_shapes_we_do_not_run_are_refused() {
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.add_kv("gemma3.attention.key_length_swa", 32u32).unwrap();
    assert_refused(
        &w,
        &["gemma3.attention.key_length_swa", "per-layer head sizes"],
    );
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.add_kv("gemma3.rope.dimension_count_swa", 32u32).unwrap();
    assert_refused(&w, &["gemma3.rope.dimension_count_swa"]);
    // A per-layer pattern that does not name every layer.
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.set_kv(
        "gemma3.attention.sliding_window_pattern",
        Value::Array(Array::Bool(vec![true, false])),
    )
    .unwrap();
    assert_refused(&w, &["sliding_window_pattern", "2 entries for 3 layers"]);
    // One that does is read as given.
    let mut w = synthetic_model(&spec(Arch::Gemma3)).unwrap();
    w.set_kv(
        "gemma3.attention.sliding_window_pattern",
        Value::Array(Array::Bool(vec![false, true, true])),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.gguf", &w);
    let c = check_model(GgufFile::open(&path).unwrap().gguf()).unwrap();
    assert_eq!(c.hparams.swa_layers, vec![false, true, true]);
}

fn session_error(model: &Model, cache: &str, n_ctx: usize) -> Option<Error> {
    let sp = SessionParams {
        n_ctx,
        n_batch: 16,
        threads: 1,
        cache: cache.parse::<CacheKind>().unwrap(),
    };
    Session::new(model, sp).err()
}

fn logits(model: &Model, cache: &str, n_ctx: usize, toks: &[i32]) -> Vec<f32> {
    let sp = SessionParams {
        n_ctx,
        n_batch: 512,
        threads: 2,
        cache: cache.parse::<CacheKind>().unwrap(),
    };
    let mut s = Session::new(model, sp).unwrap();
    s.eval(toks, Logits::All).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Where the window is shorter than the context, our cache keeps the window layers' last
/// tokens in a q8_0 ring beside it and attends them through the window, as llama.cpp's cache
/// does: with every other token exact (a residual window longer than the text) the logits
/// match llama.cpp's f16 cache to q8_0 rounding, far closer than to the same weights
/// without a window (what ignoring the window would give); the ring's memory stays fixed as
/// the context grows; at most the window, every layer is in our cache as usual.
#[test]
fn our_cache_keeps_the_window_layers_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "g.gguf",
        &synthetic_model(&spec(Arch::Gemma3)).unwrap(),
    );
    let model = Model::load(&path).unwrap();
    let mut s0 = spec(Arch::Gemma3);
    s0.sliding_window = 0;
    let path0 = write(dir.path(), "g0.gguf", &synthetic_model(&s0).unwrap());
    let no_window = Model::load(&path0).unwrap();

    let n_vocab = model.hparams.vocab_size as i32;
    // Longer than one ring sub-batch (256), so a batch is split on the way in.
    let toks: Vec<i32> = (0..300).map(|i| 3 + (i * 7919) % (n_vocab - 3)).collect();
    let f16 = logits(&model, "f16", 320, &toks);
    let exact = logits(&model, "ott:k=4,v=4,r=4096", 320, &toks);
    let ignored = logits(&no_window, "f16", 320, &toks);
    let (ours, control) = (max_abs_diff(&exact, &f16), max_abs_diff(&ignored, &f16));
    println!("max |logit - f16|: ours (exact) {ours:.2e}, without the window {control:.2e}");
    assert!(ours < 0.02 && ours * 20.0 < control, "{ours} vs {control}");

    // The ring is sized by the window, not the context.
    let bytes = |n_ctx| {
        let sp = SessionParams {
            n_ctx,
            n_batch: 16,
            threads: 1,
            cache: "recommended".parse::<CacheKind>().unwrap(),
        };
        Session::new(&model, sp).unwrap().kv_bytes()
    };
    let ring = 2 * 2 * 64 * 512 * 34 / 32; // 2 window layers, K and V, 64 × 512 cells, q8_0
    assert_eq!(bytes(1000), bytes(100_000));
    assert!(bytes(1000) >= ring);
    // Within the window no ring: every layer is in our cache, which starts smaller.
    assert!(bytes(32) < ring, "{}", bytes(32));
    for c in ["f16", "q8_0", "q4_0"] {
        assert!(session_error(&model, c, 1000).is_none(), "{c}");
    }
    // A model with a window on every layer leaves nothing for our cache: refused, named.
    let mut s = spec(Arch::Gemma3);
    s.sliding_window_pattern = None;
    s.n_layer = 2;
    let path = write(dir.path(), "gw.gguf", &synthetic_model(&s).unwrap());
    let all = Model::load(&path).unwrap();
    assert!(all.hparams.swa_layers.iter().all(|&w| w));
    match session_error(&all, "recommended", 1000) {
        Some(Error::Unsupported(msg)) => {
            for n in ["every layer", "32-token sliding window", "f16"] {
                assert!(msg.contains(n), "{msg:?} lacks {n:?}");
            }
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(session_error(&all, "recommended", 32).is_none());
}

#[test]
fn the_old_linear_scale_key_is_read_as_libllama_does() {
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_kv("llama.rope.scale_linear", 2.0f32).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "m.gguf", &w);
    let c = check_model(GgufFile::open(&path).unwrap().gguf()).unwrap();
    assert_eq!(c.hparams.rope_freq_scale, 0.5);
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .args(["inspect", "--json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn inspect_shows_the_new_hyperparameters() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(Arch::Llama);
    s.rope_freqs = true;
    let j = inspect_json(&write(dir.path(), "l.gguf", &synthetic_model(&s).unwrap()));
    let h = &j["hparams"];
    assert_eq!(h["rope_freq_factors"], 32);
    assert_eq!(h["qk_norm"], false);
    assert!(h["sliding_window"].is_null());

    let j = inspect_json(&write(
        dir.path(),
        "q.gguf",
        &synthetic_model(&spec(Arch::Qwen3)).unwrap(),
    ));
    assert_eq!(j["hparams"]["qk_norm"], true);
    assert_eq!(j["hparams"]["rope_type"], "neox");

    let mut s = spec(Arch::Gemma3);
    s.rope_freq_base_swa = Some(5000.0);
    s.final_logit_softcapping = Some(30.0);
    let j = inspect_json(&write(dir.path(), "g.gguf", &synthetic_model(&s).unwrap()));
    let h = &j["hparams"];
    assert_eq!(h["qk_norm"], true);
    assert_eq!(h["sliding_window"], 32);
    assert_eq!(h["sliding_window_layers"], "SSF");
    assert_eq!(h["rope_freq_base_swa"], 5000.0);
    assert_eq!(h["final_logit_softcapping"], 30.0);

    // yarn is shown, though the engine refuses it.
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_kv("llama.rope.scaling.type", "yarn").unwrap();
    let j = inspect_json(&write(dir.path(), "y.gguf", &w));
    assert_eq!(j["hparams"]["rope_scaling_type"], "yarn");
}

#[test]
fn refusals_happen_before_llama_cpp_sees_the_file() {
    let mut w = synthetic_model(&spec(Arch::Llama)).unwrap();
    w.add_kv("llama.rope.scaling.type", "yarn").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "y.gguf", &w);
    match Model::load(&path) {
        Err(Error::Gguf(GgufError::InvalidHparam { key, reason })) => {
            assert_eq!(key, "llama.rope.scaling.type");
            assert!(reason.contains("yarn"), "{reason}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("accepted"),
    }
    let e = ottkv::llama::LlamaModel::load(&path, true)
        .err()
        .expect("refused");
    assert!(e.to_string().contains("yarn"), "{e}");
}
