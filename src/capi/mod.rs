//! The C ABI (`include/ottkv.h`): the only place with `#[no_mangle] extern "C"`.
//!
//! Every entry point goes through [`guard`] (or [`guard_ptr`]): it clears the thread's last
//! error, runs the body under `catch_unwind` so no panic crosses into C, and turns a
//! [`CapiError`] into a status plus a message for `ottkv_last_error()`.
//!
//! Handles are not pointers to Rust objects: an `ottkv_cache *` is a token (a never-reused u64
//! id cast to a pointer) looked up in a global registry, so a freed or forged handle is an
//! error (`OTTKV_ERR_HANDLE`) instead of a use-after-free. The types here mirror the header
//! field by field; `tests/capi.rs` checks their sizes against the C compiler's.

mod cache;
mod ggml_op;

pub use cache::*;
pub use ggml_op::*;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use crate::cache::CacheError;

/// `OTTKV_ABI_VERSION` of include/ottkv.h.
pub const ABI_VERSION: u32 = 3;
/// `OTTKV_GGML_VERSION`: the ggml bundled by llama-cpp-sys-2 =0.1.161.
pub const GGML_VERSION: &str = "0.26.0";

/// `ottkv_status` (a C enum: `int`-sized, hence `repr(C)`). Only ever returned to C, never
/// read from it: C passing an out-of-range value into a Rust enum would be undefined, so
/// functions that take a status take `c_int`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum ottkv_status {
    OTTKV_OK = 0,
    OTTKV_ERR_NULL = 1,
    OTTKV_ERR_INVALID_ARGUMENT = 2,
    OTTKV_ERR_SHAPE = 3,
    OTTKV_ERR_OVERFLOW = 4,
    OTTKV_ERR_NO_DEVICE = 5,
    OTTKV_ERR_INTERNAL = 6,
    OTTKV_ERR_HANDLE = 7,
    OTTKV_ERR_RANGE = 8,
    OTTKV_ERR_NON_FINITE = 9,
    OTTKV_ERR_SUBBATCH = 10,
    OTTKV_ERR_VERSION = 11,
    OTTKV_ERR_ALLOC = 12,
}
use ottkv_status::*;

const STATUS_NAMES: [&CStr; 13] = [
    c"OTTKV_OK",
    c"OTTKV_ERR_NULL",
    c"OTTKV_ERR_INVALID_ARGUMENT",
    c"OTTKV_ERR_SHAPE",
    c"OTTKV_ERR_OVERFLOW",
    c"OTTKV_ERR_NO_DEVICE",
    c"OTTKV_ERR_INTERNAL",
    c"OTTKV_ERR_HANDLE",
    c"OTTKV_ERR_RANGE",
    c"OTTKV_ERR_NON_FINITE",
    c"OTTKV_ERR_SUBBATCH",
    c"OTTKV_ERR_VERSION",
    c"OTTKV_ERR_ALLOC",
];

/// `ottkv_layer_override`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct ottkv_layer_override {
    pub layer: u32,
    pub pool: i32,
    pub extra: i32,
    pub key_bits: i32,
    pub value_bits: i32,
}

/// `ottkv_cache_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[allow(non_camel_case_types)]
pub struct ottkv_cache_config {
    pub key_bits: u32,
    pub value_bits: u32,
    pub group: u32,
    pub residual: u32,
    pub pool: u32,
    pub extra: u32,
    pub untraced_layers: u32,
    pub score: u32,
    pub value_group: u32,
    pub rotate: u32,
    pub sink: u32,
    pub window_bits: u32,
    pub value_axis: u32,
    pub untraced_key_bits: u32,
    pub value_param_bits: u32,
    pub value_fit: u32,
    pub key_fit: u32,
    pub overrides: *const ottkv_layer_override,
    pub n_overrides: usize,
}

/// `ottkv_cache_shape`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct ottkv_cache_shape {
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub max_tokens: u64,
}

/// `ottkv_memory_stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct ottkv_memory_stats {
    pub codes: u64,
    pub params: u64,
    pub window: u64,
    pub pools: u64,
    pub masks_positions: u64,
    pub total: u64,
}

/// `ottkv_cache`: never instantiated; `*mut ottkv_cache` values are registry tokens.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct ottkv_cache {
    _opaque: [u8; 0],
}

/// A failed call: the status C sees and the message `ottkv_last_error()` returns.
#[derive(Debug)]
pub(crate) struct CapiError {
    pub status: ottkv_status,
    pub msg: String,
}

pub(crate) type CResult<T> = Result<T, CapiError>;

