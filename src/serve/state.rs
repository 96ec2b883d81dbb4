//! What the HTTP side and the engine thread share: each slot's state as last published by
//! the engine, the server's counters, and the facts about the model and settings.

use super::params::{Defaults, GenParams};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, MutexGuard};

/// One slot as the engine last saw it.
#[derive(Clone, Debug, Default)]
pub struct SlotView {
    pub id: usize,
    /// The request it runs, -1 when idle.
    pub id_task: i64,
    pub is_processing: bool,
    pub n_ctx: usize,
    /// KV bytes reserved for the running request (its session's closed form).
    pub kv_reserved: usize,
    /// Tokens in its KV cache.
    pub n_past: usize,
    pub kv_bytes: usize,
    pub n_prompt: usize,
    pub n_decoded: usize,
    pub has_new_line: bool,
    pub params: Option<GenParams>,
}

impl SlotView {
    pub fn to_json(&self, defaults: &Defaults) -> Value {
        let params = match &self.params {
            Some(p) => p.to_json(),
            None => defaults.params().to_json(),
        };
        let n_remain = match &self.params {
            Some(GenParams {
                n_predict: Some(n), ..
            }) => n.saturating_sub(self.n_decoded) as i64,
            _ => -1,
        };
        json!({
            "id": self.id,
            "id_task": self.id_task,
            "n_ctx": self.n_ctx,
            "speculative": false,
            "is_processing": self.is_processing,
            "params": params,
            "next_token": {
                "has_next_token": self.is_processing,
                "has_new_line": self.has_new_line,
                "n_remain": n_remain,
                "n_decoded": self.n_decoded,
            },
            "n_past": self.n_past,
            "n_prompt_tokens": self.n_prompt,
            "kv_bytes": self.kv_bytes,
            "kv_bytes_reserved": self.kv_reserved,
        })
    }
}

/// Counters in llama-server's metric names.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub prompt_tokens_total: u64,
    pub prompt_seconds_total: f64,
    pub tokens_predicted_total: u64,
    pub tokens_predicted_seconds_total: f64,
    /// Graphs computed (one per slot per round).
    pub n_decode_total: u64,
    /// Busy slots summed over rounds, and the rounds.
    pub busy_slots_sum: u64,
    pub n_rounds: u64,
    /// The most tokens any slot held.
    pub n_tokens_max: u64,
    /// KV bytes the running jobs reserved, against the budget.
    pub kv_reserved: usize,
    pub kv_budget: usize,
}

/// Slots and counters behind one lock: the engine publishes once per round.
#[derive(Default)]
pub struct Published {
    pub slots: Vec<SlotView>,
    pub metrics: Metrics,
}

#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Published>>);

impl Shared {
    /// The lock, also after a panic elsewhere (the data are counters and snapshots).
    pub fn lock(&self) -> MutexGuard<'_, Published> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Facts about the model and the settings, fixed at startup.
#[derive(Clone, Debug)]
pub struct Info {
    pub model_path: String,
    /// `--alias`, else the model path: the `model` of every response.
    pub model_name: String,
    pub n_ctx: usize,
    pub n_slots: usize,
    /// The cache as named (`recommended`) and what it stands for.
    pub cache_name: String,
    pub cache_resolved: String,
    pub api_key: Option<String>,
    pub metrics: bool,
    pub n_vocab: usize,
    pub n_ctx_train: u64,
    pub n_embd: u64,
    pub n_params: u64,
    pub file_size: u64,
    /// KV bytes one slot's cache holds at `n_ctx` tokens (closed form), ours and f16's.
    pub kv_bytes_full: f64,
    pub kv_bytes_full_f16: f64,
}

/// Everything a handler needs.
pub struct AppState {
    pub vocab: Arc<crate::llama::LlamaModel>,
    pub template: super::template::ChatTemplate,
    pub engine: super::slots::EngineHandle,
    pub shared: Shared,
    pub info: Info,
    pub defaults: Defaults,
}
