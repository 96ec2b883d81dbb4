//! Safe owners over a ggml context, its tensors and graphs.
//!
//! ggml reports most misuse with `GGML_ASSERT`, which aborts the process; so every wrapper here
//! checks types and shapes first and returns `Error::Ggml` instead of letting ggml see bad input.

use super::sys;
use crate::error::{Error, Result};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// Owner of one `ggml_context` (an arena: tensors and graphs live until it is dropped).
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
    no_alloc: bool,
}

// SAFETY: a ggml context is a plain arena with no thread affinity. It is Send but not Sync,
// so allocation through `&self` never happens on two threads at once.
unsafe impl Send for Context {}

impl Context {
    /// An arena of `mem_size` bytes. With `no_alloc`, tensors get metadata only and their data
    /// must be set to memory owned elsewhere (for instance a model's memory map).
    pub fn new(mem_size: usize, no_alloc: bool) -> Result<Self> {
        super::log::install();
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: std::ptr::null_mut(),
            no_alloc,
        };
        // SAFETY: params are plain values; ggml_init returns null when it cannot allocate.
        let raw = unsafe { sys::ggml_init(params) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| Error::Ggml(format!("ggml_init failed for a {mem_size}-byte arena")))?;
        Ok(Self { ptr, no_alloc })
    }

    pub fn as_ptr(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    /// Bytes of the arena still free, so callers can fail cleanly before ggml would abort.
    fn mem_free(&self) -> usize {
        // SAFETY: the context is live.
        unsafe { sys::ggml_get_mem_size(self.as_ptr()) - sys::ggml_used_mem(self.as_ptr()) }
    }

    fn check_room(&self, bytes: usize) -> Result<()> {
        // Tensor and graph headers are small; 1 KiB covers the object header plus padding.
        if self.mem_free() < bytes + 1024 {
            return Err(Error::Ggml(format!(
                "ggml context out of memory: need {} bytes, {} free",
                bytes + 1024,
                self.mem_free()
            )));
        }
        Ok(())
    }

    /// A new tensor of `ty` with shape `ne` (innermost first, 1 to 4 dims).
    pub fn new_tensor(&self, ty: sys::ggml_type, ne: &[i64]) -> Result<Tensor<'_>> {
        if ne.is_empty() || ne.len() > 4 || ne.iter().any(|&d| d <= 0) {
            return Err(Error::Ggml(format!("bad tensor shape {ne:?}")));
        }
        if ty >= sys::GGML_TYPE_COUNT {
            return Err(Error::Ggml(format!("unknown ggml type {ty}")));
        }
        // SAFETY: ty < GGML_TYPE_COUNT; these only read the static type table.
        let (blck, tsize) = unsafe { (sys::ggml_blck_size(ty), sys::ggml_type_size(ty)) };
        if blck <= 0 || tsize == 0 || ne[0] % blck != 0 {
            return Err(Error::Ggml(format!(
                "shape {ne:?} does not fit ggml type {ty} (block {blck})"
            )));
        }
        let bytes = ne
            .iter()
            .skip(1)
            .try_fold((ne[0] / blck) as usize * tsize, |acc, &d| {
                acc.checked_mul(d as usize)
            })
            .ok_or_else(|| Error::Ggml(format!("tensor shape {ne:?} overflows")))?;
        self.check_room(if self.no_alloc { 0 } else { bytes })?;
        // SAFETY: shape and type validated above, room checked, context live.
        let raw = unsafe { sys::ggml_new_tensor(self.as_ptr(), ty, ne.len() as i32, ne.as_ptr()) };
        Tensor::from_raw(raw)
    }

    pub fn new_f32(&self, ne: &[i64]) -> Result<Tensor<'_>> {
        self.new_tensor(sys::GGML_TYPE_F32, ne)
    }

    /// `a @ b` in ggml's convention: `a [k, m]`, `b [k, n]` → `[m, n]` (b broadcast over a's
    /// higher dims when they divide).
    pub fn mul_mat<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let (na, nb) = (a.ne(), b.ne());
        if na[0] != nb[0] || nb[2] % na[2] != 0 || nb[3] % na[3] != 0 {
            return Err(Error::Ggml(format!(
                "mul_mat shapes {na:?} x {nb:?} do not match"
            )));
        }
        self.check_room(0)?;
        // SAFETY: shapes checked; both tensors belong to this context (same lifetime).
        Tensor::from_raw(unsafe { sys::ggml_mul_mat(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    /// Elementwise `a + b`, b repeated over a when its dims divide a's.
    pub fn add<'c>(&'c self, a: Tensor<'c>, b: Tensor<'c>) -> Result<Tensor<'c>> {
        let (na, nb) = (a.ne(), b.ne());
        if (0..4).any(|i| na[i] % nb[i] != 0) {
            return Err(Error::Ggml(format!(
                "add: {nb:?} cannot repeat over {na:?}"
            )));
        }
        self.check_room(0)?;
        // SAFETY: shapes checked; both tensors belong to this context.
        Tensor::from_raw(unsafe { sys::ggml_add(self.as_ptr(), a.as_ptr(), b.as_ptr()) })
    }

    /// ggml's fused attention, as llama.cpp calls it: `q [d, n_q, n_head]` (f32),
    /// `k [d, n_kv, n_head_kv]`, `v [d, n_kv, n_head_kv]` (f16 or a quantized type), optional
    /// `mask [n_kv, n_q_pad]` (f16, at least n_q rows) → the
    /// output `[d, n_head, n_q]` (permuted, as ggml returns it).
    pub fn flash_attn_ext<'c>(
        &'c self,
        q: Tensor<'c>,
        k: Tensor<'c>,
        v: Tensor<'c>,
        mask: Option<Tensor<'c>>,
        scale: f32,
    ) -> Result<Tensor<'c>> {
        let (nq, nk, nv) = (q.ne(), k.ne(), v.ne());
        let ok = q.ty() == sys::GGML_TYPE_F32
            && nq[0] == nk[0]
            && nk[1] == nv[1]
            && nk[2] == nv[2]
            && nk[2] > 0
            && nq[2] % nk[2] == 0
            && nq[3] % nk[3] == 0;
        if !ok {
            return Err(Error::Ggml(format!(
                "flash_attn_ext: q {nq:?} k {nk:?} v {nv:?} do not match"
            )));
        }
        if let Some(m) = mask {
            let nm = m.ne();
            if m.ty() != sys::GGML_TYPE_F16 || nm[0] != nk[1] || nm[1] < nq[1] {
                return Err(Error::Ggml(format!(
                    "flash_attn_ext: mask {nm:?} does not fit k {nk:?} / q {nq:?}"
                )));
            }
        }
        self.check_room(0)?;
        let mp = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: shapes and types checked as ggml asserts them; all tensors from this context.
        Tensor::from_raw(unsafe {
            sys::ggml_flash_attn_ext(
                self.as_ptr(),
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                mp,
                scale,
                0.0,
                0.0,
            )
        })
    }

    /// The forward graph ending at `out`, built once and computable many times.
    pub fn build_graph<'c>(&'c self, out: Tensor<'c>) -> Result<Graph<'c>> {
        // SAFETY: context live.
        let need = unsafe { sys::ggml_graph_overhead() };
        self.check_room(need)?;
        // SAFETY: context live; the graph is allocated in it.
        let graph = unsafe { sys::ggml_new_graph(self.as_ptr()) };
        let ptr = NonNull::new(graph).ok_or_else(|| Error::Ggml("ggml_new_graph failed".into()))?;
        // SAFETY: graph and tensor are from this context.
        unsafe { sys::ggml_build_forward_expand(graph, out.as_ptr()) };
        Ok(Graph {
            ptr,
            _ctx: PhantomData,
        })
    }

    /// Builds the graph ending at `out` and computes it once with `threads` threads.
    pub fn compute<'c>(&'c self, out: Tensor<'c>, threads: usize) -> Result<()> {
        self.build_graph(out)?.compute(threads)
    }
}

