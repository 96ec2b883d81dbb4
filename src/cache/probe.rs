//! The queries a head records before its first flush, and the attention error they see with
//! its first group stored one way or another.
//!
//! Which key form suits a head (plain or Hadamard-rotated per-channel codes) is a question
//! about attention, not about keys: a key error matters only along the queries that read it
//! and only where softmax puts its weight. Key-only measures (squared error, q8_0 error,
//! channel spread) picked the wrong form on most heads of Qwen2.5-Coder-0.5B; the attention
//! error of the queries seen before the first flush, with that group stored each way, picked
//! the form that wins over 2048 tokens on 43 of its 48 heads and 79 of SmolLM2's 90.

use std::sync::Mutex;

/// Queries of positions `0..positions`, one row per (position, query head of the group), as
/// the caller passed them to `attend`. Each row is written by the one call that attends it,
/// so what is recorded does not depend on how a batch was split or threaded.
#[derive(Debug, Default)]
pub(crate) struct QueryProbe {
    inner: Mutex<Recorded>,
}

#[derive(Clone, Debug, Default)]
struct Recorded {
    rep: usize,
    scale: f32,
    q: Vec<f32>,     // [positions][rep][head_dim]
    seen: Vec<bool>, // [positions][rep]
}

/// The recorded queries, taken out of the probe at the first flush.
#[derive(Debug)]
pub(crate) struct Queries {
    pub rep: usize,
    pub scale: f32,
    pub q: Vec<f32>,
    pub seen: Vec<bool>,
}

impl Clone for QueryProbe {
    fn clone(&self) -> Self {
        Self {
            inner: Mutex::new(self.lock().clone()),
        }
    }
}

impl QueryProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A panic elsewhere while holding the lock leaves plain data behind: still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records query row `q` (`[head_dim]`) of position `pos` < `positions` and query head
    /// `j` of the `rep` heads sharing this kv head. Nothing is recorded when the memory for it
    /// cannot be had: the head then decides from its keys alone.
    pub(crate) fn record(
        &self,
        pos: usize,
        j: usize,
        rep: usize,
        positions: usize,
        q: &[f32],
        scale: f32,
    ) {
        let hd = q.len();
        let mut r = self.lock();
        if r.rep != rep || r.q.is_empty() {
            let n = positions * rep;
            let (mut qs, mut seen) = (Vec::new(), Vec::new());
            if qs.try_reserve_exact(n * hd).is_err() || seen.try_reserve_exact(n).is_err() {
                return;
            }
            qs.resize(n * hd, 0.0);
            seen.resize(n, false);
            *r = Recorded {
                rep,
                scale,
                q: qs,
                seen,
            };
        }
        let i = pos * rep + j;
        if i < r.seen.len() {
            r.q[i * hd..(i + 1) * hd].copy_from_slice(q);
            r.seen[i] = true;
            r.scale = scale;
        }
    }

    /// The recorded queries (none when nothing was attended), leaving the probe empty.
    pub(crate) fn take(&self) -> Option<Queries> {
        let r = std::mem::take(&mut *self.lock());
        if !r.seen.iter().any(|&s| s) {
            return None;
        }
        Some(Queries {
            rep: r.rep,
            scale: r.scale,
            q: r.q,
            seen: r.seen,
        })
    }

    pub(crate) fn clear(&self) {
        *self.lock() = Recorded::default();
    }
}

/// Σ over the recorded queries of ‖attention(K̂) − attention(K)‖, causal: the query of
/// position p reads keys `0..=p`. `k`, `k_hat`: `[positions][head_dim]` (`k_hat` differs from
/// `k` only where the first group stores it lossily), `v`: `[positions][head_dim]`.
pub(crate) fn attention_error(qs: &Queries, k: &[f32], k_hat: &[f32], v: &[f32], hd: usize) -> f64 {
    let n_keys = k.len() / hd;
    let mut total = 0f64;
    let (mut sx, mut sy) = (vec![0f32; n_keys], vec![0f32; n_keys]);
    let (mut ox, mut oy) = (vec![0f32; hd], vec![0f32; hd]);
    for (i, q) in qs.q.chunks_exact(hd).enumerate() {
        if !qs.seen[i] {
            continue;
        }
        let keys = (i / qs.rep + 1).min(n_keys);
        for (s, kr) in [(&mut sx, k), (&mut sy, k_hat)] {
            for (t, st) in s[..keys].iter_mut().enumerate() {
                *st = qs.scale * dot(q, &kr[t * hd..(t + 1) * hd]);
            }
        }
        softmax_mix(&mut sx[..keys], v, hd, &mut ox);
        softmax_mix(&mut sy[..keys], v, hd, &mut oy);
        let e: f32 = ox.iter().zip(&oy).map(|(a, b)| (a - b) * (a - b)).sum();
        total += f64::from(e.sqrt());
    }
    total
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out` = Σ_t softmax(s)_t · v_t.
fn softmax_mix(s: &mut [f32], v: &[f32], hd: usize, out: &mut [f32]) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    out.fill(0.0);
    for (t, &p) in s.iter().enumerate() {
        let w = p / sum;
        for (o, &x) in out.iter_mut().zip(&v[t * hd..(t + 1) * hd]) {
            *o += w * x;
        }
    }
}
