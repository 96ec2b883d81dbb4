//! The engine: one thread owns the model and one [`Session`] per slot and advances every
//! active slot in one graph per round (continuous batching: a prompt advances one `-b` chunk
//! per round, a generating slot one token, and a new request's prompt joins the next round),
//! so the weights are read once per round for all of them. Attention runs per slot over its
//! own cache: a slot's output depends only on its request, never on what the other slots do.
//!
//! The HTTP side submits jobs through a channel and reads each job's events from its own
//! channel; a job whose receiver is gone (the client left) is dropped at the next round and
//! its cache freed at once.
//!
//! Memory is the admission rule: a job gets a session sized to what it can use (prompt plus
//! `n_predict`, at most `-c`), whose closed-form KV bytes are reserved against the KV budget
//! while it runs; the first waiting job starts when a slot is free and its bytes fit, and
//! waits otherwise (first come, first served). An idle slot holds no cache.

use super::error::ApiError;
use super::params::GenParams;
use super::state::{Shared, SlotView};
use super::text::{StopMatcher, Utf8Stream};
use crate::kind::CacheKind;
use crate::llama::LlamaModel;
use crate::model::sample::Sampler;
use crate::model::{Batcher, Model, Session, SessionParams, Stepped};
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Why generation ended, in llama-server's `stop_type` words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopType {
    Eos,
    Limit,
    Word,
}

impl StopType {
    pub fn name(self) -> &'static str {
        match self {
            StopType::Eos => "eos",
            StopType::Limit => "limit",
            StopType::Word => "word",
        }
    }

    /// OpenAI's `finish_reason`.
    pub fn finish_reason(self) -> &'static str {
        match self {
            StopType::Limit => "length",
            _ => "stop",
        }
    }
}

/// The end of a job.
#[derive(Clone, Debug)]
pub struct Done {
    pub slot: usize,
    /// Everything generated (stop string excluded), and its token ids.
    pub content: String,
    pub tokens: Vec<i32>,
    /// What no `Text` event carried yet.
    pub tail: String,
    pub tail_tokens: Vec<i32>,
    pub stop_type: StopType,
    pub stopping_word: String,
    pub n_prompt: usize,
    /// The context filled up before `n_predict` or a stop.
    pub truncated: bool,
    pub prompt_ms: f64,
    pub predicted_ms: f64,
    pub has_new_line: bool,
}

impl Done {
    pub fn n_predicted(&self) -> usize {
        self.tokens.len()
    }
}

/// What a job's receiver gets.
#[derive(Debug)]
pub enum Event {
    /// New text and the tokens it came from (tokens whose text is held back, an unfinished
    /// character or a possible stop string, come with a later event).
    Text {
        text: String,
        tokens: Vec<i32>,
    },
    Done(Box<Done>),
    Error(ApiError),
}

pub struct Job {
    pub id: u64,
    pub prompt: Vec<i32>,
    pub params: GenParams,
    events: UnboundedSender<Event>,
    /// Counts the job as admitted until it is dropped, or handed back before its answer is
    /// sent so that the client's next request finds the room.
    ticket: Option<Ticket>,
}

impl Job {
    /// The answer, after giving the job's place back.
    fn answer(&mut self, ev: Event) {
        self.ticket = None;
        let _ = self.events.send(ev);
    }
}

