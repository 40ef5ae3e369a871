//! The model worker: one thread that loads the model and serves the jobs of a bounded FIFO queue,
//! up to `--parallel` at once (`slots`), streaming each job's text back to its request.
//!
//! The HTTP side only ever sees `Queue::submit(Job)` and the job's `Event` channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::slots::{Fault, Slots};
use crate::constraint::Constraint;
use crate::engine::Loaded;
use crate::error::Result;
use crate::generation::{StopReason, TokenLogprobs};
use crate::model::Model;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// One request's generation, as the worker needs it: one run per choice, run in order.
pub struct Job {
    pub runs: Vec<Run>,
    pub max_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// `Some(k)`: each generated token's log-probability and the `k` most likely tokens.
    pub logprobs: Option<usize>,
    /// With `logprobs`, the prompt tokens' too, before each run's tokens (completions' `echo`).
    pub prompt_logprobs: bool,
    pub events: UnboundedSender<Event>,
}

/// One choice of a job: a prompt and its sampling (each of `n` choices has its own seed).
#[derive(Debug, Clone)]
pub struct Run {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// The grammar the answer must follow (`response_format`, a required tool call), at its start.
    pub constraint: Option<Constraint>,
}

/// What a job's request hears from the worker, in this order for each run (`choice`): `Prompt` when
/// asked for, `Token`s, `Done`; the runs one after another; `Failed` ends the job. The channel closing
/// before the last `Done` means the server is stopping.
#[derive(Debug)]
pub enum Event {
    /// The log-probabilities of the prompt's tokens after its first, `first`.
    Prompt {
        choice: usize,
        first: u32,
        logprobs: Vec<TokenLogprobs>,
    },
    /// One generated token and the text it releases (empty while it holds half a character or what
    /// may be the start of a stop string).
    Token {
        choice: usize,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    Done {
        choice: usize,
        outcome: Outcome,
    },
    Failed(String),
    /// The request's own fault, found while answering it (a grammar too large for the parser at
    /// some token): a 400.
    Refused(String),
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Text held back until the end (see `TextStream::finish`).
    pub tail: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What the HTTP side and the worker share.
pub struct Shared {
    pub metrics: Metrics,
    /// The model is loaded and the worker takes jobs.
    pub ready: AtomicBool,
    /// The server is stopping: generations end at their next token, queued jobs are dropped.
    pub stopping: AtomicBool,
}

/// The sending end of the job queue.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Stopped,
}

impl Queue {
    /// A queue that holds `capacity` jobs beyond the one running, and its receiving end.
    pub fn new(capacity: usize, shared: Arc<Shared>) -> (Queue, Receiver<Job>) {
        let (tx, rx) = sync_channel(capacity);
        (Queue { tx, shared }, rx)
    }

