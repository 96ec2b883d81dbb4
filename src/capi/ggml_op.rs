//! `ottkv_ggml_attention`: the cache's write + attention as two custom ops in a caller's ggml
//! graph (the caller owns the context, so this cannot use the lifetime-checked
//! `crate::ggml::Context::custom_op`; the same trampoline rules apply, written out here).
//!
//! The ggml userdata is an op id, not a pointer: the trampolines look it up in [`OPS`], so a
//! graph computed after its op was replaced or its cache freed finds nothing and writes NaN
//! instead of touching freed memory.
//!
//! Batch equivalence for any n_tokens: the write op (thread 0 alone) appends the batch; when
//! it straddles flush points it first runs `OttCache::forward` over every sub-batch but the
//! last (single-threaded, into `Run::side`), so each query sees the state a token-by-token
//! decode would. The attend op (all threads, disjoint rows) attends the last sub-batch and
//! copies the side rows.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, LazyLock, Mutex};

use half::f16;

use super::cache::Entry;
use super::ottkv_status::*;
use super::{
    err, guard, guard_ptr, lock_map, lookup, next_id, ottkv_cache, ottkv_status,
    runtime_ggml_version, CResult, GGML_VERSION,
};
use crate::ggml::sys;

/// One `ottkv_ggml_attention` call's ops (write and attend share it).
struct LayerOp {
    entry: Arc<Entry>,
    layer: usize,
    head_dim: usize,
    n_head: usize,
    n_head_kv: usize,
    n: usize,
    scale: f32,
    /// Set by the write op; read by the attend op, which ggml runs after it (its source).
    run: Mutex<Option<Arc<Run>>>,
}

/// What the write op leaves for the attend op.
struct Run {
    /// Tokens `0..tail` were attended by the write op into `side`; `tail..n` are left.
    tail: usize,
    side: Vec<f32>, // [tail][n_head][head_dim]
    /// The write op failed (error recorded): the attend op writes NaN.
    failed: bool,
}

/// Live ops by id. An id leaves the map when its (cache, layer) gets a new op or its cache is
/// freed.
static OPS: LazyLock<Mutex<HashMap<u64, Arc<LayerOp>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(crate) fn forget_ops(ids: impl IntoIterator<Item = u64>) {
    let mut m = lock_map(&OPS);
    for id in ids {
        m.remove(&id);
    }
}

fn op_of(userdata: *mut c_void) -> Option<Arc<LayerOp>> {
    lock_map(&OPS).get(&(userdata as usize as u64)).cloned()
}

/// An f32 source of the node being computed, as a slice of `n` floats.
///
/// # Safety
/// `t` must be NULL or a live tensor that ggml computed before the current node and does not
/// write while it runs.
unsafe fn src_f32<'a>(t: *const sys::ggml_tensor, n: usize, what: &str) -> CResult<&'a [f32]> {
    if t.is_null() {
        return err(OTTKV_ERR_INTERNAL, format!("{what}: missing source tensor"));
    }
    // SAFETY: live tensor (caller's contract).
    let tr = unsafe { &*t };
    // SAFETY: as above.
    let (contig, ne) = unsafe { (sys::ggml_is_contiguous(t), sys::ggml_nelements(t)) };
    if tr.type_ != sys::GGML_TYPE_F32 || !contig || ne != n as i64 {
        return err(
            OTTKV_ERR_SHAPE,
            format!("{what}: changed since the op was built ({:?})", tr.ne),
        );
    }
    check_host(tr, what)?;
    if tr.data.is_null() {
        return err(OTTKV_ERR_INVALID_ARGUMENT, format!("{what}: not allocated"));
    }
    // SAFETY: allocated host memory of n contiguous f32 (checked above); ggml does not write
    // a source while a later node runs.
    Ok(unsafe { std::slice::from_raw_parts(tr.data as *const f32, n) })
}

fn check_host(t: &sys::ggml_tensor, what: &str) -> CResult<()> {
    // SAFETY: a non-null buffer of a live tensor is a live backend buffer.
    if !t.buffer.is_null() && !unsafe { sys::ggml_backend_buffer_is_host(t.buffer) } {
        return err(
            OTTKV_ERR_INVALID_ARGUMENT,
            format!(
                "{what}: lives in a device buffer; the ottkv ggml op runs on the CPU backend only"
            ),
        );
    }
    Ok(())
}

