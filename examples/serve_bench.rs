//! Load benchmark of `ottkv serve`, with llama.cpp's own batched decode as its anchor.
//!
//! For each cache and each client count N it starts the real server (`-np N`), sends N
//! concurrent streamed `/completion` requests of distinct prompts (token ids from
//! consecutive slices of a text), and measures generated and prompt tokens/s, time to first
//! token, the KV memory the server reports in use (`/slots`, polled) and the server's peak
//! RSS. The anchor runs the same prompts in this process through one llama.cpp context
//! holding N sequences, as llama-batched-bench does. A second part starts the server under a
//! KV budget and counts how many long sessions it admits at once, per cache.
//!
//! `cargo build --release && cargo run --release --example serve_bench -- --quick --out DIR`

use clap::Parser;
use ottkv::kind::BlockType;
use ottkv::llama::{LlamaContext, LlamaContextParams, LlamaModel, SeqId, Token};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The server's `llama.cpp` cache types: the ones llama.cpp itself can anchor.
const LLAMA_TYPES: [&str; 3] = ["f16", "q8_0", "q4_0"];
/// The anchor every row is also compared with.
const REFERENCE_ANCHOR: &str = "q4_0";
/// How often `/slots` is read during a run.
const POLL: Duration = Duration::from_millis(100);
/// How long a started server may take to print its `listening on` line.
const STARTUP: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
struct Args {
    /// The GGUF model (default: SmolLM2-135M-Instruct Q4_1 where the fetch script put it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text whose tokens become the prompts (default: the fetch script's text, else
    /// wikitext-2 beside the checkout).
    #[arg(long)]
    text: Option<PathBuf>,
    /// The `ottkv` binary (default: the one beside this example's target directory).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Caches, comma-separated, as `ottkv serve --cache` takes them.
    #[arg(long, default_value = "f16,q8_0,q4_0,recommended")]
    caches: String,
    /// Client counts (= server slots), comma-separated.
    #[arg(long, default_value = "1,4,16")]
    clients: String,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 2048)]
    prompt: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Threads of the server and of the anchor.
    #[arg(short, long, default_value_t = 2)]
    threads: usize,
    /// Prompt tokens per step (server `-b`, anchor `n_batch`).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// A short end-to-end check: prompt 256, gen 32, clients 1,4, and a budget test scaled
    /// down by the same factor as the prompt.
    #[arg(long)]
    quick: bool,
    /// Leave out the llama.cpp anchor.
    #[arg(long)]
    no_anchor: bool,
    /// Leave out the KV-budget admission test.
    #[arg(long)]
    no_budget_test: bool,
    /// Run only the KV-budget admission test.
    #[arg(long, conflicts_with = "no_budget_test")]
    budget_only: bool,
    /// KV budget of the admission test, in MiB.
    #[arg(long, default_value_t = 256.0)]
    budget_mib: f64,
    /// Context of each slot in the admission test (each request asks for nearly all of it).
    #[arg(long, default_value_t = 4096)]
    budget_ctx: usize,
    /// Clients (and slots) of the admission test.
    #[arg(long, default_value_t = 32)]
    budget_clients: usize,
    /// Caches of the admission test, comma-separated.
    #[arg(long, default_value = "f16,recommended")]
    budget_caches: String,
    /// Directory for serve_bench.json, serve_bench.md, the plots and the server logs.
    #[arg(long, default_value = "serve_bench")]
    out: PathBuf,
}

/// One server run: one cache, N clients.
#[derive(Serialize, Clone, Debug)]
struct ServeRow {
    cache: String,
    clients: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    wall_s: f64,
    /// All generated tokens over the wall time from the first request sent to the last done.
    gen_tps: f64,
    /// Tokens streamed after every request had its first token, over that stretch: the
    /// decode rate with all N sequences generating.
    decode_tps: Option<f64>,
    /// All prompt tokens over the time until the last request had its first token.
    prompt_tps: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// The server's own `timings` of each request (prompt_ms, predicted_ms).
    server_timings: Vec<Value>,
    kv_mib_peak: f64,
    busy_slots_peak: usize,
    rss_mib_peak: Option<f64>,
    /// Requests that ended short of `gen` tokens or with an error.
    failures: Vec<String>,
}

