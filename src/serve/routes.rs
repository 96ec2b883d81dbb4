//! The HTTP routes: llama-server's own endpoints here, the OpenAI ones in `openai`. Every
//! body is read as bytes and parsed here, so that malformed JSON, invalid UTF-8 or a body of
//! the wrong shape is a 400 with the error object, never a panic or a plain-text reply.

use super::error::ApiError;
use super::openai;
use super::params::{self, Api, GenParams};
use super::slots::{Done, Event};
use super::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

type St = State<Arc<AppState>>;

/// Bodies larger than this are refused (a prompt of a few million characters fits).
const MAX_BODY: usize = 32 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/completion", post(completion))
        .route("/completions", post(completion))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/apply-template", post(apply_template))
        .route("/props", get(props))
        .route("/slots", get(slots))
        .route("/metrics", get(metrics))
        .route("/models", get(openai::models))
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/chat/completions", post(openai::chat))
        .route("/v1/chat/completions", post(openai::chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// A request body that is a JSON object.
pub struct JsonBody(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|e| {
                ApiError::bad_request(format!(
                    "could not read the request body (at most {MAX_BODY} bytes): {e}"
                ))
            })?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        })?;
        match v {
            Value::Object(m) => Ok(JsonBody(m)),
            _ => Err(ApiError::bad_request(
                "the request body must be a JSON object",
            )),
        }
    }
}

async fn auth(State(s): St, req: Request, next: Next) -> Response {
    let Some(key) = &s.info.api_key else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    if path == "/health" || path == "/v1/health" {
        return next.run(req).await;
    }
    if presented_key(req.headers()).is_some_and(|k| same(k.as_bytes(), key.as_bytes())) {
        return next.run(req).await;
    }
    ApiError::unauthorized().into_response()
}

/// `Authorization: Bearer KEY`, or `X-Api-Key: KEY` as llama-server also takes.
fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    h.get("x-api-key").and_then(|v| v.to_str().ok())
}

/// Equality that takes as long for every key of a length (no early exit to time).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no endpoint {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    let mut e = ApiError::bad_request(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Tokens of a prompt checked against a slot's context.
pub fn check_prompt(s: &AppState, tokens: &[i32]) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "the prompt is empty (it tokenizes to no tokens)",
        ));
    }
    if tokens.len() > s.info.n_ctx {
        return Err(ApiError::exceeds_context(tokens.len(), s.info.n_ctx));
    }
    Ok(())
}

/// Waits for a job's end.
pub async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Done, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Text { .. }) => {}
            Some(Event::Done(d)) => return Ok(*d),
            Some(Event::Error(e)) => return Err(e),
            None => return Err(ApiError::server("the engine stopped")),
        }
    }
}

/// A Server-Sent Events response: `render` turns each event into `data:` payloads and says
/// whether it was the last; `done_marker` ends with OpenAI's `data: [DONE]`. An error
/// event becomes `data: {"error": ...}`.
pub fn sse<F>(rx: UnboundedReceiver<Event>, render: F, done_marker: bool) -> Response
where
    F: FnMut(Event) -> Vec<Value> + Send + 'static,
{
    struct S<F> {
        rx: UnboundedReceiver<Event>,
        render: F,
        buf: VecDeque<Bytes>,
        ended: bool,
        done_marker: bool,
    }
    let line = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
    let st = S {
        rx,
        render,
        buf: VecDeque::new(),
        ended: false,
        done_marker,
    };
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(b) = st.buf.pop_front() {
                return Some((Ok::<_, Infallible>(b), st));
            }
            if st.ended {
                return None;
            }
            let ev = st.rx.recv().await;
            let last = !matches!(ev, Some(Event::Text { .. }));
            let vals = match ev {
                Some(Event::Error(e)) => vec![e.to_json()],
                None => vec![ApiError::server("the engine stopped").to_json()],
                Some(ev) => (st.render)(ev),
            };
            st.buf.extend(vals.iter().map(line));
            if last {
                st.ended = true;
                if st.done_marker {
                    st.buf.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                }
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| ApiError::server(e.to_string()).into_response())
}

