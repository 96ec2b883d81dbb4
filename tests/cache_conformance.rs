//! One contract, every KV cache the engine runs: llama.cpp's block types as ggml builds them,
//! our presets, and our cache beside the window rings of a sliding-window model. For each:
//! the memory it reports is its closed form (what `compare` prices), a reset forgets
//! everything (the same tokens again give the same logits, bit for bit), and a refused call
//! (past the context, a token outside the vocabulary) is a typed error that loses nothing —
//! the session goes on as if it had not been made. Batch == token by token for every cache is
//! `tests/engine_batch.rs`, on a real model.

use ottkv::gguf::GgmlType;
use ottkv::kind::CacheKind;
use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};
use ottkv::model::{Logits, Model, Session, SessionParams};
use ottkv::Error;

const CACHES: &[&str] = &[
    "f16",
    "q8_0",
    "q4_0",
    "ott2",
    "ott3a",
    "recommended",
    "ottk4v2",
    "kivi2",
    "ott3c",
];

/// A llama model with head_dim 64 and a gemma3 one whose window (40 tokens) is shorter than
/// the context, so our cache runs beside window rings there.
fn models(dir: &std::path::Path) -> Vec<(String, Model)> {
    let mut llama = SyntheticSpec::small(Arch::Llama);
    llama.weight_type = GgmlType::Q4_1;
    let mut gemma = SyntheticSpec::small(Arch::Gemma3);
    gemma.weight_type = GgmlType::Q4_1;
    gemma.n_layer = 3;
    gemma.n_head_kv = 1;
    gemma.sliding_window = 40;
    gemma.sliding_window_pattern = Some(3);
    [llama, gemma]
        .into_iter()
        .map(|spec| {
            let path = dir.join(format!("{}.gguf", spec.arch.name()));
            synthetic_model(&spec).unwrap().write_to(&path).unwrap();
            (spec.arch.name().to_string(), Model::load(&path).unwrap())
        })
        .collect()
}

fn session<'m>(model: &'m Model, cache: &str, n_ctx: usize) -> Session<'m> {
    let sp = SessionParams {
        n_ctx,
        n_batch: 64,
        threads: 2,
        cache: cache.parse::<CacheKind>().unwrap(),
    };
    Session::new(model, sp).unwrap()
}

fn tokens(model: &Model, n: usize) -> Vec<i32> {
    let v = model.hparams.vocab_size as i32;
    (0..n as i32)
        .map(|i| 3 + (i * 7919 + 11) % (v - 3))
        .collect()
}

#[test]
fn every_cache_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    for (arch, model) in models(dir.path()) {
        let toks = tokens(&model, n);
        let hp = &model.hparams;
        for &cache in CACHES {
            let what = format!("{arch} {cache}");
            let mut s = session(&model, cache, n);

            // Memory: what the cache holds at n tokens is the closed form for n tokens, with
            // the choices it made where it made any.
            let first = s.eval(&toks, Logits::All).unwrap();
            let priced = match s.cache_choices(n) {
                Some((_, bytes)) => bytes,
                None => cache.parse::<CacheKind>().unwrap().bytes_at(hp, n).unwrap(),
            };
            assert_eq!(s.kv_bytes(), priced, "{what}: reported vs closed form");

            // Reset: the same tokens again, the same logits.
            s.reset().unwrap();
            assert_eq!(s.n_past(), 0, "{what}");
            let again = s.eval(&toks, Logits::All).unwrap();
            assert!(first == again, "{what}: logits after reset differ");

            // Refusals lose nothing: past the context and out of the vocabulary, then the rest.
            let mut s = session(&model, cache, n);
            let n_vocab = hp.vocab_size as usize;
            let half = n / 2;
            s.eval(&toks[..half], Logits::Last).unwrap();
            let mut too_long = toks[half..].to_vec();
            too_long.push(toks[0]);
            match s.eval(&too_long, Logits::Last) {
                Err(Error::ContextOverflow { needed, n_ctx }) => {
                    assert_eq!((needed, n_ctx), (n + 1, n), "{what}")
                }
                other => panic!("{what}: expected ContextOverflow, got {:?}", other.err()),
            }
            let mut bad = toks[half..half + 3].to_vec();
            bad[2] = n_vocab as i32;
            match s.eval(&bad, Logits::Last) {
                Err(Error::TokenOutOfVocab { token, n_vocab: nv }) => {
                    assert_eq!((token, nv), (n_vocab as i32, n_vocab), "{what}")
                }
                other => panic!("{what}: expected TokenOutOfVocab, got {:?}", other.err()),
            }
            assert_eq!(
                s.n_past(),
                half,
                "{what}: a refused call moved the position"
            );
            let rest = s.eval(&toks[half..], Logits::Last).unwrap();
            // The same split without the refused calls (f16's flash attention rounds a batch
            // unlike one token, so the split itself must match).
            let mut clean = session(&model, cache, n);
            clean.eval(&toks[..half], Logits::Last).unwrap();
            let want = clean.eval(&toks[half..], Logits::Last).unwrap();
            assert!(rest == want, "{what}: logits after refused calls differ");
        }
    }
}

/// Every cache refuses a context it cannot hold with a typed error, before any token.
#[test]
fn impossible_sessions_are_refused_with_a_type() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = models(dir.path()).remove(0);
    for &cache in CACHES {
        let sp = |n_ctx, n_batch| SessionParams {
            n_ctx,
            n_batch,
            threads: 1,
            cache: cache.parse::<CacheKind>().unwrap(),
        };
        for (n_ctx, n_batch) in [(0, 16), (16, 0)] {
            match Session::new(&model, sp(n_ctx, n_batch)) {
                Err(Error::InvalidArgument(msg)) => assert!(msg.contains("positive"), "{msg}"),
                other => panic!("{cache}: expected InvalidArgument, got {:?}", other.err()),
            }
        }
    }
}
