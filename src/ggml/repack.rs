//! ggml's CPU "extra" buffer types: weights copied into the layout the CPU's SIMD matmul
//! kernels read fastest (Q4_0/Q4_K/Q5_K/Q6_K/Q8_0/IQ4_NL interleaved rows on AVX2 or NEON).
//! llama.cpp puts every weight an extra buffer type accepts there by default; those kernels
//! accumulate in another order than the plain `vec_dot`, so an engine that wants llama.cpp's
//! logits bit for bit has to do the same, and gets the faster prompt processing with it.
//!
//! A weight is offered to each extra buffer type in turn, the way llama.cpp's loader asks:
//! a dummy `mul_mat(w, [ne0, 512])` is built and the CPU device is asked whether it supports
//! that op with `w` in the candidate buffer type.

use super::sys;
use super::{Context, TensorId};
use crate::error::{Error, Result};
use std::ptr::NonNull;

/// One weight to place: its ggml type, shape and bytes (the GGUF mapping).
pub struct Candidate<'a> {
    pub ty: sys::ggml_type,
    pub ne: Vec<i64>,
    pub data: &'a [u8],
}

/// Weights held by extra buffer types: the contexts their tensors live in and the buffers
/// that own the (repacked) data.
pub struct ExtraWeights {
    // Buffers before contexts: a buffer's data is what its context's tensors point to, and both
    // are only freed together, on drop.
    buffers: Vec<NonNull<sys::ggml_backend_buffer>>,
    _contexts: Vec<Context>,
    bytes: usize,
}

// SAFETY: the buffers are only written while building; afterwards ggml only reads weights,
// and the buffers have no thread affinity (CPU memory).
unsafe impl Send for ExtraWeights {}
unsafe impl Sync for ExtraWeights {}

impl ExtraWeights {
    /// Places every candidate that an extra buffer type accepts; returns, per candidate, the
    /// tensor holding its repacked copy (`None`: keep the plain tensor over the mapping).
    pub fn place(cands: &[Candidate<'_>]) -> Result<(Self, Vec<Option<TensorId>>)> {
        let mut out = ExtraWeights {
            buffers: Vec::new(),
            _contexts: Vec::new(),
            bytes: 0,
        };
        let mut placed = vec![None; cands.len()];
        let (dev, bufts) = extra_buffer_types();
        let Some(dev) = dev else {
            return Ok((out, placed));
        };
        let mut by_buft: Vec<Vec<usize>> = vec![Vec::new(); bufts.len()];
        for (i, c) in cands.iter().enumerate() {
            if c.ne.len() != 2 {
                continue;
            }
            for (b, &buft) in bufts.iter().enumerate() {
                if supports_mul_mat(dev, buft, c)? {
                    by_buft[b].push(i);
                    break;
                }
            }
        }
        for (b, idx) in by_buft.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let ctx = Context::new(Context::overhead(idx.len(), 0), true)?;
            let mut ts = Vec::with_capacity(idx.len());
            for &i in idx {
                ts.push(ctx.new_tensor(cands[i].ty, &cands[i].ne)?.as_ptr());
            }
            // SAFETY: a live no_alloc context whose tensors have no data yet; buft is one of
            // the CPU device's extra buffer types (static). Null means out of memory.
            let buf =
                unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.as_ptr(), bufts[b]) };
            let buf = NonNull::new(buf).ok_or_else(|| {
                Error::Ggml("could not allocate the repacked weights (out of memory?)".into())
            })?;
            out.buffers.push(buf);
            // SAFETY: live buffer.
            out.bytes += unsafe { sys::ggml_backend_buffer_get_size(buf.as_ptr()) };
            for (&i, &t) in idx.iter().zip(&ts) {
                // SAFETY: t was allocated in buf just above; the data slice is exactly the
                // tensor's bytes (the caller passes the GGUF view the parser sized), and
                // set_tensor repacks it into the buffer's layout.
                unsafe {
                    let n = sys::ggml_nbytes(t);
                    if n != cands[i].data.len() {
                        return Err(Error::Ggml(format!(
                            "repack: {} bytes for a tensor of {n}",
                            cands[i].data.len()
                        )));
                    }
                    sys::ggml_backend_tensor_set(t, cands[i].data.as_ptr().cast(), 0, n);
                }
                placed[i] = TensorId::from_raw(t);
            }
            out._contexts.push(ctx);
        }
        Ok((out, placed))
    }

    /// Bytes the repacked copies take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for ExtraWeights {
    fn drop(&mut self) {
        for b in &self.buffers {
            // SAFETY: each buffer was allocated by us and is freed once.
            unsafe { sys::ggml_backend_buffer_free(b.as_ptr()) }
        }
    }
}

/// The CPU device and its extra buffer types (none when ggml was built without them).
fn extra_buffer_types() -> (
    Option<sys::ggml_backend_dev_t>,
    Vec<sys::ggml_backend_buffer_type_t>,
) {
    // SAFETY: device registry lookups on the statically registered CPU backend.
    unsafe {
        let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
        if dev.is_null() {
            return (None, Vec::new());
        }
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        let f = sys::ggml_backend_reg_get_proc_address(
            reg,
            c"ggml_backend_dev_get_extra_bufts".as_ptr(),
        );
        if f.is_null() {
            return (Some(dev), Vec::new());
        }
        // SAFETY: the registry returns this symbol with exactly this signature.
        let f: unsafe extern "C" fn(
            sys::ggml_backend_dev_t,
        ) -> *mut sys::ggml_backend_buffer_type_t = std::mem::transmute(f);
        let mut list = Vec::new();
        let mut p = f(dev);
        while !p.is_null() && !(*p).is_null() {
            list.push(*p);
            p = p.add(1);
        }
        (Some(dev), list)
    }
}

/// Whether `dev` runs `mul_mat(w, [ne0, 512])` with `w` in `buft` (llama.cpp's test).
fn supports_mul_mat(
    dev: sys::ggml_backend_dev_t,
    buft: sys::ggml_backend_buffer_type_t,
    c: &Candidate<'_>,
) -> Result<bool> {
    let tmp = Context::new(Context::overhead(4, 0), true)?;
    let w = tmp.new_tensor(c.ty, &c.ne)?;
    let b = tmp.new_tensor(sys::GGML_TYPE_F32, &[c.ne[0], 512])?;
    // SAFETY: both tensors live in `tmp` (no_alloc: no data is touched); the zero-size dummy
    // buffer only carries the buffer type for the check and is freed before returning.
    unsafe {
        let op = sys::ggml_mul_mat(tmp.as_ptr(), w.as_ptr(), b.as_ptr());
        if op.is_null() {
            return Ok(false);
        }
        let dummy = sys::ggml_backend_buft_alloc_buffer(buft, 0);
        if dummy.is_null() {
            return Ok(false);
        }
        (*w.as_ptr()).buffer = dummy;
        let ok = sys::ggml_backend_dev_supports_op(dev, op);
        (*w.as_ptr()).buffer = std::ptr::null_mut();
        sys::ggml_backend_buffer_free(dummy);
        Ok(ok)
    }
}
