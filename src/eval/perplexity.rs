//! llama-perplexity's protocol: chunks of n_ctx tokens (BOS first when the model adds one),
//! each decoded from an empty cache, scoring only the second half; plus KL divergence and
//! top-1 agreement against a reference run on the same positions.

use super::kld::{argmax, log_softmax};
use crate::error::{Error, Result};

/// The token chunks of a text: `n_chunks` of `n_ctx` tokens (fewer if the text is short).
pub fn chunks(
    tokens: &[i32],
    n_ctx: usize,
    n_chunks: Option<usize>,
    bos: Option<i32>,
) -> Result<Vec<Vec<i32>>> {
    if n_ctx < 4 {
        return Err(Error::InvalidArgument(format!(
            "n_ctx {n_ctx} is too small"
        )));
    }
    if n_chunks == Some(0) {
        return Err(Error::InvalidArgument(
            "0 chunks asked for: nothing to evaluate".into(),
        ));
    }
    let max = tokens.len() / n_ctx;
    let n = n_chunks.map_or(max, |c| c.min(max));
    if n == 0 {
        return Err(Error::TextTooShort {
            tokens: tokens.len(),
            n_ctx,
        });
    }
    Ok((0..n)
        .map(|i| {
            let mut c = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
            if let Some(b) = bos {
                c[0] = b;
            }
            c
        })
        .collect())
}

/// The first scored position of a chunk (logits at first.. predict tokens first+1..).
pub fn first_scored(n_ctx: usize) -> usize {
    n_ctx / 2
}

/// Running scores of one row.
#[derive(Clone, Debug, Default)]
pub struct Scores {
    nll: f64,
    nll2: f64,
    pub count: usize,
    pub klds: Vec<f64>,
    top1_same: usize,
    pub chunk_ppl: Vec<f64>,
    /// What the last chunk added, so an interrupted run can take it back.
    last: Option<ChunkDelta>,
}

#[derive(Clone, Debug)]
struct ChunkDelta {
    nll: f64,
    nll2: f64,
    count: usize,
    klds: usize,
    top1_same: usize,
}

/// Summary of a row's scores.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub ppl: f64,
    pub ppl_se: f64,
    pub kld_mean: Option<f64>,
    pub kld_p99: Option<f64>,
    pub kld_max: Option<f64>,
    pub top1: Option<f64>,
    pub chunks: usize,
}

impl Scores {
    /// Adds one chunk: `logits [n - first][n_vocab]` of positions first..n-1, scored on the
    /// next tokens (the last position predicts nothing); `reference`, when given, is the
    /// reference row's logits on the same positions.
    pub fn add_chunk(
        &mut self,
        chunk: &[i32],
        first: usize,
        logits: &[f32],
        n_vocab: usize,
        reference: Option<&[f32]>,
    ) {
        let n = chunk.len();
        let before = ChunkDelta {
            nll: self.nll,
            nll2: self.nll2,
            count: self.count,
            klds: self.klds.len(),
            top1_same: self.top1_same,
        };
        let (mut nll_c, mut cnt_c) = (0.0, 0usize);
        for (r, pos) in (first..n - 1).enumerate() {
            let row = &logits[r * n_vocab..(r + 1) * n_vocab];
            let lp = log_softmax(row);
            let nll = -lp[chunk[pos + 1] as usize];
            self.nll += nll;
            self.nll2 += nll * nll;
            nll_c += nll;
            cnt_c += 1;
            if let Some(refl) = reference {
                let rrow = &refl[r * n_vocab..(r + 1) * n_vocab];
                let lr = log_softmax(rrow);
                let kl: f64 = lr.iter().zip(&lp).map(|(a, b)| a.exp() * (a - b)).sum();
                self.klds.push(kl.max(0.0));
                self.top1_same += (argmax(rrow) == argmax(row)) as usize;
            }
        }
        self.count += cnt_c;
        self.chunk_ppl.push((nll_c / cnt_c.max(1) as f64).exp());
        self.last = Some(before);
    }

    /// Takes back the last `add_chunk` (once).
    pub fn rollback_last_chunk(&mut self) {
        if let Some(b) = self.last.take() {
            self.nll = b.nll;
            self.nll2 = b.nll2;
            self.count = b.count;
            self.klds.truncate(b.klds);
            self.top1_same = b.top1_same;
            self.chunk_ppl.pop();
        }
    }

    pub fn summary(&self) -> Summary {
        let n = self.count.max(1) as f64;
        let mean = self.nll / n;
        let var = (self.nll2 / n - mean * mean).max(0.0);
        let ppl = mean.exp();
        let mut sorted = self.klds.clone();
        sorted.sort_by(f64::total_cmp);
        let has = !sorted.is_empty();
        let pick = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Summary {
            ppl,
            ppl_se: ppl * (var / (n - 1.0).max(1.0)).sqrt(),
            kld_mean: has.then(|| sorted.iter().sum::<f64>() / sorted.len() as f64),
            kld_p99: has.then(|| pick(0.99)),
            kld_max: has.then(|| pick(1.0)),
            top1: has.then(|| self.top1_same as f64 / sorted.len() as f64),
            chunks: self.chunk_ppl.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_vocab_size_perplexity() {
        let chunk = vec![1, 2, 3, 0, 1, 2, 3, 0];
        let first = first_scored(chunk.len());
        let logits = vec![0.0f32; (chunk.len() - first) * 4];
        let mut s = Scores::default();
        s.add_chunk(&chunk, first, &logits, 4, Some(&logits));
        let m = s.summary();
        assert!((m.ppl - 4.0).abs() < 1e-9);
        assert_eq!(s.count, chunk.len() - 1 - first);
        assert_eq!(m.kld_mean, Some(0.0));
        assert_eq!(m.top1, Some(1.0));
        assert!(m.ppl_se.abs() < 1e-12);
    }

    #[test]
    fn chunking_follows_llama_perplexity() {
        let t: Vec<i32> = (0..25).collect();
        let c = chunks(&t, 8, None, Some(99)).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1], vec![99, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(chunks(&t, 8, Some(2), None).unwrap().len(), 2);
        assert!(chunks(&t, 30, None, None).is_err());
    }
}
