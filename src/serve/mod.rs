//! `ottkv serve`: an HTTP server with llama-server's API (and OpenAI's), over our engine and
//! its KV caches.
//!
//! Layout: `args` (flags), `slots` (the engine thread: N slots, one [`Session`] each over
//! one model, interleaved token by token), `routes` and `openai` (axum handlers), `params`
//! (request bodies), `template` (chat templates through minijinja), `text` (UTF-8 and stop
//! strings while streaming), `state` (what handlers and the engine share), `error`
//! (llama-server's error object).
//!
//! This is many sequences with one graph each: every slot computes its own graph over its own
//! cache, and the engine takes the slots in turn; requests are admitted against a KV memory
//! budget (see `slots`). Batching all sequences into one graph is a later step.
//!
//! [`Session`]: crate::model::Session

pub mod args;
pub mod error;
pub mod openai;
pub mod params;
pub mod routes;
pub mod slots;
pub mod state;
pub mod template;
pub mod text;

pub use args::Args;

use crate::error::{Error, Result};
use crate::kind::{BlockType, CacheKind};
use crate::llama::LlamaModel;
use state::{AppState, Info, Shared};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

/// How long in-flight connections get to close after SIGINT/SIGTERM before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub fn run(a: &Args) -> Result<()> {
    let (cache_name, kind) = a.cache_kind()?;
    let template_override = a.chat_template_source()?;
    let vocab = Arc::new(LlamaModel::load(&a.model, true)?);
    let (gguf_template, n_params, file_size) = {
        let file = crate::gguf::GgufFile::open(&a.model)?;
        let g = file.gguf();
        let t = g.get_str_opt("tokenizer.chat_template")?.map(str::to_owned);
        let n: u64 = g.tensors().iter().map(|t| t.n_elements).sum();
        (t, n, file.file_size())
    };
    let source = match (template_override, gguf_template) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => {
            log::warn!("the model has no chat template: using ChatML");
            template::CHATML.to_owned()
        }
    };
    let text_of = |t: Option<i32>| t.and_then(|t| vocab.token_text(t).ok()).unwrap_or_default();
    let chat = template::ChatTemplate::new(&source, &text_of(vocab.bos()), &text_of(vocab.eos()))
        .map_err(Error::InvalidArgument)?;

    let shared = Shared::default();
    let cfg = slots::EngineConfig {
        model: a.model.clone(),
        n_slots: a.parallel,
        n_ctx: a.ctx_size,
        n_batch: a.batch_size,
        threads: a.threads,
        cache: kind.clone(),
        queue: a.queue,
        kv_budget: a.kv_budget,
    };
    let (engine, start, engine_thread) = slots::start(cfg, vocab.clone(), shared.clone())?;
    let hp = &start.hparams;

    // What one slot's cache costs at a full context, ours against f16 (closed forms, as
    // `compare` and `inspect` cost them).
    let elems_per_token = 2.0 * hp.n_layer as f64 * hp.n_head_kv as f64 * hp.head_dim_k as f64;
    let bytes_at = |k: &CacheKind| -> Result<f64> { Ok(k.bytes_at(hp, a.ctx_size)? as f64) };
    let f16 = CacheKind::Block {
        ty: BlockType::F16,
        rotate: false,
    };
    let (ours, theirs) = (bytes_at(&kind)?, bytes_at(&f16)?);
    let mib = |b: f64| b / (1u64 << 20) as f64;
    let info = Info {
        model_path: a.model.display().to_string(),
        model_name: a
            .alias
            .clone()
            .unwrap_or_else(|| a.model.display().to_string()),
        n_ctx: a.ctx_size,
        n_slots: a.parallel,
        cache_name: cache_name.clone(),
        cache_resolved: kind.to_string(),
        api_key: a.api_key.clone(),
        metrics: a.metrics,
        n_vocab: vocab.n_vocab(),
        n_ctx_train: hp.n_ctx_train as u64,
        n_embd: hp.n_embd as u64,
        n_params,
        file_size,
        kv_bytes_full: ours,
        kv_bytes_full_f16: theirs,
    };
    let state = Arc::new(AppState {
        vocab,
        template: chat,
        engine,
        shared,
        info,
        defaults: params::Defaults {
            n_predict: a.n_predict,
            temperature: a.temp,
            seed: a.seed,
        },
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidArgument(format!("could not start the HTTP runtime: {e}")))?;
    let result = rt.block_on(async {
        let addr = format!("{}:{}", a.host, a.port);
        // (host, port) rather than the joined string, so that IPv6 literals bind too.
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| Error::io(&addr, e))?;
        let local = listener.local_addr().map_err(|e| Error::io(&addr, e))?;
        let per_token = |b: f64| b / a.ctx_size as f64 / 1024.0;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "KV cache per slot at {} tokens: {} {:.2} MiB ({:.2} KiB/token, {:.2} bits/element) \
             vs f16 {:.2} MiB ({:.2} KiB/token): {:.2}x less; {} slot(s), each allocating its \
             cache when a request starts ({:.2} MiB as made for a full-context request)",
            a.ctx_size,
            cache_name,
            mib(ours),
            per_token(ours),
            8.0 * ours / (elems_per_token * a.ctx_size as f64),
            mib(theirs),
            per_token(theirs),
            theirs / ours.max(1.0),
            a.parallel,
            mib(start.kv_bytes_start as f64),
        );
        let budget = start.kv_budget as f64;
        let _ =
            writeln!(
            out,
            "KV budget {:.2} MiB{}: about {:.0} tokens of {} at once over all slots, {:.0} of f16",
            mib(budget),
            if a.kv_budget.is_some() { "" } else { " (slots x -c at f16)" },
            budget / ours.max(1.0) * a.ctx_size as f64,
            cache_name,
            budget / theirs.max(1.0) * a.ctx_size as f64,
        );
        let _ = writeln!(out, "listening on http://{local}");
        let _ = out.flush();
        drop(out);

        let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
        let st = state.clone();
        let on_signal = async move {
            wait_for_signal().await;
            eprintln!("shutting down: cancelling in-flight requests");
            st.engine.shutdown();
            let _ = stopping_tx.send(true);
        };
        let server =
            axum::serve(listener, routes::router(state.clone())).with_graceful_shutdown(on_signal);
        tokio::select! {
            r = server => r.map_err(|e| Error::io(&addr, e)),
            _ = async {
                let _ = stopping_rx.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                log::warn!("connections still open {SHUTDOWN_GRACE:?} after the signal: exiting");
                Ok(())
            }
        }
    });
    state.engine.shutdown();
    // Drop the handlers' state first so that the engine sees its channel close too.
    drop(state);
    drop(rt);
    let _ = engine_thread.join();
    result
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