/// The output rows `rows` (of `row` floats) of `dst`, or None when it has no host data.
///
/// # Safety
/// `dst` must be the live node being computed, a contiguous f32 tensor of at least
/// `rows.end * row` floats, and no other thread may touch these rows.
unsafe fn dst_rows<'a>(
    dst: *mut sys::ggml_tensor,
    rows: &Range<usize>,
    row: usize,
) -> Option<&'a mut [f32]> {
    // SAFETY: live node (caller's contract).
    let d = unsafe { &*dst };
    if d.data.is_null() || check_host(d, "output").is_err() {
        return None;
    }
    // SAFETY: caller's contract: in bounds and exclusive to this thread.
    Some(unsafe {
        std::slice::from_raw_parts_mut((d.data as *mut f32).add(rows.start * row), rows.len() * row)
    })
}

impl LayerOp {
    fn qrow(&self) -> usize {
        self.n_head * self.head_dim
    }
    fn kvrow(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// The write op's work: append the batch, attending all but its last sub-batch.
    ///
    /// # Safety
    /// `dst` is the live write node, its sources computed.
    unsafe fn write(&self, dst: *mut sys::ggml_tensor) -> CResult<Run> {
        // SAFETY: live node (caller's contract).
        let d = unsafe { &*dst };
        let (nq, nkv) = (self.n * self.qrow(), self.n * self.kvrow());
        // SAFETY: sources of the node being computed (caller's contract).
        let (q, k, v) = unsafe {
            (
                src_f32(d.src[0], nq, "q")?,
                src_f32(d.src[1], nkv, "k")?,
                src_f32(d.src[2], nkv, "v")?,
            )
        };
        let mut c = self.entry.write()?;
        // Check all that can fail before changing anything: the prefix forward and the tail
        // append below each check only their own part.
        let len = c.layer_len(self.layer)?;
        let max = c.shape().max_tokens;
        if self.n > max - len {
            return err(
                OTTKV_ERR_OVERFLOW,
                format!(
                    "layer {}: {len} cached + {} new tokens exceed max_tokens {max}",
                    self.layer, self.n
                ),
            );
        }
        for (name, x) in [("k", k), ("v", v)] {
            if let Some(i) = x.iter().position(|&a| !f16::from_f32(a).is_finite()) {
                return err(
                    OTTKV_ERR_NON_FINITE,
                    format!(
                        "layer {}: {name}[{i}] = {} is not a finite f16",
                        self.layer, x[i]
                    ),
                );
            }
        }
        let plan = c.plan_subbatches(self.layer, self.n)?;
        let tail = plan.last().map_or(0, |r| r.start);
        let (qr, kr) = (self.qrow(), self.kvrow());
        let mut side = vec![0f32; tail * qr];
        if tail > 0 {
            // `tail` is a flush point, so forward's own plan of 0..tail is this plan's prefix.
            c.forward(
                self.layer,
                &q[..tail * qr],
                &k[..tail * kr],
                &v[..tail * kr],
                tail,
                self.n_head,
                self.scale,
                &mut side,
                1, // ggml's other threads spin at the barrier meanwhile: do not add more
            )?;
        }
        c.append(self.layer, &k[tail * kr..], &v[tail * kr..], self.n - tail)?;
        Ok(Run {
            tail,
            side,
            failed: false,
        })
    }

    /// The attend op's work for output rows `rows` (flattened (token, head)).
    ///
    /// # Safety
    /// `dst` is the live attend node, its sources computed.
    unsafe fn attend(
        &self,
        dst: *mut sys::ggml_tensor,
        rows: Range<usize>,
        out: &mut [f32],
    ) -> CResult<()> {
        let run = self.run.lock().ok().and_then(|r| r.clone());
        let Some(run) = run else {
            return err(
                OTTKV_ERR_INTERNAL,
                "the write op did not run before the attention op",
            );
        };
        if run.failed {
            return err(OTTKV_OK, ""); // already recorded by the write op
        }
        let (hd, nh) = (self.head_dim, self.n_head);
        let split = run.tail * nh; // first row attended here
        let (r0, r1) = (rows.start, rows.end);
        let m = r1.min(split).saturating_sub(r0); // rows copied from the side buffer
        let (head, rest) = out.split_at_mut(m * hd);
        if m > 0 {
            head.copy_from_slice(&run.side[r0 * hd..(r0 + m) * hd]);
        }
        if rest.is_empty() {
            return Ok(());
        }
        // SAFETY: live node, sources computed (caller's contract).
        let d = unsafe { &*dst };
        // SAFETY: as above.
        let q = unsafe { src_f32(d.src[0], self.n * self.qrow(), "q")? };
        let c = self.entry.read()?;
        let a = (r0 + m) - split;
        c.attend(
            self.layer,
            &q[run.tail * self.qrow()..],
            self.n - run.tail,
            nh,
            self.scale,
            a..a + (r1 - r0 - m),
            rest,
        )?;
        Ok(())
    }
}

fn internal_panic<T>(p: &(dyn std::any::Any + Send)) -> CResult<T> {
    err(
        OTTKV_ERR_INTERNAL,
        format!("internal panic: {}", super::panic_message(p)),
    )
}

fn fill_nan(out: Option<&mut [f32]>) {
    if let Some(o) = out {
        o.fill(f32::NAN);
    }
}

/// Custom op 1: runs on thread 0 only (ggml calls every thread whatever n_tasks says).
unsafe extern "C" fn write_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    _nth: c_int,
    user: *mut c_void,
) {
    if ith != 0 {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: ggml passes the live write node ([1] f32) to thread 0 alone (checked above).
        let out = unsafe { dst_rows(dst, &(0..1), 1) };
        let Some(op) = op_of(user) else {
            return fill_nan(out); // op replaced or cache freed: nothing to report to
        };
        // Until this op finishes, the attend op must not see the previous compute's run.
        if let Ok(mut r) = op.run.lock() {
            *r = None;
        }
        // SAFETY: dst is the live write node, sources computed (ggml's node order).
        let res = catch_unwind(AssertUnwindSafe(|| unsafe { op.write(dst) }))
            .unwrap_or_else(|p| internal_panic(p.as_ref()));
        let run = match res {
            Ok(run) => {
                if let Some(o) = out {
                    o[0] = 0.0;
                }
                run
            }
            Err(e) => {
                op.entry
                    .record_op_error(e.status, format!("ottkv ggml write op: {}", e.msg));
                fill_nan(out);
                Run {
                    tail: 0,
                    side: Vec::new(),
                    failed: true,
                }
            }
        };
        if let Ok(mut r) = op.run.lock() {
            *r = Some(Arc::new(run));
        };
    }));
}