/// One admitted job: running or waiting.
struct Ticket(Arc<AtomicUsize>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Cmd {
    Job(Job),
    Shutdown,
}

/// What the engine tells the server once it is up.
#[derive(Clone, Debug)]
pub struct StartInfo {
    pub hparams: crate::gguf::ModelHparams,
    /// KV bytes a cache at `-c` tokens holds right after creation.
    pub kv_bytes_start: usize,
    /// The KV budget in force.
    pub kv_budget: usize,
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model: PathBuf,
    pub n_slots: usize,
    pub n_ctx: usize,
    pub n_batch: usize,
    pub threads: usize,
    pub cache: CacheKind,
    pub queue: usize,
    /// KV bytes all running jobs may reserve together (None: every slot at `-c` tokens of
    /// f16, llama-server's memory for the same flags).
    pub kv_budget: Option<usize>,
}

/// The HTTP side's end: submit jobs, shut the engine down.
pub struct EngineHandle {
    tx: Sender<Cmd>,
    /// Jobs sent but not yet in a slot.
    waiting: Arc<AtomicUsize>,
    /// Jobs admitted and not yet answered, and how many may be: the slots plus `--queue`.
    admitted: Arc<AtomicUsize>,
    limit: usize,
    queue: usize,
    next_id: AtomicU64,
}

impl EngineHandle {
    /// Queues a job; 503 (with Retry-After) when the queue is full or the engine stopped.
    pub fn submit(
        &self,
        prompt: Vec<i32>,
        params: GenParams,
    ) -> Result<(u64, UnboundedReceiver<Event>), ApiError> {
        let full = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_err();
        if full {
            return Err(ApiError::unavailable(format!(
                "all {} slots are busy and {} requests are already waiting (--queue): retry later",
                self.limit - self.queue,
                self.queue
            ))
            .with_retry_after(1));
        }
        let ticket = Ticket(self.admitted.clone());
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            id,
            prompt,
            params,
            events,
            ticket: Some(ticket),
        };
        if self.tx.send(Cmd::Job(job)).is_err() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        Ok((id, rx))
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Ends every job (each gets an error event) and stops the engine thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Cmd::Shutdown);
    }
}

/// Starts the engine thread: loads the model, makes the slots, and returns once they exist
/// (or with the reason they could not be made).
pub fn start(
    cfg: EngineConfig,
    vocab: Arc<LlamaModel>,
    shared: Shared,
) -> crate::Result<(EngineHandle, StartInfo, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let w = waiting.clone();
    let queue = cfg.queue;
    let limit = cfg.n_slots.saturating_add(cfg.queue);
    let thread = std::thread::Builder::new()
        .name("ottkv-engine".into())
        .spawn(move || {
            // The model lives on this thread's stack and the sessions borrow it: nothing
            // else needs the weights, so no 'static model is needed.
            let model = match Model::load(&cfg.model) {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // One session at the full context, made and dropped, proves the cache runs with
            // this model (a refusal is a startup error, not every request's).
            let kv_bytes_start = match new_session(&model, &cfg, cfg.n_ctx) {
                Ok(s) => s.kv_bytes(),
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let f16 = CacheKind::Block {
                ty: crate::kind::BlockType::F16,
                rotate: false,
            };
            let f16_budget = f16
                .bytes_at(&model.hparams, cfg.n_ctx)
                .map(|b| b.saturating_mul(cfg.n_slots));
            let kv_budget = match (cfg.kv_budget, f16_budget) {
                (Some(b), _) => b,
                (None, Ok(b)) => b,
                (None, Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let batcher = match Batcher::new(cfg.threads) {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let slots = (0..cfg.n_slots)
                .map(|id| Slot {
                    id,
                    session: None,
                    active: None,
                })
                .collect();
            let info = StartInfo {
                hparams: model.hparams.clone(),
                kv_bytes_start,
                kv_budget,
            };
            let mut cfg = cfg;
            cfg.kv_budget = Some(kv_budget);
            let mut engine = Engine {
                model: &model,
                cfg,
                vocab,
                slots,
                pending: VecDeque::new(),
                waiting: w,
                shared,
                reserved: 0,
                batcher,
            };
            engine.publish(0, 0);
            let _ = ready_tx.send(Ok(info));
            engine.run(rx);
        })
        .map_err(|e| crate::Error::InvalidArgument(format!("could not start the engine: {e}")))?;
    let info = match ready_rx.recv() {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(crate::Error::InvalidArgument(
                "the engine thread ended while starting".into(),
            ));
        }
    };
    let handle = EngineHandle {
        tx,
        waiting,
        admitted: Arc::new(AtomicUsize::new(0)),
        limit,
        queue,
        next_id: AtomicU64::new(0),
    };
    Ok((handle, info, thread))
}

fn new_session<'m>(
    model: &'m Model,
    cfg: &EngineConfig,
    n_ctx: usize,
) -> crate::Result<Session<'m>> {
    Session::new(
        model,
        SessionParams {
            n_ctx,
            n_batch: cfg.n_batch,
            threads: cfg.threads,
            cache: cfg.cache.clone(),
        },
    )
}

struct Slot<'m> {
    id: usize,
    /// The running job's session (None while idle: an idle slot holds no KV memory).
    session: Option<Session<'m>>,
    active: Option<Active>,
}

struct Active {
    job: Job,
    /// KV bytes reserved against the budget for this job's session.
    reserved: usize,
    phase: Phase,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    generated: Vec<i32>,
    /// Tokens whose text no event carried yet.
    unsent: Vec<i32>,
    t_start: Instant,
    t_prompt_end: Option<Instant>,
    has_new_line: bool,
}

enum Phase {
    /// Prompt tokens evaluated so far.
    Prompt(usize),
    /// The logits to sample the next token from.
    Decode(Vec<f32>),
}

enum Step {
    /// Tokens to compute this round.
    Eval(Vec<i32>),
    Finished(StopType, Option<String>),
    Failed(ApiError),
}

/// A bug inside a step leaves its sessions in an unknown state; releasing the slots drops them.
fn internal() -> ApiError {
    ApiError::server("internal error while generating (a bug: please report it)")
}

struct Engine<'m> {
    model: &'m Model,
    cfg: EngineConfig,
    vocab: Arc<LlamaModel>,
    slots: Vec<Slot<'m>>,
    pending: VecDeque<Job>,
    waiting: Arc<AtomicUsize>,
    shared: Shared,
    /// KV bytes the running jobs reserved.
    reserved: usize,
    batcher: Batcher,
}

