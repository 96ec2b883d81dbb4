//! Many sequences in one graph: 16 greedy sequences stepped together by `Batcher` (prompts of
//! different lengths, so some decode while others are still in their prompt, as in a server)
//! give the same logits, bit for bit, as each sequence decoded alone in its own session with
//! the same prompt chunks. Checked for our cache and llama.cpp's f16/q4_0 layouts on
//! SmolLM2, and on random-weight qwen2 and gemma3 (window rings) models.

mod common;

use ottkv::kind::CacheKind;
use ottkv::model::{argmax, Batcher, Logits, Model, Session, SessionParams};

const N_SEQ: usize = 16;
const N_BATCH: usize = 64;
const N_GEN: usize = 6;

/// One test at a time: ggml's threads spin at barriers, so two graphs side by side on two
/// cores make both crawl.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn params(cache: &str, n_ctx: usize) -> SessionParams {
    SessionParams {
        n_ctx,
        n_batch: N_BATCH,
        threads: 2,
        cache: cache.parse::<CacheKind>().unwrap(),
    }
}

/// Sequence `i`'s prompt: lengths from 5 to 140 tokens, so prompts end in different steps.
fn prompts(n_vocab: usize) -> Vec<Vec<i32>> {
    (0..N_SEQ)
        .map(|i| {
            let len = 5 + 9 * i;
            (0..len)
                .map(|j| (3 + (i * 7919 + j * 104_729) % (n_vocab - 3)) as i32)
                .collect()
        })
        .collect()
}

/// The logits each greedy choice was made from: the prompt's last, then each new token's.
fn alone(model: &Model, cache: &str, n_ctx: usize, prompt: &[i32]) -> Vec<Vec<f32>> {
    let mut s = Session::new(model, params(cache, n_ctx)).unwrap();
    let mut l = Vec::new();
    for chunk in prompt.chunks(N_BATCH) {
        l = s.eval(chunk, Logits::Last).unwrap();
    }
    let mut out = vec![l];
    for _ in 0..N_GEN {
        let t = argmax(out.last().unwrap()) as i32;
        out.push(s.eval(&[t], Logits::Last).unwrap());
    }
    out
}

/// The same, all sequences through one `Batcher`; also the largest number of sequences one
/// step carried.
fn together(
    model: &Model,
    cache: &str,
    n_ctx: usize,
    prompts: &[Vec<i32>],
) -> (Vec<Vec<Vec<f32>>>, usize) {
    let mut sessions: Vec<Session> = prompts
        .iter()
        .map(|_| Session::new(model, params(cache, n_ctx)).unwrap())
        .collect();
    let mut pending: Vec<Vec<i32>> = prompts.to_vec();
    let mut seen: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    let mut batcher = Batcher::new(2).unwrap();
    let mut widest = 0;
    loop {
        let live: Vec<usize> = (0..prompts.len())
            .filter(|&i| !pending[i].is_empty())
            .collect();
        if live.is_empty() {
            break;
        }
        widest = widest.max(live.len());
        let mut seqs: Vec<(&mut Session, &[i32])> = sessions
            .iter_mut()
            .zip(&pending)
            .filter(|(_, p)| !p.is_empty())
            .map(|(s, p)| (s, p.as_slice()))
            .collect();
        let stepped = batcher.step(&mut seqs).unwrap();
        drop(seqs);
        for (&i, st) in live.iter().zip(stepped) {
            assert!(st.consumed >= 1 && st.consumed <= pending[i].len());
            if st.consumed < pending[i].len() {
                pending[i].drain(..st.consumed);
                continue;
            }
            let t = argmax(&st.logits) as i32;
            seen[i].push(st.logits);
            pending[i] = if seen[i].len() <= N_GEN {
                vec![t]
            } else {
                Vec::new()
            };
        }
    }
    (seen, widest)
}

