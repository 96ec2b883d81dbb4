//! Comparing next-token distributions: log-softmax, KL divergence, top-1 agreement.

/// log-softmax of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let lz = m + z.ln();
    logits.iter().map(|&x| x as f64 - lz).collect()
}

/// KL(p ‖ q) of the distributions behind two logit rows: reference p, approximation q.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

pub use crate::model::argmax;

/// Per-row KL divergences and top-1 agreement of two `[rows][n_vocab]` logit matrices.
pub fn compare_rows(reference: &[f32], other: &[f32], n_vocab: usize) -> (Vec<f64>, f64) {
    let rows = reference.len() / n_vocab;
    let mut klds = Vec::with_capacity(rows);
    let mut same = 0usize;
    for (a, b) in reference
        .chunks_exact(n_vocab)
        .zip(other.chunks_exact(n_vocab))
    {
        klds.push(kl_divergence(a, b));
        same += (argmax(a) == argmax(b)) as usize;
    }
    (klds, same as f64 / rows.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl_divergence(&a, &a).abs() < 1e-12);
        // Shifting all logits keeps the distribution.
        assert!(kl_divergence(&a, &[11.0, 12.0, 13.0]).abs() < 1e-9);
        let b = [3.0f32, 2.0, 1.0];
        // p = softmax(a), q = softmax(b): KL = Σ p (log p - log q) = 2·(p3 - p1)·... computed:
        let k = kl_divergence(&a, &b);
        let p: Vec<f64> = log_softmax(&a).iter().map(|x| x.exp()).collect();
        let want = p[0] * (-2.0 - 0.0) + p[2] * (0.0 + 2.0);
        assert!((k - want * 1.0).abs() < 1e-9, "{k} vs {want}");
        let (kl, top1) = compare_rows(&[1.0, 2.0, 3.0, 1.0], &[1.0, 2.0, 1.0, 3.0], 2);
        assert_eq!(kl.len(), 2);
        assert_eq!(top1, 0.5);
    }
}