impl<'m> Engine<'m> {
    fn run(&mut self, rx: Receiver<Cmd>) {
        loop {
            let idle = self.pending.is_empty() && self.slots.iter().all(|s| s.active.is_none());
            let mut shutdown = false;
            if idle {
                match rx.recv() {
                    Ok(c) => shutdown |= self.take(c),
                    Err(_) => shutdown = true,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => shutdown |= self.take(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                }
            }
            if shutdown {
                self.cancel_all();
                return;
            }
            self.assign();
            let busy = self.slots.iter().filter(|s| s.active.is_some()).count() as u64;
            let n_eval = self.round();
            self.publish(n_eval, busy);
        }
    }

    /// Takes a command; true for shutdown.
    fn take(&mut self, c: Cmd) -> bool {
        match c {
            Cmd::Job(j) => {
                self.pending.push_back(j);
                false
            }
            Cmd::Shutdown => true,
        }
    }

    fn dequeued(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    /// Tokens a job's session needs: its prompt and what it may generate, within `-c`.
    fn job_ctx(&self, job: &Job) -> usize {
        let n_predict = job.params.n_predict.unwrap_or(self.cfg.n_ctx);
        job.prompt
            .len()
            .saturating_add(n_predict)
            .clamp(1, self.cfg.n_ctx)
    }

    /// Waiting jobs into free slots while their KV fits the budget, first come first served;
    /// jobs whose client left go, and a job that could never fit is answered at once.
    fn assign(&mut self) {
        let before = self.pending.len();
        self.pending.retain(|j| !j.events.is_closed());
        for _ in self.pending.len()..before {
            self.dequeued();
        }
        for i in 0..self.slots.len() {
            if self.slots[i].active.is_some() {
                continue;
            }
            let Some(job) = self.pending.front() else {
                break;
            };
            let n_ctx = self.job_ctx(job);
            let need = self
                .cfg
                .cache
                .bytes_at(&self.model.hparams, n_ctx)
                .unwrap_or(usize::MAX);
            let budget = self.cfg.kv_budget.unwrap_or(usize::MAX);
            if need <= budget && self.reserved.saturating_add(need) > budget {
                break; // waits until running jobs give memory back
            }
            let Some(mut job) = self.pending.pop_front() else {
                break;
            };
            self.dequeued();
            if need > budget {
                let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
                job.answer(Event::Error(ApiError::bad_request(format!(
                    "this request needs {:.2} MiB of KV cache for {n_ctx} tokens, more than \
                     the whole --kv-budget of {:.2} MiB: ask for fewer tokens (n_predict) or \
                     start the server with a larger budget",
                    mib(need),
                    mib(budget)
                ))));
                continue;
            }
            let session = match new_session(self.model, &self.cfg, n_ctx) {
                Ok(s) => s,
                Err(e) => {
                    job.answer(Event::Error(ApiError::server(format!(
                        "could not make a cache for this request: {e}"
                    ))));
                    continue;
                }
            };
            self.reserved += need;
            self.slots[i].session = Some(session);
            let p = &job.params;
            let sampler = Sampler::new(p.temperature, p.top_k, p.top_p, p.seed).with_min_p(p.min_p);
            self.slots[i].active = Some(Active {
                stops: StopMatcher::new(p.stop.clone()),
                reserved: need,
                job,
                phase: Phase::Prompt(0),
                sampler,
                utf8: Utf8Stream::default(),
                generated: Vec::new(),
                unsent: Vec::new(),
                t_start: Instant::now(),
                t_prompt_end: None,
                has_new_line: false,
            });
        }
    }

    /// One step for every active slot, all in one graph: a prompt advances by one `-b`
    /// chunk, a generating slot by one token. Returns the graphs computed (0 or 1).
    fn round(&mut self) -> u64 {
        let mut batch: Vec<(usize, Vec<i32>)> = Vec::new();
        for i in 0..self.slots.len() {
            let Some(a) = &self.slots[i].active else {
                continue;
            };
            if a.job.events.is_closed() {
                log::info!("slot {i}: client of task {} left; slot freed", a.job.id);
                self.release(i);
                continue;
            }
            let prepared = std::panic::catch_unwind(AssertUnwindSafe(|| self.prepare(i)));
            match prepared.unwrap_or_else(|_| Step::Failed(internal())) {
                Step::Eval(tokens) => batch.push((i, tokens)),
                Step::Finished(stop, word) => self.finish(i, stop, word),
                Step::Failed(e) => self.fail(i, e),
            }
        }
        // Every generating slot's token, and at most `-b` prompt tokens a round: whole
        // chunks (see `prepare`), in slot order while they fit.
        let mut room = self.cfg.n_batch;
        batch.retain(|(i, tokens)| {
            let prompt = matches!(
                self.slots[*i].active.as_ref().map(|a| &a.phase),
                Some(Phase::Prompt(_))
            );
            if !prompt {
                return true;
            }
            let fits = tokens.len() <= room;
            if fits {
                room -= tokens.len();
            }
            fits
        });
        if batch.is_empty() {
            return 0;
        }
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.eval(&batch)));
        match stepped.unwrap_or_else(|_| Err(internal())) {
            Ok(out) => {
                for ((i, _), st) in batch.iter().zip(out) {
                    if let Some((stop, word)) = self.advance(*i, st) {
                        self.finish(*i, stop, word);
                    }
                }
            }
            // The step's sessions are in an unknown state: each of its requests ends.
            Err(e) => {
                for (i, _) in &batch {
                    self.fail(*i, e.clone());
                }
            }
        }
        1
    }

