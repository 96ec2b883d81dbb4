//! Choosing the next token from logits: greedy, or temperature with top-k / min-p / top-p.

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
    /// Drop tokens less likely than `min_p` times the most likely one (0: off), judged at
    /// temperature 1 as llama.cpp's chain does (min-p before temperature).
    pub min_p: f32,
    state: u64,
}

impl Sampler {
    pub fn new(temp: f32, top_k: usize, top_p: f32, seed: u64) -> Self {
        Self {
            temp,
            top_k,
            top_p,
            min_p: 0.0,
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The same sampler with min-p filtering (`min_p` in [0, 1]).
    pub fn with_min_p(mut self, min_p: f32) -> Self {
        self.min_p = min_p;
        self
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
        if self.min_p > 0.0 {
            // p_i / p_max = exp(l_i - l_max) at temperature 1; idx is sorted, so a prefix stays.
            let floor = m + (self.min_p as f64).ln();
            let keep = idx.partition_point(|&i| logits[i] as f64 >= floor);
            idx.truncate(keep.max(1));
        }
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

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Probabilities at temperature 1 relative to the best: 1, e^-0.1, e^-1, e^-3.
        let l = [3.0f32, 2.9, 2.0, 0.0];
        let draws = |min_p, temp| {
            let mut s = Sampler::new(temp, 0, 1.0, 11).with_min_p(min_p);
            (0..400).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        // min_p 0.5 keeps the two within a factor 2 of the best, whatever the temperature.
        for temp in [1.0, 5.0] {
            let d = draws(0.5, temp);
            assert!(d.iter().all(|&t| t == 0 || t == 1), "temp {temp}");
            assert!(d.contains(&0) && d.contains(&1));
        }
        // 0.2 lets token 2 (e^-1 = 0.37) in but not token 3 (e^-3 = 0.05).
        let d = draws(0.2, 1.0);
        assert!(d.contains(&2) && !d.contains(&3));
        // Off, every token shows up at a high temperature.
        assert!(draws(0.0, 50.0).contains(&3));
        // min_p 1 keeps only the best.
        assert!(draws(1.0, 5.0).iter().all(|&t| t == 0));
    }
}
