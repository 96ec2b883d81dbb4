//! Rows of one head kept outside the quantized groups (window, sinks, pools): f16, or 8-bit
//! blocks as llama.cpp's q8_0 (`d = max|x| / 127` stored as f16, `x ≈ d·q`).
//!
//! The window is what makes per-channel key groups cost memory (R + G tokens per head, held
//! all the time); at 8 bits it costs half, for an error far below the 2- and 3-bit codes'.

use half::{f16, slice::HalfFloatSliceExt};

use super::CacheError;

/// An empty vector with room for exactly `cap` elements, or [`CacheError::Alloc`].
pub(crate) fn try_vec<T>(cap: usize, what: &'static str) -> Result<Vec<T>, CacheError> {
    let mut v = Vec::new();
    v.try_reserve_exact(cap).map_err(|e| CacheError::Alloc {
        what,
        detail: format!("{cap} elements of {} bytes: {e}", std::mem::size_of::<T>()),
    })?;
    Ok(v)
}

/// Storage precision of the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowPrecision {
    F16,
    /// Symmetric 8-bit codes per block of `block` values with one f16 scale.
    Q8 {
        block: usize,
    },
}

impl RowPrecision {
    /// Precision for `bits` (16 or 8) at a head size: q8 blocks are 32 values as in llama.cpp,
    /// or the largest power of two dividing head_dim when that is smaller.
    pub fn new(bits: u32, head_dim: usize) -> Self {
        if bits == 16 {
            Self::F16
        } else {
            let pow2 = 1usize << head_dim.trailing_zeros();
            Self::Q8 {
                block: pow2.min(32),
            }
        }
    }

    /// Bytes one row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F16 => 2 * head_dim,
            Self::Q8 { block } => head_dim + 2 * (head_dim / block),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Rows {
    hd: usize,
    prec: RowPrecision,
    f16: Vec<f16>,    // [rows][head_dim] (F16)
    codes: Vec<i8>,   // [rows][head_dim] (Q8)
    scales: Vec<f16>, // [rows][head_dim / block] (Q8)
}

impl Rows {
    /// Empty rows with room for exactly `cap` rows (allocated now, never grown).
    pub(crate) fn with_capacity(prec: RowPrecision, hd: usize, cap: usize) -> Self {
        let (nf, nc, ns) = Self::sizes(prec, hd, cap);
        Self {
            hd,
            prec,
            f16: Vec::with_capacity(nf),
            codes: Vec::with_capacity(nc),
            scales: Vec::with_capacity(ns),
        }
    }

    /// [`Self::with_capacity`], failing instead of aborting when the memory is not there.
    pub(crate) fn try_with_capacity(
        prec: RowPrecision,
        hd: usize,
        cap: usize,
        what: &'static str,
    ) -> Result<Self, CacheError> {
        let (nf, nc, ns) = Self::sizes(prec, hd, cap);
        Ok(Self {
            hd,
            prec,
            f16: try_vec(nf, what)?,
            codes: try_vec(nc, what)?,
            scales: try_vec(ns, what)?,
        })
    }

    /// Elements of (f16, codes, scales) for `cap` rows.
    fn sizes(prec: RowPrecision, hd: usize, cap: usize) -> (usize, usize, usize) {
        match prec {
            RowPrecision::F16 => (cap * hd, 0, 0),
            RowPrecision::Q8 { block } => (0, cap * hd, cap * (hd / block)),
        }
    }

    fn per_row_scales(&self) -> usize {
        match self.prec {
            RowPrecision::F16 => 0,
            RowPrecision::Q8 { block } => self.hd / block,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self.prec {
            RowPrecision::F16 => self.f16.len() / self.hd,
            RowPrecision::Q8 { .. } => self.codes.len() / self.hd,
        }
    }

    /// Rows that fit without reallocating.
    pub(crate) fn capacity(&self) -> usize {
        match self.prec {
            RowPrecision::F16 => self.f16.capacity() / self.hd,
            RowPrecision::Q8 { .. } => self.codes.capacity() / self.hd,
        }
    }

    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        2 * self.f16.capacity() + self.codes.capacity() + 2 * self.scales.capacity()
    }

    /// Appends one row (finite, within f16 range: checked by the cache's caller).
    pub(crate) fn push(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len(), self.hd);
        match self.prec {
            RowPrecision::F16 => self.f16.extend(x.iter().map(|&v| f16::from_f32(v))),
            RowPrecision::Q8 { block } => {
                for b in x.chunks_exact(block) {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    self.scales.push(f16::from_f32(d));
                    self.codes.extend(
                        b.iter()
                            .map(|&v| (v * id).round().clamp(-127.0, 127.0) as i8),
                    );
                }
            }
        }
    }