    /// One graph over the slots of `batch` and their next tokens.
    fn eval(&mut self, batch: &[(usize, Vec<i32>)]) -> Result<Vec<Stepped>, ApiError> {
        let mut want = batch.iter().map(|(i, t)| (*i, t.as_slice())).peekable();
        let mut seqs: Vec<(&mut Session<'m>, &[i32])> = Vec::with_capacity(batch.len());
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if want.peek().is_some_and(|&(j, _)| j == i) {
                let (_, tokens) = want.next().expect("peeked");
                let Some(s) = slot.session.as_mut() else {
                    return Err(internal());
                };
                seqs.push((s, tokens));
            }
        }
        self.batcher
            .step(&mut seqs)
            .map_err(|e| ApiError::server(e.to_string()))
    }

    fn fail(&mut self, i: usize, e: ApiError) {
        log::error!("slot {i}: {e}");
        if let Some(mut a) = self.release(i) {
            a.job.answer(Event::Error(e));
        }
    }

    /// What slot `i` computes this round: its prompt up to the next `-b` boundary (where the
    /// request alone would cut it, so its numbers are the same whatever runs beside it), or
    /// the token it samples now, after sending its text; or its end.
    fn prepare(&mut self, i: usize) -> Step {
        let n_batch = self.cfg.n_batch;
        let vocab = self.vocab.clone();
        let slot = &mut self.slots[i];
        let (Some(a), Some(session)) = (slot.active.as_mut(), slot.session.as_ref()) else {
            return Step::Failed(internal());
        };
        match &mut a.phase {
            Phase::Prompt(done) => {
                let end = ((*done / n_batch + 1) * n_batch).min(a.job.prompt.len());
                Step::Eval(a.job.prompt[*done..end].to_vec())
            }
            Phase::Decode(logits) => {
                let tok = a.sampler.sample(logits) as i32;
                if vocab.is_eog(tok) && !a.job.params.ignore_eos {
                    return Step::Finished(StopType::Eos, None);
                }
                a.generated.push(tok);
                a.unsent.push(tok);
                let bytes = match vocab.token_bytes(tok, false) {
                    Ok(b) => b,
                    Err(e) => return Step::Failed(ApiError::server(e.to_string())),
                };
                let text = a.utf8.push(&bytes);
                let (show, hit) = a.stops.push(&text);
                a.has_new_line |= show.contains('\n');
                if !show.is_empty() {
                    let tokens = std::mem::take(&mut a.unsent);
                    let _ = a.job.events.send(Event::Text { text: show, tokens });
                }
                if hit.is_some() {
                    return Step::Finished(StopType::Word, hit);
                }
                if a.job
                    .params
                    .n_predict
                    .is_some_and(|n| a.generated.len() >= n)
                    || session.n_past() >= session.n_ctx()
                {
                    return Step::Finished(StopType::Limit, None);
                }
                Step::Eval(vec![tok])
            }
        }
    }