/// Custom op 2: every thread computes its own contiguous block of output rows.
unsafe extern "C" fn attend_op(
    dst: *mut sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    user: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: dst is the live attend node.
        let ne = unsafe { (*dst).ne };
        let (hd, rows) = (ne[0] as usize, (ne[1] * ne[2] * ne[3]) as usize);
        let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
        let r = rows * ith / nth..rows * (ith + 1) / nth;
        if r.is_empty() {
            return;
        }
        // SAFETY: dst is contiguous f32 [hd, rows] (we created it); threads get disjoint rows.
        let Some(out) = (unsafe { dst_rows(dst, &r, hd) }) else {
            return;
        };
        let Some(op) = op_of(user) else {
            return out.fill(f32::NAN);
        };
        // SAFETY: dst is the live attend node, sources computed (ggml's node order).
        let res = catch_unwind(AssertUnwindSafe(|| unsafe { op.attend(dst, r, out) }))
            .unwrap_or_else(|p| internal_panic(p.as_ref()));
        if let Err(e) = res {
            if e.status != OTTKV_OK {
                let msg = format!("ottkv ggml attention op: {}", e.msg);
                op.entry.record_op_error(e.status, msg);
            }
            // SAFETY: as above (the first borrow of these rows ended with `attend`).
            fill_nan(unsafe { dst_rows(dst, &(rows * ith / nth..rows * (ith + 1) / nth), hd) });
        }
    }));
}

