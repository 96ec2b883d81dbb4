//! llama.cpp contexts with several sequences: decoded together they give what each gives
//! alone, and the calls refuse bad sequence ids, empty parts and overflow with errors.

mod common;

use ottkv::kind::BlockType;
use ottkv::llama::{LlamaContext, LlamaContextParams, LlamaModel, Token};
use ottkv::Error;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEN: usize = 8;

/// Largest |logit difference| allowed between a sequence decoded with three others and the
/// same sequence alone. Measured 0 (bit-identical) on x86-64 for f16 and q4_0 caches: the
/// weight matmuls compute each token's row on its own, and flash attention skips the
/// masked cells of other sequences rather than adding zeros. Kept above 0 because ggml
/// may change how it tiles a matmul by batch size; a wrong mask or position moves logits
/// by whole units.
const BATCHED_LOGIT_TOL: f32 = 1e-3;

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "Water boils at a temperature of one hundred degrees",
];

fn argmax(row: &[f32]) -> Token {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as Token
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Greedy tokens and the logits row each was taken from, one sequence in its own context.
fn alone(model: &LlamaModel, ct: BlockType, prompt: &[Token]) -> (Vec<Token>, Vec<Vec<f32>>) {
    let p = LlamaContextParams {
        n_ctx: (prompt.len() + GEN) as u32,
        cache_k: ct,
        cache_v: ct,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(model, &p).unwrap();
    let mut row = ctx.decode(prompt, false).unwrap();
    let (mut toks, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..GEN {
        let t = argmax(&row);
        toks.push(t);
        rows.push(row);
        row = ctx.decode(&[t], false).unwrap();
    }
    (toks, rows)
}

#[test]
fn four_sequences_together_match_each_alone() {
    let Some(path) = common::model_or_skip(MODEL, "llama_batched") else {
        return;
    };
    let model = LlamaModel::load(&path, false).unwrap();
    let prompts: Vec<Vec<Token>> = PROMPTS
        .iter()
        .map(|t| model.tokenize(t, false).unwrap())
        .collect();
    for ct in [BlockType::F16, BlockType::Q4_0] {
        let want: Vec<_> = prompts.iter().map(|p| alone(&model, ct, p)).collect();
        let total: usize = prompts.iter().map(|p| p.len() + GEN).sum();
        let p = LlamaContextParams {
            n_ctx: total as u32,
            // Smaller than the prompts together, so one prompt spans two windows.
            n_batch: 32,
            cache_k: ct,
            cache_v: ct,
            n_seq_max: prompts.len() as u32,
            ..Default::default()
        };
        let mut ctx = LlamaContext::new(&model, &p).unwrap();
        let parts: Vec<(i32, &[Token])> = prompts
            .iter()
            .enumerate()
            .map(|(s, p)| (s as i32, p.as_slice()))
            .collect();
        let mut rows = ctx.decode_seqs(&parts).unwrap();
        let mut worst = 0f32;
        for step in 0..GEN {
            let mut next = Vec::new();
            for (s, row) in rows.iter().enumerate() {
                let (toks, want_rows) = &want[s];
                worst = worst.max(max_diff(row, &want_rows[step]));
                let t = argmax(row);
                assert_eq!(t, toks[step], "{ct:?}: sequence {s}, step {step}");
                next.push([t]);
            }
            let parts: Vec<(i32, &[Token])> = next
                .iter()
                .enumerate()
                .map(|(s, t)| (s as i32, t.as_slice()))
                .collect();
            rows = ctx.decode_seqs(&parts).unwrap();
        }
        println!("{ct:?}: largest logit difference batched vs alone {worst:e}");
        assert!(worst <= BATCHED_LOGIT_TOL, "{ct:?}: {worst}");
        for (s, p) in prompts.iter().enumerate() {
            assert_eq!(ctx.seq_len(s as i32).unwrap(), p.len() + GEN);
        }

        // One sequence cleared and decoded again starts over; the others keep their cells.
        ctx.clear_seq(2).unwrap();
        assert_eq!(ctx.seq_len(2).unwrap(), 0);
        assert_eq!(ctx.seq_len(1).unwrap(), prompts[1].len() + GEN);
        let again = ctx.decode_seqs(&[(2, &prompts[2])]).unwrap();
        assert!(max_diff(&again[0], &want[2].1[0]) <= BATCHED_LOGIT_TOL);
    }
}

#[test]
fn bad_sequences_and_overflow_are_errors() {
    let Some(path) = common::model_or_skip("stories260K.gguf", "llama_batched errors") else {
        return;
    };
    let model = LlamaModel::load(&path, false).unwrap();
    let bad_seq = |n_seq_max| {
        let p = LlamaContextParams {
            n_seq_max,
            ..Default::default()
        };
        LlamaContext::new(&model, &p).err()
    };
    assert!(matches!(bad_seq(0), Some(Error::Llama(_))));
    assert!(matches!(bad_seq(100_000), Some(Error::Llama(_))));

    let p = LlamaContextParams {
        n_ctx: 16,
        n_batch: 8,
        n_seq_max: 2,
        ..Default::default()
    };
    let mut ctx = LlamaContext::new(&model, &p).unwrap();
    let toks: Vec<Token> = (10..16).collect();
    for seq in [2, -1, i32::MAX] {
        let e = ctx.decode_seqs(&[(0, &toks), (seq, &toks)]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{seq}: {e}");
        assert!(ctx.clear_seq(seq).is_err());
        assert!(ctx.seq_len(seq).is_err());
    }
    assert!(ctx.decode_seqs(&[(0, &[])]).is_err());
    assert!(ctx.decode_seqs(&[(1, &[-3])]).is_err());
    // A refused call leaves nothing cached.
    assert_eq!(ctx.seq_len(0).unwrap(), 0);
    assert!(ctx.decode_seqs(&[]).unwrap().is_empty());

    // n_ctx is the total over both sequences.
    ctx.decode_seqs(&[(0, &toks), (1, &toks)]).unwrap();
    let e = ctx.decode_seqs(&[(1, &toks)]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ContextOverflow {
                needed: 18,
                n_ctx: 16
            }
        ),
        "{e}"
    );
    assert_eq!(ctx.seq_len(1).unwrap(), 6);
    ctx.clear_seq(0).unwrap();
    let rows = ctx.decode_seqs(&[(1, &toks)]).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].len(), model.n_vocab());
    assert_eq!(ctx.seq_len(1).unwrap(), 12);

    // Two parts of one sequence in one call follow each other, as one part would.
    ctx.clear();
    let split = ctx
        .decode_seqs(&[(0, &toks[..2]), (0, &toks[2..])])
        .unwrap();
    let mut one = LlamaContext::new(&model, &p).unwrap();
    let all = one.decode_all_logits(&toks).unwrap();
    let n = model.n_vocab();
    assert!(max_diff(&split[0], &all[n..2 * n]) <= BATCHED_LOGIT_TOL);
    assert!(max_diff(&split[1], &all[5 * n..]) <= BATCHED_LOGIT_TOL);
}