    /// Takes what the step computed for slot `i`; its end when it has one.
    fn advance(&mut self, i: usize, st: Stepped) -> Option<(StopType, Option<String>)> {
        let a = self.slots[i].active.as_mut()?;
        match &mut a.phase {
            Phase::Prompt(done) => {
                *done += st.consumed;
                if *done == a.job.prompt.len() {
                    a.t_prompt_end = Some(Instant::now());
                    a.phase = Phase::Decode(st.logits);
                    if a.job.params.n_predict == Some(0) {
                        return Some((StopType::Limit, None));
                    }
                }
            }
            Phase::Decode(logits) => *logits = st.logits,
        }
        None
    }

    /// Frees the slot, then sends the job its end: a client that has its answer sees the
    /// slot free in /slots.
    fn finish(&mut self, i: usize, stop: StopType, word: Option<String>) {
        let n_past = self.slots[i].session.as_ref().map_or(0, |s| s.n_past());
        let Some(mut a) = self.release(i) else {
            return;
        };
        let now = Instant::now();
        let t_prompt_end = a.t_prompt_end.unwrap_or(now);
        // An unfinished character, then text held back for a stop that never came.
        let mut tail = String::new();
        if stop != StopType::Word {
            let rest = a.utf8.flush();
            let (show, _) = a.stops.push(&rest);
            tail.push_str(&show);
            tail.push_str(&a.stops.finish());
        }
        let limited_by_ctx = stop == StopType::Limit
            && n_past >= self.cfg.n_ctx
            && a.job
                .params
                .n_predict
                .map_or(true, |n| a.generated.len() < n);
        let done = Done {
            slot: i,
            content: a.stops.text().to_owned(),
            tokens: std::mem::take(&mut a.generated),
            tail,
            tail_tokens: std::mem::take(&mut a.unsent),
            stop_type: stop,
            stopping_word: word.unwrap_or_default(),
            n_prompt: a.job.prompt.len(),
            truncated: limited_by_ctx,
            prompt_ms: (t_prompt_end - a.t_start).as_secs_f64() * 1e3,
            predicted_ms: (now - t_prompt_end).as_secs_f64() * 1e3,
            has_new_line: a.has_new_line || a.stops.text().contains('\n'),
        };
        {
            let mut p = self.shared.lock();
            let m = &mut p.metrics;
            m.prompt_tokens_total += done.n_prompt as u64;
            m.prompt_seconds_total += done.prompt_ms / 1e3;
            m.tokens_predicted_total += done.n_predicted() as u64;
            m.tokens_predicted_seconds_total += done.predicted_ms / 1e3;
        }
        a.job.answer(Event::Done(Box::new(done)));
    }

