//! A llama.cpp model handle: full load (for the baseline) or vocab-only (for tokenizing).

use crate::error::{Error, Result};
use crate::ggml::sys;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

pub type Token = sys::llama_token;

/// Owner of a `llama_model`.
pub struct LlamaModel {
    ptr: NonNull<sys::llama_model>,
    path: PathBuf,
}

// SAFETY: a loaded llama_model is immutable and llama.cpp shares it between contexts on
// several threads; we never mutate it through `&self`.
unsafe impl Send for LlamaModel {}
unsafe impl Sync for LlamaModel {}

impl LlamaModel {
    /// Loads `path` with llama.cpp (CPU only). `vocab_only` skips the weights: enough to tokenize.
    pub fn load(path: &Path, vocab_only: bool) -> Result<Self> {
        super::backend_init();
        // Our checks run first: llama.cpp answers some malformed files (and ggml some tensor
        // types) with an assertion that aborts the process.
        let file = crate::gguf::GgufFile::open(path)?;
        crate::model::check_model(file.gguf())?;
        drop(file);
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Llama(format!("{}: path contains a NUL byte", path.display())))?;
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.vocab_only = vocab_only;
        params.n_gpu_layers = 0;
        crate::ggml::log::clear_logged_error();
        // SAFETY: cpath is NUL-terminated and outlives the call; null means llama.cpp refused
        // the file (it logs why, which our log bridge keeps).
        let raw = unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::Llama(match crate::ggml::log::logged_error() {
                Some(why) => format!("could not load {}: {why}", path.display()),
                None => format!(
                    "could not load {} (RUST_LOG=ggml=debug shows llama.cpp's log)",
                    path.display()
                ),
            })
        })?;
        Ok(Self {
            ptr,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model is live; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.as_ptr()) }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }

    /// Whether the model's tokenizer prepends BOS (what llama-perplexity does with add_special).
    pub fn add_bos(&self) -> bool {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    /// Whether `token` ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: vocab pointer from a live model; any id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    /// llama.cpp's tokenization of `text`; `add_special` adds BOS/EOS per the model's settings.
    /// Special-token text (`<|im_start|>`) is tokenized as plain text.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<Token>> {
        self.tokenize_with(text, add_special, false)
    }

    /// As [`tokenize`](Self::tokenize); with `parse_special` the text of a special token
    /// becomes that token, as a rendered chat template needs.
    pub fn tokenize_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>> {
        let len = i32::try_from(text.len()).map_err(|_| {
            Error::Llama(format!(
                "text of {} bytes is too long to tokenize",
                text.len()
            ))
        })?;
        // A token covers at least one byte, plus BOS/EOS.
        let mut out: Vec<Token> = vec![0; text.len() + 2];
        // SAFETY: text pointer/len describe valid bytes; out has room for n_tokens_max tokens.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr() as *const _,
                len,
                out.as_mut_ptr(),
                out.len() as i32,
                add_special,
                parse_special,
            )
        };
        if n < 0 {
            return Err(Error::Llama(format!("tokenize needed {} slots", -n)));
        }
        out.truncate(n as usize);
        Ok(out)
    }

    /// The text of one token (bytes as the tokenizer stores them, lossily decoded; special
    /// tokens render as nothing).
    pub fn token_to_piece(&self, token: Token) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.token_bytes(token, false)?).into_owned())
    }

    /// The bytes of one token, which may be part of a UTF-8 character; `special` renders
    /// special tokens (`<|im_end|>`) as their text instead of nothing.
    pub fn token_bytes(&self, token: Token, special: bool) -> Result<Vec<u8>> {
        self.check_token(token)?;
        let mut buf = vec![0u8; 64];
        for _ in 0..2 {
            // SAFETY: buf has buf.len() writable bytes; the token is in range (llama.cpp
            // indexes its tables with it unchecked and throws through the C API otherwise).
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut _,
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize((-n) as usize, 0);
        }
        Err(Error::Llama(format!(
            "token_to_piece failed for token {token}"
        )))
    }

    /// A token id the vocabulary has, or an error naming the range.
    pub fn check_token(&self, token: Token) -> Result<()> {
        let n = self.n_vocab();
        if token < 0 || token as usize >= n {
            return Err(Error::InvalidArgument(format!(
                "token id {token} outside the vocabulary (0..{n})"
            )));
        }
        Ok(())
    }

    /// The BOS token, if the vocabulary has one.
    pub fn bos(&self) -> Option<Token> {
        // SAFETY: vocab pointer from a live model.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        self.check_token(t).ok().map(|_| t)
    }

    /// The EOS token, if the vocabulary has one.
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: vocab pointer from a live model.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        self.check_token(t).ok().map(|_| t)
    }

    /// A token's text as the vocabulary stores it (`<|im_start|>`; SentencePiece's `▁` kept).
    pub fn token_text(&self, token: Token) -> Result<String> {
        self.check_token(token)?;
        // SAFETY: the token is in range; the string lives as long as the model.
        let p = unsafe { sys::llama_vocab_get_text(self.vocab(), token) };
        if p.is_null() {
            return Err(Error::Llama(format!("token {token} has no text")));
        }
        // SAFETY: llama.cpp returns a NUL-terminated string owned by the vocabulary.
        let s = unsafe { std::ffi::CStr::from_ptr(p) };
        Ok(s.to_string_lossy().into_owned())
    }
}

impl Drop for LlamaModel {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts borrow it and are dropped first.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}