/// llama-server's `timings`.
pub fn timings(d: &Done) -> Value {
    let per = |ms: f64, n: usize| if n == 0 { 0.0 } else { ms / n as f64 };
    let rate = |ms: f64, n: usize| if ms <= 0.0 { 0.0 } else { 1e3 * n as f64 / ms };
    json!({
        "cache_n": 0,
        "prompt_n": d.n_prompt,
        "prompt_ms": d.prompt_ms,
        "prompt_per_token_ms": per(d.prompt_ms, d.n_prompt),
        "prompt_per_second": rate(d.prompt_ms, d.n_prompt),
        "predicted_n": d.n_predicted(),
        "predicted_ms": d.predicted_ms,
        "predicted_per_token_ms": per(d.predicted_ms, d.n_predicted()),
        "predicted_per_second": rate(d.predicted_ms, d.n_predicted()),
    })
}

/// Token ids as text: the bytes of every piece (special tokens as their text) joined, then
/// decoded, so that a character split over tokens comes out whole.
fn detok(s: &AppState, tokens: &[i32]) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    for &t in tokens {
        bytes.extend(
            s.vocab
                .token_bytes(t, true)
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        );
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

struct NativeRequest {
    prompt: Vec<i32>,
    params: GenParams,
    stream: bool,
    return_tokens: bool,
}

async fn completion(State(s): St, JsonBody(b): JsonBody) -> Result<Response, ApiError> {
    let prompt = b
        .get("prompt")
        .ok_or_else(|| ApiError::bad_request("\"prompt\" is required"))?;
    let r = NativeRequest {
        prompt: params::prompt_tokens(prompt, &s.vocab)?,
        params: params::gen_params(&b, &s.defaults, Api::Native)?,
        stream: params::get_bool(&b, "stream")?.unwrap_or(false),
        return_tokens: params::get_bool(&b, "return_tokens")?.unwrap_or(false),
    };
    // `cache_prompt` is accepted and has no effect: every request starts from an empty slot.
    params::get_bool(&b, "cache_prompt")?;
    check_prompt(&s, &r.prompt)?;
    let prompt_text = detok(&s, &r.prompt)?;
    let (id, rx) = s.engine.submit(r.prompt.clone(), r.params.clone())?;
    log::info!("task {id}: /completion, {} prompt tokens", r.prompt.len());
    let final_json = {
        let s = s.clone();
        let params = r.params.clone();
        move |d: &Done, content: &str, tokens: &[i32]| {
            let mut settings = params.to_json();
            if let Value::Object(m) = &mut settings {
                m.insert("n_ctx".into(), s.info.n_ctx.into());
                m.insert("model".into(), s.info.model_name.clone().into());
            }
            json!({
                "index": 0,
                "content": content,
                "tokens": tokens,
                "id_slot": d.slot,
                "stop": true,
                "model": s.info.model_name,
                "tokens_predicted": d.n_predicted(),
                "tokens_evaluated": d.n_prompt,
                "generation_settings": settings,
                "prompt": prompt_text,
                "has_new_line": d.has_new_line,
                "truncated": d.truncated,
                "stop_type": d.stop_type.name(),
                "stopping_word": d.stopping_word,
                "tokens_cached": 0,
                "timings": timings(d),
            })
        }
    };
    if !r.stream {
        let d = collect(rx).await?;
        let tokens = if r.return_tokens {
            d.tokens.clone()
        } else {
            Vec::new()
        };
        return Ok(Json(final_json(&d, &d.content, &tokens)).into_response());
    }
    let chunk = |text: &str, tokens: &[i32]| json!({"index": 0, "content": text, "tokens": tokens, "stop": false});
    Ok(sse(
        rx,
        move |ev| match ev {
            Event::Text { text, tokens } => vec![chunk(&text, &tokens)],
            Event::Done(d) => {
                let mut out = Vec::new();
                if !d.tail.is_empty() || !d.tail_tokens.is_empty() {
                    out.push(chunk(&d.tail, &d.tail_tokens));
                }
                out.push(final_json(&d, "", &[]));
                out
            }
            Event::Error(e) => vec![e.to_json()],
        },
        false,
    ))
}

async fn tokenize(State(s): St, JsonBody(b): JsonBody) -> Result<Json<Value>, ApiError> {
    let content = params::get_str(&b, "content")?
        .ok_or_else(|| ApiError::bad_request("\"content\" is required (a string)"))?;
    let add_special = params::get_bool(&b, "add_special")?.unwrap_or(false);
    let parse_special = params::get_bool(&b, "parse_special")?.unwrap_or(true);
    let with_pieces = params::get_bool(&b, "with_pieces")?.unwrap_or(false);
    let tokens = s
        .vocab
        .tokenize_with(content, add_special, parse_special)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if !with_pieces {
        return Ok(Json(json!({ "tokens": tokens })));
    }
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        let bytes = s
            .vocab
            .token_bytes(t, true)
            .map_err(|e| ApiError::server(e.to_string()))?;
        // A piece that is not whole UTF-8 is given as its bytes, as llama-server does.
        let piece = match String::from_utf8(bytes) {
            Ok(p) => json!(p),
            Err(e) => json!(e.into_bytes()),
        };
        out.push(json!({"id": t, "piece": piece}));
    }
    Ok(Json(json!({ "tokens": out })))
}

