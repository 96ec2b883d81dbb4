//! ggml's own GGUF reader (`gguf_*`), used to cross-check files our writer produces: what ggml
//! reads must be what we wrote.

use super::sys;
use crate::error::{Error, Result};
use std::ffi::{CStr, CString};
use std::path::Path;

/// What ggml's reader sees in a GGUF file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgmlGgufSummary {
    pub version: u32,
    pub alignment: usize,
    pub data_offset: usize,
    pub keys: Vec<String>,
    /// (name, ggml type id, offset in the data section, size in bytes, ne)
    pub tensors: Vec<(String, u32, usize, usize, [i64; 4])>,
}

/// Reads the header of `path` with ggml's parser (metadata only, no tensor data).
pub fn read_with_ggml(path: &Path) -> Result<GgmlGgufSummary> {
    super::log::install();
    let cpath = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Ggml(format!("{}: path contains a NUL byte", path.display())))?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: cpath is NUL-terminated; with ctx null ggml allocates no tensors. Null = refused.
    let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
    if ctx.is_null() {
        return Err(Error::Ggml(format!(
            "ggml's gguf reader refused {}",
            path.display()
        )));
    }
    struct Guard(*mut sys::gguf_context);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: created by gguf_init_from_file above, freed once.
            unsafe { sys::gguf_free(self.0) }
        }
    }
    let g = Guard(ctx);
    let cstr = |p: *const std::ffi::c_char| {
        // SAFETY: ggml returns NUL-terminated strings owned by the live context.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    // SAFETY (all calls below): the context is live and every index is below the count ggml
    // reported for it.
    unsafe {
        let keys = (0..sys::gguf_get_n_kv(g.0))
            .map(|i| cstr(sys::gguf_get_key(g.0, i)))
            .collect();
        let tensors = (0..sys::gguf_get_n_tensors(g.0))
            .map(|i| {
                let ne = std::slice::from_raw_parts(sys::gguf_get_tensor_ne(g.0, i), 4);
                (
                    cstr(sys::gguf_get_tensor_name(g.0, i)),
                    sys::gguf_get_tensor_type(g.0, i),
                    sys::gguf_get_tensor_offset(g.0, i),
                    sys::gguf_get_tensor_size(g.0, i),
                    [ne[0], ne[1], ne[2], ne[3]],
                )
            })
            .collect();
        Ok(GgmlGgufSummary {
            version: sys::gguf_get_version(g.0),
            alignment: sys::gguf_get_alignment(g.0),
            data_offset: sys::gguf_get_data_offset(g.0),
            keys,
            tensors,
        })
    }
}
