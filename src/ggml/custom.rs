//! A safe custom ggml op: ggml calls `CustomOp::compute` from each of its worker threads, each
//! with its own disjoint slice of the output rows, so Rust code can run inside a ggml graph
//! (this is how our KV cache sits in the engine's graph).

use super::context::{Context, Tensor};
use super::sys;
use crate::error::{Error, Result};
use std::ffi::{c_int, c_void};
use std::ops::Range;

/// Work a custom op does. `compute` runs concurrently on ggml's threads (hence `Sync`), and
/// must not panic across the FFI boundary: the trampoline catches panics and reports them
/// through `fail`, as it does for returned errors.
pub trait CustomOp: Sync {
    /// Computes the output rows `rows` (rows are `ne[0]` floats; flattened over ne[1..]) into
    /// `out`, which holds exactly those rows. `args` are the op's inputs, f32, contiguous.
    fn compute(
        &self,
        args: &[&[f32]],
        rows: Range<usize>,
        out: &mut [f32],
    ) -> std::result::Result<(), String>;
    /// Records a failure; the graph's owner checks for it after compute.
    fn fail(&self, msg: String);
    /// Whether the rows may be split over ggml's threads; if not, thread 0 alone computes them
    /// all (ggml calls every op from every thread, whatever its task count).
    fn parallel(&self) -> bool;
}

unsafe extern "C" fn trampoline<T: CustomOp>(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    user: *mut c_void,
) {
    let ith_raw = ith;
    // SAFETY: `user` is the `&T` given to `custom_op`, which outlives every compute of the
    // graph (the lifetime 'c ties it to the context the graph lives in).
    let op = unsafe { &*(user as *const T) };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: dst is the live op node; ggml computed its sources before calling us.
        let d = unsafe { &*dst };
        let mut args: Vec<&[f32]> = Vec::new();
        for &s in d.src.iter().take_while(|s| !s.is_null()) {
            // SAFETY: sources were checked to be contiguous f32 when the op was built; their
            // data is allocated and not written while this node runs (ggml orders nodes).
            let n = unsafe { sys::ggml_nelements(s) } as usize;
            args.push(unsafe { std::slice::from_raw_parts((*s).data as *const f32, n) });
        }
        let row = d.ne[0] as usize;
        let rows = (d.ne[1] * d.ne[2] * d.ne[3]) as usize;
        let (ith, nth) = if op.parallel() {
            (ith.max(0) as usize, nth.max(1) as usize)
        } else {
            (0, 1)
        };
        if !op.parallel() && ith_raw != 0 {
            return Ok(());
        }
        let r = rows * ith / nth..rows * (ith + 1) / nth;
        // SAFETY: dst is a contiguous f32 tensor of rows*row floats (built by custom_op); each
        // thread gets the disjoint row range r, so no two threads alias.
        let out = unsafe {
            std::slice::from_raw_parts_mut((d.data as *mut f32).add(r.start * row), r.len() * row)
        };
        op.compute(&args, r, out)
    }));
    match run {
        Ok(Ok(())) => {}
        Ok(Err(e)) => op.fail(e),
        Err(_) => op.fail("panic inside a custom ggml op".into()),
    }
}

impl Context {
    /// A custom op producing an f32 tensor of shape `ne` from `args` (contiguous f32), its
    /// rows split over the graph's threads when `op.parallel()`.
    pub fn custom_op<'c, T: CustomOp>(
        &'c self,
        ne: [i64; 4],
        args: &[Tensor<'c>],
        op: &'c T,
    ) -> Result<Tensor<'c>> {
        let n_tasks = if op.parallel() { -1 } else { 1 };
        for (i, a) in args.iter().enumerate() {
            // SAFETY: valid tensor.
            if a.ty() != sys::GGML_TYPE_F32 || !unsafe { sys::ggml_is_contiguous(a.as_ptr()) } {
                return Err(Error::Ggml(format!(
                    "custom op arg {i} must be contiguous f32 ({:?})",
                    a.ne()
                )));
            }
        }
        // SAFETY: the trampoline does not unwind and only reads args / writes dst rows; `op`
        // lives for 'c, as long as any graph of this context can be computed.
        unsafe {
            self.custom_4d(
                ne,
                args,
                Some(trampoline::<T>),
                n_tasks,
                op as *const T as *mut c_void,
            )
        }
    }

    /// `a @ b` marked, as llama.cpp marks its rotations, with "a is a Hadamard matrix" (ggml
    /// may then use a fast transform).
    pub fn mul_mat_hadamard<'c>(&'c self, h: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let t = self.mul_mat(h, b)?;
        // SAFETY: t is a mul_mat node.
        unsafe { sys::ggml_mul_mat_set_hint(t.as_ptr(), sys::GGML_HINT_SRC0_IS_HADAMARD) };
        Ok(t)
    }

    /// Flash attention as llama.cpp configures it (f32 accumulation).
    pub fn flash_attn_f32acc<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        let t = self.flash_attn_ext(q, k, v, mask, scale)?;
        // SAFETY: t is a flash_attn_ext node.
        unsafe { sys::ggml_prec_set_acc(t.as_ptr(), sys::GGML_PREC_F32) };
        Ok(t)
    }
}

impl Tensor<'_> {
    /// Fills an allocated tensor with zero bytes.
    pub fn zero(&self) -> Result<()> {
        if self.bytes().is_err() {
            return Err(Error::Ggml(
                "zero: tensor is not allocated and contiguous".into(),
            ));
        }
        // SAFETY: allocated (checked).
        unsafe { sys::ggml_set_zero(self.as_ptr()) };
        Ok(())
    }
}
