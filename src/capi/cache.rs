//! `ottkv_cache_*`: configuration, creation and the cache calls.

use std::ffi::{c_char, CStr};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::ottkv_status::*;
use super::{
    err, guard, handle_of, in_slice, lock_map, lookup, next_id, ottkv_cache, ottkv_cache_config,
    ottkv_cache_shape, ottkv_layer_override, ottkv_memory_stats, ottkv_status, out_slice,
    write_out, CResult, CACHES,
};
use crate::cache::{
    CacheConfig, CacheShape, Fit, LayerOverride, OttCache, Rotation, Score, ValueAxis,
};

/// Most per-layer overrides a C config may carry (a hostile count must not drive allocation).
const MAX_OVERRIDES: usize = 1 << 16;

/// What a handle names: the cache and the ggml ops made for it.
pub(crate) struct Entry {
    pub id: u64,
    pub cache: RwLock<OttCache>,
    /// Live ggml op id per layer (`[n_layer]`), see ggml_op.rs.
    pub ops: Mutex<Vec<Option<u64>>>,
    /// First error a ggml op hit during compute, for `ottkv_ggml_check`.
    pub op_error: Mutex<Option<(ottkv_status, String)>>,
}

impl Entry {
    pub fn read(&self) -> CResult<RwLockReadGuard<'_, OttCache>> {
        self.cache.read().map_err(|_| poisoned())
    }
    pub fn write(&self) -> CResult<RwLockWriteGuard<'_, OttCache>> {
        self.cache.write().map_err(|_| poisoned())
    }
    pub fn record_op_error(&self, status: ottkv_status, msg: String) {
        if let Ok(mut e) = self.op_error.lock() {
            e.get_or_insert((status, msg));
        }
    }
}

fn poisoned() -> super::CapiError {
    // A panic (caught at the boundary) left this cache half-updated: refuse to use it.
    super::CapiError {
        status: OTTKV_ERR_INTERNAL,
        msg: "this cache was left inconsistent by an earlier internal error; free it".into(),
    }
}

// ---- Config conversion ----------------------------------------------------------------------