/// Checks q/k/v against the cache; returns (n_head, n_tokens).
fn check_tensors(
    q: &sys::ggml_tensor,
    k: &sys::ggml_tensor,
    v: &sys::ggml_tensor,
    head_dim: usize,
    n_head_kv: usize,
) -> CResult<(usize, usize)> {
    for (name, t) in [("q", q), ("k", k), ("v", v)] {
        // SAFETY: a live tensor (the caller's contract of ottkv_ggml_attention).
        let contig = unsafe { sys::ggml_is_contiguous(t) };
        if t.type_ != sys::GGML_TYPE_F32 || !contig {
            return err(
                OTTKV_ERR_SHAPE,
                format!(
                    "{name} must be contiguous f32 (type {}, contiguous {contig}); use ggml_cont / ggml_cast",
                    t.type_
                ),
            );
        }
        if t.ne[3] != 1 || t.ne.iter().any(|&d| d <= 0) {
            return err(
                OTTKV_ERR_SHAPE,
                format!("{name} ne {:?}: expected 3-d", t.ne),
            );
        }
        check_host(t, name)?;
    }
    let (hd, nkv) = (head_dim as i64, n_head_kv as i64);
    if q.ne[0] != hd || k.ne[0] != hd || v.ne[0] != hd {
        return err(
            OTTKV_ERR_SHAPE,
            format!(
                "ne[0] (head_dim) of q/k/v = {}/{}/{}, the cache has {hd}",
                q.ne[0], k.ne[0], v.ne[0]
            ),
        );
    }
    if k.ne != v.ne || k.ne[1] != nkv {
        return err(
            OTTKV_ERR_SHAPE,
            format!(
                "k {:?} and v {:?} must both be [head_dim, n_head_kv = {nkv}, n_tokens]",
                k.ne, v.ne
            ),
        );
    }
    if q.ne[2] != k.ne[2] {
        return err(
            OTTKV_ERR_SHAPE,
            format!("q has {} tokens, k/v have {}", q.ne[2], k.ne[2]),
        );
    }
    if q.ne[1] % nkv != 0 {
        return err(
            OTTKV_ERR_SHAPE,
            format!("n_head {} is not a multiple of n_head_kv {nkv}", q.ne[1]),
        );
    }
    Ok((q.ne[1] as usize, q.ne[2] as usize))
}

/// ggml aborts when a context runs out of room: check first that two more tensors fit.
fn check_room(ctx: *mut sys::ggml_context, out_floats: usize) -> CResult<()> {
    // SAFETY: ctx is a live context (caller's contract); these only read its bookkeeping.
    let (size, used, no_alloc, overhead) = unsafe {
        (
            sys::ggml_get_mem_size(ctx),
            sys::ggml_used_mem(ctx),
            sys::ggml_get_no_alloc(ctx),
            sys::ggml_tensor_overhead(),
        )
    };
    // Per tensor ggml takes object header + tensor struct + (data unless no_alloc), each
    // padded to GGML_MEM_ALIGN (16 on 64-bit); 64 bytes of slack for that padding.
    let data = |n: usize| if no_alloc { 0 } else { n * 4 };
    let need = 2 * overhead + data(1) + data(out_floats) + 64;
    if size.saturating_sub(used) < need {
        return err(
            OTTKV_ERR_OVERFLOW,
            format!(
                "ggml context has {} free bytes, the op needs {need}",
                size.saturating_sub(used)
            ),
        );
    }
    Ok(())
}

