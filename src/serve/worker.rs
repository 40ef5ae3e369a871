//! The model worker: one thread that loads the model, owns its one `Generator` (the KV cache), and
//! runs the jobs of a bounded FIFO queue one at a time, streaming each job's text back to its request.
//!
//! The HTTP side only ever sees `Queue::submit(Job)` and the job's `Event` channel. Batched decoding
//! can therefore come later inside this module alone: a worker that admits several jobs from the same
//! queue and steps them together sends the same events.

use std::ops::ControlFlow;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::engine::Loaded;
use crate::error::Result;
use crate::generation::{generate_scored, prompt_logprobs, GenerationStats, Generator, StopReason, TokenLogprobs};
use crate::sampling::{Sampler, SamplingParams};
use crate::stream::TextStream;
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

/// Settings of the worker's one generator.
pub struct WorkerOptions {
    /// KV cache length (`--ctx`); None: the model's max_position_embeddings.
    pub ctx: Option<usize>,
    /// Pause after each token (tests use it to disconnect or fill the queue mid-answer).
    pub decode_delay: Duration,
    /// Prompts run in chunks that start at multiples of this (`--prefill-chunk`, at least 2).
    pub prefill_chunk: usize,
    /// `--decode-path`.
    pub decode: crate::generation::DecodeOptions,
}

/// Runs on the worker thread: loads the model, then serves jobs until the server stops.
/// Returns the load's error (the server then stops); errors of single jobs go to their requests.
pub fn run(load: impl FnOnce() -> Result<Loaded>, tokenizer: &Tokenizer, jobs: Receiver<Job>, shared: &Shared, opts: WorkerOptions) -> Result<()> {
    let loaded = load()?;
    let ctx = opts.ctx.unwrap_or(loaded.model.config.max_position_embeddings);
    let mut engine = Engine::new(Generator::with_decode(&loaded.model, ctx, &opts.decode)?, &opts, tokenizer, shared);
    super::log(format_args!("{}", loaded.summary()));
    shared.ready.store(true, Ordering::SeqCst);
    let mut injected = false;
    loop {
        // A timeout, so a stopping server is noticed even while a request still holds a sender.
        let job = match jobs.recv_timeout(Duration::from_millis(100)) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) if !shared.stopping.load(Ordering::SeqCst) => continue,
            Err(_) => break,
        };
        shared.metrics.queue_depth.dec();
        if shared.stopping.load(Ordering::SeqCst) {
            continue;
        }
        if job.events.is_closed() {
            shared.metrics.cancelled.inc();
            continue;
        }
        let failure = match catch_unwind(AssertUnwindSafe(|| fault_hook(&mut injected).and_then(|()| engine.run_job(&job)))) {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => {
                // The whole error for the server's log; the client's copy names no server file.
                super::log(format_args!("a request failed: {e}"));
                e.without_paths()
            }
            Err(panic) => {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                format!("the model worker panicked: {}", msg.unwrap_or_default())
            }
        };
        engine.forget();
        // A client that left needs no answer.
        let _ = job.events.send(Event::Failed(failure));
    }
    Ok(())
}

/// Test hook: `EXPANSE_TEST_FAULT=serve-worker` fails the first job the way a device error would (a
/// model that fails on checked input can no longer be made: NaN weights are refused at load).
fn fault_hook(injected: &mut bool) -> Result<()> {
    if !*injected && std::env::var("EXPANSE_TEST_FAULT").as_deref() == Ok("serve-worker") {
        *injected = true;
        return Err(crate::error::Error::internal("fault injected by EXPANSE_TEST_FAULT"));
    }
    Ok(())
}

/// The generator and what the worker knows about the state of its cache.
///
/// A prompt's logits must not depend on what ran before it (greedy answers are the same whoever else
/// is connected), yet a prompt that extends an earlier one should reuse the cache. Both hold because
/// every prompt runs in the same chunks, whatever the cache holds: chunks start at multiples of
/// `chunk`, and only whole chunks of an earlier prompt are reused. Same chunks, same shapes, same
/// inputs: the same bits — even where the matmul kernels round differently for different row counts
/// (candle's CPU gemm does, in f32). A prompt of up to `chunk + 1` tokens is one chunk, as in `generate`.
struct Engine<'m> {
    generator: Generator<'m>,
    /// How many leading cached tokens were computed as whole chunks of a prompt: only these are reused.
    exact: usize,
    chunk: usize,
    tokenizer: &'m Tokenizer,
    shared: &'m Shared,
    delay: Duration,
}

