//! The tokenizer metadata, checked against what libllama's vocabulary loader and tokenizer
//! assert on (llama.cpp `src/llama-vocab.cpp`), so that a file that would abort the process
//! inside libllama is refused here with an error naming the key.
//!
//! llama.cpp throws (and its loader turns into a failed load) for most bad tokenizer data, but
//! a few cases end in `GGML_ASSERT`/`GGML_ABORT` or in an exception that escapes through the C
//! API, which terminates the process:
//! - two tokens with the same text (`id_to_token.size() == token_to_id.size()`), empty tokens
//!   counting as `[EMPTY_<id>]`;
//! - tokenizer models without a tokenizer (`none`, `no_vocab`) or whose tokenize/detokenize
//!   paths abort for some inputs (`bert`); only the two this crate's architectures use are
//!   accepted: `llama` (SentencePiece) and `gpt2` (byte-level BPE);
//! - BOS/EOS added by tokenization while the id resolves to no token;
//! - a SentencePiece vocabulary without the 256 `<0xXX>` byte tokens: text it cannot cover
//!   falls back to them through `std::map::at`, which throws out of `llama_tokenize`.

use std::borrow::Cow;
use std::collections::HashMap;

use super::error::{GgufError, Result};
use super::header::Gguf;
use super::value::{Array, Value};

pub const MODEL_KEY: &str = "tokenizer.ggml.model";
pub const TOKENS_KEY: &str = "tokenizer.ggml.tokens";
pub const SCORES_KEY: &str = "tokenizer.ggml.scores";
pub const TOKEN_TYPE_KEY: &str = "tokenizer.ggml.token_type";
pub const MERGES_KEY: &str = "tokenizer.ggml.merges";
const BOS_KEY: &str = "tokenizer.ggml.bos_token_id";
const EOS_KEY: &str = "tokenizer.ggml.eos_token_id";
const ADD_BOS_KEY: &str = "tokenizer.ggml.add_bos_token";
const ADD_EOS_KEY: &str = "tokenizer.ggml.add_eos_token";
/// Special-token ids llama.cpp reads (as u32) besides BOS and EOS.
const OTHER_ID_KEYS: &[&str] = &[
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.mask_token_id",
];

/// llama.cpp stores token ids as `int32_t`.
pub const MAX_TOKENS: usize = i32::MAX as usize;

/// The tokenizers this crate's architectures use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerModel {
    /// `llama`: SentencePiece with byte fallback.
    Spm,
    /// `gpt2`: byte-level BPE with merges.
    Bpe,
}

impl TokenizerModel {
    pub fn name(self) -> &'static str {
        match self {
            TokenizerModel::Spm => "llama",
            TokenizerModel::Bpe => "gpt2",
        }
    }

    /// llama.cpp's default BOS / EOS ids for this tokenizer when the file names none.
    fn default_bos_eos(self) -> (u32, u32) {
        match self {
            TokenizerModel::Spm => (1, 2),
            TokenizerModel::Bpe => (11, 11),
        }
    }
}

/// What the check learned about the vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabInfo {
    pub model: TokenizerModel,
    pub n_tokens: usize,
}