pub(crate) fn err<T>(status: ottkv_status, msg: impl Into<String>) -> CResult<T> {
    Err(CapiError {
        status,
        msg: msg.into(),
    })
}

impl From<CacheError> for CapiError {
    fn from(e: CacheError) -> Self {
        let status = match &e {
            CacheError::Config { .. } | CacheError::Parse { .. } => OTTKV_ERR_INVALID_ARGUMENT,
            CacheError::Shape(_) | CacheError::Length { .. } | CacheError::Heads { .. } => {
                OTTKV_ERR_SHAPE
            }
            CacheError::Layer { .. } | CacheError::Rows { .. } => OTTKV_ERR_RANGE,
            CacheError::Overflow { .. } => OTTKV_ERR_OVERFLOW,
            CacheError::NonFinite { .. } => OTTKV_ERR_NON_FINITE,
            CacheError::SubBatch { .. } => OTTKV_ERR_SUBBATCH,
            CacheError::Alloc { .. } => OTTKV_ERR_ALLOC,
            // The quantizer only fails on inputs the cache checked before: a bug if it happens.
            CacheError::Quant(_) => OTTKV_ERR_INTERNAL,
        };
        CapiError {
            status,
            msg: e.to_string(),
        }
    }
}

thread_local! {
    /// `ottkv_last_error()`'s string; replaced (so the old pointer dies) by the next call.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    // Interior NULs would truncate the message in C; replace them rather than lose it.
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; then there is nobody to tell.
    let _ = LAST_ERROR.try_with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs an entry point's body: clears the last error, catches panics, reports failures.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> CResult<()>) -> ottkv_status {
    set_last_error(String::new());
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => OTTKV_OK,
        Ok(Err(e)) => {
            set_last_error(format!("{name}: {}", e.msg));
            e.status
        }
        Err(p) => {
            set_last_error(format!(
                "{name}: internal panic (a bug in ottkv): {}",
                panic_message(p.as_ref())
            ));
            OTTKV_ERR_INTERNAL
        }
    }
}

/// [`guard`] for entry points that return a pointer (NULL on failure).
pub(crate) fn guard_ptr<T>(name: &str, body: impl FnOnce() -> CResult<*mut T>) -> *mut T {
    let mut out = std::ptr::null_mut();
    guard(name, || {
        out = body()?;
        Ok(())
    });
    out
}

// ---- Handle registry ----------------------------------------------------------------------

/// Ids for caches and ggml ops; never reused, so a stale token can never name a newer object.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Locks a registry map. The maps are only touched by insert/remove/get, which leave them
/// consistent even if a panic poisoned the lock, so poisoning is ignored.
pub(crate) fn lock_map<K, V>(m: &Mutex<HashMap<K, V>>) -> MutexGuard<'_, HashMap<K, V>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static CACHES: LazyLock<Mutex<HashMap<u64, Arc<cache::Entry>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

pub(crate) fn handle_of(id: u64) -> *mut ottkv_cache {
    // A token, not an address: it is only ever compared, never dereferenced.
    id as usize as *mut ottkv_cache
}

/// The live cache behind a handle.
pub(crate) fn lookup(h: *mut ottkv_cache) -> CResult<Arc<cache::Entry>> {
    if h.is_null() {
        return err(OTTKV_ERR_NULL, "cache handle is NULL");
    }
    let id = h as usize as u64;
    match lock_map(&CACHES).get(&id) {
        Some(e) => Ok(Arc::clone(e)),
        None => err(
            OTTKV_ERR_HANDLE,
            format!("cache handle {h:p} was freed or never created"),
        ),
    }
}

// ---- Buffers from C -----------------------------------------------------------------------

