//! `ottkv serve` end to end: the real binary on SmolLM2, driven over HTTP. Greedy outputs
//! against `ottkv generate`, concurrency against the same requests alone (our cache and
//! f16), streaming against plain answers, the chat template against llama.cpp's own
//! formatting, every kind of bad input, disconnects, the queue, API keys, metrics, SIGTERM,
//! and the official `openai` Python client when it is installed.

mod common;

use reqwest::blocking::{Client, Response};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// One server at a time: they share two cores, and timings would mean nothing otherwise.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ottkv"))
            .arg("serve")
            .arg("-m")
            .arg(model)
            .args(["--port", "0", "-c", "512", "-t", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ottkv serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps reading so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("server: {line}");
                if let Some(u) = line.strip_prefix("listening on ") {
                    let _ = tx.send(u.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("the server printed no `listening on` line within 60 s");
            }
        };
        Server { child, url }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> Option<PathBuf> {
    common::model_or_skip(MODEL, "serve")
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// POSTs JSON; the status and the body as JSON.
fn post(c: &Client, url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .expect("request");
    json_of(r)
}

fn post_raw(c: &Client, url: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = c
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .expect("request");
    json_of(r)
}

fn get(c: &Client, url: &str, path: &str) -> (u16, Value) {
    json_of(c.get(format!("{url}{path}")).send().expect("request"))
}

fn json_of(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, v)
}

/// The `data:` payloads of an SSE response, read to the end.
fn sse(r: Response) -> Vec<String> {
    assert_eq!(r.status().as_u16(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    BufReader::new(r)
        .lines()
        .map(|l| l.expect("stream line"))
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// An error answer: the status, llama-server's error object with that code and type.
fn assert_error(got: &(u16, Value), status: u16, ty: &str) -> String {
    assert_eq!(got.0, status, "{}", got.1);
    let e = &got.1["error"];
    assert_eq!(e["code"], status, "{}", got.1);
    assert_eq!(e["type"], ty, "{}", got.1);
    let m = e["message"].as_str().expect("message").to_string();
    assert!(!m.is_empty());
    m
}

/// The server still answers, and still generates.
fn assert_alive(c: &Client, url: &str) {
    assert_eq!(get(c, url, "/health"), (200, json!({"status": "ok"})));
    let r = post(
        c,
        url,
        "/completion",
        &json!({"prompt": "Hi", "n_predict": 2, "temperature": 0}),
    );
    assert_eq!(r.0, 200, "{}", r.1);
    assert!(r.1["tokens_predicted"].as_u64().unwrap() > 0 || r.1["stop_type"] == "eos");
}

fn greedy(c: &Client, url: &str, prompt: &str, n: usize) -> (String, Vec<i64>, Value) {
    let (s, v) = post(
        c,
        url,
        "/completion",
        &json!({"prompt": prompt, "n_predict": n, "temperature": 0, "return_tokens": true}),
    );
    assert_eq!(s, 200, "{v}");
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    (v["content"].as_str().unwrap().to_string(), tokens, v)
}

/// Polls /slots until every slot is idle with an empty cache.
fn wait_slots_free(c: &Client, url: &str) {
    let t0 = Instant::now();
    loop {
        let (_, v) = get(c, url, "/slots");
        let all_free = v
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["is_processing"] == false && s["n_past"] == 0 && s["id_task"] == -1);
        if all_free {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slots never freed: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
];

#[test]
fn completion_matches_generate_and_streams_agree() {
    let Some(m) = model() else { return };
    let _g = serial();
    let srv = Server::start(&m, &["-np", "2"]);
    let c = client();
    let n = 16;
    let prompt = PROMPTS[0];
    let (content, tokens, v) = greedy(&c, &srv.url, prompt, n);
    assert_eq!(v["stop"], true);
    assert_eq!(
        v["tokens_predicted"].as_u64().unwrap() as usize,
        tokens.len()
    );
    assert!(
        ["limit", "eos"].contains(&v["stop_type"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["timings"]["predicted_n"].as_u64().unwrap() > 0, "{v}");

    // `ottkv generate` on the same prompt, cache and settings: the same text.
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .arg("generate")
        .arg("-m")
        .arg(&m)
        .args([
            "-p",
            prompt,
            "-n",
            &n.to_string(),
            "--cache",
            "recommended",
            "-c",
            "512",
        ])
        .args(["-t", "2"])
        .output()
        .expect("run generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    assert_eq!(generated, format!("{prompt}{content}\n"));

    // Streaming gives the same tokens and text, and ends with the full final object.
    let r = c
        .post(format!("{}/completion", srv.url))
        .json(&json!({"prompt": prompt, "n_predict": n, "temperature": 0, "stream": true}))
        .send()
        .unwrap();
    let events: Vec<Value> = sse(r)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, chunks) = events.split_last().unwrap();
    assert!(chunks.iter().all(|e| e["stop"] == false));
    let streamed: String = chunks
        .iter()
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    let streamed_tokens: Vec<i64> = chunks
        .iter()
        .flat_map(|e| e["tokens"].as_array().unwrap().clone())
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(streamed, content);
    assert_eq!(streamed_tokens, tokens);
    assert_eq!(last["stop"], true);
    assert_eq!(last["stop_type"], v["stop_type"]);
    assert!(last["timings"]["predicted_per_second"].as_f64().unwrap() > 0.0);

    // OpenAI's completions endpoint, plain and streamed.
    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
    let (s, o) = post(&c, &srv.url, "/v1/completions", &body);
    assert_eq!(s, 200, "{o}");
    assert_eq!(o["object"], "text_completion");
    assert_eq!(o["choices"][0]["text"], content.as_str());
    assert_eq!(
        o["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        tokens.len()
    );
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let data = sse(c
        .post(format!("{}/v1/completions", srv.url))
        .json(&sbody)
        .send()
        .unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let text: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, content);

    // Stop strings: cut before the stop, which is reported.
    let cut = content
        .char_indices()
        .nth(content.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = content[cut..].chars().take(3).collect();
    let (s, w) = post(
        &c,
        &srv.url,
        "/completion",
        &json!({"prompt": prompt, "n_predict": n, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(s, 200);
    assert_eq!(w["stop_type"], "word", "{w}");
    assert_eq!(w["stopping_word"], stop.as_str());
    let expect = &content[..content.find(stop.as_str()).unwrap()];
    assert_eq!(w["content"], expect);
}

/// 16 prompts of different lengths: some are still in their prompt while others generate.
fn sixteen_prompts() -> Vec<String> {
    (0..16)
        .map(|i| {
            let p = PROMPTS[i % PROMPTS.len()];
            format!("{}{p}", "Listen, and answer well. ".repeat(i * 3 / 4))
        })
        .collect()
}

/// The tokens of each of 16 prompts, run at the same time on 16 slots (one graph per round)
/// and one by one.
fn concurrent_equals_alone(cache_args: &[&str]) {
    let Some(m) = model() else { return };
    let _g = serial();
    let mut args = vec!["-np", "16", "--metrics", "-b", "64"];
    args.extend_from_slice(cache_args);
    let srv = Server::start(&m, &args);
    let c = client();
    let n = 12;
    let prompts = sixteen_prompts();
    let alone: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| greedy(&c, &srv.url, p, n).1)
        .collect();
    let graphs = |c: &Client| metrics(c, &srv.url)["llamacpp:n_decode_total"];
    let graphs_alone = graphs(&c);
    let together: Vec<Vec<i64>> = std::thread::scope(|s| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (c, url) = (c.clone(), srv.url.clone());
                s.spawn(move || greedy(&c, &url, p, n).1)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (t, a)) in together.iter().zip(&alone).enumerate() {
        assert_eq!(
            t, a,
            "cache {cache_args:?}: request {i} beside 15 others vs alone"
        );
    }
    assert!(alone.iter().all(|t| !t.is_empty()));

    // The 16 shared graphs: together they took a fraction of the graphs they took alone.
    let graphs_together = graphs(&c) - graphs_alone;
    assert!(
        graphs_together * 4.0 <= graphs_alone,
        "{graphs_together} graphs together vs {graphs_alone} alone"
    );
    let metrics = metrics(&c, &srv.url);
    let total: usize = 2 * alone.iter().map(Vec::len).sum::<usize>();
    assert_eq!(metrics["llamacpp:tokens_predicted_total"] as usize, total);
    assert_eq!(metrics["llamacpp:requests_processing"], 0.0);
    // Finished requests give their caches back: idle slots hold no KV memory.
    assert_eq!(metrics["ottkv:kv_bytes_total"], 0.0);
    assert_eq!(metrics["ottkv:kv_bytes_reserved"], 0.0);
    assert!(metrics.contains_key("ottkv:kv_bytes{slot=\"15\"}"));
}

/// /metrics as Prometheus text: every sample line `name{labels} value`, HELP and TYPE for each.
fn metrics(c: &Client, url: &str) -> std::collections::HashMap<String, f64> {
    let r = c.get(format!("{url}/metrics")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().unwrap();
    let mut out = std::collections::HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name = key.split('{').next().unwrap();
        assert!(typed.contains(name), "no TYPE for {name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        let v: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        out.insert(key.to_string(), v);
    }
    out
}

/// The KV budget decides how many requests run at once: the same budget that holds one f16
/// request at a time holds several of ours, and the answers are the same token for token
/// either way; a request that could never fit is refused at once, the others unaffected.
#[test]
fn the_kv_budget_turns_memory_into_concurrent_requests() {
    let Some(m) = model() else { return };
    let _g = serial();
    let hp = ottkv::model::Model::load(&m).unwrap().hparams;
    let n = 12;
    let prompts: Vec<Vec<i64>> = {
        let srv = Server::start(&m, &[]);
        let c = client();
        PROMPTS
            .iter()
            .map(|p| {
                let (s, v) = post(&c, &srv.url, "/tokenize", &json!({ "content": p }));
                assert_eq!(s, 200, "{v}");
                v["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_i64().unwrap())
                    .collect()
            })
            .collect()
    };
    // What each request reserves: its session's closed form at prompt + n_predict tokens.
    let need = |cache: &str| -> usize {
        let kind: ottkv::kind::CacheKind = cache.parse().unwrap();
        prompts
            .iter()
            .map(|p| kind.bytes_at(&hp, p.len() + n).unwrap())
            .max()
            .unwrap()
    };
    let (f16, ours) = (need("f16"), need("recommended"));
    let budget = f16 * 3 / 2;
    assert!(
        2 * ours <= budget,
        "ours {ours} B, f16 {f16} B: the premise of this test"
    );
    let budget_mib = format!("{}", budget as f64 / (1u64 << 20) as f64);

    for cache_args in [
        &["--cache", "recommended"][..],
        &["-ctk", "f16", "-ctv", "f16"],
    ] {
        let mut args = vec!["-np", "4", "--metrics", "--kv-budget", &budget_mib];
        args.extend_from_slice(cache_args);
        let srv = Server::start(&m, &args);
        let c = client();
        let run = |p: &Vec<i64>| {
            let body =
                json!({"prompt": p, "n_predict": n, "temperature": 0, "return_tokens": true});
            let (s, v) = post(&c, &srv.url, "/completion", &body);
            assert_eq!(s, 200, "{v}");
            v["tokens"].clone()
        };
        let alone: Vec<Value> = prompts.iter().map(run).collect();
        let together: Vec<Value> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts.iter().map(|p| s.spawn(move || run(p))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "{cache_args:?}");
        let metrics = metrics(&c, &srv.url);
        let busy = metrics["llamacpp:n_busy_slots_per_decode"];
        if cache_args[0] == "-ctk" {
            assert_eq!(
                busy, 1.0,
                "f16 under a budget of 1.5 requests ran them one by one"
            );
        } else {
            assert!(
                busy > 1.0,
                "ours under the same budget ran several at once: {busy}"
            );
        }
        assert_eq!(metrics["ottkv:kv_budget_bytes"] as usize, budget);
        assert_eq!(metrics["ottkv:kv_bytes_reserved"], 0.0);
        if cache_args[0] == "-ctk" {
            // More than the whole budget (512 cells of f16): refused with the numbers, and
            // nothing else breaks.
            let big = json!({"prompt": "Hi", "n_predict": 500, "temperature": 0});
            let msg = assert_error(
                &post(&c, &srv.url, "/completion", &big),
                400,
                "invalid_request_error",
            );
            assert!(msg.contains("--kv-budget") && msg.contains("MiB"), "{msg}");
            assert_alive(&c, &srv.url);
        }
        wait_slots_free(&c, &srv.url);
    }
}

#[test]
fn concurrent_greedy_equals_alone_our_cache() {
    concurrent_equals_alone(&[]);
}

#[test]
fn concurrent_greedy_equals_alone_f16() {
    concurrent_equals_alone(&["-ctk", "f16", "-ctv", "f16"]);
}

#[test]
fn chat_template_tokenize_and_props() {
    let Some(m) = model() else { return };
    let _g = serial();
    let srv = Server::start(&m, &["--alias", "smol"]);
    let c = client();
    let (s, props) = get(&c, &srv.url, "/props");
    assert_eq!(s, 200);
    assert_eq!(props["total_slots"], 1);
    assert_eq!(props["default_generation_settings"]["n_ctx"], 512);
    let template = props["chat_template"].as_str().unwrap().to_string();
    assert!(template.contains("<|im_start|>"), "{template}");

    // With a system message llama.cpp's own ChatML formatting is the reference.
    let msgs = [
        ("system", "You are terse."),
        ("user", "Hi there"),
        ("assistant", "Hello."),
        ("user", "Name a color."),
    ];
    let body_msgs: Vec<Value> = msgs
        .iter()
        .map(|(r, t)| json!({"role": r, "content": t}))
        .collect();
    let (s, v) = post(
        &c,
        &srv.url,
        "/apply-template",
        &json!({"messages": body_msgs}),
    );
    assert_eq!(s, 200, "{v}");
    let reference = ottkv::llama::chat_apply_template(&template, &msgs, true).unwrap();
    assert_eq!(v["prompt"], reference.as_str());
    // Without one, SmolLM2's template adds its own (which llama.cpp's ChatML does not).
    let (_, v) = post(
        &c,
        &srv.url,
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(
        v["prompt"],
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let rendered = v["prompt"].as_str().unwrap().to_string();

    // The chat endpoint generates from exactly that text, special tokens parsed.
    let chat = json!({"model": "x", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "temperature": 0});
    let (s, v) = post(&c, &srv.url, "/v1/chat/completions", &chat);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smol");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let (direct, _, dv) = greedy(&c, &srv.url, &rendered, 10);
    assert_eq!(content, direct);
    let (_, tk) = post(
        &c,
        &srv.url,
        "/tokenize",
        &json!({"content": rendered, "add_special": true}),
    );
    let n_prompt = tk["tokens"].as_array().unwrap().len();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        n_prompt
    );
    assert_eq!(dv["tokens_evaluated"].as_u64().unwrap() as usize, n_prompt);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap()
            + v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let finish = v["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();

    // Streamed chat: role first, the same text, the finish reason, usage, [DONE].
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    sc["stream_options"] = json!({"include_usage": true});
    let data = sse(c
        .post(format!("{}/v1/chat/completions", srv.url))
        .json(&sc)
        .send()
        .unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content);
    let reasons: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["finish_reason"].as_str())
        .collect();
    assert_eq!(reasons, [finish.as_str()]);
    assert_eq!(chunks.last().unwrap()["usage"], v["usage"]);

    // tokenize → detokenize, with pieces, special tokens.
    let text = "Hello world, ünïcödé 😀 — done.";
    let (s, t) = post(&c, &srv.url, "/tokenize", &json!({"content": text}));
    assert_eq!(s, 200);
    let ids = t["tokens"].clone();
    assert!(ids.as_array().unwrap().len() > 5);
    let (s, d) = post(&c, &srv.url, "/detokenize", &json!({"tokens": ids}));
    assert_eq!(s, 200);
    assert_eq!(d["content"], text);
    let (_, p) = post(
        &c,
        &srv.url,
        "/tokenize",
        &json!({"content": "Hello world", "with_pieces": true}),
    );
    let pieces: String = p["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["piece"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pieces, "Hello world");
    let (_, sp) = post(
        &c,
        &srv.url,
        "/tokenize",
        &json!({"content": "<|im_start|>"}),
    );
    assert_eq!(sp["tokens"].as_array().unwrap().len(), 1, "{sp}");
    let (_, sp) = post(
        &c,
        &srv.url,
        "/tokenize",
        &json!({"content": "<|im_start|>", "parse_special": false}),
    );
    assert!(sp["tokens"].as_array().unwrap().len() > 1, "{sp}");

    let (s, models) = get(&c, &srv.url, "/v1/models");
    assert_eq!(s, 200);
    assert_eq!(models["data"][0]["id"], "smol");
    assert_eq!(models["data"][0]["meta"]["n_vocab"], 49152);
    // /metrics without --metrics.
    assert_error(&get(&c, &srv.url, "/metrics"), 501, "not_supported_error");
}

#[test]
fn bad_input_is_refused_and_nothing_breaks() {
    let Some(m) = model() else { return };
    let _g = serial();
    let srv = Server::start(&m, &[]);
    let c = client();
    let u = &srv.url;

    let msg = assert_error(
        &post_raw(&c, u, "/completion", b"{\"prompt\": \"x\", ".to_vec()),
        400,
        "invalid_request_error",
    );
    assert!(msg.contains("not valid JSON"), "{msg}");
    assert_alive(&c, u);
    assert_error(
        &post_raw(&c, u, "/completion", b"[1, 2]".to_vec()),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post_raw(&c, u, "/tokenize", Vec::new()),
        400,
        "invalid_request_error",
    );
    // Invalid UTF-8 inside a JSON string.
    let msg = assert_error(
        &post_raw(
            &c,
            u,
            "/completion",
            b"{\"prompt\": \"a\xff\xfeb\"}".to_vec(),
        ),
        400,
        "invalid_request_error",
    );
    assert!(msg.contains("JSON"), "{msg}");
    assert_alive(&c, u);

    // Wrong types, named.
    let msg = assert_error(
        &post(
            &c,
            u,
            "/completion",
            &json!({"prompt": "x", "n_predict": "ten"}),
        ),
        400,
        "invalid_request_error",
    );
    assert!(msg.contains("n_predict"), "{msg}");
    let msg = assert_error(
        &post(&c, u, "/completion", &json!({"prompt": 5})),
        400,
        "invalid_request_error",
    );
    assert!(msg.contains("prompt"), "{msg}");
    assert_error(
        &post(
            &c,
            u,
            "/completion",
            &json!({"prompt": "x", "stream": "yes"}),
        ),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": "x", "stop": [1]})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/completion", &json!({"n_predict": 3})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/v1/chat/completions", &json!({"messages": "hi"})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(
            &c,
            u,
            "/v1/chat/completions",
            &json!({"messages": [{"content": "no role"}]}),
        ),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/tokenize", &json!({"content": ["x"]})),
        400,
        "invalid_request_error",
    );
    // Unknown fields are ignored.
    let (s, v) = post(
        &c,
        u,
        "/completion",
        &json!({"prompt": "Hi", "n_predict": 2, "temperature": 0, "frobnicate": {"x": [1]}, "cache_prompt": true}),
    );
    assert_eq!(s, 200, "{v}");

    // Token ids outside the vocabulary, in prompts and in /detokenize.
    let msg = assert_error(
        &post(&c, u, "/completion", &json!({"prompt": [1, 49152]})),
        400,
        "invalid_request_error",
    );
    assert!(msg.contains("49152") && msg.contains("vocabulary"), "{msg}");
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": [-1]})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": [1.5]})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/detokenize", &json!({"tokens": [1, 99999999]})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": ""})),
        400,
        "invalid_request_error",
    );
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": ["a", "b"]})),
        400,
        "invalid_request_error",
    );
    assert_alive(&c, u);

    // A prompt longer than the slot's context: the numbers in the message and the fields.
    let long = "hello ".repeat(600);
    let got = post(&c, u, "/completion", &json!({"prompt": long}));
    let msg = assert_error(&got, 400, "exceed_context_size_error");
    assert!(msg.contains("512"), "{msg}");
    assert_eq!(got.1["error"]["n_ctx"], 512);
    assert!(got.1["error"]["n_prompt_tokens"].as_u64().unwrap() > 512);
    assert_error(
        &post(
            &c,
            u,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": long}]}),
        ),
        400,
        "exceed_context_size_error",
    );

    // n_predict past the context: stops at the context with "limit" / "length".
    // (A prompt a little shorter than the context, so that few tokens fit after it.)
    let near = "hello ".repeat(480);
    let (_, t) = post(&c, u, "/tokenize", &json!({"content": near}));
    let n_prompt = t["tokens"].as_array().unwrap().len();
    assert!((400..500).contains(&n_prompt), "{n_prompt}");
    let (s, v) = post(
        &c,
        u,
        "/completion",
        &json!({"prompt": near, "n_predict": 1000, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stop_type"], "limit");
    assert_eq!(v["truncated"], true);
    let predicted = v["tokens_predicted"].as_u64().unwrap() as usize;
    // The last token is sampled from the full context, not stored.
    assert_eq!(predicted, 512 - n_prompt + 1, "{v}");
    let (s, v) = post(
        &c,
        u,
        "/v1/completions",
        &json!({"prompt": near, "max_tokens": 1000, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");

    // Unknown endpoints and methods: the error object too.
    assert_error(&get(&c, u, "/nope"), 404, "not_found_error");
    let r = c.get(format!("{u}/completion")).send().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_alive(&c, u);
}

#[test]
fn disconnect_frees_the_slot_and_the_queue_is_bounded() {
    let Some(m) = model() else { return };
    let _g = serial();
    let srv = Server::start(&m, &["-np", "1", "--queue", "1", "--metrics"]);
    let c = client();
    let u = srv.url.clone();
    let long = json!({"prompt": "Write a long story about a dragon.", "n_predict": 400, "temperature": 0, "ignore_eos": true, "stream": true});

    // A client that leaves mid-stream: its slot is freed and reset.
    {
        let r = c
            .post(format!("{u}/completion"))
            .json(&long)
            .send()
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        let mut seen = 0;
        while seen < 3 {
            let l = lines.next().unwrap().unwrap();
            seen += usize::from(l.starts_with("data: "));
        }
        let (_, v) = get(&c, &u, "/slots");
        assert_eq!(v[0]["is_processing"], true, "{v}");
        assert!(v[0]["n_past"].as_u64().unwrap() > 0);
    }
    wait_slots_free(&c, &u);
    assert_alive(&c, &u);
    // A client that gives up on a plain (not streamed) answer frees its slot too.
    let impatient = Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .unwrap();
    let mut plain = long.clone();
    plain["stream"] = json!(false);
    let r = impatient
        .post(format!("{u}/completion"))
        .json(&plain)
        .send();
    assert!(r.is_err_and(|e| e.is_timeout()));
    wait_slots_free(&c, &u);

    // One slot busy, one request waiting, the next one refused with 503 + Retry-After.
    let r = c
        .post(format!("{u}/completion"))
        .json(&long)
        .send()
        .unwrap();
    let mut busy = BufReader::new(r).lines();
    busy.next().unwrap().unwrap();
    let waiter = {
        let (c, u) = (c.clone(), u.clone());
        std::thread::spawn(move || {
            post(
                &c,
                &u,
                "/completion",
                &json!({"prompt": "Hi", "n_predict": 3, "temperature": 0}),
            )
        })
    };
    let t0 = Instant::now();
    while metrics(&c, &u)["llamacpp:requests_deferred"] < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the waiting request never queued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = c
        .post(format!("{u}/completion"))
        .json(&json!({"prompt": "Hi", "n_predict": 3}))
        .send()
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|h| h.to_str().unwrap().to_string());
    let got = json_of(r);
    let msg = assert_error(&got, 503, "unavailable_error");
    assert!(msg.contains("queue"), "{msg}");
    assert_eq!(retry.as_deref(), Some("1"));
    // The busy client leaves; the waiting one gets the slot and its answer.
    drop(busy);
    let (s, v) = waiter.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert!(v["tokens_predicted"].as_u64().unwrap() > 0);
    wait_slots_free(&c, &u);
}

#[test]
fn api_key_is_required_except_for_health() {
    let Some(m) = model() else { return };
    let _g = serial();
    let template =
        "{% for m in messages %}[{{ m.role | upper }}]{{ m.content.strip() }}\n{% endfor %}";
    let srv = Server::start(&m, &["--api-key", "s3cret", "--chat-template", template]);
    let c = client();
    let u = &srv.url;
    assert_eq!(get(&c, u, "/health").0, 200);
    assert_error(&get(&c, u, "/v1/models"), 401, "authentication_error");
    assert_error(
        &post(&c, u, "/completion", &json!({"prompt": "Hi"})),
        401,
        "authentication_error",
    );
    let wrong = c
        .get(format!("{u}/props"))
        .bearer_auth("nope")
        .send()
        .unwrap();
    assert_error(&json_of(wrong), 401, "authentication_error");
    let ok = c
        .get(format!("{u}/props"))
        .bearer_auth("s3cret")
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let ok = c
        .get(format!("{u}/slots"))
        .header("x-api-key", "s3cret")
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // --chat-template replaces the model's template.
    let msgs = json!([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}]);
    let r = c
        .post(format!("{u}/apply-template"))
        .bearer_auth("s3cret")
        .json(&json!({ "messages": msgs }))
        .send()
        .unwrap();
    assert_eq!(
        json_of(r),
        (200, json!({"prompt": "[USER]Hi\n[ASSISTANT]Yo\n"}))
    );
    let r = c
        .post(format!("{u}/completion"))
        .bearer_auth("s3cret")
        .json(&json!({"prompt": "Hi", "n_predict": 2}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn sigterm_ends_streams_and_exits_cleanly() {
    let Some(m) = model() else { return };
    let _g = serial();
    let mut srv = Server::start(&m, &[]);
    let c = client();
    let r = c
        .post(format!("{}/completion", srv.url))
        .json(&json!({"prompt": "Tell me a story.", "n_predict": 400, "ignore_eos": true, "stream": true}))
        .send()
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("data: "));
    let kill = Command::new("kill")
        .args(["-TERM", &srv.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // The stream ends (with an error event) rather than hanging.
    let rest: Vec<String> = lines
        .map_while(Result::ok)
        .filter(|l| l.starts_with("data: "))
        .collect();
    let last: Value = serde_json::from_str(&rest.last().unwrap()[6..]).unwrap();
    assert_eq!(last["error"]["type"], "unavailable_error", "{last}");
    let t0 = Instant::now();
    loop {
        if let Some(status) = srv.child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unequal_cache_types_are_refused() {
    let Some(m) = model() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_ottkv"))
        .arg("serve")
        .arg("-m")
        .arg(&m)
        .args(["-ctk", "q8_0", "-ctv", "f16", "--port", "0"])
        .output()
        .unwrap();
    // A usage error, as a bad flag is.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-ctk q8_0 and -ctv f16 differ"), "{err}");
}

#[test]
fn openai_python_client() {
    let Some(m) = model() else { return };
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        println!("skipping: openai_python_client: python3 cannot import openai (pip install \"openai>=1,<2\")");
        return;
    }
    let _g = serial();
    let srv = Server::start(&m, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/serve_openai_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&srv.url)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
