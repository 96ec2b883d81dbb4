//! `ottkv serve` flags, with llama-server's names where they apply.

use crate::kind::CacheKind;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[arg(short, long)]
    pub model: PathBuf,
    /// Context of each slot (prompt + generated tokens).
    #[arg(short = 'c', long, default_value_t = 4096, value_parser = crate::cli::parse_positive)]
    pub ctx_size: usize,
    /// Slots: sequences decoded at the same time (`-np`).
    #[arg(long, default_value_t = 1, value_parser = crate::cli::parse_positive)]
    pub parallel: usize,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed on the `listening on` line).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[arg(short, long, default_value_t = crate::cli::default_threads(), value_parser = crate::cli::parse_threads)]
    pub threads: usize,
    /// Most prompt tokens one slot computes in one step.
    #[arg(short = 'b', long, default_value_t = 512, value_parser = crate::cli::parse_positive)]
    pub batch_size: usize,
    /// llama.cpp's K cache type (f16, q8_0, q4_0; `-ctk`); must equal `-ctv`.
    #[arg(long, conflicts_with = "cache")]
    pub cache_type_k: Option<String>,
    /// llama.cpp's V cache type (`-ctv`); must equal `-ctk`.
    #[arg(long, conflicts_with = "cache")]
    pub cache_type_v: Option<String>,
    /// KV cache: a preset (recommended, ott4a, ott3a, ...), a spec string, or f16/q8_0/q4_0.
    #[arg(long)]
    pub cache: Option<String>,
    /// Tokens to generate when a request does not say (-1: until the context is full).
    #[arg(short = 'n', long, default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,
    /// Requests need `Authorization: Bearer KEY` (all but /health).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name in responses and /v1/models (default: the model path).
    #[arg(long)]
    pub alias: Option<String>,
    /// Serve Prometheus metrics on /metrics.
    #[arg(long)]
    pub metrics: bool,
    /// A Jinja chat template, or a file holding one, instead of the model's.
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Default sampling seed (-1: a new one per request).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,
    /// Default temperature (0: greedy).
    #[arg(long, default_value_t = 0.8, value_parser = crate::cli::generate::parse_temp)]
    pub temp: f32,
    /// Most requests waiting for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// KV cache memory, in MiB, all running requests may use together; a request waits
    /// until its cache fits (default: every slot at `-c` tokens of f16).
    #[arg(long, value_parser = parse_mib)]
    pub kv_budget: Option<usize>,
}

impl Args {
    /// The cache to build: `-ctk`/`-ctv` (equal), else `--cache`, else the recommended preset.
    pub fn cache_kind(&self) -> crate::Result<(String, CacheKind)> {
        let name = match (&self.cache_type_k, &self.cache_type_v) {
            (None, None) => self.cache.clone().unwrap_or_else(|| "recommended".into()),
            (k, v) => {
                // llama-server's default for the one not given.
                let k = k.as_deref().unwrap_or("f16");
                let v = v.as_deref().unwrap_or("f16");
                if k != v {
                    return Err(crate::Error::InvalidArgument(format!(
                        "-ctk {k} and -ctv {v} differ: this engine keeps K and V in one cache \
                         type; pass the same type to both (or use --cache)"
                    )));
                }
                if !matches!(k, "f16" | "q8_0" | "q4_0") {
                    return Err(crate::Error::InvalidArgument(format!(
                        "-ctk/-ctv {k}: one of f16, q8_0, q4_0 (our cache types: --cache)"
                    )));
                }
                k.to_owned()
            }
        };
        let kind: CacheKind = name.parse()?;
        Ok((name, kind))
    }

    /// `--chat-template`: a file's content when it names a file, else the text itself.
    pub fn chat_template_source(&self) -> crate::Result<Option<String>> {
        let Some(t) = &self.chat_template else {
            return Ok(None);
        };
        let p = std::path::Path::new(t);
        // A template is never a bare word without braces; a path may be.
        if !t.contains("{%") && !t.contains("{{") {
            if p.is_file() {
                return Ok(Some(crate::cli::read_text(p)?));
            }
            if t == "chatml" {
                return Ok(Some(super::template::CHATML.to_owned()));
            }
            return Err(crate::Error::InvalidArgument(format!(
                "--chat-template {t:?} is neither a file nor a Jinja template (or `chatml`)"
            )));
        }
        Ok(Some(t.clone()))
    }
}

/// A positive, finite number of MiB, as bytes.
fn parse_mib(s: &str) -> Result<usize, String> {
    match s.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 && m * ((1u64 << 20) as f64) < usize::MAX as f64 => {
            Ok((m * (1u64 << 20) as f64) as usize)
        }
        _ => Err(format!("{s:?}: a positive number of MiB")),
    }
}

/// llama-server's multi-letter short flags (`-np`, `-ctk`, `-ctv`), which clap cannot
/// declare, rewritten to their long names after the `serve` subcommand.
pub fn normalize_argv(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut in_serve = false;
    for a in args {
        if !in_serve {
            in_serve = a == "serve" && !out.is_empty();
            out.push(a);
            continue;
        }
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        let (flag, value) = match s.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (s, None),
        };
        let long = match flag {
            "-np" => "--parallel",
            "-ctk" => "--cache-type-k",
            "-ctv" => "--cache-type-v",
            _ => {
                out.push(a);
                continue;
            }
        };
        out.push(match value {
            Some(v) => format!("{long}={v}").into(),
            None => long.into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: Args,
    }

    /// `ottkv serve -m x.gguf EXTRA...` as the CLI reads it.
    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let argv = ["ottkv", "serve", "-m", "x.gguf"].iter().chain(extra);
        let mut argv = normalize_argv(argv.map(OsString::from));
        argv.remove(1);
        T::try_parse_from(argv).map(|t| t.a)
    }

    #[test]
    fn cache_flags() {
        let name = |extra: &[&str]| parse(extra).unwrap().cache_kind().map(|(n, _)| n);
        assert_eq!(name(&[]).unwrap(), "recommended");
        assert_eq!(name(&["--cache", "ott3a"]).unwrap(), "ott3a");
        assert_eq!(name(&["-ctk", "q8_0", "-ctv", "q8_0"]).unwrap(), "q8_0");
        // One of the two alone leaves the other at llama-server's f16: they differ.
        let e = name(&["-ctk", "q4_0"]).unwrap_err().to_string();
        assert!(e.contains("-ctk q4_0 and -ctv f16 differ"), "{e}");
        assert!(name(&["-ctk", "ott2", "-ctv", "ott2"]).is_err());
        assert!(parse(&["-ctk", "f16", "--cache", "ott2"]).is_err());
        assert!(parse(&["--temp", "-1"]).is_err());
        assert_eq!(parse(&["-np", "3"]).unwrap().parallel, 3);
    }

    #[test]
    fn multi_letter_short_flags() {
        let argv = [
            "ottkv",
            "serve",
            "-np",
            "4",
            "-ctk=q8_0",
            "-ctv",
            "q8_0",
            "-c",
            "64",
        ];
        let got = normalize_argv(argv.iter().map(OsString::from));
        let want = [
            "ottkv",
            "serve",
            "--parallel",
            "4",
            "--cache-type-k=q8_0",
            "--cache-type-v",
            "q8_0",
            "-c",
            "64",
        ];
        assert_eq!(got, want.iter().map(OsString::from).collect::<Vec<_>>());
        // Other subcommands are left alone.
        let argv = ["ottkv", "generate", "-np"];
        let got = normalize_argv(argv.iter().map(OsString::from));
        assert_eq!(got, argv.iter().map(OsString::from).collect::<Vec<_>>());
    }
}