fn check_buf<T>(p: *const T, len: usize, what: &str) -> CResult<()> {
    if len == 0 {
        return Ok(());
    }
    if p.is_null() {
        return err(
            OTTKV_ERR_NULL,
            format!("{what} is NULL but holds {len} elements"),
        );
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return err(
            OTTKV_ERR_INVALID_ARGUMENT,
            format!(
                "{what} ({p:p}) is not {}-byte aligned",
                std::mem::align_of::<T>()
            ),
        );
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .map_or(true, |b| b > isize::MAX as usize)
    {
        return err(
            OTTKV_ERR_OVERFLOW,
            format!("{what}: {len} elements overflow"),
        );
    }
    Ok(())
}

/// A C input buffer as a slice (empty when `len` is 0, whatever `p` is).
///
/// # Safety
/// `p` must point to `len` initialized `T` that stay valid and unwritten for `'a`.
pub(crate) unsafe fn in_slice<'a, T>(p: *const T, len: usize, what: &str) -> CResult<&'a [T]> {
    check_buf(p, len, what)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-null, aligned, size fits isize (checked); the caller vouches for validity.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// A C output buffer as a mutable slice; it must not overlap any of `inputs` (Rust would
/// otherwise hold a `&mut` and a `&` to the same memory).
///
/// # Safety
/// `p` must point to `len` writable `T` that nothing else accesses for `'a`.
pub(crate) unsafe fn out_slice<'a, T>(
    p: *mut T,
    len: usize,
    what: &str,
    inputs: &[(&str, *const u8, usize)],
) -> CResult<&'a mut [T]> {
    check_buf(p, len, what)?;
    if len == 0 {
        return Ok(&mut []);
    }
    let (a0, a1) = (p as usize, p as usize + len * std::mem::size_of::<T>());
    for &(name, q, bytes) in inputs {
        let (b0, b1) = (q as usize, q as usize + bytes);
        if bytes > 0 && a0 < b1 && b0 < a1 {
            return err(
                OTTKV_ERR_INVALID_ARGUMENT,
                format!("{what} overlaps {name}; use separate buffers"),
            );
        }
    }
    // SAFETY: non-null, aligned, size fits isize, disjoint from the inputs (checked); the
    // caller vouches for validity and exclusivity.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// Writes an out-parameter after checking it for NULL (and alignment).
///
/// # Safety
/// `p` must be NULL or point to writable memory for one `T`.
pub(crate) unsafe fn write_out<T>(p: *mut T, v: T, what: &str) -> CResult<()> {
    if p.is_null() {
        return err(OTTKV_ERR_NULL, format!("{what} is NULL"));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return err(OTTKV_ERR_INVALID_ARGUMENT, format!("{what} is misaligned"));
    }
    // SAFETY: non-null and aligned (checked); the caller vouches it is writable.
    unsafe { p.write(v) };
    Ok(())
}

// ---- Library-level entry points ------------------------------------------------------------

/// `const char *ottkv_version(void)`.
#[no_mangle]
pub extern "C" fn ottkv_version() -> *const c_char {
    // A static string: no allocation, nothing that can fail or unwind.
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `uint32_t ottkv_abi_version(void)`.
#[no_mangle]
pub extern "C" fn ottkv_abi_version() -> u32 {
    ABI_VERSION
}

/// The ggml version in the process, as Rust reads it.
pub(crate) fn runtime_ggml_version() -> String {
    crate::ggml::version()
}

/// `const char *ottkv_ggml_version(void)`.
#[no_mangle]
pub extern "C" fn ottkv_ggml_version() -> *const c_char {
    // ggml returns a static string; calling it cannot unwind.
    // SAFETY: ggml_version takes nothing and returns a pointer to a static C string.
    unsafe { crate::ggml::sys::ggml_version() }
}

/// `const char *ottkv_last_error(void)`.
#[no_mangle]
pub extern "C" fn ottkv_last_error() -> *const c_char {
    // The pointer stays valid until LAST_ERROR is replaced, i.e. the next call on this
    // thread (the header's contract). During thread teardown, fall back to a static "".
    LAST_ERROR
        .try_with(|e| e.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// `const char *ottkv_status_name(int status)`.
#[no_mangle]
pub extern "C" fn ottkv_status_name(status: c_int) -> *const c_char {
    usize::try_from(status)
        .ok()
        .and_then(|i| STATUS_NAMES.get(i))
        .map_or(c"unknown".as_ptr(), |s| s.as_ptr())
}

/// `int ottkv_cuda_available(void)`.
#[no_mangle]
pub extern "C" fn ottkv_cuda_available() -> c_int {
    let mut ok = 0;
    let st = guard("ottkv_cuda_available", || {
        cuda_probe()?;
        ok = 1;
        Ok(())
    });
    debug_assert!(st == OTTKV_OK || ok == 0);
    ok
}

#[cfg(not(feature = "cuda"))]
fn cuda_probe() -> CResult<()> {
    err(
        OTTKV_ERR_NO_DEVICE,
        "ottkv was built without the `cuda` feature (and has no CUDA cache yet)",
    )
}

#[cfg(feature = "cuda")]
fn cuda_probe() -> CResult<()> {
    // cudarc panics when libcuda is missing (DESIGN.md §8): ask first.
    // SAFETY: is_culib_present only tries to dlopen libcuda.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return err(OTTKV_ERR_NO_DEVICE, "libcuda not found (no NVIDIA driver)");
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => err(OTTKV_ERR_NO_DEVICE, "no CUDA device"),
        Err(e) => err(OTTKV_ERR_NO_DEVICE, format!("CUDA driver: {e:?}")),
    }
}