/// llama.cpp's batched decode of the same prompts.
#[derive(Serialize, Clone, Debug)]
struct AnchorRow {
    cache: String,
    clients: usize,
    wall_s: f64,
    gen_tps: f64,
    decode_tps: Option<f64>,
    prompt_tps: f64,
}

#[derive(Serialize, Clone, Debug)]
struct BudgetRow {
    cache: String,
    budget_mib: f64,
    slots: usize,
    ctx: usize,
    /// Tokens each request's session needs (prompt + n_predict).
    session_tokens: usize,
    /// Most slots busy at once, read from /slots before any request finished.
    admitted_peak: usize,
    kv_mib_peak: f64,
    /// What the server's startup line says fits (tokens of this cache over all slots) divided
    /// by the session's tokens: the closed-form expectation beside the measurement.
    printed_tokens_fit: Option<f64>,
    requests_refused: usize,
}

#[derive(Serialize)]
struct Report {
    model: String,
    text: String,
    prompt: usize,
    gen: usize,
    threads: usize,
    batch: usize,
    serve: Vec<ServeRow>,
    anchor: Vec<AnchorRow>,
    budget: Vec<BudgetRow>,
    budget_ratio: Option<f64>,
    errors: Vec<String>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("serve_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let mut a = Args::parse();
    if a.quick {
        // The budget test keeps its ratio of budget to context while the context shrinks.
        let scale = 256.0 / a.prompt as f64;
        a.prompt = 256;
        a.gen = 32;
        a.clients = "1,4".into();
        a.budget_ctx = ((a.budget_ctx as f64 * scale) as usize).max(64);
        a.budget_mib *= scale;
    }
    let caches = split_list(&a.caches);
    let clients: Vec<usize> = parse_list(&a.clients)?;
    if caches.is_empty() || clients.is_empty() || clients.contains(&0) {
        return Err("--caches and --clients need at least one entry each, clients > 0".into());
    }
    if a.prompt == 0 || a.gen == 0 {
        return Err("--prompt and --gen must be positive".into());
    }
    let model = match &a.model {
        Some(m) => m.clone(),
        None => ottkv::paths::find_model(ottkv::paths::DEFAULT_MODEL)
            .ok_or("no --model given and the default model is not fetched")?,
    };
    let text = match &a.text {
        Some(t) => t.clone(),
        None => default_text().ok_or("no --text given and no default text found")?,
    };
    let server = match &a.server {
        Some(s) => s.clone(),
        None => default_server()?,
    };
    if !server.is_file() {
        return Err(format!(
            "{}: no ottkv binary there (cargo build --release, or --server)",
            server.display()
        )
        .into());
    }
    std::fs::create_dir_all(&a.out)?;

    let vocab = LlamaModel::load(&model, true)?;
    let raw = std::fs::read(&text)?;
    let all_tokens = vocab.tokenize(&String::from_utf8_lossy(&raw), false)?;
    drop(vocab);
    let max_n = *clients.iter().max().unwrap_or(&1);
    let budget_prompt = budget_prompt_len(a.budget_ctx);
    let need = (max_n * a.prompt).max(if a.no_budget_test {
        0
    } else {
        a.budget_clients * budget_prompt
    });
    if all_tokens.len() < need {
        return Err(format!(
            "{} has {} tokens; distinct prompts need {need}",
            text.display(),
            all_tokens.len()
        )
        .into());
    }
    println!(
        "model {}, text {} ({} tokens), prompt {}, gen {}, threads {}",
        model.display(),
        text.display(),
        all_tokens.len(),
        a.prompt,
        a.gen,
        a.threads
    );

    // A failed run is recorded and the others go on: a full run takes long.
    let mut errors = Vec::new();
    let mut serve = Vec::new();
    let mut anchor = Vec::new();
    if !a.budget_only {
        for cache in &caches {
            for &n in &clients {
                let prompts = distinct_prompts(&all_tokens, n, a.prompt);
                match serve_run(&a, &server, &model, cache, n, &prompts) {
                    Ok(row) => {
                        print_serve(&row);
                        serve.push(row);
                    }
                    Err(e) => errors.push(noted(format!("serve {cache} N={n}: {e}"))),
                }
            }
        }
        if !a.no_anchor {
            let full = LlamaModel::load(&model, false)?;
            for cache in anchor_caches(&caches) {
                for &n in &clients {
                    let prompts = distinct_prompts(&all_tokens, n, a.prompt);
                    let row = match anchor_run(&a, &full, &cache, &prompts) {
                        Ok(row) => row,
                        Err(e) => {
                            errors.push(noted(format!("llama.cpp {cache} N={n}: {e}")));
                            continue;
                        }
                    };
                    println!(
                        "llama.cpp {:>6} N={:<3} gen {:8.2} tok/s  decode {}  prompt {:8.1} tok/s",
                        row.cache,
                        row.clients,
                        row.gen_tps,
                        opt(row.decode_tps, 2),
                        row.prompt_tps
                    );
                    anchor.push(row);
                }
            }
        }
    }
    let mut budget = Vec::new();
    if !a.no_budget_test {
        for cache in split_list(&a.budget_caches) {
            let row = match budget_run(&a, &server, &model, &cache, &all_tokens) {
                Ok(row) => row,
                Err(e) => {
                    errors.push(noted(format!("budget {cache}: {e}")));
                    continue;
                }
            };
            println!(
                "budget {:.0} MiB, {:>12}: {} of {} sessions of {} tokens at once (startup line: {} fit), KV peak {:.1} MiB",
                row.budget_mib,
                row.cache,
                row.admitted_peak,
                row.slots,
                row.session_tokens,
                opt(row.printed_tokens_fit, 1),
                row.kv_mib_peak
            );
            budget.push(row);
        }
    }
    let budget_ratio = budget_ratio(&budget);
    let report = Report {
        // File names only: the report is meant to be kept beside the code.
        model: file_name(&model),
        text: file_name(&text),
        prompt: a.prompt,
        gen: a.gen,
        threads: a.threads,
        batch: a.batch,
        serve,
        anchor,
        budget,
        budget_ratio,
        errors,
    };
    write_report(&a.out, &report)?;
    Ok(())
}

fn noted(e: String) -> String {
    eprintln!("error: {e}");
    e
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

fn parse_list(s: &str) -> Res<Vec<usize>> {
    split_list(s)
        .iter()
        .map(|x| {
            x.parse::<usize>()
                .map_err(|e| format!("{x:?}: not a count ({e})").into())
        })
        .collect()
}

fn default_text() -> Option<PathBuf> {
    ottkv::paths::find_default_text().or_else(|| {
        let p = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/corpus/wiki.test.raw"
        ));
        p.is_file().then_some(p)
    })
}