async fn detokenize(State(s): St, JsonBody(b): JsonBody) -> Result<Json<Value>, ApiError> {
    let tokens = params::token_list(b.get("tokens"), "tokens", &s.vocab)?;
    Ok(Json(json!({ "content": detok(&s, &tokens)? })))
}

/// The chat template applied to `messages` (plus `add_generation_prompt`, default true, and
/// `chat_template_kwargs`).
pub fn render_chat(s: &AppState, b: &Map<String, Value>) -> Result<String, ApiError> {
    let messages = params::chat_messages(b)?;
    let add_generation_prompt = params::get_bool(b, "add_generation_prompt")?.unwrap_or(true);
    let kwargs = match b.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "\"chat_template_kwargs\" must be an object",
            ))
        }
    };
    s.template
        .render(&messages, add_generation_prompt, &kwargs)
        .map_err(ApiError::bad_request)
}

async fn apply_template(State(s): St, JsonBody(b): JsonBody) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "prompt": render_chat(&s, &b)? })))
}

async fn props(State(s): St) -> Json<Value> {
    let idle = s.defaults.params();
    let i = &s.info;
    Json(json!({
        "default_generation_settings": {
            "id": 0,
            "id_task": -1,
            "n_ctx": i.n_ctx,
            "speculative": false,
            "is_processing": false,
            "params": idle.to_json(),
            "prompt": "",
        },
        "total_slots": i.n_slots,
        "model_path": i.model_path,
        "model_alias": i.model_name,
        "chat_template": s.template.source(),
        "chat_template_caps": {},
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("ottkv {}", env!("CARGO_PKG_VERSION")),
        "is_sleeping": false,
        "kv_cache": {
            "cache": i.cache_name,
            "resolved": i.cache_resolved,
            "bytes_per_slot_at_n_ctx": i.kv_bytes_full,
            "f16_bytes_per_slot_at_n_ctx": i.kv_bytes_full_f16,
        },
    }))
}

async fn slots(
    State(s): St,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let views = s.shared.lock().slots.clone();
    let fail = q
        .get("fail_on_no_slot")
        .is_some_and(|v| v == "1" || v == "true");
    if fail && views.iter().all(|v| v.is_processing) {
        return Err(ApiError::unavailable("no slot available"));
    }
    Ok(Json(Value::Array(
        views.iter().map(|v| v.to_json(&s.defaults)).collect(),
    )))
}