fn config_from_c(c: &ottkv_cache_config) -> CResult<CacheConfig> {
    let score = match c.score {
        0 => Score::L1,
        1 => Score::L2,
        s => {
            return err(
                OTTKV_ERR_INVALID_ARGUMENT,
                format!("score {s} is not OTTKV_SCORE_L1 (0) or OTTKV_SCORE_L2 (1)"),
            )
        }
    };
    if c.n_overrides > MAX_OVERRIDES {
        return err(
            OTTKV_ERR_INVALID_ARGUMENT,
            format!("n_overrides {} above {MAX_OVERRIDES}", c.n_overrides),
        );
    }
    // SAFETY: the header's contract: `overrides` holds n_overrides entries while we read them.
    let raw = unsafe { in_slice(c.overrides, c.n_overrides, "config.overrides")? };
    let mut overrides: Vec<LayerOverride> = raw
        .iter()
        .map(|o| LayerOverride {
            layer: o.layer,
            pool: u32::try_from(o.pool).ok(),
            extra: u32::try_from(o.extra).ok(),
            key_bits: u32::try_from(o.key_bits).ok(),
            value_bits: u32::try_from(o.value_bits).ok(),
        })
        .collect();
    // C callers list overrides in any order; the Rust config wants them sorted (duplicates are
    // then caught by validate as non-increasing layers).
    overrides.sort_by_key(|o| o.layer);
    let cfg = CacheConfig {
        key_bits: c.key_bits,
        value_bits: c.value_bits,
        group: c.group,
        residual: c.residual,
        pool: c.pool,
        extra: c.extra,
        untraced_layers: c.untraced_layers,
        score,
        value_group: (c.value_group != 0).then_some(c.value_group),
        overrides,
        rotate: match c.rotate {
            0 => Rotation::Off,
            1 => Rotation::On,
            2 => Rotation::Auto,
            r => {
                return err(
                    OTTKV_ERR_INVALID_ARGUMENT,
                    format!("rotate {r} is not 0, 1 or 2 (auto)"),
                )
            }
        },
        sink: c.sink,
        window_bits: c.window_bits,
        value_axis: match c.value_axis {
            0 => ValueAxis::Token,
            1 => ValueAxis::Channel,
            2 => ValueAxis::Auto,
            a => {
                return err(
                    OTTKV_ERR_INVALID_ARGUMENT,
                    format!("value_axis {a} is not 0 (per token), 1 (per channel) or 2 (auto)"),
                )
            }
        },
        untraced_key_bits: (c.untraced_key_bits != 0).then_some(c.untraced_key_bits),
        value_param_bits: c.value_param_bits,
        value_fit: match c.value_fit {
            0 => Fit::MinMax,
            1 => Fit::LeastSquares,
            f => {
                return err(
                    OTTKV_ERR_INVALID_ARGUMENT,
                    format!("value_fit {f} is not 0 (min/max) or 1 (least squares)"),
                )
            }
        },
        key_fit: match c.key_fit {
            0 => Fit::MinMax,
            1 => Fit::LeastSquares,
            f => {
                return err(
                    OTTKV_ERR_INVALID_ARGUMENT,
                    format!("key_fit {f} is not 0 (min/max) or 1 (least squares)"),
                )
            }
        },
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The C view of a config; `overrides`/`n_overrides` are left for the caller to fill.
fn config_to_c(c: &CacheConfig) -> ottkv_cache_config {
    ottkv_cache_config {
        key_bits: c.key_bits,
        value_bits: c.value_bits,
        group: c.group,
        residual: c.residual,
        pool: c.pool,
        extra: c.extra,
        untraced_layers: c.untraced_layers,
        score: match c.score {
            Score::L1 => 0,
            Score::L2 => 1,
        },
        value_group: c.value_group.unwrap_or(0),
        rotate: match c.rotate {
            Rotation::Off => 0,
            Rotation::On => 1,
            Rotation::Auto => 2,
        },
        sink: c.sink,
        window_bits: c.window_bits,
        value_axis: match c.value_axis {
            ValueAxis::Token => 0,
            ValueAxis::Channel => 1,
            ValueAxis::Auto => 2,
        },
        untraced_key_bits: c.untraced_key_bits.unwrap_or(0),
        value_param_bits: c.value_param_bits,
        value_fit: match c.value_fit {
            Fit::MinMax => 0,
            Fit::LeastSquares => 1,
        },
        key_fit: match c.key_fit {
            Fit::MinMax => 0,
            Fit::LeastSquares => 1,
        },
        overrides: std::ptr::null(),
        n_overrides: 0,
    }
}

fn override_to_c(o: &LayerOverride) -> ottkv_layer_override {
    // Validated pools are at most MAX_POOL / MAX_EXTRA, far below i32::MAX.
    let c = |v: Option<u32>| v.map_or(-1, |x| i32::try_from(x).unwrap_or(i32::MAX));
    ottkv_layer_override {
        layer: o.layer,
        pool: c(o.pool),
        extra: c(o.extra),
        key_bits: c(o.key_bits),
        value_bits: c(o.value_bits),
    }
}

fn shape_from_c(s: &ottkv_cache_shape) -> CResult<CacheShape> {
    Ok(CacheShape {
        n_layer: s.n_layer as usize,
        n_head_kv: s.n_head_kv as usize,
        head_dim: s.head_dim as usize,
        max_tokens: usize::try_from(s.max_tokens).or_else(|_| {
            err(
                OTTKV_ERR_SHAPE,
                format!("max_tokens {} does not fit in size_t", s.max_tokens),
            )
        })?,
    })
}

/// `ottkv_cache_config_default`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_config_default(out: *mut ottkv_cache_config) -> ottkv_status {
    guard("ottkv_cache_config_default", || {
        // SAFETY: caller's contract.
        unsafe { write_out(out, config_to_c(&CacheConfig::default()), "out") }
    })
}

/// `ottkv_cache_config_from_spec`.
///
/// # Safety
/// `spec` must be NULL or a NUL-terminated string; `out` NULL or writable; `overrides` NULL or
/// writable for `overrides_cap` entries.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_config_from_spec(
    spec: *const c_char,
    out: *mut ottkv_cache_config,
    overrides: *mut ottkv_layer_override,
    overrides_cap: usize,
) -> ottkv_status {
    guard("ottkv_cache_config_from_spec", || {
        if spec.is_null() {
            return err(OTTKV_ERR_NULL, "spec is NULL");
        }
        if out.is_null() {
            return err(OTTKV_ERR_NULL, "out is NULL");
        }
        // SAFETY: non-null; the caller vouches for the NUL terminator.
        let s = unsafe { CStr::from_ptr(spec) }.to_str().or_else(|e| {
            err(
                OTTKV_ERR_INVALID_ARGUMENT,
                format!("spec is not UTF-8: {e}"),
            )
        })?;
        let cfg: CacheConfig = s.parse()?;
        let mut c = config_to_c(&cfg);
        let n = cfg.overrides.len();
        c.n_overrides = n;
        if n > overrides_cap {
            // SAFETY: caller's contract on `out`.
            unsafe { write_out(out, c, "out")? };
            return err(
                OTTKV_ERR_OVERFLOW,
                format!("spec has {n} per-layer overrides, overrides_cap is {overrides_cap}"),
            );
        }
        if n > 0 {
            // SAFETY: caller's contract: `overrides` is writable for overrides_cap >= n entries;
            // it cannot overlap `spec` (which is not written) in a way that matters here.
            let dst = unsafe { out_slice(overrides, n, "overrides", &[])? };
            for (d, o) in dst.iter_mut().zip(&cfg.overrides) {
                *d = override_to_c(o);
            }
            c.overrides = overrides;
        }
        // SAFETY: caller's contract on `out`.
        unsafe { write_out(out, c, "out") }
    })
}