/// `ottkv` in the profile directory above `examples/`, where cargo put this example.
fn default_server() -> Res<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory from this example's path")?;
    Ok(profile.join(format!("ottkv{}", std::env::consts::EXE_SUFFIX)))
}

/// Prompt tokens of one admission-test request: nearly the whole slot, leaving room for
/// the few generated tokens.
fn budget_prompt_len(ctx: usize) -> usize {
    ctx - ctx / 32 - BUDGET_PREDICT
}
const BUDGET_PREDICT: usize = 4;

/// `n` distinct prompts of `len` tokens: consecutive slices of the text.
fn distinct_prompts(tokens: &[Token], n: usize, len: usize) -> Vec<Vec<Token>> {
    tokens
        .chunks_exact(len)
        .take(n)
        .map(<[_]>::to_vec)
        .collect()
}

/// The llama.cpp types among `caches`, plus the reference anchor.
fn anchor_caches(caches: &[String]) -> Vec<String> {
    let mut v: Vec<String> = caches
        .iter()
        .filter(|c| LLAMA_TYPES.contains(&c.as_str()))
        .cloned()
        .collect();
    if !v.iter().any(|c| c == REFERENCE_ANCHOR) {
        v.push(REFERENCE_ANCHOR.into());
    }
    v
}

fn block_type(name: &str) -> Res<BlockType> {
    Ok(match name {
        "f16" => BlockType::F16,
        "q8_0" => BlockType::Q8_0,
        "q4_0" => BlockType::Q4_0,
        other => return Err(format!("{other}: llama.cpp has no such cache type").into()),
    })
}