/// A computation graph inside a `Context`.
pub struct Graph<'ctx> {
    ptr: NonNull<sys::ggml_cgraph>,
    _ctx: PhantomData<&'ctx Context>,
}

impl Graph<'_> {
    /// Runs the graph on ggml's CPU backend with `threads` threads.
    pub fn compute(&self, threads: usize) -> Result<()> {
        compute_graph(self.ptr.as_ptr(), threads)
    }
}

/// Runs a built graph on the CPU with a work buffer we own.
pub(crate) fn compute_graph(graph: *mut sys::ggml_cgraph, threads: usize) -> Result<()> {
    let threads = threads.clamp(1, 512) as i32;
    // SAFETY: the caller passes a graph built in a live context.
    let mut plan = unsafe { sys::ggml_graph_plan(graph, threads, std::ptr::null_mut()) };
    // [work_size] scratch for the ops (quantized activations, partial sums).
    let mut work = vec![0u8; plan.work_size];
    plan.work_data = if work.is_empty() {
        std::ptr::null_mut()
    } else {
        work.as_mut_ptr()
    };
    // SAFETY: the plan's work buffer outlives the call; the graph is valid.
    let status = unsafe { sys::ggml_graph_compute(graph, &mut plan) };
    if status != sys::GGML_STATUS_SUCCESS {
        return Err(Error::Ggml(format!(
            "graph compute failed: status {status}"
        )));
    }
    Ok(())
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context; tensors borrowing it cannot outlive `self`.
        unsafe { sys::ggml_free(self.ptr.as_ptr()) }
    }
}