/// Where the last chunk of a prompt of `n` tokens starts. A last chunk of one token joins the one
/// before: one token alone would take the decode path, which rounds differently from the prefill path.
fn last_chunk_start(n: usize, chunk: usize) -> usize {
    let start = n.saturating_sub(1) / chunk * chunk;
    if n - start == 1 && start >= chunk {
        start - chunk
    } else {
        start
    }
}

impl<'m> Engine<'m> {
    fn new(generator: Generator<'m>, opts: &WorkerOptions, tokenizer: &'m Tokenizer, shared: &'m Shared) -> Engine<'m> {
        Engine { generator, exact: 0, chunk: opts.prefill_chunk.max(2), tokenizer, shared, delay: opts.decode_delay }
    }

    /// After a failure the cache may hold anything: start the next job from nothing.
    fn forget(&mut self) {
        self.generator.reset();
        self.exact = 0;
    }

    /// Fills the cache with every chunk of `prompt` but the last (which `generate` runs), reusing the
    /// whole chunks it already holds. Returns how many prompt tokens were reused.
    fn prepare(&mut self, prompt: &[u32]) -> Result<usize> {
        let common = self.generator.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let last = last_chunk_start(prompt.len(), self.chunk);
        let keep = (common.min(self.exact) / self.chunk * self.chunk).min(last);
        self.generator.truncate(keep);
        self.exact = keep;
        for start in (keep..last).step_by(self.chunk) {
            self.generator.feed(&prompt[start..start + self.chunk])?;
            self.exact = start + self.chunk;
        }
        Ok(keep)
    }

    /// Runs a job's runs in order, each ending with its `Done`; stops early when the client left or
    /// the server is stopping.
    fn run_job(&mut self, job: &Job) -> Result<()> {
        for (choice, run) in job.runs.iter().enumerate() {
            if job.prompt_logprobs {
                let logprobs = prompt_logprobs(self.generator.model, &run.prompt, job.logprobs.unwrap_or(0))?;
                let first = run.prompt.first().copied().unwrap_or_default();
                if job.events.send(Event::Prompt { choice, first, logprobs }).is_err() {
                    self.shared.metrics.cancelled.inc();
                    return Ok(());
                }
            }
            let outcome = self.run(job, choice, run)?;
            let ended = outcome.stop == StopReason::Interrupted;
            if job.events.send(Event::Done { choice, outcome }).is_err() || ended {
                return Ok(());
            }
        }
        Ok(())
    }

    fn run(&mut self, job: &Job, choice: usize, run: &Run) -> Result<Outcome> {
        let reused = self.prepare(&run.prompt)?;
        let mut sampler = Sampler::new(run.sampling.clone());
        let mut stream = TextStream::new(self.tokenizer, job.stop_strings.clone());
        let mut failure = None;
        let mut gone = false;
        let (shared, delay) = (self.shared, self.delay);
        let stats = generate_scored(&mut self.generator, &run.prompt, &mut sampler, job.max_tokens, &job.stop_ids, job.logprobs, |id, logprobs| {
            let text = match stream.push(id) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(e);
                    return ControlFlow::Break(StopReason::Interrupted);
                }
            };
            if job.events.send(Event::Token { choice, text, logprobs }).is_err() {
                gone = true;
                return ControlFlow::Break(StopReason::Interrupted);
            }
            if stream.stopped() {
                return ControlFlow::Break(StopReason::StopString);
            }
            if shared.stopping.load(Ordering::SeqCst) {
                return ControlFlow::Break(StopReason::Interrupted);
            }
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            ControlFlow::Continue(())
        })?;
        // Reusable: the whole chunks. Not the generated tokens (written one at a time by the decode
        // path), nor a last chunk of another size than `chunk` (a later prompt would run those positions
        // in a whole chunk, a matmul of another shape).
        let (n, last) = (run.prompt.len(), last_chunk_start(run.prompt.len(), self.chunk));
        self.exact = if n - last == self.chunk { n } else { last };
        if let Some(e) = failure {
            return Err(e);
        }
        self.record(&stats, reused, gone);
        Ok(Outcome {
            tail: stream.finish()?,
            stop: stats.stop,
            prompt_tokens: stats.prompt_tokens,
            cached_tokens: reused,
            completion_tokens: stats.generated.len(),
        })
    }

    fn record(&self, stats: &GenerationStats, reused: usize, gone: bool) {
        let m = &self.shared.metrics;
        m.prompt_tokens.inc_by(stats.prompt_tokens as u64);
        m.cached_prompt_tokens.inc_by(reused as u64);
        m.generated_tokens.inc_by(stats.generated.len() as u64);
        if stats.generated.len() > 1 {
            m.decode_seconds.inc_by(stats.decode_secs);
            m.decode_tokens_per_second.set(stats.decode_tps());
        }
        if gone {
            m.cancelled.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{load, LoadOptions};

    #[test]
    fn prompts_split_at_multiples_of_the_chunk_and_never_end_on_one_token() {
        // (tokens, chunk) → start of the last chunk
        for (n, chunk, want) in [(1, 8, 0), (2, 8, 0), (8, 8, 0), (9, 8, 0), (10, 8, 8), (16, 8, 8), (17, 8, 8), (18, 8, 16), (3, 2, 0), (4, 2, 2), (5, 2, 2)] {
            let start = last_chunk_start(n, chunk);
            assert_eq!(start, want, "n {n}, chunk {chunk}");
            assert!(n - start >= 2 || n == 1, "n {n}, chunk {chunk}: a one-token last chunk");
        }
    }

    fn logits_bits(t: &candle_core::Tensor) -> Vec<u32> {
        t.to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    /// What `generate` runs first: the prompt's logits, after `prepare`.
    fn prompt_logits(e: &mut Engine, prompt: &[u32]) -> (Vec<u32>, usize) {
        let reused = e.prepare(prompt).unwrap();
        (logits_bits(&e.generator.feed_prompt(prompt).unwrap()), reused)
    }

    #[test]
    fn a_reused_prefix_gives_the_logits_of_computing_it_afresh() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let tok = Tokenizer::from_file(&dir.join("tiny-mistral-f32/tokenizer.json")).unwrap();
        let shared = Shared { metrics: Metrics::new(), ready: AtomicBool::new(true), stopping: AtomicBool::new(false) };
        let opts = WorkerOptions { ctx: None, decode_delay: Duration::ZERO, prefill_chunk: 8, decode: Default::default() };
        let ids = |n: usize, seed: usize| -> Vec<u32> { (0..n).map(|i| ((i * 7919 + seed * 104729) % 31999 + 1) as u32).collect() };
        for (model, dtype) in [("tiny-mistral-f32", "auto"), ("tiny-mistral-bf16", "auto"), ("tiny-mistral-f32", "bf16")] {
            let loaded = load(&LoadOptions::new(dir.join(model).display().to_string()).expand("every:4").dtype(dtype)).unwrap();
            let mut warm = Engine::new(Generator::new(&loaded.model, 256).unwrap(), &opts, &tok, &shared);
            let a = ids(60, 1);
            // A history of jobs (each decodes a few tokens into the cache), then prompts that share its
            // prefixes: the same prompt again, its extension, a longer and a shorter cut, an unrelated one.
            let mut prompts = vec![a[..23].to_vec(), a[..23].to_vec(), a[..40].to_vec(), a[..33].to_vec(), a[..9].to_vec(), ids(17, 2), a[..57].to_vec()];
            let mut turn = a[..23].to_vec();
            turn.extend(ids(12, 3));
            prompts.insert(2, turn);
            let mut reused_total = 0;
            for (i, p) in prompts.iter().enumerate() {
                let (got, reused) = prompt_logits(&mut warm, p);
                reused_total += reused;
                let mut fresh = Engine::new(Generator::new(&loaded.model, 256).unwrap(), &opts, &tok, &shared);
                let (want, none) = prompt_logits(&mut fresh, p);
                assert_eq!(none, 0);
                assert!(got == want, "{model} {dtype}, prompt {i} ({} tokens, {reused} reused): logits differ from a fresh prefill", p.len());
                if p.len() <= 9 {
                    let mut g = Generator::new(&loaded.model, 256).unwrap();
                    assert!(logits_bits(&g.feed(p).unwrap()) == want, "one chunk is one plain prefill, as in `generate`");
                }
                let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
                let run = Run { prompt: p.clone(), sampling: SamplingParams::default() };
                let job =
                    Job { runs: vec![run.clone()], max_tokens: 4, stop_ids: vec![], stop_strings: vec![], logprobs: None, prompt_logprobs: false, events };
                assert_eq!(warm.run(&job, 0, &run).unwrap().completion_tokens, 4);
            }
            assert!(reused_total >= 8 * 5, "{model}: the cache was reused ({reused_total} tokens)");
        }
    }
}