/// A running `ottkv serve`, killed on drop.
struct Server {
    child: Child,
    url: String,
    /// Its stdout up to the `listening on` line.
    startup: Vec<String>,
    /// Where its stderr goes; removed when empty.
    log: PathBuf,
}

impl Server {
    fn start(bin: &Path, model: &Path, args: &[String], log: &Path) -> Res<Server> {
        let err = std::fs::File::create(log)?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps reading to the end so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut startup = Vec::new();
        let t0 = Instant::now();
        loop {
            let left = STARTUP.saturating_sub(t0.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let url = line
                        .strip_prefix("listening on ")
                        .map(|u| u.trim().to_owned());
                    startup.push(line);
                    if let Some(url) = url {
                        return Ok(Server {
                            child,
                            url,
                            startup,
                            log: log.to_path_buf(),
                        });
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the server printed no `listening on` line within {STARTUP:?} (see {})",
                        log.display()
                    )
                    .into());
                }
            }
        }
    }

    /// Peak resident set of the server so far (`VmHWM`), in bytes.
    fn peak_rss(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::fs::metadata(&self.log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Reads `/slots` every `POLL` until stopped; keeps the peaks of busy slots and KV bytes.
struct Poller {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<(usize, usize)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(url: &str) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new((0usize, 0usize)));
        let (s, p, url) = (stop.clone(), peaks.clone(), format!("{url}/slots"));
        let thread = std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            while !s.load(Ordering::Acquire) {
                if let Ok(Value::Array(slots)) =
                    client.get(&url).send().and_then(|r| r.json::<Value>())
                {
                    let busy = slots
                        .iter()
                        .filter(|v| v["is_processing"].as_bool() == Some(true))
                        .count();
                    let kv: u64 = slots.iter().filter_map(|v| v["kv_bytes"].as_u64()).sum();
                    let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                    g.0 = g.0.max(busy);
                    g.1 = g.1.max(kv as usize);
                }
                std::thread::sleep(POLL);
            }
        });
        Poller {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// (busy slots, KV bytes) peaks so far.
    fn peaks(&self) -> (usize, usize) {
        *self.peaks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peaks()
    }
}

/// What one streamed request saw.
#[derive(Default)]
struct ClientRun {
    /// Seconds after the common start: first token, each chunk of tokens, the end.
    first: Option<f64>,
    chunks: Vec<(f64, usize)>,
    done: Option<f64>,
    predicted: usize,
    timings: Value,
    error: Option<String>,
}

/// One streamed `/completion` request; times are seconds since `t0`. `on_done` runs when
/// the final message arrives.
fn stream_request(
    client: &reqwest::blocking::Client,
    url: &str,
    prompt: &[Token],
    n_predict: usize,
    t0: Instant,
    on_done: &dyn Fn(),
) -> ClientRun {
    let mut out = ClientRun::default();
    let body = json!({
        "prompt": prompt,
        "n_predict": n_predict,
        "ignore_eos": true,
        "temperature": 0,
        "stream": true,
    });
    let resp = match client.post(format!("{url}/completion")).json(&body).send() {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("request: {e}"));
            return out;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        out.error = Some(format!("{status}: {}", resp.text().unwrap_or_default()));
        return out;
    }
    for line in BufReader::new(resp).lines() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                out.error = Some(format!("reading the stream: {e}"));
                break;
            }
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let now = t0.elapsed().as_secs_f64();
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                out.error = Some(format!("bad event {data:?}: {e}"));
                break;
            }
        };
        if let Some(e) = v.get("error") {
            out.error = Some(e.to_string());
            break;
        }
        let n = v["tokens"].as_array().map_or(0, Vec::len);
        if n > 0 {
            out.first.get_or_insert(now);
            out.chunks.push((now, n));
        }
        if v["stop"].as_bool() == Some(true) {
            out.done = Some(now);
            out.predicted = v["tokens_predicted"].as_u64().unwrap_or(0) as usize;
            out.timings = v["timings"].clone();
            on_done();
            break;
        }
    }
    if out.done.is_none() && out.error.is_none() {
        out.error = Some("the stream ended without a final message".into());
    }
    out
}