/// A tensor inside a `Context`; `Copy` like ggml's pointers, but tied to the context's lifetime.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    fn from_raw(raw: *mut sys::ggml_tensor) -> Result<Self> {
        let ptr =
            NonNull::new(raw).ok_or_else(|| Error::Ggml("ggml returned a null tensor".into()))?;
        Ok(Self {
            ptr,
            _ctx: PhantomData,
        })
    }

    pub fn as_ptr(&self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives as long as its context, which `'ctx` keeps alive.
        unsafe { self.ptr.as_ref() }
    }

    pub fn ne(&self) -> [i64; 4] {
        self.raw().ne
    }

    pub fn ty(&self) -> sys::ggml_type {
        self.raw().type_
    }

    pub fn n_elements(&self) -> usize {
        self.ne().iter().product::<i64>() as usize
    }

    fn f32_contiguous(&self) -> Result<()> {
        let t = self.raw();
        if t.type_ != sys::GGML_TYPE_F32 || t.data.is_null() {
            return Err(Error::Ggml("tensor is not an allocated f32 tensor".into()));
        }
        // SAFETY: valid tensor.
        if !unsafe { sys::ggml_is_contiguous(self.as_ptr()) } {
            return Err(Error::Ggml("tensor is not contiguous".into()));
        }
        Ok(())
    }

    /// Copies `src` into an allocated, contiguous f32 tensor of the same element count.
    pub fn set_f32(&self, src: &[f32]) -> Result<()> {
        self.f32_contiguous()?;
        if src.len() != self.n_elements() {
            return Err(Error::Ggml(format!(
                "set_f32: {} values for a tensor of {}",
                src.len(),
                self.n_elements()
            )));
        }
        // SAFETY: f32, contiguous, allocated, and exactly n_elements long (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.raw().data as *mut f32, src.len())
        };
        Ok(())
    }

    /// Copies raw bytes (any type, e.g. f16 bit patterns) into an allocated, contiguous tensor
    /// of exactly that many bytes.
    pub fn set_bytes(&self, src: &[u8]) -> Result<()> {
        let t = self.raw();
        // SAFETY: valid tensor.
        let (contig, nbytes) = unsafe {
            (
                sys::ggml_is_contiguous(self.as_ptr()),
                sys::ggml_nbytes(self.as_ptr()),
            )
        };
        if t.data.is_null() || !contig || nbytes != src.len() {
            return Err(Error::Ggml(format!(
                "set_bytes: {} bytes for a tensor of {nbytes} (allocated: {}, contiguous: {contig})",
                src.len(),
                !t.data.is_null()
            )));
        }
        // SAFETY: allocated, contiguous, exactly src.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), t.data as *mut u8, src.len()) };
        Ok(())
    }

    /// The values of an allocated, contiguous f32 tensor.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.f32_contiguous()?;
        // SAFETY: as in set_f32.
        let s =
            unsafe { std::slice::from_raw_parts(self.raw().data as *const f32, self.n_elements()) };
        Ok(s.to_vec())
    }
}
