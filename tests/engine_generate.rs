//! `ottkv generate` as a user runs it, and generation with the compressed cache.

mod common;

use ottkv::kind::CacheKind;
use ottkv::llama::LlamaModel;
use ottkv::model::sample::Sampler;
use ottkv::model::{Logits, Model, Session, SessionParams};
use std::process::Command;

/// Measured: peak RSS 126 MiB for the 94 MiB SmolLM2 file (weights mapped, not copied; the
/// rest is the tokenizer, activations and the binary). A copy of the weights would be ≥ 2×.
const RSS_OVER_MODEL_MAX: f64 = 1.6;
/// Measured (see printout): the f16 model's perplexity of what ott2 generated after a long
/// prompt was ~2 (greedy text is very likely under the model); broken text scores far higher.
const CONTINUATION_PPL_MAX: f64 = 8.0;

const LONG_PROMPT: &str = "The history of astronomy is long. Ancient peoples watched the sky to keep track of \
    the seasons, to plan harvests and to navigate across the sea. The Babylonians recorded the positions of the \
    planets on clay tablets, and Greek thinkers such as Aristarchus and Ptolemy built models of the heavens. \
    For more than a thousand years the Earth was believed to sit at the centre of the universe. In the sixteenth \
    century Nicolaus Copernicus proposed that the Earth and the other planets move around the Sun. Galileo Galilei \
    pointed a telescope at the sky and saw the moons of Jupiter and the phases of Venus, and Johannes Kepler \
    showed that the planets travel on ellipses. Isaac Newton then explained these motions with a single law of \
    gravitation. In the twentieth century astronomers discovered that the Milky Way is only one of billions of \
    galaxies, and that the universe is expanding. Today telescopes in space observe light from the first stars. \
    The most important discovery of modern astronomy is";

#[test]
fn ott2_generation_after_a_compressed_prompt_is_fluent() {
    let Some(path) = common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "generate") else {
        return;
    };
    let vocab = LlamaModel::load(&path, true).unwrap();
    let model = Model::load(&path).unwrap();
    let prompt = vocab.tokenize(LONG_PROMPT, true).unwrap();
    assert!(
        prompt.len() > 170,
        "prompt must pass the first flush at R+G = 160: {}",
        prompt.len()
    );
    let n_ctx = prompt.len() + 40;
    let sp = |c: &str| SessionParams {
        n_ctx,
        n_batch: 512,
        threads: 2,
        cache: c.parse::<CacheKind>().unwrap(),
    };
    let mut s = Session::new(&model, sp("ott2")).unwrap();
    let mut logits = s.eval(&prompt, Logits::Last).unwrap();
    let mut greedy = Sampler::new(0.0, 0, 1.0, 0);
    let mut gen = Vec::new();
    for _ in 0..40 {
        let t = greedy.sample(&logits) as i32;
        gen.push(t);
        logits = s.eval(&[t], Logits::Last).unwrap();
    }
    let text: String = gen
        .iter()
        .map(|&t| vocab.token_to_piece(t).unwrap())
        .collect();
    // Score the continuation with the exact (f16) cache.
    let mut f = Session::new(&model, sp("f16")).unwrap();
    let all: Vec<i32> = prompt.iter().chain(&gen).copied().collect();
    let l = f.eval(&all, Logits::All).unwrap();
    let nv = model.hparams.vocab_size as usize;
    let nll: f64 = (prompt.len() - 1..all.len() - 1)
        .map(|i| -ottkv::eval::kld::log_softmax(&l[i * nv..(i + 1) * nv])[all[i + 1] as usize])
        .sum::<f64>()
        / gen.len() as f64;
    println!("ott2 continuation (f16 PPL {:.2}): {text}", nll.exp());
    assert!(nll.exp() < CONTINUATION_PPL_MAX, "{text}");
    assert!(
        text.chars().filter(|c| c.is_alphabetic()).count() > 60,
        "{text}"
    );
}

#[test]
fn generate_cli_is_deterministic_and_reports_speed_and_rss() {
    let Some(path) = common::model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf", "generate cli")
    else {
        return;
    };
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
            .args([
                "generate",
                "-m",
                path.to_str().unwrap(),
                "-p",
                "The capital of France is",
                "-n",
                "24",
                "--cache",
                "ott2",
                "-t",
                "2",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (a, err) = run();
    let (b, _) = run();
    assert_eq!(a, b, "greedy output differs between runs");
    assert!(a.starts_with("The capital of France is Paris"), "{a}");
    assert!(
        err.contains("tok/s") && err.contains("generation:"),
        "{err}"
    );
    let mib = |key: &str| -> f64 {
        let i = err.find(key).unwrap() + key.len();
        err[i..]
            .trim_start()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (rss, file) = (mib("peak RSS"), mib("model file"));
    println!("peak RSS {rss} MiB, model {file} MiB");
    assert!(
        rss < RSS_OVER_MODEL_MAX * file,
        "peak RSS {rss} MiB for a {file} MiB model"
    );
}
