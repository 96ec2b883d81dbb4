//! Choosing the next token from logits: greedy, or temperature with top-k / top-p.

/// Index of the largest logit (first on ties): greedy decoding, and top-1 agreement in the
/// measurements.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Sampling settings; `temp <= 0` is greedy.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub temp: f32,
    pub top_k: usize,
    pub top_p: f32,
    state: u64,
}

impl Sampler {
    pub fn new(temp: f32, top_k: usize, top_p: f32, seed: u64) -> Self {
        Self {
            temp,
            top_k,
            top_p,
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn uniform(&mut self) -> f64 {
        // SplitMix64: reproducible for a seed on every platform.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token for one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        if self.temp <= 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.top_k > 0 {
            idx.truncate(self.top_k);
        }
        let m = logits[idx[0]] as f64;
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - m) / self.temp as f64).exp())
            .collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p.iter().position(|&x| {
                acc += x;
                acc >= self.top_p as f64
            });
            let keep = keep.map_or(p.len(), |k| k + 1);
            p.truncate(keep);
            idx.truncate(keep);
            let z: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= z);
        }
        let mut r = self.uniform();
        for (i, &pi) in p.iter().enumerate() {
            if r < pi {
                return idx[i];
            }
            r -= pi;
        }
        idx[p.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let l = [0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 0, 1.0, 1).sample(&l), 1);
        // top-k 1 is greedy whatever the temperature.
        assert_eq!(Sampler::new(2.0, 1, 1.0, 5).sample(&l), 1);
        // Same seed, same draws; only the top two survive top-p 0.6.
        let draws = |seed| {
            let mut s = Sampler::new(1.0, 0, 0.6, seed);
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert!(draws(3).iter().all(|&t| t == 1 || t == 3));
        assert!(draws(3).contains(&3) && draws(3).contains(&1));
    }
}
