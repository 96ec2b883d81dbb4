//! Exact causal attention in f32 over plain K/V: the ground truth error figures are measured
//! against, and the attention used for simulated llama.cpp caches.

use crate::cache::dot_lanes;

/// Shapes of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_tokens: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

/// Outputs of query tokens `from..n_tokens`, each seeing keys `0..=t` (causal, GQA), as
/// `[(n_tokens - from)][n_head][head_dim]`. q `[n][n_head][hd]`, k and v `[n][n_head_kv][hd]`.
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    from: usize,
    threads: usize,
) -> Vec<f32> {
    let (n, nh, nkv, hd) = (s.n_tokens, s.n_head, s.n_head_kv, s.head_dim);
    debug_assert!(q.len() == n * nh * hd && k.len() == n * nkv * hd && v.len() == k.len());
    let rows = n.saturating_sub(from);
    let mut out = vec![0f32; rows * nh * hd];
    let scale = 1.0 / (hd as f32).sqrt();
    let threads = threads.clamp(1, 64);
    // Split query tokens so each thread gets about the same number of scores (later tokens
    // see more keys): cumulative work of tokens from..t is ~ t² - from².
    let total = (n * n - from * from) as f64;
    let mut bounds = vec![from];
    for i in 1..threads {
        let target = (from * from) as f64 + total * i as f64 / threads as f64;
        bounds.push((target.sqrt() as usize).clamp(*bounds.last().unwrap(), n));
    }
    bounds.push(n);
    std::thread::scope(|sc| {
        let mut rest = out.as_mut_slice();
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            let (mine, tail) = rest.split_at_mut((b - a) * nh * hd);
            rest = tail;
            sc.spawn(move || {
                let mut scores = vec![0f32; n];
                for t in a..b {
                    for h in 0..nh {
                        let kh = h / (nh / nkv);
                        let qv = &q[(t * nh + h) * hd..][..hd];
                        let mut m = f32::NEG_INFINITY;
                        for (j, sj) in scores[..=t].iter_mut().enumerate() {
                            let kv = &k[(j * nkv + kh) * hd..][..hd];
                            *sj = dot_lanes(qv, kv) * scale;
                            m = m.max(*sj);
                        }
                        let mut z = 0f32;
                        for sj in &mut scores[..=t] {
                            *sj = (*sj - m).exp();
                            z += *sj;
                        }
                        let o = &mut mine[((t - a) * nh + h) * hd..][..hd];
                        o.fill(0.0);
                        for (j, &p) in scores[..=t].iter().enumerate() {
                            let vv = &v[(j * nkv + kh) * hd..][..hd];
                            let w = p / z;
                            for (oc, &vc) in o.iter_mut().zip(vv) {
                                *oc += w * vc;
                            }
                        }
                    }
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_keys_average_the_values() {
        // Equal keys → softmax is uniform → output is the mean of the visible values.
        let s = AttnShape {
            n_tokens: 5,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 3,
        };
        let q: Vec<f32> = (0..5 * 2 * 3).map(|i| i as f32 * 0.1).collect();
        let k = vec![1.0f32; 5 * 3];
        let v: Vec<f32> = (0..5 * 3).map(|i| (i / 3) as f32).collect();
        for threads in [1, 3] {
            let o = causal_attention(&q, &k, &v, s, 1, threads);
            for t in 1..5 {
                let mean = (0..=t).sum::<usize>() as f32 / (t + 1) as f32;
                for x in &o[(t - 1) * 6..t * 6] {
                    assert!((x - mean).abs() < 1e-5);
                }
            }
        }
    }
}