fn bad(key: &str, reason: impl Into<String>) -> GgufError {
    GgufError::Vocab {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Checks the tokenizer metadata of `g` (see the module documentation for what and why).
pub fn check_vocab(g: &Gguf) -> Result<VocabInfo> {
    let model = match g.get_str(MODEL_KEY)? {
        "llama" => TokenizerModel::Spm,
        "gpt2" => TokenizerModel::Bpe,
        other => {
            return Err(bad(
                MODEL_KEY,
                format!(
                    "'{other}' is not a tokenizer ottkv runs (llama = SentencePiece, gpt2 = \
                     byte-level BPE){}",
                    if matches!(other, "none" | "no_vocab") {
                        "; a model without a vocabulary cannot tokenize text"
                    } else {
                        ""
                    }
                ),
            ))
        }
    };
    let tokens = match g.get(TOKENS_KEY) {
        Some(Value::Array(Array::String(t))) => t,
        Some(v) => {
            return Err(bad(
                TOKENS_KEY,
                format!("must be an array of strings, not {}", describe(v)),
            ))
        }
        None => {
            return Err(GgufError::MissingKey {
                key: TOKENS_KEY.to_owned(),
            })
        }
    };
    let n = tokens.len();
    if n == 0 || n > MAX_TOKENS {
        return Err(bad(
            TOKENS_KEY,
            format!("{n} tokens (must be 1..={MAX_TOKENS})"),
        ));
    }
    check_unique(tokens)?;
    check_parallel_array(g, SCORES_KEY, n, &["f32", "i32"], |a| {
        matches!(a, Array::F32(_) | Array::I32(_))
    })?;
    check_parallel_array(g, TOKEN_TYPE_KEY, n, &["i32"], |a| {
        matches!(a, Array::I32(_))
    })?;
    if model == TokenizerModel::Bpe {
        match g.get(MERGES_KEY) {
            Some(Value::Array(Array::String(_))) => {}
            Some(v) => {
                return Err(bad(
                    MERGES_KEY,
                    format!("must be an array of strings, not {}", describe(v)),
                ))
            }
            None => {
                return Err(bad(
                    MERGES_KEY,
                    "missing (a gpt2 tokenizer needs its merges)",
                ))
            }
        }
    }
    for key in OTHER_ID_KEYS {
        token_id(g, key, n)?;
    }
    let (def_bos, def_eos) = model.default_bos_eos();
    let in_vocab = |id: u32| (id as usize) < n;
    let bos = token_id(g, BOS_KEY, n)?.or(Some(def_bos).filter(|&i| in_vocab(i)));
    let eos = token_id(g, EOS_KEY, n)?.or(Some(def_eos).filter(|&i| in_vocab(i)));
    // SentencePiece adds BOS unless told otherwise; some BPE pre-tokenizers do too, so BOS
    // must exist unless the file turns it off. EOS is added only when the file asks.
    let add_bos = flag(g, ADD_BOS_KEY)?.unwrap_or(true);
    let add_eos = flag(g, ADD_EOS_KEY)?.unwrap_or(false);
    if add_bos && bos.is_none() {
        return Err(bad(
            BOS_KEY,
            format!(
                "tokenization adds BOS but no token is BOS (no valid {BOS_KEY}, and the \
                 default id {def_bos} is outside the {n}-token vocabulary)"
            ),
        ));
    }
    if add_eos && eos.is_none() {
        return Err(bad(
            EOS_KEY,
            format!(
                "{ADD_EOS_KEY} is true but no token is EOS (no valid {EOS_KEY}, and the \
                 default id {def_eos} is outside the {n}-token vocabulary)"
            ),
        ));
    }
    if model == TokenizerModel::Spm {
        check_byte_tokens(tokens)?;
    }
    Ok(VocabInfo { model, n_tokens: n })
}

fn describe(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {}", a.elem_type()),
        other => format!("a {}", other.value_type()),
    }
}

/// llama.cpp maps token text to id and asserts the map is as large as the list. It reads each
/// token as a C string (up to its first NUL byte), and an empty token takes the text
/// `[EMPTY_<id>]`: what must be distinct is the text after both.
fn check_unique(tokens: &[String]) -> Result<()> {
    let mut seen: HashMap<Cow<'_, str>, usize> = HashMap::with_capacity(tokens.len());
    for (i, full) in tokens.iter().enumerate() {
        let t = full.split('\0').next().unwrap_or_default();
        let text = if t.is_empty() {
            Cow::Owned(format!("[EMPTY_{i}]"))
        } else {
            Cow::Borrowed(t)
        };
        if let Some(&first) = seen.get(text.as_ref()) {
            return Err(bad(
                TOKENS_KEY,
                format!(
                    "token #{i} {:?}{} repeats token #{first} (every token's text must be \
                     distinct)",
                    shorten(&text),
                    if full.len() > t.len() {
                        " (up to its NUL byte, as llama.cpp reads it)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        seen.insert(text, i);
    }
    Ok(())
}

/// At most 40 characters of a token, for messages.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

/// An optional per-token array: of an accepted element type, at least one entry per token.
fn check_parallel_array(
    g: &Gguf,
    key: &str,
    n: usize,
    types: &[&str],
    ok: impl Fn(&Array) -> bool,
) -> Result<()> {
    match g.get(key) {
        None => Ok(()),
        Some(Value::Array(a)) if ok(a) => {
            if a.len() < n {
                Err(bad(key, format!("{} entries for {n} tokens", a.len())))
            } else {
                Ok(())
            }
        }
        Some(v) => Err(bad(
            key,
            format!(
                "must be an array of {}, not {}",
                types.join(" or "),
                describe(v)
            ),
        )),
    }
}

/// A special-token id as llama.cpp resolves it: read as u32 (another type fails its load, so
/// it is refused here too); an id outside the vocabulary is ignored with a warning, leaving
/// llama.cpp's default.
fn token_id(g: &Gguf, key: &str, n: usize) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::U32(id)) if (*id as usize) < n => Ok(Some(*id)),
        Some(Value::U32(_)) => Ok(None),
        Some(v) => Err(bad(key, format!("must be a u32, not {}", describe(v)))),
    }
}

fn flag(g: &Gguf, key: &str) -> Result<Option<bool>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(key, format!("must be a bool, not {}", describe(v)))),
    }
}

/// SentencePiece's byte fallback looks up `<0xXX>` (or, for ASCII, the one-character token)
/// for every byte of text no piece covers.
fn check_byte_tokens(tokens: &[String]) -> Result<()> {
    let mut have = [false; 256];
    for t in tokens {
        let b = t.as_bytes();
        if b.len() == 6 && b.starts_with(b"<0x") && b[5] == b'>' {
            if let Ok(v) = u8::from_str_radix(&t[3..5], 16) {
                // llama.cpp looks up upper-case hex digits only.
                if t[3..5] == format!("{v:02X}") {
                    have[v as usize] = true;
                }
            }
        } else if b.len() == 1 && b[0] != 0 {
            // A lone NUL is the empty C string to llama.cpp, never found.
            have[b[0] as usize] = true;
        }
    }
    match have.iter().position(|&h| !h) {
        None => Ok(()),
        Some(b) => Err(bad(
            TOKENS_KEY,
            format!(
                "SentencePiece vocabulary without the byte token <0x{b:02X}> (llama.cpp's \
                 tokenizer falls back to byte tokens for text no piece covers)"
            ),
        )),
    }
}
