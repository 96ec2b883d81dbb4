//! Files from our GGUF writer are valid GGUF for llama.cpp: ggml's reader sees what we wrote,
//! our parser reads back every key and byte, and libllama loads and runs the model.

use ottkv::ggml::gguf_reader::read_with_ggml;
use ottkv::gguf::{GgufFile, ModelHparams};
use ottkv::llama::{LlamaContext, LlamaContextParams, LlamaModel};
use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};

fn check(spec: &SyntheticSpec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let w = synthetic_model(spec).unwrap();
    let bytes = w.to_bytes();
    w.write_to(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Our parser reads back exactly what the writer was given.
    let ours = GgufFile::open(&path).unwrap();
    let again = ottkv::gguf::parse(&bytes).unwrap();
    assert_eq!(ours.gguf().tensors(), again.tensors());
    let h = ModelHparams::from_gguf(ours.gguf()).unwrap();
    assert_eq!(h.arch, spec.arch.name());
    assert_eq!(
        (h.n_layer, h.n_head, h.n_head_kv),
        (spec.n_layer, spec.n_head, spec.n_head_kv)
    );
    assert_eq!(
        (h.head_dim_k, h.n_ctx_train),
        (spec.head_dim, spec.n_ctx_train)
    );
    assert_eq!(h.vocab_size, spec.n_vocab);

    // ggml's own reader agrees on keys, tensors, types, shapes and offsets.
    let gg = read_with_ggml(&path).unwrap();
    let keys: Vec<String> = ours.gguf().metadata().map(|(k, _)| k.to_string()).collect();
    assert_eq!(gg.keys, keys);
    assert_eq!(gg.version, ours.gguf().version());
    assert_eq!(gg.data_offset as u64, ours.gguf().data_offset());
    assert_eq!(gg.tensors.len(), ours.gguf().tensors().len());
    for (g, t) in gg.tensors.iter().zip(ours.gguf().tensors()) {
        assert_eq!(g.0, t.name);
        assert_eq!(g.1, t.ggml_type.id());
        assert_eq!(g.2 as u64, t.offset);
        assert_eq!(g.3 as u64, t.n_bytes);
        assert_eq!(
            &g.4[..t.dims.len()],
            t.dims.iter().map(|&d| d as i64).collect::<Vec<_>>()
        );
    }

    // llama.cpp loads it and produces finite, non-constant logits.
    let model = LlamaModel::load(&path, false).unwrap();
    assert_eq!(model.n_vocab(), spec.n_vocab as usize);
    let toks = model
        .tokenize("hello world, this is a test.", true)
        .unwrap();
    assert!(toks.len() > 3);
    let p = LlamaContextParams {
        n_ctx: 64,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(&model, &p).unwrap();
    let logits = ctx.decode_all_logits(&toks).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let last = &logits[logits.len() - spec.n_vocab as usize..];
    let (lo, hi) = last
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(hi - lo > 1e-3, "flat logits");
}

#[test]
fn synthetic_llama_loads_in_llama_cpp() {
    check(&SyntheticSpec::small(Arch::Llama));
}

#[test]
fn synthetic_qwen2_f16_tied_loads_in_llama_cpp() {
    let mut s = SyntheticSpec::small(Arch::Qwen2);
    s.weight_type = ottkv::gguf::GgmlType::F16;
    s.tied_embeddings = true;
    s.head_dim = 128;
    s.n_head = 2;
    s.n_head_kv = 1;
    s.n_ctx_train = 777;
    check(&s);
}

#[test]
fn synthetic_vocab_too_large_is_an_error() {
    let mut s = SyntheticSpec::small(Arch::Llama);
    s.n_vocab = 100_000;
    assert!(synthetic_model(&s).is_err());
    s.n_vocab = 100;
    assert!(synthetic_model(&s).is_err());
}

#[test]
fn synthetic_bpe_vocab_loads_in_llama_cpp() {
    let mut s = SyntheticSpec::small(Arch::Qwen2);
    s.vocab = ottkv::model::synthetic::SyntheticVocab::Bpe;
    s.n_vocab = 400;
    check(&s);
}

#[test]
fn synthetic_llama3_qwen3_gemma3_load_in_llama_cpp() {
    let mut s = SyntheticSpec::small(Arch::Llama);
    s.rope_freqs = true;
    check(&s);
    let mut s = SyntheticSpec::small(Arch::Qwen3);
    s.vocab = ottkv::model::synthetic::SyntheticVocab::Bpe;
    check(&s);
    let mut s = SyntheticSpec::small(Arch::Gemma3);
    s.head_dim = 256;
    s.n_head_kv = 1;
    s.sliding_window = 16;
    s.rope_freq_base_swa = Some(10000.0);
    s.final_logit_softcapping = Some(30.0);
    check(&s);
}
