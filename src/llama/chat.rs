//! llama.cpp's own chat formatting (`llama_chat_apply_template`): a fixed list of known
//! formats recognised from the template text, no Jinja. Our server renders templates with
//! Jinja; this is the independent reference its tests compare against.

use crate::error::{Error, Result};
use crate::ggml::sys;
use std::ffi::CString;

/// `messages` (role, content) formatted the way llama.cpp formats the chat that `template`
/// (a model's Jinja template, or a name such as `chatml`) stands for; `add_assistant` ends
/// with the start of an assistant turn.
pub fn chat_apply_template(
    template: &str,
    messages: &[(&str, &str)],
    add_assistant: bool,
) -> Result<String> {
    let c = |s: &str| {
        CString::new(s).map_err(|_| Error::InvalidArgument("chat text contains a NUL byte".into()))
    };
    let tmpl = c(template)?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, t)| Ok((c(r)?, c(t)?)))
        .collect::<Result<_>>()?;
    let msgs: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, t)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: t.as_ptr(),
        })
        .collect();
    let total: usize = messages.iter().map(|(r, t)| r.len() + t.len()).sum();
    let mut buf = vec![0u8; 2 * total + 256];
    for _ in 0..2 {
        let len = i32::try_from(buf.len())
            .map_err(|_| Error::InvalidArgument("chat too long to format".into()))?;
        // SAFETY: every pointer in msgs points into `owned`, alive for the call; buf has
        // buf.len() writable bytes; llama.cpp writes at most `len` and returns the full size.
        let n = unsafe {
            sys::llama_chat_apply_template(
                tmpl.as_ptr(),
                msgs.as_ptr(),
                msgs.len(),
                add_assistant,
                buf.as_mut_ptr() as *mut _,
                len,
            )
        };
        if n < 0 {
            return Err(Error::Llama(
                "llama.cpp does not know this chat template".into(),
            ));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return String::from_utf8(buf)
                .map_err(|_| Error::Llama("chat template output is not UTF-8".into()));
        }
        buf.resize(n, 0);
    }
    Err(Error::Llama("chat template output kept growing".into()))
}