/// N concurrent requests against a started server, released together; `on_done` as in
/// `stream_request`.
fn run_clients(
    url: &str,
    prompts: &[Vec<Token>],
    n_predict: usize,
    on_done: Arc<dyn Fn() + Send + Sync>,
) -> (Instant, Vec<ClientRun>) {
    let n = prompts.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let (b, t0, url, on_done) =
                (barrier.clone(), t0.clone(), url.to_owned(), on_done.clone());
            std::thread::spawn(move || {
                // No overall timeout: a long prompt on slow cores is not a failure.
                let client = reqwest::blocking::Client::builder()
                    .timeout(None)
                    .build()
                    .expect("an HTTP client with default TLS settings");
                b.wait();
                let start = t0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .expect("set before the barrier");
                stream_request(&client, &url, &p, n_predict, start, &*on_done)
            })
        })
        .collect();
    let start = Instant::now();
    *t0.lock().unwrap_or_else(|e| e.into_inner()) = Some(start);
    barrier.wait();
    let runs = handles
        .into_iter()
        .map(|h| {
            h.join().unwrap_or_else(|_| ClientRun {
                error: Some("client thread panicked".into()),
                ..Default::default()
            })
        })
        .collect();
    (start, runs)
}

/// Nearest-rank percentile of `v` (sorted in place).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

const MIB: f64 = (1u64 << 20) as f64;

fn serve_run(
    a: &Args,
    bin: &Path,
    model: &Path,
    cache: &str,
    n: usize,
    prompts: &[Vec<Token>],
) -> Res<ServeRow> {
    let args: Vec<String> = [
        "-np".to_string(),
        n.to_string(),
        "-c".into(),
        (a.prompt + a.gen).to_string(),
        "-t".into(),
        a.threads.to_string(),
        "-b".into(),
        a.batch.to_string(),
        "--cache".into(),
        cache.into(),
    ]
    .into();
    let log = a.out.join(format!("server_{cache}_{n}.log"));
    let server = Server::start(bin, model, &args, &log)?;
    let poller = Poller::start(&server.url);
    let (_, runs) = run_clients(&server.url, prompts, a.gen, Arc::new(|| {}));
    let (busy_peak, kv_peak) = poller.finish();
    let rss = server.peak_rss();
    drop(server);

    let mut failures = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        if let Some(e) = &r.error {
            failures.push(format!("request {i}: {e}"));
        } else if r.predicted != a.gen {
            failures.push(format!(
                "request {i}: {} tokens, not {}",
                r.predicted, a.gen
            ));
        }
    }
    let end = runs.iter().filter_map(|r| r.done).fold(0.0, f64::max);
    let last_first = runs.iter().filter_map(|r| r.first).fold(0.0, f64::max);
    let generated: usize = runs.iter().map(|r| r.predicted).sum();
    let after: usize = runs
        .iter()
        .flat_map(|r| &r.chunks)
        .filter(|c| c.0 > last_first)
        .map(|c| c.1)
        .sum();
    let mut ttft: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.first)
        .map(|t| t * 1e3)
        .collect();
    let prompt_tokens = n * a.prompt;
    Ok(ServeRow {
        cache: cache.into(),
        clients: n,
        prompt_tokens,
        generated_tokens: generated,
        wall_s: end,
        gen_tps: rate(generated, end),
        decode_tps: (end > last_first && after > 0).then(|| rate(after, end - last_first)),
        prompt_tps: rate(prompt_tokens, last_first),
        ttft_p50_ms: percentile(&mut ttft, 50.0),
        ttft_p99_ms: percentile(&mut ttft, 99.0),
        server_timings: runs.iter().map(|r| r.timings.clone()).collect(),
        kv_mib_peak: kv_peak as f64 / MIB,
        busy_slots_peak: busy_peak,
        rss_mib_peak: rss.map(|b| b as f64 / MIB),
        failures,
    })
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        f64::NAN
    }
}

