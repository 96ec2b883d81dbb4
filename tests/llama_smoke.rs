//! libllama through our owner types: load real models, tokenize, decode, read logits.

mod common;

use ottkv::kind::BlockType;
use ottkv::llama::{LlamaContext, LlamaContextParams, LlamaModel};

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn smollm2_tokenizes_and_decodes() {
    let Some(path) = common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2") else {
        return;
    };
    let vocab = LlamaModel::load(&path, true).unwrap();
    assert_eq!(vocab.n_vocab(), 49152);
    let toks = vocab.tokenize("The capital of France is", false).unwrap();
    assert!(toks.len() >= 5 && toks.len() <= 8, "{toks:?}");
    let text: String = toks
        .iter()
        .map(|&t| vocab.token_to_piece(t).unwrap())
        .collect();
    assert_eq!(text, "The capital of France is");

    let model = LlamaModel::load(&path, false).unwrap();
    let params = LlamaContextParams {
        n_ctx: 64,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(&model, &params).unwrap();
    let logits = ctx.decode_all_logits(&toks).unwrap();
    assert_eq!(logits.len(), toks.len() * 49152);
    assert!(logits.iter().all(|x| x.is_finite()));
    let next = argmax(&logits[(toks.len() - 1) * 49152..]);
    assert_eq!(model.token_to_piece(next as i32).unwrap(), " Paris");
}

#[test]
fn stories260k_decodes_and_clears() {
    let Some(path) = common::model_or_skip("stories260K.gguf", "stories260K") else {
        return;
    };
    let model = LlamaModel::load(&path, false).unwrap();
    let toks = model
        .tokenize("Once upon a time, there was a little girl", true)
        .unwrap();
    let p = LlamaContextParams {
        n_ctx: 64,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(&model, &p).unwrap();
    let l = ctx.decode_all_logits(&toks).unwrap();
    assert!(l.iter().all(|x| x.is_finite()));
    // Clearing the cache and decoding again gives the same logits.
    ctx.clear();
    assert_eq!(l, ctx.decode_all_logits(&toks).unwrap());
    // head_dim 8 is smaller than a q8_0 block (32): llama.cpp refuses, and we get an error.
    let q = LlamaContextParams {
        cache_k: BlockType::Q8_0,
        cache_v: BlockType::Q8_0,
        ..p
    };
    assert!(LlamaContext::new(&model, &q).is_err());
}

#[test]
fn context_overflow_is_an_error() {
    let Some(path) = common::model_or_skip("stories260K.gguf", "overflow") else {
        return;
    };
    let model = LlamaModel::load(&path, false).unwrap();
    let p = LlamaContextParams {
        n_ctx: 16,
        n_batch: 16,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(&model, &p).unwrap();
    let toks = vec![1; 17];
    let err = ctx.decode_all_logits(&toks).unwrap_err();
    assert!(err.to_string().contains("context overflow"), "{err}");
}

#[test]
fn missing_and_garbage_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(LlamaModel::load(&dir.path().join("none.gguf"), true).is_err());
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0garbage").unwrap();
    assert!(LlamaModel::load(&junk, true).is_err());
}
