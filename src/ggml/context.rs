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
        let g = self.new_graph(GRAPH_NODES)?;
        g.expand(out);
        Ok(g)
    }

    /// An empty graph of up to `nodes` nodes; `Graph::expand` adds outputs in order.
    pub fn new_graph(&self, nodes: usize) -> Result<Graph<'_>> {
        // SAFETY: pure size computation.
        let need = unsafe { sys::ggml_graph_overhead_custom(nodes, false) };
        self.check_room(need)?;
        // SAFETY: context live and has room; the graph is allocated in it.
        let graph = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), nodes, false) };
        let ptr = NonNull::new(graph).ok_or_else(|| Error::Ggml("ggml_new_graph failed".into()))?;
        Ok(Graph {
            ptr,
            _ctx: PhantomData,
        })
    }

    /// Bytes a context needs for `n` tensor headers plus a graph of `nodes` nodes.
    pub fn overhead(n_tensors: usize, nodes: usize) -> usize {
        // SAFETY: pure size computations.
        unsafe {
            n_tensors * sys::ggml_tensor_overhead()
                + sys::ggml_graph_overhead_custom(nodes, false)
                + 4096
        }
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

/// Node capacity of graphs built by `build_graph` (a 128-layer model needs ~4k).
pub const GRAPH_NODES: usize = 8192;

impl<'c> Graph<'c> {
    /// Adds `t` and everything it depends on, after the nodes already in the graph: ggml runs
    /// nodes in this order, which is how a cache write is placed before the reads of it.
    pub fn expand(&self, t: Tensor<'c>) {
        // SAFETY: graph and tensor belong to the same live context ('c).
        unsafe { sys::ggml_build_forward_expand(self.ptr.as_ptr(), t.as_ptr()) }
    }

    /// Runs the graph on ggml's CPU backend with `threads` threads.
    pub fn compute(&self, threads: usize) -> Result<()> {
        compute_graph(self.ptr.as_ptr(), threads)
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }
}

/// ggml's graph allocator on the CPU buffer type: gives the tensors of a `no_alloc` graph
/// memory, reusing it between nodes whose lifetimes do not overlap.
pub struct GraphAllocator {
    ptr: NonNull<sys::ggml_gallocr>,
}

// SAFETY: the allocator has no thread affinity; `&mut self` serialises its use.
unsafe impl Send for GraphAllocator {}

impl GraphAllocator {
    pub fn new() -> Result<Self> {
        // SAFETY: the CPU buffer type is a static singleton.
        let raw = unsafe { sys::ggml_gallocr_new(sys::ggml_backend_cpu_buffer_type()) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::Ggml("ggml_gallocr_new failed".into()))?;
        Ok(Self { ptr })
    }

    /// Allocates every tensor of `graph` that has no data yet. The memory stays valid until
    /// the next call or drop; compute the graph before either.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: live allocator and graph.
        if !unsafe { sys::ggml_gallocr_alloc_graph(self.ptr.as_ptr(), graph.as_ptr()) } {
            return Err(Error::Ggml(
                "graph allocation failed (out of memory?)".into(),
            ));
        }
        Ok(())
    }

    /// Bytes of the allocator's buffer.
    pub fn buffer_size(&self) -> usize {
        // SAFETY: live allocator; buffer 0 is the only one.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.ptr.as_ptr(), 0) }
    }
}

impl Drop for GraphAllocator {
    fn drop(&mut self) {
        // SAFETY: owned, freed once.
        unsafe { sys::ggml_gallocr_free(self.ptr.as_ptr()) }
    }
}

/// Runs a built graph on the CPU with a work buffer we own.
/// The most threads worth giving ggml: the cores this process may run on. ggml's threads
/// spin at barriers, so more than that only slows it down (ggml itself allows 512).
pub fn max_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(512)
}