fn check(model: &Model, what: &str, caches: &[&str]) {
    let n_vocab = model.hparams.vocab_size as usize;
    let prompts = prompts(n_vocab);
    let n_ctx = prompts.iter().map(Vec::len).max().unwrap() + N_GEN + 1;
    for &cache in caches {
        let (got, widest) = together(model, cache, n_ctx, &prompts);
        assert_eq!(
            widest, N_SEQ,
            "{what} {cache}: every sequence shared a step"
        );
        for (i, p) in prompts.iter().enumerate() {
            let want = alone(model, cache, n_ctx, p);
            assert_eq!(got[i].len(), want.len(), "{what} {cache} seq {i}");
            for (j, (a, b)) in got[i].iter().zip(&want).enumerate() {
                let max = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    a == b,
                    "{what} {cache}: sequence {i}, choice {j}: batched logits differ from alone \
                     by up to {max:e}"
                );
            }
        }
        println!("{what} {cache}: {N_SEQ} sequences together == alone, bit for bit");
    }
}

#[test]
fn sixteen_sequences_together_equal_each_alone_on_smollm2() {
    let Some(path) = common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "multi-sequence")
    else {
        return;
    };
    let _g = serial();
    let model = Model::load(&path).unwrap();
    check(&model, "SmolLM2", &["recommended", "f16", "q4_0"]);
}

/// qwen2 (biases) and gemma3 (window layers whose rings sit beside our cache, MQA) with Q4_1
/// weights, as SmolLM2's: with f32 weights ggml multiplies many columns through another kernel
/// than one (llamafile's sgemm), so a sequence's numbers would depend on its neighbours.
#[test]
fn sixteen_sequences_together_equal_each_alone_on_qwen2_and_gemma3() {
    use ottkv::gguf::GgmlType;
    use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut qwen = SyntheticSpec::small(Arch::Qwen2);
    qwen.weight_type = GgmlType::Q4_1;
    let mut gemma = SyntheticSpec::small(Arch::Gemma3);
    gemma.weight_type = GgmlType::Q4_1;
    gemma.n_head_kv = 1;
    gemma.n_layer = 3;
    gemma.sliding_window = 40;
    gemma.sliding_window_pattern = Some(3);
    for spec in [qwen, gemma] {
        let path = dir.path().join(format!("{}.gguf", spec.arch.name()));
        synthetic_model(&spec).unwrap().write_to(&path).unwrap();
        let model = Model::load(&path).unwrap();
        check(&model, spec.arch.name(), &["recommended", "f16"]);
    }
}

#[test]
fn a_step_refuses_mixed_models_and_empty_inputs() {
    use ottkv::model::synthetic::{synthetic_model, Arch, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    synthetic_model(&SyntheticSpec::small(Arch::Llama))
        .unwrap()
        .write_to(&path)
        .unwrap();
    let (a, b) = (Model::load(&path).unwrap(), Model::load(&path).unwrap());
    let mut sa = Session::new(&a, params("f16", 32)).unwrap();
    let mut sb = Session::new(&b, params("f16", 32)).unwrap();
    let mut batcher = Batcher::new(2).unwrap();
    let err = batcher
        .step(&mut [(&mut sa, &[5][..]), (&mut sb, &[5][..])])
        .unwrap_err();
    assert!(err.to_string().contains("one model"), "{err}");
    let err = batcher.step(&mut [(&mut sa, &[][..])]).unwrap_err();
    assert!(err.to_string().contains("needs a token"), "{err}");
    let err = batcher.step(&mut [(&mut sa, &[7; 40][..])]).unwrap_err();
    assert!(
        err.to_string().contains("32"),
        "context overflow names n_ctx: {err}"
    );
    assert_eq!(sa.n_past(), 0, "a refused step changes nothing");
    let ok = batcher.step(&mut [(&mut sa, &[5, 6][..])]).unwrap();
    assert_eq!((ok[0].consumed, sa.n_past()), (2, 2));
}
