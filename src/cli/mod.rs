//! The command line: one module per subcommand. Errors become one line on stderr and exit
//! status 1 (usage errors: 2, from clap); nothing panics on user input.

mod bench;
mod compare;
mod cuda_bench;
mod dump_kv;
pub(crate) mod generate;
mod info;
mod inspect;
mod kv_error;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ottkv",
    version,
    about = "A 2-bit KV cache with outlier-token tracing for GGUF models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a GGUF model: architecture, shapes, tensor types, KV-cache bytes per token.
    Inspect(inspect::Args),
    /// Capture post-RoPE Q/K/V of every layer from llama.cpp running a model on a text.
    DumpKv(dump_kv::Args),
    /// Replay a K/V dump through each cache type: reconstruction and attention-output error.
    KvError(kv_error::Args),
    /// Generate text with our engine and a chosen KV cache.
    Generate(generate::Args),
    /// Perplexity with llama-perplexity's protocol, for one or more caches.
    Perplexity(compare::PerplexityArgs),
    /// Quality, memory and speed of every cache type against llama.cpp's own, in one run.
    // A later option overrides an earlier one, so wrappers can pass defaults and users theirs.
    #[command(args_override_self = true)]
    Compare(compare::CompareArgs),
    /// Prompt and decode speed at several filled contexts, llama.cpp's caches and ours.
    Bench(bench::Args),
    /// Decode attention kernel timings on the GPU: OTT vs f16, against copy bandwidth.
    CudaBench(cuda_bench::Args),
    /// Build facts for a bug report: versions, features, embedded kernels, CUDA device.
    Info(info::Args),
    /// An HTTP server with llama-server's and OpenAI's API, over our engine and caches.
    #[cfg(feature = "serve")]
    Serve(crate::serve::Args),
}

/// Runs the command line and returns the process exit status.
pub fn main() -> i32 {
    #[cfg(feature = "serve")]
    let argv = crate::serve::args::normalize_argv(std::env::args_os());
    #[cfg(not(feature = "serve"))]
    let argv = std::env::args_os();
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = std::panic::catch_unwind(|| match cli.cmd {
        Command::Inspect(a) => inspect::run(&a),
        Command::DumpKv(a) => dump_kv::run(&a),
        Command::KvError(a) => kv_error::run(&a),
        Command::Generate(a) => generate::run(&a),
        Command::Perplexity(a) => compare::perplexity(&a),
        Command::Compare(a) => compare::compare(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Info(a) => info::run(&a),
        Command::CudaBench(a) => cuda_bench::run(&a),
        #[cfg(feature = "serve")]
        Command::Serve(a) => crate::serve::run(&a),
    });
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
        Err(_) => {
            eprintln!("error: internal error (a bug: please report it with the command line)");
            1
        }
    }
}

/// Threads to use by default: every core the process may run on.
pub(crate) fn default_threads() -> usize {
    crate::ggml::max_threads()
}

/// `--threads`: at least 1; more than the cores this process may use is clamped with a
/// warning, as llama.cpp's tools do (ggml's threads spin at barriers, so extra threads on
/// busy cores make every step crawl).
pub(crate) fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|e| format!("{s:?} is not a thread count: {e}"))?;
    if n == 0 {
        return Err("must be at least 1".into());
    }
    let max = crate::ggml::max_threads();
    if n > max {
        log::warn!("--threads {n} is more than the {max} cores available: using {max}");
        return Ok(max);
    }
    Ok(n)
}

/// A count that must be at least 1 (`-c`, `-b`, `--chunks`, `--reps`).
pub(crate) fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?} is not a positive integer: {e}")),
    }
}

/// A text file as UTF-8 (invalid bytes replaced, as llama.cpp's tools read them).
pub(crate) fn read_text(path: &std::path::Path) -> crate::Result<String> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Lower-case hex sha256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) use crate::kind::split_cache_list;