pub(crate) fn compute_graph(graph: *mut sys::ggml_cgraph, threads: usize) -> Result<()> {
    let threads = threads.clamp(1, max_threads()) as i32;
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

/// A tensor of a context, apart from the borrow: owners that keep a context and handles to
/// its tensors side by side (caches, weights) store these and turn them back into a `Tensor`
/// borrowed from themselves.
#[derive(Clone, Copy, Debug)]
pub struct TensorId(NonNull<sys::ggml_tensor>);

// SAFETY: an address only; it is dereferenced through `Tensor`, whose borrow of the owner
// keeps the tensor alive, and the owner decides what may run concurrently.
unsafe impl Send for TensorId {}
unsafe impl Sync for TensorId {}

impl TensorId {
    /// The tensor, borrowed as long as `owner`, which must own the tensor's context.
    pub(crate) fn get<O: ?Sized>(self, owner: &O) -> Tensor<'_> {
        let _ = owner;
        Tensor {
            ptr: self.0,
            _ctx: PhantomData,
        }
    }

    pub(crate) fn from_raw(raw: *mut sys::ggml_tensor) -> Option<Self> {
        NonNull::new(raw).map(Self)
    }
}

/// A tensor inside a `Context`; `Copy` like ggml's pointers, but tied to the context's lifetime.
#[derive(Clone, Copy)]
pub struct Tensor<'ctx> {
    ptr: NonNull<sys::ggml_tensor>,
    _ctx: PhantomData<&'ctx Context>,
}

impl<'ctx> Tensor<'ctx> {
    pub(crate) fn from_raw(raw: *mut sys::ggml_tensor) -> Result<Self> {
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

    /// The handle an owner keeps beside the context.
    pub fn id(&self) -> TensorId {
        TensorId(self.ptr)
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

    /// Byte strides `nb` (ggml's, per dimension).
    pub fn nb(&self) -> [usize; 4] {
        self.raw().nb
    }

    /// Bytes of `n` elements of this tensor's type in one row.
    pub fn row_bytes(&self, n: i64) -> usize {
        // SAFETY: the type comes from a live tensor.
        unsafe { sys::ggml_row_size(self.ty(), n) }
    }

    /// Marks the tensor as a graph input (the allocator will not reuse its memory).
    pub fn set_input(&self) {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_input(self.as_ptr()) }
    }

    /// Marks the tensor as a graph output (kept after compute).
    pub fn set_output(&self) {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_output(self.as_ptr()) }
    }

    /// Points a tensor of a `no_alloc` context at memory owned elsewhere (a model's mapping).
    ///
    /// # Safety
    /// `data` must hold exactly this tensor's bytes, outlive every use of the tensor, and not
    /// be written through it (ggml only reads weights; the mapping is read-only).
    pub unsafe fn bind_external(&self, data: &[u8]) -> Result<()> {
        // SAFETY: valid tensor.
        let nbytes = unsafe { sys::ggml_nbytes(self.as_ptr()) };
        if nbytes != data.len() || !self.raw().data.is_null() {
            return Err(Error::Ggml(format!(
                "bind_external: {} bytes for a tensor of {nbytes} (already bound: {})",
                data.len(),
                !self.raw().data.is_null()
            )));
        }
        // SAFETY: we own the only handle writing this field; the caller upholds the rest.
        unsafe { (*self.as_ptr()).data = data.as_ptr() as *mut std::ffi::c_void };
        Ok(())
    }

    /// Raw bytes of an allocated, contiguous tensor.
    pub fn bytes(&self) -> Result<&[u8]> {
        // SAFETY: valid tensor.
        let (contig, nbytes) = unsafe {
            (
                sys::ggml_is_contiguous(self.as_ptr()),
                sys::ggml_nbytes(self.as_ptr()),
            )
        };
        if self.raw().data.is_null() || !contig {
            return Err(Error::Ggml("tensor is not allocated and contiguous".into()));
        }
        // SAFETY: allocated and contiguous, nbytes long, alive as long as the context.
        Ok(unsafe { std::slice::from_raw_parts(self.raw().data as *const u8, nbytes) })
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
