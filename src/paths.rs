//! Where models and texts are looked up: `$OTTKV_MODEL_DIR`, then the fetch script's cache
//! (`$OTTKV_CACHE_DIR`, default `~/.cache/ottkv`), then a `shared/models` beside the checkout.

use std::path::PathBuf;

/// The default model README's commands run (fetched by `scripts/fetch.sh`).
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default text (fetched by `scripts/fetch.sh`).
pub const DEFAULT_TEXT: &str = "shakespeare-hamlet.txt";

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("OTTKV_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ottkv"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ottkv"))
}

/// Directories searched for model files, in order.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("OTTKV_MODEL_DIR") {
        v.push(PathBuf::from(d));
    }
    if let Some(c) = cache_dir() {
        v.push(c.join("models"));
    }
    v.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/models"
    )));
    v
}

/// The first existing file called `name` in `model_dirs()`.
pub fn find_model(name: &str) -> Option<PathBuf> {
    model_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The default text: `$OTTKV_TEXT`, else the fetch script's copy.
pub fn find_default_text() -> Option<PathBuf> {
    if let Some(t) = std::env::var_os("OTTKV_TEXT") {
        let p = PathBuf::from(t);
        if p.is_file() {
            return Some(p);
        }
    }
    let p = cache_dir()?.join("data").join(DEFAULT_TEXT);
    p.is_file().then_some(p)
}