    /// Queues `job` behind the others, or refuses it at once when every place is taken.
    pub fn submit(&self, job: Job) -> std::result::Result<(), SubmitError> {
        // Counted before sending so the worker's decrement can never come first.
        self.shared.metrics.queue_depth.inc();
        self.tx.try_send(job).map_err(|e| {
            self.shared.metrics.queue_depth.dec();
            match e {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }
}

/// Settings of the worker's slots.
pub struct WorkerOptions {
    /// KV cache length of each slot (`--ctx`); None: the model's max_position_embeddings.
    pub ctx: Option<usize>,
    /// Pause after each decode step (tests use it to disconnect or fill the queue mid-answer).
    pub decode_delay: Duration,
    /// Prompts run in chunks that start at multiples of this (`--prefill-chunk`, at least 2).
    pub prefill_chunk: usize,
    /// `--decode-path` (of a single slot; several decode in batches).
    pub decode: crate::generation::DecodeOptions,
    /// `--parallel`: sequences served at once; None: sized for the device ([`slot_count`]).
    pub parallel: Option<usize>,
}

/// Most slots chosen without `--parallel`.
const DEFAULT_MAX_SLOTS: usize = 16;

/// Bytes of one slot's KV cache of `ctx` tokens.
fn slot_bytes(model: &Model, ctx: usize) -> u128 {
    let c = &model.config;
    let layers = model.blocks.iter().filter(|b| model.runs(b)).count();
    (layers * 2 * c.num_key_value_heads * c.head_dim * model.dtype.size_in_bytes()) as u128 * ctx as u128
}

/// The number of slots and why: `--parallel` when given (its caches must fit the device), else on the
/// CPU as many as half the available memory holds, up to 16; on a GPU one (a batch there would run
/// the reference kernels one row at a time: the fused CUDA step does not batch yet).
fn slot_count(model: &Model, ctx: usize, asked: Option<usize>) -> Result<(usize, String)> {
    let per_slot = slot_bytes(model, ctx);
    let human = |b: u128| crate::expand::human_bytes(usize::try_from(b).unwrap_or(usize::MAX));
    if let Some(n) = asked {
        crate::engine::check_fits(&format!("--parallel {n}: {n} KV caches of {ctx} tokens (--ctx)"), per_slot * n as u128, &model.device)?;
        return Ok((n, format!("--parallel, {} of KV cache each", human(per_slot))));
    }
    if !model.device.is_cpu() {
        return Ok((1, "the default on a GPU; --parallel N decodes N at once, on the reference kernels".into()));
    }
    let Some(free) = crate::engine::available_host_memory() else {
        return Ok((DEFAULT_MAX_SLOTS, "the default".into()));
    };
    let fit = (free as u128 / 2 / per_slot.max(1)).min(DEFAULT_MAX_SLOTS as u128) as usize;
    Ok((
        fit.max(1),
        format!("as many as half of the {} available hold, at most {DEFAULT_MAX_SLOTS}; {} of KV cache each", human(free as u128), human(per_slot)),
    ))
}

/// Runs on the worker thread: loads the model, then serves jobs until the server stops.
/// Returns the load's error (the server then stops); errors of single jobs go to their requests.
pub fn run(load: impl FnOnce() -> Result<Loaded>, tokenizer: &Tokenizer, jobs: Receiver<Job>, shared: &Shared, opts: WorkerOptions) -> Result<()> {
    let loaded = load()?;
    let model = &loaded.model;
    let ctx = opts.ctx.unwrap_or(model.config.max_position_embeddings);
    let fused = matches!(opts.decode.path, crate::step::DecodePath::Fused | crate::step::DecodePath::Graph);
    let (n, why) = if fused && opts.parallel.is_none() {
        (1, "--decode-path fused or graph: one sequence at a time".into())
    } else {
        slot_count(model, ctx, opts.parallel)?
    };
    let mut slots = Slots::new(model, n, ctx, &opts.decode, tokenizer, shared)?.with_pacing(opts.prefill_chunk, opts.decode_delay).with_fault(test_fault());
    super::log(format_args!("{}", loaded.summary()));
    super::log(format_args!("{n} sequence{} at once ({why})", if n == 1 { "" } else { "s" }));
    shared.ready.store(true, Ordering::SeqCst);
    loop {
        // New jobs join at the next step; with nothing under way the worker waits for one. A timeout,
        // so a stopping server is noticed even while a request still holds a sender.
        while slots.has_free() {
            let job = if slots.running() == 0 {
                jobs.recv_timeout(Duration::from_millis(100)).map_err(|e| e == RecvTimeoutError::Disconnected)
            } else {
                jobs.try_recv().map_err(|e| e == TryRecvError::Disconnected)
            };
            match job {
                Ok(job) => admit(&mut slots, job, shared),
                Err(true) if slots.running() == 0 => return Ok(()),
                Err(_) => break,
            }
        }
        shared.metrics.running_sequences.set(slots.running() as i64);
        if slots.running() == 0 {
            if shared.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            continue;
        }
        slots.step();
        shared.metrics.running_sequences.set(slots.running() as i64);
    }
}

/// Takes `job` off the queue into a slot, unless the server is stopping or its client already left.
fn admit(slots: &mut Slots, job: Job, shared: &Shared) {
    shared.metrics.queue_depth.dec();
    if shared.stopping.load(Ordering::SeqCst) {
        return;
    }
    if job.events.is_closed() {
        shared.metrics.cancelled.inc();
        return;
    }
    slots.admit(job);
}

/// Test hook: `EXPANSE_TEST_FAULT=serve-worker` fails the first request's decode steps the way a device
/// error would, `serve-worker-panic` the way a bug would (a model that fails on checked input can no
/// longer be made: NaN weights are refused at load).
fn test_fault() -> Option<Fault> {
    match std::env::var("EXPANSE_TEST_FAULT").as_deref() {
        Ok("serve-worker") => Some(Fault::Error),
        Ok("serve-worker-panic") => Some(Fault::Panic),
        _ => None,
    }
}