/// `ottkv_ggml_attention`.
///
/// # Safety
/// `ctx` must be NULL or a live ggml context of this process's ggml; `q`, `k`, `v` NULL or
/// live tensors. The returned tensor's graph must be computed while those live.
#[no_mangle]
pub unsafe extern "C" fn ottkv_ggml_attention(
    cache: *mut ottkv_cache,
    ctx: *mut sys::ggml_context,
    layer: u32,
    q: *mut sys::ggml_tensor,
    k: *mut sys::ggml_tensor,
    v: *mut sys::ggml_tensor,
    scale: f32,
) -> *mut sys::ggml_tensor {
    guard_ptr("ottkv_ggml_attention", || {
        let entry = lookup(cache)?;
        if ctx.is_null() || q.is_null() || k.is_null() || v.is_null() {
            return err(OTTKV_ERR_NULL, "ctx, q, k and v must not be NULL");
        }
        let ver = runtime_ggml_version();
        if ver != GGML_VERSION {
            return err(
                OTTKV_ERR_VERSION,
                format!("ggml in the process is {ver}, ottkv is built for {GGML_VERSION}"),
            );
        }
        if !scale.is_finite() {
            return err(
                OTTKV_ERR_INVALID_ARGUMENT,
                format!("scale {scale} is not finite"),
            );
        }
        let shape = *entry.read()?.shape();
        let layer = layer as usize;
        if layer >= shape.n_layer {
            return err(
                OTTKV_ERR_RANGE,
                format!("layer {layer} out of range (n_layer {})", shape.n_layer),
            );
        }
        // SAFETY: non-null live tensors (caller's contract).
        let (qt, kt, vt) = unsafe { (&*q, &*k, &*v) };
        let (n_head, n) = check_tensors(qt, kt, vt, shape.head_dim, shape.n_head_kv)?;
        if n > shape.max_tokens {
            return err(
                OTTKV_ERR_OVERFLOW,
                format!("{n} tokens exceed max_tokens {}", shape.max_tokens),
            );
        }
        check_room(ctx, shape.head_dim * n_head * n)?;

        let id = next_id();
        let op = Arc::new(LayerOp {
            entry: Arc::clone(&entry),
            layer,
            head_dim: shape.head_dim,
            n_head,
            n_head_kv: shape.n_head_kv,
            n,
            scale,
            run: Mutex::new(None),
        });
        lock_map(&OPS).insert(id, op);
        let old = entry
            .ops
            .lock()
            .map_err(|_| super::CapiError {
                status: OTTKV_ERR_INTERNAL,
                msg: "op table lock poisoned".into(),
            })?
            .get_mut(layer)
            .and_then(|slot| slot.replace(id));
        forget_ops(old);

        let user = id as usize as *mut c_void; // a token, looked up by the trampolines
        let mut wargs = [q, k, v];
        // SAFETY: live ctx and tensors; room checked; the trampolines never unwind and only
        // read the sources and write their own rows of dst; `user` is an id, valid forever.
        let w = unsafe {
            sys::ggml_custom_4d(
                ctx,
                sys::GGML_TYPE_F32,
                1,
                1,
                1,
                1,
                wargs.as_mut_ptr(),
                wargs.len() as c_int,
                Some(write_op),
                1,
                user,
            )
        };
        if w.is_null() {
            return err(
                OTTKV_ERR_INTERNAL,
                "ggml_custom_4d returned NULL (write op)",
            );
        }
        let mut aargs = [q, w];
        // SAFETY: as above; -1 is GGML_N_TASKS_MAX (all of the graph's threads).
        let a = unsafe {
            sys::ggml_custom_4d(
                ctx,
                sys::GGML_TYPE_F32,
                shape.head_dim as i64,
                n_head as i64,
                n as i64,
                1,
                aargs.as_mut_ptr(),
                aargs.len() as c_int,
                Some(attend_op),
                -1,
                user,
            )
        };
        if a.is_null() {
            return err(
                OTTKV_ERR_INTERNAL,
                "ggml_custom_4d returned NULL (attention op)",
            );
        }
        Ok(a)
    })
}

/// `ottkv_ggml_check`.
///
/// # Safety
/// Always safe to call: the handle is only looked up.
#[no_mangle]
pub unsafe extern "C" fn ottkv_ggml_check(cache: *mut ottkv_cache) -> ottkv_status {
    guard("ottkv_ggml_check", || {
        let e = lookup(cache)?;
        let recorded = e.op_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        match recorded {
            None => Ok(()),
            Some((status, msg)) => err(status, msg),
        }
    })
}