async fn metrics(State(s): St) -> Result<Response, ApiError> {
    if !s.info.metrics {
        return Err(ApiError::not_supported(
            "this server does not serve metrics: start it with --metrics",
        ));
    }
    let (m, views) = {
        let p = s.shared.lock();
        (p.metrics.clone(), p.slots.clone())
    };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let busy = views.iter().filter(|v| v.is_processing).count();
    let l = "llamacpp:";
    metric(
        &format!("{l}prompt_tokens_total"),
        "counter",
        "Number of prompt tokens processed.",
        &one(m.prompt_tokens_total as f64),
    );
    metric(
        &format!("{l}prompt_seconds_total"),
        "counter",
        "Prompt process time in seconds.",
        &one(m.prompt_seconds_total),
    );
    metric(
        &format!("{l}tokens_predicted_total"),
        "counter",
        "Number of generation tokens processed.",
        &one(m.tokens_predicted_total as f64),
    );
    metric(
        &format!("{l}tokens_predicted_seconds_total"),
        "counter",
        "Predict process time in seconds.",
        &one(m.tokens_predicted_seconds_total),
    );
    metric(
        &format!("{l}n_decode_total"),
        "counter",
        "Graphs computed (one per slot per step).",
        &one(m.n_decode_total as f64),
    );
    metric(
        &format!("{l}n_tokens_max"),
        "counter",
        "Most tokens a slot held.",
        &one(m.n_tokens_max as f64),
    );
    metric(
        &format!("{l}prompt_tokens_seconds"),
        "gauge",
        "Average prompt throughput in tokens/s.",
        &one(rate(m.prompt_tokens_total, m.prompt_seconds_total)),
    );
    metric(
        &format!("{l}predicted_tokens_seconds"),
        "gauge",
        "Average generation throughput in tokens/s.",
        &one(rate(
            m.tokens_predicted_total,
            m.tokens_predicted_seconds_total,
        )),
    );
    metric(
        &format!("{l}requests_processing"),
        "gauge",
        "Number of requests processing.",
        &one(busy as f64),
    );
    metric(
        &format!("{l}requests_deferred"),
        "gauge",
        "Number of requests waiting for a slot.",
        &one(s.engine.waiting() as f64),
    );
    let per_round = if m.n_rounds > 0 {
        m.busy_slots_sum as f64 / m.n_rounds as f64
    } else {
        0.0
    };
    metric(
        &format!("{l}n_busy_slots_per_decode"),
        "gauge",
        "Average number of busy slots per step.",
        &one(per_round),
    );
    let per_slot: Vec<(String, f64)> = views
        .iter()
        .map(|v| (format!("{{slot=\"{}\"}}", v.id), v.kv_bytes as f64))
        .collect();
    metric(
        "ottkv:kv_bytes",
        "gauge",
        "KV cache bytes allocated by each slot.",
        &per_slot,
    );
    let total: usize = views.iter().map(|v| v.kv_bytes).sum();
    metric(
        "ottkv:kv_bytes_total",
        "gauge",
        "KV cache bytes allocated by all slots.",
        &one(total as f64),
    );
    metric(
        "ottkv:kv_bytes_reserved",
        "gauge",
        "KV cache bytes reserved by the running requests (closed form of their sessions).",
        &one(m.kv_reserved as f64),
    );
    metric(
        "ottkv:kv_budget_bytes",
        "gauge",
        "KV cache bytes the running requests may reserve together (--kv-budget).",
        &one(m.kv_budget as f64),
    );
    let tokens: Vec<(String, f64)> = views
        .iter()
        .map(|v| (format!("{{slot=\"{}\"}}", v.id), v.n_past as f64))
        .collect();
    metric(
        "ottkv:kv_tokens",
        "gauge",
        "Tokens in each slot's KV cache.",
        &tokens,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// A fresh id for OpenAI responses (`chatcmpl-…`).
pub fn random_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{prefix}-{:016x}", h.finish())
}