// ---- Lifecycle ------------------------------------------------------------------------------

/// `ottkv_cache_create`.
///
/// # Safety
/// `config` and `shape` must be NULL or valid (with `config->overrides` holding
/// `n_overrides` entries); `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_create(
    config: *const ottkv_cache_config,
    shape: *const ottkv_cache_shape,
    out: *mut *mut ottkv_cache,
) -> ottkv_status {
    guard("ottkv_cache_create", || {
        if config.is_null() || shape.is_null() || out.is_null() {
            return err(OTTKV_ERR_NULL, "config, shape and out must not be NULL");
        }
        // SAFETY: non-null; the caller vouches they point to valid structs.
        let (c, s) = unsafe { (&*config, &*shape) };
        let cache = OttCache::new(config_from_c(c)?, shape_from_c(s)?)?;
        let n_layer = cache.shape().n_layer;
        let id = next_id();
        let entry = Arc::new(Entry {
            id,
            cache: RwLock::new(cache),
            ops: Mutex::new(vec![None; n_layer]),
            op_error: Mutex::new(None),
        });
        // Write the out-parameter first, so a bad `out` leaves nothing registered.
        // SAFETY: caller's contract.
        unsafe { write_out(out, handle_of(id), "out")? };
        lock_map(&CACHES).insert(id, entry);
        Ok(())
    })
}

/// `ottkv_cache_free`.
///
/// # Safety
/// Always safe to call: the handle is only looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_free(cache: *mut ottkv_cache) -> ottkv_status {
    guard("ottkv_cache_free", || {
        if cache.is_null() {
            return Ok(()); // free(NULL) is a no-op, as in C
        }
        let entry = lookup(cache)?;
        lock_map(&CACHES).remove(&entry.id);
        // Drop this cache's ggml ops too: a graph computed later finds no op and writes NaN.
        let ops = std::mem::take(&mut *entry.ops.lock().unwrap_or_else(|e| e.into_inner()));
        super::ggml_op::forget_ops(ops.into_iter().flatten());
        Ok(())
    })
}

/// `ottkv_cache_reset`.
///
/// # Safety
/// Always safe to call (see `ottkv_cache_free`).
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_reset(cache: *mut ottkv_cache) -> ottkv_status {
    guard("ottkv_cache_reset", || {
        let e = lookup(cache)?;
        e.write()?.reset()?;
        *e.op_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    })
}

/// `ottkv_cache_len`.
///
/// # Safety
/// `out_len` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_len(
    cache: *mut ottkv_cache,
    layer: u32,
    out_len: *mut u64,
) -> ottkv_status {
    guard("ottkv_cache_len", || {
        let e = lookup(cache)?;
        let n = e.read()?.layer_len(layer as usize)?;
        // SAFETY: caller's contract.
        unsafe { write_out(out_len, n as u64, "out_len") }
    })
}

/// `ottkv_cache_memory`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_memory(
    cache: *mut ottkv_cache,
    out: *mut ottkv_memory_stats,
) -> ottkv_status {
    guard("ottkv_cache_memory", || {
        let e = lookup(cache)?;
        let m = e.read()?.memory();
        let s = ottkv_memory_stats {
            codes: m.codes as u64,
            params: m.params as u64,
            window: m.window as u64,
            pools: m.pools as u64,
            masks_positions: m.masks_positions as u64,
            total: m.total as u64,
        };
        // SAFETY: caller's contract.
        unsafe { write_out(out, s, "out") }
    })
}

// ---- Compute --------------------------------------------------------------------------------

fn check_scale(scale: f32) -> CResult<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        err(
            OTTKV_ERR_INVALID_ARGUMENT,
            format!("scale {scale} is not finite"),
        )
    }
}

fn bytes(p: *const f32, len: usize) -> (*const u8, usize) {
    (p.cast(), len.saturating_mul(4))
}