    /// Appends row `i` of `other` (same precision and head size) without re-quantizing it.
    pub(crate) fn push_from(&mut self, other: &Rows, i: usize) {
        debug_assert!(self.prec == other.prec && self.hd == other.hd);
        let hd = self.hd;
        match self.prec {
            RowPrecision::F16 => self.f16.extend_from_slice(&other.f16[i * hd..(i + 1) * hd]),
            RowPrecision::Q8 { .. } => {
                let ns = self.per_row_scales();
                self.codes
                    .extend_from_slice(&other.codes[i * hd..(i + 1) * hd]);
                self.scales
                    .extend_from_slice(&other.scales[i * ns..(i + 1) * ns]);
            }
        }
    }

    /// Rows `[from, to)` as f32 into `out` (`[(to - from) · head_dim]`).
    pub(crate) fn to_f32(&self, from: usize, to: usize, out: &mut [f32]) {
        let hd = self.hd;
        debug_assert!(from <= to && to <= self.len() && out.len() == (to - from) * hd);
        match self.prec {
            RowPrecision::F16 => self.f16[from * hd..to * hd].convert_to_f32_slice(out),
            RowPrecision::Q8 { block } => {
                let codes = &self.codes[from * hd..to * hd];
                let scales = &self.scales[from * hd / block..to * hd / block];
                for ((o, c), d) in out
                    .chunks_exact_mut(block)
                    .zip(codes.chunks_exact(block))
                    .zip(scales)
                {
                    let d = d.to_f32();
                    for (o, &c) in o.iter_mut().zip(c) {
                        *o = f32::from(c) * d;
                    }
                }
            }
        }
    }

    /// Row `i` as f32.
    pub(crate) fn row_f32(&self, i: usize) -> Vec<f32> {
        let mut r = vec![0f32; self.hd];
        self.to_f32(i, i + 1, &mut r);
        r
    }

    /// Removes the first `n` rows.
    pub(crate) fn drain_front(&mut self, n: usize) {
        let ns = self.per_row_scales();
        match self.prec {
            RowPrecision::F16 => drop(self.f16.drain(..n * self.hd)),
            RowPrecision::Q8 { .. } => {
                self.codes.drain(..n * self.hd);
                self.scales.drain(..n * ns);
            }
        }
    }

    /// Rewrites every row through `f` (`[head_dim]` in f32), re-quantizing q8 rows; capacity
    /// is kept.
    pub(crate) fn map_rows(&mut self, mut f: impl FnMut(&mut [f32])) {
        let n = self.len();
        let mut all = vec![0f32; n * self.hd]; // [rows][head_dim]
        self.to_f32(0, n, &mut all);
        self.clear();
        for row in all.chunks_mut(self.hd) {
            f(row);
            self.push(row);
        }
    }

    /// The same rows in precision `prec`, with room for exactly as many rows as `self`.
    pub(crate) fn converted(&self, prec: RowPrecision) -> Rows {
        let mut out = Rows::with_capacity(prec, self.hd, self.capacity());
        let mut row = vec![0f32; self.hd];
        for i in 0..self.len() {
            self.to_f32(i, i + 1, &mut row);
            out.push(&row);
        }
        out
    }

    /// Removes every row (capacity kept).
    pub(crate) fn clear(&mut self) {
        self.f16.clear();
        self.codes.clear();
        self.scales.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_rows_match_llama_q8_0_rounding_and_copy_exactly() {
        let hd = 64;
        let x: Vec<f32> = (0..hd)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        let prec = RowPrecision::new(8, hd);
        assert_eq!(prec, RowPrecision::Q8 { block: 32 });
        let mut a = Rows::with_capacity(prec, hd, 2);
        a.push(&x);
        a.push(&vec![0.0; hd]);
        let back = a.row_f32(0);
        for (blk, (xb, bb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0).to_f32();
            for (v, b) in xb.iter().zip(bb) {
                assert!(
                    (v - b).abs() <= 0.5 * d + 1e-3 * amax,
                    "block {blk}: {v} vs {b}"
                );
            }
        }
        assert_eq!(a.row_f32(1), vec![0.0; hd], "an all-zero row stays exact");
        let mut c = Rows::with_capacity(prec, hd, 1);
        c.push_from(&a, 0);
        assert_eq!(c.row_f32(0), back, "copies are not re-quantized");
        assert_eq!(a.bytes(), 2 * prec.row_bytes(hd));
        a.drain_front(1);
        assert_eq!((a.len(), a.row_f32(0)), (1, vec![0.0; hd]));
        assert_eq!(RowPrecision::new(8, 8), RowPrecision::Q8 { block: 8 });
        assert_eq!(RowPrecision::new(8, 96), RowPrecision::Q8 { block: 32 });
        assert_eq!(RowPrecision::new(8, 40), RowPrecision::Q8 { block: 8 });
    }

    #[test]
    fn f16_rows_are_plain_f16() {
        let hd = 8;
        let mut a = Rows::with_capacity(RowPrecision::F16, hd, 3);
        let x: Vec<f32> = (0..hd).map(|i| i as f32 / 3.0).collect();
        a.push(&x);
        let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        assert_eq!(a.row_f32(0), want);
        assert_eq!((a.bytes(), a.capacity()), (2 * hd * 3, 3));
    }
}
