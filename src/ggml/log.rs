//! Routes ggml's and llama.cpp's log lines to the `log` facade, so they follow `RUST_LOG`
//! instead of writing to stderr unasked.

use super::sys;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Once;

static INSTALL: Once = Once::new();

thread_local! {
    /// The first error line ggml or llama.cpp logged on this thread since the last
    /// `clear_logged_error` (they log the reason of a failed load, then a generic line, then
    /// return only NULL: the first line is the reason).
    static LOGGED_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Forgets the logged error of this thread (call before the call whose reason you want).
pub fn clear_logged_error() {
    let _ = LOGGED_ERROR.try_with(|e| e.borrow_mut().take());
}

/// The first error line ggml or llama.cpp logged on this thread since `clear_logged_error`.
pub fn logged_error() -> Option<String> {
    LOGGED_ERROR.try_with(|e| e.borrow().clone()).ok().flatten()
}

/// Installs the callback once per process; later calls are free.
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the callback is a plain function valid for the whole process and ignores
        // its user data, which we pass as null.
        unsafe {
            sys::ggml_log_set(Some(forward), std::ptr::null_mut());
            sys::llama_log_set(Some(forward), std::ptr::null_mut());
        }
    });
}

unsafe extern "C" fn forward(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: ggml passes a NUL-terminated string that lives for the duration of the call.
    let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let msg = msg.trim_end();
    if msg.is_empty() {
        return;
    }
    // One level down: llama.cpp warns about things a user of ours cannot act on (odd special
    // token ids in a file, say), and its errors are restated by ours with their context.
    if level == sys::GGML_LOG_LEVEL_ERROR {
        let _ = LOGGED_ERROR.try_with(|e| {
            e.borrow_mut().get_or_insert_with(|| msg.to_owned());
        });
    }
    let lvl = match level {
        sys::GGML_LOG_LEVEL_ERROR => log::Level::Warn,
        sys::GGML_LOG_LEVEL_WARN => log::Level::Info,
        sys::GGML_LOG_LEVEL_INFO => log::Level::Debug,
        _ => log::Level::Trace,
    };
    log::log!(target: "ggml", lvl, "{msg}");
}