/// llama.cpp with N sequences in one context: every prompt in `batch`-token decodes (the
/// prompts one after another, windows spanning sequences), then one decode per step with
/// one token of each sequence, greedy. Each sequence gets `gen` tokens, the first from its
/// prompt's logits, as the server streams them.
fn anchor_run(a: &Args, model: &LlamaModel, cache: &str, prompts: &[Vec<Token>]) -> Res<AnchorRow> {
    let n = prompts.len();
    let ct = block_type(cache)?;
    let p = LlamaContextParams {
        n_ctx: (n * (a.prompt + a.gen)) as u32,
        n_batch: a.batch as u32,
        threads: a.threads,
        cache_k: ct,
        cache_v: ct,
        n_seq_max: n as u32,
    };
    let mut ctx = LlamaContext::new(model, &p)?;
    let parts: Vec<(SeqId, &[Token])> = prompts
        .iter()
        .enumerate()
        .map(|(s, p)| (s as SeqId, p.as_slice()))
        .collect();
    let t0 = Instant::now();
    let mut rows = ctx.decode_seqs(&parts)?;
    let t_prompt = t0.elapsed().as_secs_f64();
    for _ in 1..a.gen {
        let next: Vec<[Token; 1]> = rows.iter().map(|r| [argmax(r)]).collect();
        let parts: Vec<(SeqId, &[Token])> = next
            .iter()
            .enumerate()
            .map(|(s, t)| (s as SeqId, t.as_slice()))
            .collect();
        rows = ctx.decode_seqs(&parts)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    Ok(AnchorRow {
        cache: cache.into(),
        clients: n,
        wall_s: wall,
        gen_tps: rate(n * a.gen, wall),
        decode_tps: (a.gen > 1).then(|| rate(n * (a.gen - 1), wall - t_prompt)),
        prompt_tps: rate(n * a.prompt, t_prompt),
    })
}

fn argmax(row: &[f32]) -> Token {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as Token
}

/// Starts the server under the KV budget with many slots, sends long requests from as
/// many clients, and reads how many run at once until the first one finishes (all
/// requests are the same size, so none can be admitted beyond that count later); then
/// stops the server rather than waiting for the rest.
fn budget_run(a: &Args, bin: &Path, model: &Path, cache: &str, tokens: &[Token]) -> Res<BudgetRow> {
    let prompt_len = budget_prompt_len(a.budget_ctx);
    let prompts = distinct_prompts(tokens, a.budget_clients, prompt_len);
    let args: Vec<String> = vec![
        "-np".into(),
        a.budget_clients.to_string(),
        "-c".into(),
        a.budget_ctx.to_string(),
        "-t".into(),
        a.threads.to_string(),
        "-b".into(),
        a.batch.to_string(),
        "--cache".into(),
        cache.into(),
        "--kv-budget".into(),
        format!("{}", a.budget_mib),
    ];
    let log = a.out.join(format!("server_budget_{cache}.log"));
    let server = Arc::new(Mutex::new(Some(Server::start(bin, model, &args, &log)?)));
    let (url, startup) = {
        let g = server.lock().unwrap_or_else(|e| e.into_inner());
        let s = g.as_ref().ok_or("server gone")?;
        (s.url.clone(), s.startup.clone())
    };
    let poller = Arc::new(Mutex::new(Some(Poller::start(&url))));
    let peaks = Arc::new(Mutex::new(None::<(usize, usize)>));
    let on_done: Arc<dyn Fn() + Send + Sync> = {
        let (server, poller, peaks) = (server.clone(), poller.clone(), peaks.clone());
        Arc::new(move || {
            let mut got = peaks.lock().unwrap_or_else(|e| e.into_inner());
            if got.is_some() {
                return;
            }
            if let Some(p) = poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
                *got = Some(p.finish());
            }
            // Ends every other stream: the measurement is over.
            server.lock().unwrap_or_else(|e| e.into_inner()).take();
        })
    };
    let (_, runs) = run_clients(&url, &prompts, BUDGET_PREDICT, on_done);
    let refused = runs
        .iter()
        .filter(|r| r.error.as_deref().is_some_and(|e| e.contains("kv-budget")))
        .count();
    server.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
        p.finish();
    }
    let Some((admitted, kv)) = *peaks.lock().unwrap_or_else(|e| e.into_inner()) else {
        let errs: Vec<_> = runs
            .iter()
            .filter_map(|r| r.error.clone())
            .take(3)
            .collect();
        return Err(format!("{cache}: no request of the budget test finished: {errs:?}").into());
    };
    let session_tokens = prompt_len + BUDGET_PREDICT;
    let fit = startup
        .iter()
        .find_map(|l| printed_fit(l))
        .map(|t| t / session_tokens as f64);
    Ok(BudgetRow {
        cache: cache.into(),
        budget_mib: a.budget_mib,
        slots: a.budget_clients,
        ctx: a.budget_ctx,
        session_tokens,
        admitted_peak: admitted,
        kv_mib_peak: kv as f64 / MIB,
        printed_tokens_fit: fit,
        requests_refused: refused,
    })
}

