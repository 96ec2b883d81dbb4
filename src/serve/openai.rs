//! OpenAI's endpoints: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, with its
//! response shapes, `usage`, and SSE chunks ending in `data: [DONE]`; llama-server's
//! `timings` ride along as it adds them.

use super::error::ApiError;
use super::params::{self, Api};
use super::routes::{check_prompt, collect, random_id, render_chat, sse, timings, JsonBody};
use super::slots::{Done, Event};
use super::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::sync::Arc;

type St = State<Arc<AppState>>;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn models(State(s): St) -> Json<Value> {
    let i = &s.info;
    Json(json!({
        "object": "list",
        "data": [{
            "id": i.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "ottkv",
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
            "meta": {
                "n_vocab": i.n_vocab,
                "n_ctx_train": i.n_ctx_train,
                "n_embd": i.n_embd,
                "n_params": i.n_params,
                "size": i.file_size,
            },
        }],
    }))
}

fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.n_prompt,
        "completion_tokens": d.n_predicted(),
        "total_tokens": d.n_prompt + d.n_predicted(),
        "prompt_tokens_details": {"cached_tokens": 0},
    })
}

/// What OpenAI's options ask that this server does not do, refused by name.
fn refuse_unsupported(b: &Map<String, Value>) -> Result<(), ApiError> {
    if params::get_i64(b, "n")?.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    if let Some(f) = b.get("response_format") {
        let ty = f.get("type").and_then(Value::as_str);
        if ty.is_some_and(|t| t != "text") {
            return Err(ApiError::not_supported(
                "response_format other than text is not supported (no grammar sampling)",
            ));
        }
    }
    if b.get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return Err(ApiError::not_supported("tools are not supported yet"));
    }
    Ok(())
}

fn include_usage(b: &Map<String, Value>) -> Result<bool, ApiError> {
    match b.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(o)) => Ok(params::get_bool(o, "include_usage")?.unwrap_or(false)),
        Some(_) => Err(ApiError::bad_request(
            "\"stream_options\" must be an object",
        )),
    }
}

/// Shapes shared by both endpoints: the object names and how a piece of text is put.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Chat,
}

pub async fn completions(State(s): St, JsonBody(b): JsonBody) -> Result<Response, ApiError> {
    let prompt = b
        .get("prompt")
        .ok_or_else(|| ApiError::bad_request("\"prompt\" is required"))?;
    let tokens = params::prompt_tokens(prompt, &s.vocab)?;
    run(s, b, tokens, Kind::Text).await
}

pub async fn chat(State(s): St, JsonBody(b): JsonBody) -> Result<Response, ApiError> {
    let text = render_chat(&s, &b)?;
    // A template that writes BOS itself must not get a second one from the tokenizer.
    let bos_in_text = s
        .vocab
        .bos()
        .and_then(|t| s.vocab.token_text(t).ok())
        .is_some_and(|t| !t.is_empty() && text.starts_with(&t));
    let tokens = s
        .vocab
        .tokenize_with(&text, !bos_in_text, true)
        .map_err(|e| ApiError::bad_request(format!("could not tokenize the chat: {e}")))?;
    run(s, b, tokens, Kind::Chat).await
}

async fn run(
    s: Arc<AppState>,
    b: Map<String, Value>,
    tokens: Vec<i32>,
    kind: Kind,
) -> Result<Response, ApiError> {
    refuse_unsupported(&b)?;
    let gp = params::gen_params(&b, &s.defaults, Api::OpenAi)?;
    let stream = params::get_bool(&b, "stream")?.unwrap_or(false);
    let with_usage = include_usage(&b)?;
    check_prompt(&s, &tokens)?;
    let (task, rx) = s.engine.submit(tokens, gp)?;
    let (id, object, chunk_object) = match kind {
        Kind::Text => (random_id("cmpl"), "text_completion", "text_completion"),
        Kind::Chat => (
            random_id("chatcmpl"),
            "chat.completion",
            "chat.completion.chunk",
        ),
    };
    log::info!("task {task}: {object}");
    let model = s.info.model_name.clone();
    let created = now();
    let fingerprint = format!("ottkv-{}", env!("CARGO_PKG_VERSION"));
    if !stream {
        let d = collect(rx).await?;
        let choice = match kind {
            Kind::Text => json!({
                "index": 0, "text": d.content, "logprobs": null,
                "finish_reason": d.stop_type.finish_reason(),
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": d.content},
                "logprobs": null,
                "finish_reason": d.stop_type.finish_reason(),
            }),
        };
        return Ok(Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [choice],
            "usage": usage(&d),
            "timings": timings(&d),
        }))
        .into_response());
    }
    let envelope = move |choices: Value| {
        json!({
            "id": id, "object": chunk_object, "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
        })
    };
    let piece = move |text: &str| match kind {
        Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}),
        Kind::Chat => {
            json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
        }
    };
    let mut first = matches!(kind, Kind::Chat);
    let render = move |ev: Event| {
        let mut out = Vec::new();
        if std::mem::take(&mut first) {
            // OpenAI's first chat chunk names the role and carries no text.
            out.push(envelope(json!([{
                "index": 0, "delta": {"role": "assistant", "content": null},
                "logprobs": null, "finish_reason": null,
            }])));
        }
        match ev {
            Event::Text { text, .. } => out.push(envelope(json!([piece(&text)]))),
            Event::Done(d) => {
                if !d.tail.is_empty() {
                    out.push(envelope(json!([piece(&d.tail)])));
                }
                let end = match kind {
                    Kind::Text => json!({"index": 0, "text": "", "logprobs": null,
                        "finish_reason": d.stop_type.finish_reason()}),
                    Kind::Chat => json!({"index": 0, "delta": {}, "logprobs": null,
                        "finish_reason": d.stop_type.finish_reason()}),
                };
                let mut last = envelope(json!([end]));
                last["timings"] = timings(&d);
                out.push(last);
                if with_usage {
                    let mut u = envelope(json!([]));
                    u["usage"] = usage(&d);
                    out.push(u);
                }
            }
            Event::Error(e) => out.push(e.to_json()),
        }
        out
    };
    Ok(sse(rx, render, true))
}
