//! `F16Attention`: a plain f16 KV cache on the device and `kernels/f16_attend.cu` over it —
//! the speed reference for the OTT kernel, checked against [`f16_attend_ref`].

use std::sync::Arc;

use half::f16;

use super::launch::{launch, sys, Guarded};
use super::ott_attend::{self, SplitPlan, SplitScratch};
use super::{CudaError, Device};

/// K and V of `n_seq` sequences, `[n_seq][n_head_kv][cap][head_dim]` f16 each.
pub struct F16Attention {
    dev: Arc<Device>,
    k: Guarded<u16>,
    v: Guarded<u16>,
    n_seq: usize,
    n_head_kv: usize,
    head_dim: usize,
    cap: usize,
    len: usize,
}

/// The last call's device buffers, kept so that a benchmark can relaunch without allocating.
pub struct F16Prepared {
    args: sys::ottkv_f16_attend_args,
    plan: SplitPlan,
    rows: usize,
    _q: Guarded<f32>,
    scratch: SplitScratch,
}

impl F16Attention {
    pub fn new(
        dev: Arc<Device>,
        n_seq: usize,
        n_head_kv: usize,
        head_dim: usize,
        cap: usize,
    ) -> Result<Self, CudaError> {
        ott_attend::check_head_dim(head_dim)?;
        if n_seq == 0 || n_head_kv == 0 || cap == 0 {
            return Err(CudaError::Shape("f16 attention: empty shape".into()));
        }
        let n = n_seq * n_head_kv * cap * head_dim;
        Ok(Self {
            k: Guarded::new(&dev, "f16 keys", n)?,
            v: Guarded::new(&dev, "f16 values", n)?,
            dev,
            n_seq,
            n_head_kv,
            head_dim,
            cap,
            len: 0,
        })
    }

    /// Sets the held tokens: `k`, `v` as f16 bit patterns `[n_seq][n_head_kv][len][head_dim]`.
    pub fn set(&mut self, k: &[u16], v: &[u16], len: usize) -> Result<(), CudaError> {
        let row = self.n_head_kv * self.head_dim;
        if len > self.cap || k.len() != self.n_seq * row * len || v.len() != k.len() {
            return Err(CudaError::Shape(format!(
                "f16 attention: {} / {} values for {len} tokens (cap {})",
                k.len(),
                v.len(),
                self.cap
            )));
        }
        let hd = self.head_dim;
        for sh in 0..self.n_seq * self.n_head_kv {
            let src = sh * len * hd..(sh + 1) * len * hd;
            self.k
                .upload(&self.dev, sh * self.cap * hd, &k[src.clone()])?;
            self.v.upload(&self.dev, sh * self.cap * hd, &v[src])?;
        }
        self.len = len;
        Ok(())
    }