/// `ottkv_cache_forward`.
///
/// # Safety
/// Each buffer must be NULL or hold the number of floats its `_len` says; `out` must be
/// writable and not accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_forward(
    cache: *mut ottkv_cache,
    layer: u32,
    n_tokens: usize,
    n_head: u32,
    scale: f32,
    q: *const f32,
    q_len: usize,
    k: *const f32,
    k_len: usize,
    v: *const f32,
    v_len: usize,
    out: *mut f32,
    out_len: usize,
    n_threads: u32,
) -> ottkv_status {
    guard("ottkv_cache_forward", || {
        let e = lookup(cache)?;
        check_scale(scale)?;
        // SAFETY: caller's contract on each buffer; out is checked disjoint from the inputs.
        let (qs, ks, vs, os) = unsafe {
            let qs = in_slice(q, q_len, "q")?;
            let ks = in_slice(k, k_len, "k")?;
            let vs = in_slice(v, v_len, "v")?;
            let (bq, bk, bv) = (bytes(q, q_len), bytes(k, k_len), bytes(v, v_len));
            let os = out_slice(
                out,
                out_len,
                "out",
                &[("q", bq.0, bq.1), ("k", bk.0, bk.1), ("v", bv.0, bv.1)],
            )?;
            (qs, ks, vs, os)
        };
        let threads = match n_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t as usize,
        };
        e.write()?.forward(
            layer as usize,
            qs,
            ks,
            vs,
            n_tokens,
            n_head as usize,
            scale,
            os,
            threads,
        )?;
        Ok(())
    })
}

/// `ottkv_cache_plan`.
///
/// # Safety
/// `starts` must be NULL or writable for `cap` entries; `n_sub` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_plan(
    cache: *mut ottkv_cache,
    layer: u32,
    n_tokens: usize,
    starts: *mut usize,
    cap: usize,
    n_sub: *mut usize,
) -> ottkv_status {
    guard("ottkv_cache_plan", || {
        let e = lookup(cache)?;
        if n_sub.is_null() {
            return err(OTTKV_ERR_NULL, "n_sub is NULL");
        }
        // The count is known in closed form: nothing is allocated for it, whatever n_tokens.
        let plan = e.read()?.subbatch_starts(layer as usize, n_tokens)?;
        // SAFETY: caller's contract.
        unsafe { write_out(n_sub, plan.len(), "n_sub")? };
        if plan.len() > cap {
            return err(
                OTTKV_ERR_OVERFLOW,
                format!("{} sub-batches, cap is {cap}", plan.len()),
            );
        }
        // SAFETY: caller's contract: `starts` is writable for cap >= plan.len() entries.
        let dst = unsafe { out_slice(starts, plan.len(), "starts", &[])? };
        for (d, s) in dst.iter_mut().zip(plan) {
            *d = s;
        }
        Ok(())
    })
}

/// `ottkv_cache_append`.
///
/// # Safety
/// `k`, `v` must be NULL or hold `k_len` / `v_len` floats.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_append(
    cache: *mut ottkv_cache,
    layer: u32,
    n_tokens: usize,
    k: *const f32,
    k_len: usize,
    v: *const f32,
    v_len: usize,
) -> ottkv_status {
    guard("ottkv_cache_append", || {
        let e = lookup(cache)?;
        // SAFETY: caller's contract.
        let (ks, vs) = unsafe { (in_slice(k, k_len, "k")?, in_slice(v, v_len, "v")?) };
        e.write()?.append(layer as usize, ks, vs, n_tokens)?;
        Ok(())
    })
}

/// `ottkv_cache_attend`.
///
/// # Safety
/// `q` must be NULL or hold `q_len` floats; `out` NULL or writable for `out_len` floats and
/// not accessed by anyone else during the call.
#[no_mangle]
pub unsafe extern "C" fn ottkv_cache_attend(
    cache: *mut ottkv_cache,
    layer: u32,
    n_tokens: usize,
    n_head: u32,
    scale: f32,
    q: *const f32,
    q_len: usize,
    row_begin: usize,
    row_end: usize,
    out: *mut f32,
    out_len: usize,
) -> ottkv_status {
    guard("ottkv_cache_attend", || {
        let e = lookup(cache)?;
        check_scale(scale)?;
        // SAFETY: caller's contract; out is checked disjoint from q.
        let (qs, os) = unsafe {
            let qs = in_slice(q, q_len, "q")?;
            let bq = bytes(q, q_len);
            (qs, out_slice(out, out_len, "out", &[("q", bq.0, bq.1)])?)
        };
        e.read()?.attend(
            layer as usize,
            qs,
            n_tokens,
            n_head as usize,
            scale,
            row_begin..row_end,
            os,
        )?;
        Ok(())
    })
}
