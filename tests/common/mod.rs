//! Shared by the integration tests: finding real models, and skipping visibly.
#![allow(dead_code)]

use std::path::PathBuf;

/// A real model by file name, or `None` after printing `skipping: <why>`. With
/// `OTTKV_REQUIRE_MODELS=1` a missing model fails the test instead.
pub fn model_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    if let Some(p) = ottkv::paths::find_model(name) {
        return Some(p);
    }
    let why = format!(
        "{name} not found in {:?} (run scripts/fetch.sh or set OTTKV_MODEL_DIR)",
        ottkv::paths::model_dirs()
    );
    if std::env::var("OTTKV_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    println!("skipping: {test}: {why}");
    None
}

/// The default text (`$OTTKV_TEXT` or the fetch script's copy), else wikitext beside the
/// checkout, or `None` after printing `skipping: <why>` (a failure with OTTKV_REQUIRE_MODELS=1).
pub fn text_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(p) = ottkv::paths::find_default_text() {
        return Some(p);
    }
    let wiki = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/corpus/wiki.test.raw"
    ));
    if wiki.is_file() {
        return Some(wiki);
    }
    let why = "no text found (run scripts/fetch.sh or set OTTKV_TEXT)";
    if std::env::var("OTTKV_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{test}: {why}");
    }
    println!("skipping: {test}: {why}");
    None
}