    /// Declares the first `len` tokens held without uploading them (their content stays as
    /// allocated: zeros). For speed measurements only.
    pub fn set_len_unfilled(&mut self, len: usize) -> Result<(), CudaError> {
        if len > self.cap {
            return Err(CudaError::Shape(format!(
                "{len} tokens above cap {}",
                self.cap
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Bytes of K and V the attention reads per call.
    pub fn bytes_read(&self) -> usize {
        self.n_seq * self.n_head_kv * self.len * self.head_dim * 2 * 2
    }

    /// Builds the launch for `q: [n_seq][n_q][n_head][head_dim]` over the held tokens (the
    /// last `n_q` of which are the queries' own, causally).
    pub fn prepare(
        &self,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        scale: f32,
    ) -> Result<F16Prepared, CudaError> {
        let (nkv, hd) = (self.n_head_kv, self.head_dim);
        let rows = self.n_seq * n_q * n_head;
        if n_head == 0 || n_head % nkv != 0 || n_q == 0 || n_q > self.len || q.len() != rows * hd {
            return Err(CudaError::Shape(format!(
                "f16 attention: n_head {n_head}, n_q {n_q}, {} query values, {} tokens held",
                q.len(),
                self.len
            )));
        }
        let dev = &*self.dev;
        let plan = ott_attend::plan_splits(
            dev,
            self.len,
            ott_attend::row_blocks(n_head, nkv) * n_q * self.n_seq,
        );
        let mut qd = Guarded::<f32>::new(dev, "queries", q.len())?;
        qd.upload(dev, 0, q)?;
        let scratch = SplitScratch::new(dev, rows, plan, hd)?;
        let args = sys::ottkv_f16_attend_args {
            k: self.k.addr(dev),
            v: self.v.addr(dev),
            q: qd.addr(dev),
            part_o: scratch.part_o.addr(dev),
            part_ml: scratch.part_ml.addr(dev),
            out: scratch.out.addr(dev),
            n_seq: self.n_seq as u32,
            n_q: n_q as u32,
            n_head: n_head as u32,
            n_head_kv: nkv as u32,
            head_dim: hd as u32,
            cap: self.cap as u32,
            len: self.len as u32,
            n_split: plan.n_split,
            split_len: plan.split_len,
            scale,
        };
        Ok(F16Prepared {
            args,
            plan,
            rows,
            _q: qd,
            scratch,
        })
    }

    /// Launches a prepared call (both kernels); the result stays on the device.
    pub fn launch(&self, p: &F16Prepared) -> Result<(), CudaError> {
        let a = &p.args;
        let grid = (
            a.n_split,
            ott_attend::row_blocks(a.n_head as usize, a.n_head_kv as usize) as u32,
            a.n_seq * a.n_q,
        );
        // SAFETY: `p` was built by `prepare` from this cache's buffers and its own q and
        // scratch, which it owns, for exactly these shapes.
        unsafe {
            launch(
                &self.dev,
                "f16_attend",
                "f16_attend",
                grid,
                sys::OTTKV_ATTEND_THREADS,
                ott_attend::attend_shared_bytes(self.head_dim, a.split_len),
                a,
            )?;
        }
        ott_attend::merge(&self.dev, &p.scratch, p.rows, p.plan, self.head_dim)
    }

    /// Launches, then downloads `[n_seq][n_q][n_head][head_dim]` and checks the guards.
    pub fn attend(
        &self,
        q: &[f32],
        n_q: usize,
        n_head: usize,
        scale: f32,
    ) -> Result<Vec<f32>, CudaError> {
        let p = self.prepare(q, n_q, n_head, scale)?;
        self.launch(&p)?;
        let out = p
            .scratch
            .out
            .download(&self.dev, 0..p.rows * self.head_dim)?;
        p.scratch.check(&self.dev)?;
        self.k.check(&self.dev)?;
        self.v.check(&self.dev)?;
        Ok(out)
    }
}

/// Scalar reference of the f16 attention: same inputs, plain softmax in f32.
#[allow(clippy::too_many_arguments)]
pub fn f16_attend_ref(
    k: &[u16],
    v: &[u16],
    q: &[f32],
    n_seq: usize,
    n_head_kv: usize,
    head_dim: usize,
    len: usize,
    n_q: usize,
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let hd = head_dim;
    let rep = n_head / n_head_kv;
    let mut out = vec![0f32; n_seq * n_q * n_head * hd];
    let h2f = |x: u16| f16::from_bits(x).to_f32();
    for s in 0..n_seq {
        for i in 0..n_q {
            let vis = len - n_q + i + 1;
            for h in 0..n_head {
                let kv = (s * n_head_kv + h / rep) * len * hd;
                let qr = &q[((s * n_q + i) * n_head + h) * hd..][..hd];
                let sc: Vec<f32> = (0..vis)
                    .map(|t| {
                        (0..hd)
                            .map(|c| qr[c] * h2f(k[kv + t * hd + c]))
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|x| (x - m).exp()).collect();
                let l: f32 = e.iter().sum();
                let o = &mut out[((s * n_q + i) * n_head + h) * hd..][..hd];
                for (t, p) in e.iter().enumerate() {
                    for c in 0..hd {
                        o[c] += p / l * h2f(v[kv + t * hd + c]);
                    }
                }
            }
        }
    }
    out
}