/// The tokens the server's startup line says fit the budget ("about N tokens of ...").
fn printed_fit(line: &str) -> Option<f64> {
    let rest = line.split_once("about ")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

fn budget_ratio(rows: &[BudgetRow]) -> Option<f64> {
    let f16 = rows.iter().find(|r| r.cache == "f16")?;
    let other = rows.iter().find(|r| r.cache != "f16")?;
    (f16.admitted_peak > 0).then(|| other.admitted_peak as f64 / f16.admitted_peak as f64)
}

fn opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "—".into(),
    }
}

fn print_serve(r: &ServeRow) {
    println!(
        "serve {:>12} N={:<3} gen {:8.2} tok/s  decode {}  prompt {:8.1} tok/s  TTFT p50 {:.0} p99 {:.0} ms  KV {:.1} MiB  RSS {} MiB{}",
        r.cache,
        r.clients,
        r.gen_tps,
        opt(r.decode_tps, 2),
        r.prompt_tps,
        r.ttft_p50_ms,
        r.ttft_p99_ms,
        r.kv_mib_peak,
        opt(r.rss_mib_peak, 0),
        if r.failures.is_empty() {
            String::new()
        } else {
            format!("  FAILURES: {}", r.failures.join("; "))
        }
    );
}

fn write_report(dir: &Path, r: &Report) -> Res<()> {
    let json_path = dir.join("serve_bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(r)?)?;
    let md = markdown(r);
    std::fs::write(dir.join("serve_bench.md"), &md)?;
    println!("\n{md}");
    if !r.serve.is_empty() {
        plot(r, dir, false)?;
        plot(r, dir, true)?;
    }
    println!("wrote {} and serve_bench.md / .png", json_path.display());
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let anchor =
        |cache: &str, n: usize| r.anchor.iter().find(|x| x.cache == cache && x.clients == n);
    let server =
        |cache: &str, n: usize| r.serve.iter().find(|x| x.cache == cache && x.clients == n);
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 && a.is_finite() => format!("{:.2}", a / b),
        _ => "—".into(),
    };
    if !r.serve.is_empty() {
        s += &format!(
            "`ottkv serve` under load: {} prompt + {} generated tokens per request, one request \
             per client (= slots), {} threads, prompt batch {}; model {}.\n\
             gen tok/s = all generated tokens / wall from first request sent to last done; \
             decode tok/s = tokens streamed after every request had its first token / that \
             stretch; prompt tok/s = all prompt tokens / time to the last first token. \
             llama.cpp columns: the same prompts through one llama.cpp context of N sequences \
             with this cache type (batched decode, as llama-batched-bench). Ratios are of gen \
             tok/s.\n\n",
            r.prompt, r.gen, r.threads, r.batch, r.model
        );
        s += "| cache | N | gen tok/s | decode tok/s | prompt tok/s | TTFT p50 ms | TTFT p99 ms | KV MiB peak | RSS MiB | llama.cpp gen tok/s | llama.cpp decode tok/s | llama.cpp prompt tok/s | vs f16 server | vs llama.cpp q4_0 |\n";
        s += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for x in &r.serve {
            let an = anchor(&x.cache, x.clients);
            s += &format!(
                "| {}{} | {} | {:.2} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} |\n",
                x.cache,
                if x.failures.is_empty() { "" } else { " (failures)" },
                x.clients,
                x.gen_tps,
                opt(x.decode_tps, 2),
                x.prompt_tps,
                x.ttft_p50_ms,
                x.ttft_p99_ms,
                x.kv_mib_peak,
                opt(x.rss_mib_peak, 0),
                opt(an.map(|a| a.gen_tps), 2),
                opt(an.and_then(|a| a.decode_tps), 2),
                opt(an.map(|a| a.prompt_tps), 1),
                ratio(x.gen_tps, server("f16", x.clients).map(|f| f.gen_tps)),
                ratio(x.gen_tps, anchor(REFERENCE_ANCHOR, x.clients).map(|a| a.gen_tps)),
            );
        }
        s += "\n";
    }
    if !r.budget.is_empty() {
        let b0 = &r.budget[0];
        s += &format!(
            "Admission under `--kv-budget {}` MiB, `-np {} -c {}`: {} clients each send a \
             {}-token prompt with n_predict {}; admitted = most slots busy at once in /slots \
             before the first request finished; expected = tokens the server's startup line \
             says fit / tokens per session.\n\n",
            b0.budget_mib,
            b0.slots,
            b0.ctx,
            b0.slots,
            b0.session_tokens - BUDGET_PREDICT,
            BUDGET_PREDICT
        );
        s += "| cache | admitted | expected | KV MiB peak | refused |\n|---|---:|---:|---:|---:|\n";
        for b in &r.budget {
            s += &format!(
                "| {} | {} | {} | {:.1} | {} |\n",
                b.cache,
                b.admitted_peak,
                opt(b.printed_tokens_fit, 1),
                b.kv_mib_peak,
                b.requests_refused
            );
        }
        if let (Some(q), Some(other)) = (r.budget_ratio, r.budget.iter().find(|b| b.cache != "f16"))
        {
            s += &format!("\nSessions admitted, {} / f16: {q:.2}x\n", other.cache);
        }
    }
    if !r.errors.is_empty() {
        s += "\nRuns that failed:\n";
        for e in &r.errors {
            s += &format!("- {e}\n");
        }
    }
    s
}

