//! Request bodies: JSON with llama-server's and OpenAI's field names, read leniently (unknown
//! fields ignored) but strictly typed (a field of the wrong type is a 400 naming it).

use super::error::ApiError;
use crate::llama::LlamaModel;
use serde_json::{Map, Value};

/// What a request asks of the sampler and the stopping rules, with the server's defaults
/// filled in.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Most tokens to generate; `None` until the context is full.
    pub n_predict: Option<usize>,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// The seed as asked (-1: random), for `generation_settings`.
    pub seed_asked: i64,
    /// The seed used.
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl GenParams {
    /// `generation_settings` / a slot's `params`, in llama-server's names.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "n_predict": self.n_predict.map_or(-1, |n| n as i64),
            "max_tokens": self.n_predict.map_or(-1, |n| n as i64),
            "seed": self.seed_asked,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "samplers": ["top_k", "min_p", "temperature", "top_p"],
        })
    }
}

/// Server-wide defaults (`-n`, `--temp`, `--seed`).
#[derive(Clone, Debug)]
pub struct Defaults {
    pub n_predict: i64,
    pub temperature: f32,
    pub seed: i64,
}

impl Defaults {
    /// The settings a request gets when it names none.
    pub fn params(&self) -> GenParams {
        GenParams {
            n_predict: usize::try_from(self.n_predict).ok(),
            temperature: self.temperature,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed_asked: self.seed,
            seed: resolve_seed(self.seed),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A seed from the clock and a counter when -1 (llama-server's 4294967295 too).
fn resolve_seed(asked: i64) -> u64 {
    if asked >= 0 && asked != u32::MAX as i64 {
        return asked as u64;
    }
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS once per process; the counter tells requests apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Which API's names a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/completion`: `stop` is an array.
    Native,
    /// `/v1/...`: `stop` is a string or an array.
    OpenAi,
}

pub fn get_bool(b: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match b.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(x)) => Ok(Some(*x)),
        Some(v) => Err(wrong(key, "a boolean", v)),
    }
}

pub fn get_i64(b: &Map<String, Value>, key: &str) -> Result<Option<i64>, ApiError> {
    match b.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(x) => Ok(Some(x)),
            // 4294967295-style seeds fit in u64 but also here; anything larger is refused.
            None => match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                _ => Err(wrong(key, "an integer", &Value::Number(n.clone()))),
            },
        },
        Some(v) => Err(wrong(key, "an integer", v)),
    }
}

pub fn get_f32(b: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    match b.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() && x.abs() <= f32::MAX as f64 => Ok(Some(x as f32)),
            _ => Err(wrong(key, "a finite number", &Value::Number(n.clone()))),
        },
        Some(v) => Err(wrong(key, "a number", v)),
    }
}

pub fn get_str<'a>(b: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ApiError> {
    match b.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(wrong(key, "a string", v)),
    }
}

fn wrong(key: &str, want: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::bad_request(format!("\"{key}\" must be {want}, not {kind}"))
}

/// The generation settings of a request body.
pub fn gen_params(b: &Map<String, Value>, d: &Defaults, api: Api) -> Result<GenParams, ApiError> {
    let mut p = d.params();
    // llama-server reads OpenAI's names on every endpoint; `n_predict` wins.
    let mut n_predict = None;
    for key in ["max_tokens", "max_completion_tokens", "n_predict"] {
        if let Some(n) = get_i64(b, key)? {
            n_predict = Some(n);
        }
    }
    if let Some(n) = n_predict {
        // Negative is "no limit", as in llama-server.
        p.n_predict = usize::try_from(n).ok();
    }
    if let Some(t) = get_f32(b, "temperature")? {
        // Below zero is greedy, as llama.cpp takes it.
        p.temperature = t.max(0.0);
    }
    if let Some(k) = get_i64(b, "top_k")? {
        p.top_k = usize::try_from(k).unwrap_or(0);
    }
    if let Some(x) = get_f32(b, "top_p")? {
        if !(0.0..=1.0).contains(&x) {
            return Err(ApiError::bad_request(format!(
                "\"top_p\" {x} is not in [0, 1]"
            )));
        }
        // 0 keeps only the best token, which top-p 1e-9 does too.
        p.top_p = x.max(1e-9);
    }
    if let Some(x) = get_f32(b, "min_p")? {
        if !(0.0..=1.0).contains(&x) {
            return Err(ApiError::bad_request(format!(
                "\"min_p\" {x} is not in [0, 1]"
            )));
        }
        p.min_p = x;
    }
    if let Some(s) = get_i64(b, "seed")? {
        p.seed_asked = s;
        p.seed = resolve_seed(s);
    }
    if let Some(x) = get_bool(b, "ignore_eos")? {
        p.ignore_eos = x;
    }
    p.stop = match b.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if api == Api::OpenAi => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong("stop[]", "a string", other)),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => Err(wrong(
            "stop",
            if api == Api::OpenAi {
                "a string or an array of strings"
            } else {
                "an array of strings"
            },
            v,
        ))?,
    };
    Ok(p)
}