    /// Frees slot `i` and its cache (its reserved bytes back to the budget), publishes it,
    /// and returns what it was running.
    fn release(&mut self, i: usize) -> Option<Active> {
        let slot = &mut self.slots[i];
        let active = slot.active.take();
        slot.session = None;
        if let Some(a) = &active {
            self.reserved -= a.reserved;
        }
        let view = self.view(i);
        if let Some(v) = self.shared.lock().slots.get_mut(i) {
            *v = view;
        }
        active
    }

    /// Shutdown: every job ends with an error, every slot is reset.
    fn cancel_all(&mut self) {
        let gone = || ApiError::unavailable("the server is shutting down");
        while let Some(mut j) = self.pending.pop_front() {
            self.dequeued();
            j.answer(Event::Error(gone()));
        }
        for i in 0..self.slots.len() {
            if let Some(mut a) = self.release(i) {
                a.job.answer(Event::Error(gone()));
            }
        }
        self.publish(0, 0);
    }

    /// Slot `i` as /slots shows it.
    fn view(&self, i: usize) -> SlotView {
        let s = &self.slots[i];
        let (n_past, kv_bytes) = s
            .session
            .as_ref()
            .map_or((0, 0), |x| (x.n_past(), x.kv_bytes()));
        let a = s.active.as_ref();
        SlotView {
            id: s.id,
            id_task: a.map_or(-1, |a| a.job.id as i64),
            is_processing: a.is_some(),
            n_ctx: s.session.as_ref().map_or(self.cfg.n_ctx, |x| x.n_ctx()),
            kv_reserved: a.map_or(0, |a| a.reserved),
            n_past,
            kv_bytes,
            n_prompt: a.map_or(0, |a| a.job.prompt.len()),
            n_decoded: a.map_or(0, |a| a.generated.len()),
            has_new_line: a.is_some_and(|a| a.has_new_line),
            params: a.map(|a| a.job.params.clone()),
        }
    }

    /// The slots' state and the round's counters, for /slots, /props and /metrics.
    fn publish(&self, n_eval: u64, busy: u64) {
        let views: Vec<SlotView> = (0..self.slots.len()).map(|i| self.view(i)).collect();
        let mut p = self.shared.lock();
        let m = &mut p.metrics;
        if n_eval > 0 {
            m.n_decode_total += n_eval;
            m.busy_slots_sum += busy;
            m.n_rounds += 1;
        }
        let most = views.iter().map(|v| v.n_past as u64).max().unwrap_or(0);
        m.n_tokens_max = m.n_tokens_max.max(most);
        m.kv_reserved = self.reserved;
        m.kv_budget = self.cfg.kv_budget.unwrap_or(0);
        p.slots = views;
    }
}