/// One line per cache, in first-seen order, of `(cache, clients, y)` rows.
fn lines_per_cache(
    series: &mut Vec<ottkv::eval::plot::Series>,
    engine: &str,
    rows: Vec<(&str, usize, f64)>,
) {
    let mut names: Vec<&str> = Vec::new();
    for &(c, _, _) in &rows {
        if !names.contains(&c) {
            names.push(c);
        }
    }
    for c in names {
        series.push(ottkv::eval::plot::Series {
            label: format!("{engine} {c}"),
            points: rows
                .iter()
                .filter(|x| x.0 == c)
                .map(|&(_, n, y)| (n as f64, y))
                .collect(),
        });
    }
}

fn plot(r: &Report, dir: &Path, decode: bool) -> Res<()> {
    use ottkv::eval::plot::{lines_png, Axes, Series};
    let mut series: Vec<Series> = Vec::new();
    let y = |gen: f64, dec: Option<f64>| if decode { dec.unwrap_or(f64::NAN) } else { gen };
    let serve = r
        .serve
        .iter()
        .map(|x| (x.cache.as_str(), x.clients, y(x.gen_tps, x.decode_tps)));
    let anchor = r
        .anchor
        .iter()
        .map(|x| (x.cache.as_str(), x.clients, y(x.gen_tps, x.decode_tps)));
    lines_per_cache(&mut series, "ottkv serve", serve.collect());
    lines_per_cache(&mut series, "llama.cpp batched", anchor.collect());
    let what = if decode { "decode" } else { "generated" };
    let axes = Axes {
        title: format!(
            "{what} tokens/s vs concurrent clients ({} prompt + {} gen each)",
            r.prompt, r.gen
        ),
        x_label: "clients (= slots / sequences)".into(),
        y_label: format!("{what} tokens/s, all clients"),
        log_x: true,
        log_y: false,
    };
    let name = if decode {
        "serve_bench_decode.png"
    } else {
        "serve_bench.png"
    };
    lines_png(&series, &axes, &dir.join(name))?;
    Ok(())
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