/// A prompt as llama-server takes one: a string (BOS added when the model's tokenizer adds
/// it; special-token text parsed), token ids, or both mixed (`[12, "text", 34]`, BOS only
/// when the first element is text). Several prompts in one request are refused.
pub fn prompt_tokens(v: &Value, vocab: &LlamaModel) -> Result<Vec<i32>, ApiError> {
    let text = |s: &str, add_special: bool| {
        vocab
            .tokenize_with(s, add_special, true)
            .map_err(|e| ApiError::bad_request(format!("could not tokenize the prompt: {e}")))
    };
    let tokens = match v {
        Value::String(s) => text(s, true)?,
        Value::Array(a) => {
            let nested = a.iter().any(|x| x.is_array() || x.is_object());
            let all_text = a.iter().all(Value::is_string);
            if a.len() == 1 && nested {
                return prompt_tokens(&a[0], vocab);
            }
            if nested || (all_text && a.len() > 1) {
                return Err(ApiError::bad_request(
                    "several prompts in one request are not supported: send one request per prompt",
                ));
            }
            let mut out = Vec::new();
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::String(s) => out.extend(text(s, i == 0)?),
                    Value::Number(n) => out.push(token_id(n, vocab)?),
                    other => return Err(wrong("prompt[]", "a token id or a string", other)),
                }
            }
            out
        }
        Value::Object(o) => {
            if o.contains_key("multimodal_data") {
                return Err(ApiError::not_supported(
                    "multimodal prompts are not supported by this server",
                ));
            }
            match o.get("prompt_string") {
                Some(Value::String(s)) => text(s, true)?,
                _ => {
                    return Err(ApiError::bad_request(
                        "a prompt object needs \"prompt_string\" (a string)",
                    ))
                }
            }
        }
        other => {
            return Err(wrong(
                "prompt",
                "a string, an array of token ids, or both",
                other,
            ))
        }
    };
    Ok(tokens)
}

/// A token id the vocabulary has.
pub fn token_id(n: &serde_json::Number, vocab: &LlamaModel) -> Result<i32, ApiError> {
    let n_vocab = vocab.n_vocab();
    match n.as_i64() {
        Some(t) if t >= 0 && (t as u64) < n_vocab as u64 => Ok(t as i32),
        _ => Err(ApiError::bad_request(format!(
            "token id {n} is outside the vocabulary (0..{n_vocab})"
        ))),
    }
}

/// A list of token ids (`/detokenize`).
pub fn token_list(v: Option<&Value>, key: &str, vocab: &LlamaModel) -> Result<Vec<i32>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| match x {
                Value::Number(n) => token_id(n, vocab),
                other => Err(wrong(&format!("{key}[]"), "a token id", other)),
            })
            .collect(),
        Some(other) => Err(wrong(key, "an array of token ids", other)),
    }
}

/// OpenAI chat messages as a template reads them: content parts of type `text` joined with
/// newlines (llama.cpp's rule), `null` content as "", other fields kept.
pub fn chat_messages(b: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let msgs = match b.get("messages") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request("\"messages\" is required"));
        }
        Some(other) => return Err(wrong("messages", "an array of messages", other)),
    };
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(wrong(&format!("messages[{i}]"), "an object", m));
        };
        let mut m = m.clone();
        match m.get("role") {
            Some(Value::String(_)) => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}] needs a \"role\" (a string)"
                )))
            }
        }
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    let ty = p.get("type").and_then(Value::as_str).unwrap_or("");
                    if ty != "text" {
                        return Err(ApiError::not_supported(format!(
                            "messages[{i}]: content parts of type {ty:?} are not supported \
                             (text only)"
                        )));
                    }
                    let Some(t) = p.get("text").and_then(Value::as_str) else {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}]: a text part needs \"text\" (a string)"
                        )));
                    };
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(t);
                }
                text
            }
            Some(other) => {
                return Err(wrong(
                    &format!("messages[{i}].content"),
                    "a string or an array of parts",
                    other,
                ))
            }
        };
        m.insert("content".into(), Value::String(content));
        out.push(Value::Object(m));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn settings_types_and_names() {
        let d = Defaults {
            n_predict: -1,
            temperature: 0.8,
            seed: -1,
        };
        let p = gen_params(
            &obj(json!({"max_tokens": 5, "stop": "x", "unknown": [1]})),
            &d,
            Api::OpenAi,
        )
        .unwrap();
        assert_eq!(
            (p.n_predict, p.stop.as_slice()),
            (Some(5), &["x".to_string()][..])
        );
        let p = gen_params(
            &obj(json!({"max_tokens": 5, "n_predict": 3})),
            &d,
            Api::Native,
        );
        assert_eq!(p.unwrap().n_predict, Some(3));
        // A string `stop` is OpenAI's only.
        assert!(gen_params(&obj(json!({"stop": "x"})), &d, Api::Native).is_err());
        let e = gen_params(&obj(json!({"n_predict": "ten"})), &d, Api::Native).unwrap_err();
        assert!(
            e.message
                .contains("\"n_predict\" must be an integer, not a string"),
            "{e}"
        );
        assert!(gen_params(&obj(json!({"top_p": 1.5})), &d, Api::Native).is_err());
        assert!(gen_params(&obj(json!({"temperature": true})), &d, Api::Native).is_err());
        let p = gen_params(&obj(json!({"seed": 7, "temperature": -1})), &d, Api::Native).unwrap();
        assert_eq!((p.seed, p.temperature), (7, 0.0));
    }

    #[test]
    fn chat_content_parts() {
        let b = obj(json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "name": "x"}
        ]}));
        let m = chat_messages(&b).unwrap();
        assert_eq!(m[0]["content"], "a\nb");
        assert_eq!(m[1]["content"], "");
        assert_eq!(m[1]["name"], "x");
        assert!(chat_messages(&obj(json!({"messages": [{"content": "x"}]}))).is_err());
        assert!(chat_messages(&obj(json!({"messages": "hi"}))).is_err());
    }
}
