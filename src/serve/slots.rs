//! The sequences the model worker runs at once (`--parallel`): each in a slot with its own KV cache
//! and its own prefix reuse; prompts run one chunk at a time between decode steps, so running answers
//! keep flowing while a new prompt is read; every decoding sequence advances by one batched step.
//!
//! A sequence's logits do not depend on what else runs or when it joined. Its prompt's positions get
//! the bits they get in a cold run of the prompt alone: where a position's values do not depend on
//! the chunk it runs in (`Model::prompt_rows_invariant`: the CPU with f32/bf16 weights), an earlier
//! prompt's cached positions are reused to the token; elsewhere the prompt runs in the same chunks
//! whatever the cache held (chunks start at multiples of `chunk`, and only whole chunks of an earlier
//! prompt are reused: same shapes, same inputs, the same bits — even where the matmul kernels round
//! differently for different row counts). No chunk is one token (that would take the decode path).
//! Decode rows are batch-invariant (`Model::decode_rows`, or on CUDA the batched fused step over a
//! pool of the slots' caches, `DecodeStep::batched`), but round differently from prompt rows, so
//! generated tokens are never reused. A prompt of up to `chunk + 1` tokens is one chunk, as in
//! `generate`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::worker::{Event, Job, Outcome, Shared};
use crate::error::{Error, Result};
use crate::generation::{prompt_logprobs, token_logprobs, DecodeOptions, Generator, StopReason, TokenLogprobs};
use crate::model::{Cache, Model};
use crate::sampling::Sampler;
use crate::step::{DecodePath, DecodeStep, StepOut};
use crate::stream::TextStream;
use crate::tokenizer::Tokenizer;

/// Where the last chunk of a prompt of `n` tokens starts. A last chunk of one token joins the one
/// before: one token alone would take the decode path, which rounds differently from the prefill path.
pub(super) fn last_chunk_start(n: usize, chunk: usize) -> usize {
    let start = n.saturating_sub(1) / chunk * chunk;
    if n - start == 1 && start >= chunk {
        start - chunk
    } else {
        start
    }
}

/// Where the prompt chunk that starts at `start` ends, for a prompt of `n` tokens: at the next multiple
/// of `chunk` that leaves the chunk two tokens or more, or at the prompt's end where that would leave
/// one token after it. From a multiple of `chunk`, these are the cuts at the multiples of `chunk`
/// with the last chunk starting at [`last_chunk_start`].
pub(super) fn chunk_end(start: usize, n: usize, chunk: usize) -> usize {
    let mut end = (start / chunk + 1) * chunk;
    if end - start < 2 {
        end += chunk;
    }
    if end + 1 >= n {
        n
    } else {
        end
    }
}

/// A generator (cache and the tokens it holds), what is known of its cache, and the run it serves.
struct Slot<'m> {
    gen: Generator<'m>,
    /// How many leading cached tokens a later prompt may reuse: positions of a prompt, all of them
    /// where prompt rows are shape-invariant, else those run as whole chunks.
    exact: usize,
    seq: Option<Seq<'m>>,
    /// When the slot last took a run (admission order): among slots that reuse nothing, the one left
    /// alone longest is taken, so the conversations of the others keep their caches.
    last_used: u64,
}

/// One run (choice) of a job, under way in a slot.
struct Seq<'m> {
    job: Job,
    choice: usize,
    /// Admission order: prompts are read first come, first served.
    order: u64,
    sampler: Sampler,
    stream: TextStream<'m>,
    phase: Phase,
    /// Prompt tokens whose keys and values came from the cache.
    reused: usize,
    generated: usize,
    first_token: Option<Instant>,
    /// The client stopped listening.
    gone: bool,
}

/// What a decode step gives a row: its logits, or the next token taken on the device.
enum Next {
    Logits(Tensor),
    Token(u32),
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The prompt's next chunk starts here.
    Prompt(usize),
    /// The sampled token to run next.
    Decode(u32),
}

/// The worker's slots and the settings every sequence shares.
pub(super) struct Slots<'m> {
    slots: Vec<Slot<'m>>,
    model: &'m Model,
    chunk: usize,
    /// Most tokens a sequence may hold (`--ctx`).
    context: usize,
    /// Several slots: decode steps run every sequence as one batch (`Model::decode_rows`, or
    /// `batch_step`). One slot decodes on the generator's own path (the fused step where the device
    /// has one).
    batched: bool,
    /// On CUDA, the batched fused step over the slots' caches (a pool), once its one-cache step
    /// passed the self-check; None on the reference path, after a fallback, or elsewhere.
    batch_step: Option<Box<DecodeStep<'m>>>,
    /// `Model::prompt_rows_invariant`: cached prompt positions are reused to the token.
    invariant: bool,
    tokenizer: &'m Tokenizer,
    shared: &'m Shared,
    /// Pause after each decode step (tests use it to disconnect or fill the queue mid-answer).
    delay: Duration,
    admitted: u64,
    /// Test hook (`EXPANSE_TEST_FAULT`): the decode steps holding the first admitted run fail, batched
    /// and alone, until that run has failed.
    fault: Option<Fault>,
}

/// How an injected fault fails a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    Error,
    Panic,
}

/// The batched fused step of `path` over the slots' caches (a pool), after its one-cache step passes
/// the self-check (once per process and device); None, with a warning, where it does not (the slots
/// then batch on the reference path). A device that broke, or a bad flag, is an error.
fn batch_step<'m>(model: &'m Model, slots: &[Slot<'m>], path: DecodePath, decode: &DecodeOptions) -> Result<Option<Box<DecodeStep<'m>>>> {
    let caches: Vec<&Cache> = slots.iter().map(|s| &s.gen.cache).collect();
    let context = caches.first().map_or(0, |c| c.capacity());
    let opts = crate::step::StepOptions { splits: Some(crate::step::splits_for(model, context, &decode.step)), ..decode.step.clone() };
    let key = crate::step::check::key(model, path, opts.splits.unwrap_or(1));
    let fall_back = |why: String| {
        eprintln!("warning: the batched {} decode step is off ({why}); serve --parallel batches on the reference path", path.as_str());
        Ok(None)
    };
    if crate::step::check::known(&key).is_none() {
        let vocab = model.config.vocab_size;
        let prompt: Vec<u32> = (0..16.min(context.saturating_sub(2)).max(1)).map(|i| ((1 + i * 7919) % vocab) as u32).collect();
        match crate::step::check::check_path(model, path, &opts, &prompt, context) {
            Ok(v) => {
                crate::step::check::remember(&key, v.pass);
                if !v.pass {
                    return fall_back(v.warning());
                }
            }
            Err(e @ (Error::FastPathCrashed(_) | Error::Flag { .. })) => return Err(e),
            Err(e) => return fall_back(e.to_string()),
        }
    } else if crate::step::check::known(&key) == Some(false) {
        return fall_back("its self-check failed earlier in this process".into());
    }
    Ok(Some(Box::new(DecodeStep::batched(model, &caches, path, &opts)?)))
}

/// `f`, with a panic turned into an error (a bug must fail the requests it touches, not the server).
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(Error::internal(format!("the model worker panicked: {}", msg.unwrap_or_default())))
    })
}

/// Tells `job`'s client that its request failed (the whole error goes to the server's log; the
/// client's copy names no server file). A client that left needs no answer.
pub(super) fn send_failure(job: &Job, e: &Error) {
    super::log(format_args!("a request failed: {e}"));
    // Only a grammar's failure is the request's own fault here: anything else reaching the worker
    // for a checked request is the server's.
    let event = match e {
        Error::Grammar(_) => Event::Refused(e.without_paths()),
        _ => Event::Failed(e.without_paths()),
    };
    let _ = job.events.send(event);
}

impl<'m> Slots<'m> {
    /// `n` slots of `context` tokens each. One slot decodes on the path `decode` asks for; several
    /// decode in batches: on CUDA by the batched fused step of that path (checked now), else on the
    /// reference kernels.
    pub(super) fn new(model: &'m Model, n: usize, context: usize, decode: &DecodeOptions, tokenizer: &'m Tokenizer, shared: &'m Shared) -> Result<Slots<'m>> {
        let path = decode.path.resolve(model)?;
        let fused = n > 1 && path != DecodePath::Reference && crate::step::batches_on(model, &decode.step);
        let reference = DecodeOptions { path: DecodePath::Reference, ..decode.clone() };
        let caches = if fused { Cache::pool(model, n, context)? } else { (0..n.max(1)).map(|_| Cache::new(model, context)).collect::<Result<_>>()? };
        let slots: Vec<Slot> = caches
            .into_iter()
            .map(|c| Ok(Slot { gen: Generator::on_cache(model, c, if n > 1 { &reference } else { decode })?, exact: 0, seq: None, last_used: 0 }))
            .collect::<Result<_>>()?;
        let batch_step = match fused {
            true => batch_step(model, &slots, path, decode)?,
            false => None,
        };
        shared.metrics.slots.set(n as i64);
        let invariant = model.prompt_rows_invariant();
        Ok(Slots { slots, model, chunk: 2, context, batched: n > 1, batch_step, invariant, tokenizer, shared, delay: Duration::ZERO, admitted: 0, fault: None })
    }

    /// Prompts run in chunks starting at multiples of `chunk` (at least 2); a pause of `delay` after
    /// each decode step.
    pub(super) fn with_pacing(mut self, chunk: usize, delay: Duration) -> Self {
        self.chunk = chunk.max(2);
        self.delay = delay;
        self
    }

    /// Injects `fault` into the decode steps of the first run admitted (a device error, or a bug).
    pub(super) fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    pub(super) fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    pub(super) fn has_free(&self) -> bool {
        self.running() < self.slots.len()
    }

    /// Starts `job` in the free slot whose cache shares the longest reusable prefix with its first
    /// prompt (a client's next turn finds its conversation). A prefix counts when it is a whole chunk
    /// or half the prompt (llama-server's `--slot-prompt-similarity 0.5`): a prompt that shares only
    /// its first tokens with every cache (a BOS, a template's opening) takes the slot left alone
    /// longest, and the other conversations keep their caches. The caller checks there is a free slot.
    pub(super) fn admit(&mut self, job: Job) {
        let first = job.runs.first().map(|r| r.prompt.as_slice()).unwrap_or_default();
        let counts = |s: &Slot| Some(self.reusable(s, first)).filter(|&k| k >= self.chunk || 2 * k >= first.len()).unwrap_or(0);
        let free = self.slots.iter().enumerate().filter(|(_, s)| s.seq.is_none());
        let Some(i) = free.max_by_key(|(i, s)| (counts(s), std::cmp::Reverse(s.last_used), std::cmp::Reverse(*i))).map(|(i, _)| i) else {
            return send_failure(&job, &Error::internal("no free slot for an admitted request"));
        };
        self.start(i, job, 0);
    }

    /// Starts run `choice` of `job` in slot `i`: its prompt's log-probabilities when asked for, then
    /// the prompt's first chunk that the cache does not hold.
    fn start(&mut self, i: usize, job: Job, choice: usize) {
        match guarded(|| self.begin(i, &job, choice)) {
            Ok(Some(reused)) => {
                let run = &job.runs[choice];
                let (sampler, stream) =
                    (Sampler::new(run.sampling.clone()).with_constraint(run.constraint.clone()), TextStream::new(self.tokenizer, job.stop_strings.clone()));
                self.admitted += 1;
                let (order, phase) = (self.admitted, Phase::Prompt(reused));
                self.slots[i].last_used = order;
                self.slots[i].seq = Some(Seq { job, choice, order, sampler, stream, phase, reused, generated: 0, first_token: None, gone: false });
            }
            Ok(None) => {
                self.shared.metrics.cancelled.inc();
            }
            // `begin` changes the cache only once nothing can fail any more: it stays reusable.
            Err(e) => send_failure(&job, &e),
        }
    }

    /// Readies slot `i` for run `choice` of `job`; the prompt tokens it reuses, or None when the client
    /// left.
    fn begin(&mut self, i: usize, job: &Job, choice: usize) -> Result<Option<usize>> {
        let prompt = job.runs.get(choice).map(|r| r.prompt.as_slice()).ok_or_else(|| Error::internal(format!("a job without run {choice}")))?;
        if prompt.is_empty() {
            return Err(Error::flag("--prompt", "the prompt has no tokens"));
        }
        if prompt.len() > self.context {
            return Err(Error::ContextTooSmall { prompt: prompt.len(), context: self.context });
        }
        if job.prompt_logprobs {
            let logprobs = prompt_logprobs(self.model, prompt, job.logprobs.unwrap_or(0))?;
            let first = prompt[0];
            if job.events.send(Event::Prompt { choice, first, logprobs }).is_err() {
                return Ok(None);
            }
        }
        let slot = &mut self.slots[i];
        // One slot's fast path is built and self-checked with its first prompt (the cache is emptied).
        slot.gen.start_fast(prompt)?;
        let keep = self.reusable(&self.slots[i], prompt);
        let slot = &mut self.slots[i];
        slot.gen.truncate(keep);
        slot.exact = keep;
        Ok(Some(keep))
    }

    /// How many of `prompt`'s first tokens `slot`'s cache holds with the bits a cold run of the prompt
    /// gives them, leaving the rest to run in the chunks that run would cut: to the token where prompt
    /// rows are shape-invariant (at least two tokens left to run), else whole chunks up to the
    /// prompt's last chunk.
    fn reusable(&self, slot: &Slot, prompt: &[u32]) -> usize {
        let common = slot.gen.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(slot.exact);
        match self.invariant {
            true => common.min(prompt.len().saturating_sub(2)),
            false => (common / self.chunk * self.chunk).min(last_chunk_start(prompt.len(), self.chunk)),
        }
    }

    /// After a failure the cache may hold anything: the slot's next run starts from nothing.
    fn forget(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.gen.reset();
        slot.exact = 0;
        slot.seq = None;
    }

    /// Fails the run in slot `i` with `e` and frees the slot.
    fn fail(&mut self, i: usize, e: &Error) {
        if let Some(seq) = self.slots[i].seq.take() {
            self.shared.metrics.running_sequences.set(self.running() as i64);
            send_failure(&seq.job, e);
            if seq.order == 1 {
                self.fault = None;
            }
        }
        self.forget(i);
    }

    /// One round: the waiting prompts' next chunks, oldest first, up to one chunk's worth of tokens
    /// (at least one chunk: short prompts arriving together are read in the same round, and a round
    /// reads no more than it did when it read one chunk), then one decode step of every sequence
    /// past its prompt. While the server stops, prompts not yet read end at once.
    pub(super) fn step(&mut self) {
        let mut budget = self.chunk;
        let mut read_any = false;
        // Each pass reads one chunk or ends one prompt, so this ends.
        while let Some((_, i)) = self.oldest_waiting() {
            let left = self.slots[i].seq.as_mut().filter(|s| s.job.events.is_closed()).map(|s| s.gone = true).is_some();
            let result = match left || self.shared.stopping.load(Ordering::SeqCst) {
                // The client left, or the server stops: the prompt's other chunks need not run.
                true => self.finish(i, StopReason::Interrupted),
                false => {
                    let len = self.next_chunk_len(i);
                    if read_any && len > budget {
                        break;
                    }
                    (budget, read_any) = (budget.saturating_sub(len), true);
                    guarded(|| self.prefill(i))
                }
            };
            if let Err(e) = result {
                self.fail(i, &e);
            }
            if budget == 0 {
                break;
            }
        }
        self.decode();
    }

    /// The slot whose prompt waits to be read, admitted first: (admission order, slot).
    fn oldest_waiting(&self) -> Option<(u64, usize)> {
        let waiting = self.slots.iter().enumerate().filter_map(|(i, s)| match s.seq.as_ref()?.phase {
            Phase::Prompt(_) => Some((s.seq.as_ref()?.order, i)),
            Phase::Decode(_) => None,
        });
        waiting.min()
    }

    /// Tokens of slot `i`'s next prompt chunk (as `prefill` cuts them).
    fn next_chunk_len(&self, i: usize) -> usize {
        let Some(seq) = self.slots[i].seq.as_ref() else { return 0 };
        let Phase::Prompt(start) = seq.phase else { return 0 };
        chunk_end(start, seq.job.runs[seq.choice].prompt.len(), self.chunk) - start
    }

    /// Runs slot `i`'s next prompt chunk; after the last, samples and sends the first token.
    fn prefill(&mut self, i: usize) -> Result<()> {
        let (chunk, invariant) = (self.chunk, self.invariant);
        let slot = &mut self.slots[i];
        let Some(seq) = slot.seq.as_mut() else { return Ok(()) };
        let Phase::Prompt(start) = seq.phase else { return Ok(()) };
        let prompt = &seq.job.runs[seq.choice].prompt;
        let end = chunk_end(start, prompt.len(), chunk);
        let logits = slot.gen.feed(&prompt[start..end])?;
        // Reusable: these positions where prompt rows are shape-invariant; elsewhere only a whole
        // chunk (a later prompt would run the positions of a shorter last chunk in a whole one, a
        // matmul of another shape). Never the generated tokens, nor a one-token prompt (the decode
        // path's bits).
        if end - start >= 2 && (invariant || (start.is_multiple_of(chunk) && end - start == chunk)) {
            slot.exact = end;
        }
        if end < prompt.len() {
            seq.phase = Phase::Prompt(end);
            return Ok(());
        }
        seq.first_token = Some(Instant::now());
        self.sample_and_emit(i, &logits)
    }

    /// One decode step of every sequence past its prompt, each then sampling its next token. A step
    /// that fails is run again row by row (the same bits: the rows are batch-invariant, and a failed
    /// step advanced no cache), so only the rows that fail alone fail their requests.
    fn decode(&mut self) {
        let rows: Vec<(usize, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.seq.as_ref()?.phase {
                Phase::Decode(t) => Some((i, t)),
                Phase::Prompt(_) => None,
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let nexts = match guarded(|| self.run_rows(&rows)) {
            Ok(n) => n.into_iter().map(Ok).collect(),
            Err(_) if rows.len() > 1 => rows.iter().map(|r| guarded(|| self.run_rows(&[*r])).map(|mut n| n.remove(0))).collect(),
            Err(e) => vec![Err(e)],
        };
        let m = &self.shared.metrics;
        m.decode_steps.inc();
        m.decode_step_tokens.inc_by(rows.len() as u64);
        m.last_step_tokens.set(rows.len() as i64);
        for (&(i, _), next) in rows.iter().zip(nexts) {
            let emitted = next.and_then(|next| match next {
                Next::Logits(logits) => guarded(|| self.sample_and_emit(i, &logits)),
                Next::Token(token) => guarded(|| self.emit(i, token, None)),
            });
            if let Err(e) = emitted {
                self.fail(i, &e);
            }
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
    }

    /// Runs each row's token `(slot, token)` after its slot's cache: the logits `[vocab]` of each, or,
    /// one slot decoding greedily without log-probabilities on its fast path, the next token itself
    /// (taken on the device).
    fn run_rows(&mut self, rows: &[(usize, u32)]) -> Result<Vec<Next>> {
        self.inject_fault(rows)?;
        if !self.batched {
            let &[(i, token)] = rows else { return Err(Error::internal("one slot ran several rows")) };
            let slot = &mut self.slots[i];
            let Some(seq) = slot.seq.as_mut() else { return Err(Error::internal("a row without a run")) };
            if seq.job.logprobs.is_none() && seq.sampler.is_plain_greedy() {
                return Ok(vec![Next::Token(slot.gen.decode_next(token, &mut seq.sampler)?)]);
            }
            return Ok(vec![Next::Logits(slot.gen.feed(&[token])?)]);
        }
        let tokens: Vec<u32> = rows.iter().map(|r| r.1).collect();
        // Rows that need no logits: greedy without log-probabilities (the argmax taken on the device).
        let plain = rows.iter().all(|&(i, _)| self.slots[i].seq.as_ref().is_some_and(|s| s.job.logprobs.is_none() && s.sampler.is_plain_greedy()));
        // `rows` lists slots in order, as this filter meets them.
        let mut caches: Vec<&mut Cache> =
            self.slots.iter_mut().enumerate().filter(|(i, _)| rows.iter().any(|r| r.0 == *i)).map(|(_, s)| &mut s.gen.cache).collect();
        let nexts = match self.batch_step.as_mut().map(|step| step.decode_batch(&mut caches, &tokens, !plain)) {
            Some(Ok(out)) => out
                .into_iter()
                .map(|o| match o {
                    StepOut::Token(t) => Next::Token(t),
                    StepOut::Logits(l) => Next::Logits(l),
                })
                .collect(),
            Some(Err(e @ Error::FastPathCrashed(_))) => return Err(e),
            other => {
                // A failed step advanced no cache (`decode_batch` advances after its outputs are
                // read): the reference path redoes the rows, and keeps them.
                if let Some(Err(e)) = other {
                    eprintln!("warning: the batched decode step failed: {e}; serve --parallel goes on on the reference path");
                    self.batch_step = None;
                }
                let logits = self.model.decode_rows(&tokens, &mut caches)?;
                (0..rows.len()).map(|k| Ok(Next::Logits(logits.get(k)?))).collect::<Result<Vec<_>>>()?
            }
        };
        for &(i, token) in rows {
            self.slots[i].gen.tokens.push(token);
        }
        Ok(nexts)
    }

    /// The test hook: fails a step holding the first admitted run (until that run has failed).
    fn inject_fault(&self, rows: &[(usize, u32)]) -> Result<()> {
        let Some(fault) = self.fault else { return Ok(()) };
        if !rows.iter().any(|r| self.slots[r.0].seq.as_ref().is_some_and(|s| s.order == 1)) {
            return Ok(());
        }
        match fault {
            Fault::Error => Err(Error::internal("fault injected by EXPANSE_TEST_FAULT")),
            Fault::Panic => panic!("fault injected by EXPANSE_TEST_FAULT"),
        }
    }

    /// Samples slot `i`'s next token from `logits` and sends it, or ends the run where it stops.
    fn sample_and_emit(&mut self, i: usize, logits: &Tensor) -> Result<()> {
        let slot = &mut self.slots[i];
        let Some(seq) = slot.seq.as_mut() else { return Ok(()) };
        let next = seq.sampler.sample(logits, &slot.gen.tokens)?;
        let scored = seq.job.logprobs.map(|top| token_logprobs(logits, next, top)).transpose()?;
        self.emit(i, next, scored)
    }

    /// Sends `next` to slot `i`'s client, or ends its run where `generate` would stop.
    fn emit(&mut self, i: usize, next: u32, logprobs: Option<TokenLogprobs>) -> Result<()> {
        let slot = &mut self.slots[i];
        let Some(seq) = slot.seq.as_mut() else { return Ok(()) };
        let job = &seq.job;
        if seq.generated >= job.max_tokens {
            return self.finish(i, StopReason::MaxTokens);
        }
        if job.stop_ids.contains(&next) {
            return self.finish(i, StopReason::Eos);
        }
        seq.generated += 1;
        let text = seq.stream.push(next)?;
        let stop = if job.events.send(Event::Token { choice: seq.choice, text, logprobs }).is_err() {
            seq.gone = true;
            Some(StopReason::Interrupted)
        } else if seq.stream.stopped() {
            Some(StopReason::StopString)
        } else if self.shared.stopping.load(Ordering::SeqCst) {
            Some(StopReason::Interrupted)
        } else if seq.generated == job.max_tokens {
            Some(StopReason::MaxTokens)
        } else if slot.gen.tokens.len() + 1 > self.context {
            Some(StopReason::ContextFull)
        } else {
            None
        };
        match stop {
            Some(reason) => self.finish(i, reason),
            None => {
                seq.phase = Phase::Decode(next);
                Ok(())
            }
        }
    }

    /// Ends slot `i`'s run with `stop`: its `Done`, then the job's next run in the same slot (sharing
    /// the prompt's cached chunks), or the slot is free.
    fn finish(&mut self, i: usize, stop: StopReason) -> Result<()> {
        let Some(seq) = self.slots[i].seq.as_mut() else { return Ok(()) };
        let tail = seq.stream.finish()?;
        let Some(seq) = self.slots[i].seq.take() else { return Ok(()) };
        self.record(&seq);
        let outcome = Outcome { tail, stop, prompt_tokens: seq.job.runs[seq.choice].prompt.len(), cached_tokens: seq.reused, completion_tokens: seq.generated };
        let stopping = self.shared.stopping.load(Ordering::SeqCst);
        let next = stop != StopReason::Interrupted && !stopping && seq.choice + 1 < seq.job.runs.len();
        // The gauge is right before the client hears `Done` (and may read /metrics): the worker's own
        // update comes only after the step.
        self.shared.metrics.running_sequences.set((self.running() + usize::from(next)) as i64);
        let sent = seq.job.events.send(Event::Done { choice: seq.choice, outcome }).is_ok();
        if !sent && !seq.gone {
            self.shared.metrics.cancelled.inc();
        }
        if sent && next {
            self.start(i, seq.job, seq.choice + 1);
        }
        Ok(())
    }

    fn record(&self, seq: &Seq) {
        let m = &self.shared.metrics;
        m.prompt_tokens.inc_by(seq.job.runs[seq.choice].prompt.len() as u64);
        m.cached_prompt_tokens.inc_by(seq.reused as u64);
        m.generated_tokens.inc_by(seq.generated as u64);
        if let (Some(t), true) = (seq.first_token, seq.generated > 1) {
            let secs = t.elapsed().as_secs_f64();
            m.decode_seconds.inc_by(secs);
            m.decode_tokens_per_second.set((seq.generated - 1) as f64 / secs.max(1e-9));
        }
        if seq.gone {
            m.cancelled.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{load, LoadOptions};
    use crate::sampling::SamplingParams;
    use crate::serve::metrics::Metrics;
    use crate::serve::worker::Run;
    use std::sync::atomic::AtomicBool;

    /// The fixtures folder, the tiny models' tokenizer and a fresh server state.
    fn fixtures() -> (std::path::PathBuf, Tokenizer, Shared) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let tok = Tokenizer::from_file(&dir.join("tiny-mistral-f32/tokenizer.json")).unwrap();
        (dir, tok, Shared { metrics: Metrics::new(), ready: AtomicBool::new(true), stopping: AtomicBool::new(false) })
    }

    /// What a client hears of one job, as comparable data: each token's text and log-probabilities,
    /// then how it ended (stop reason and token counts), and the prompt tokens it found cached.
    type Heard = (Vec<(String, Option<TokenLogprobs>)>, Option<(StopReason, usize)>, usize, usize);

    /// Runs `jobs` (prompt, answer length, the step at which it arrives) through `slots` until every
    /// one is done; what each client heard.
    fn serve_all(slots: &mut Slots, jobs: &[(Vec<u32>, usize, usize)]) -> Vec<Heard> {
        serve_all_with(slots, jobs, Some(3))
    }

    /// `serve_all` with each job asking for `logprobs` (None: greedy rows take the device's argmax).
    fn serve_all_with(slots: &mut Slots, jobs: &[(Vec<u32>, usize, usize)], logprobs: Option<usize>) -> Vec<Heard> {
        let mut inbox = Vec::new();
        let mut waiting: Vec<(usize, Job)> = Vec::new();
        for (i, (prompt, max_tokens, _)) in jobs.iter().enumerate() {
            let (events, rx) = tokio::sync::mpsc::unbounded_channel();
            let run = Run { prompt: prompt.clone(), sampling: SamplingParams::default(), constraint: None };
            waiting
                .push((i, Job { runs: vec![run], max_tokens: *max_tokens, stop_ids: vec![], stop_strings: vec![], logprobs, prompt_logprobs: false, events }));
            inbox.push(rx);
        }
        let mut heard: Vec<Heard> = vec![(Vec::new(), None, 0, 0); jobs.len()];
        for step in 0.. {
            while slots.has_free() {
                let Some(k) = waiting.iter().position(|(i, _)| jobs[*i].2 <= step) else { break };
                slots.admit(waiting.remove(k).1);
            }
            if waiting.is_empty() && slots.running() == 0 {
                break;
            }
            slots.step();
            assert!(step < 10_000, "the jobs never finished");
        }
        for (h, rx) in heard.iter_mut().zip(&mut inbox) {
            while let Ok(e) = rx.try_recv() {
                match e {
                    Event::Token { text, logprobs, .. } => h.0.push((text, logprobs)),
                    Event::Done { outcome, .. } => (h.1, h.2) = (Some((outcome.stop, outcome.completion_tokens)), outcome.cached_tokens),
                    Event::Failed(_) | Event::Refused(_) => h.3 += 1,
                    other => panic!("unexpected event {other:?}"),
                }
            }
        }
        heard
    }

    /// Greedy answers and their log-probabilities (functions of the logits' bits) are the same served
    /// alone on a cold server, one after another on a warm one (reusing cached prompts), and 12 at a
    /// time in 4 slots arriving while others decode — f32, bf16 and q8_0, prompts past the sliding
    /// window.
    #[test]
    fn answers_do_not_depend_on_the_cache_or_on_who_else_is_served() {
        let (dir, tok, shared) = fixtures();
        let ids = |n: usize, seed: usize| -> Vec<u32> { (0..n).map(|i| ((i * 7919 + seed * 104729) % 31999 + 1) as u32).collect() };
        let a = ids(60, 1);
        // Shared prefixes (the same prompt again, an extension, a longer and a shorter cut), unrelated
        // prompts, one-chunk prompts, one token.
        let prompts = [
            a[..23].to_vec(),
            a[..23].to_vec(),
            a[..40].to_vec(),
            a[..33].to_vec(),
            a[..9].to_vec(),
            ids(17, 2),
            a[..57].to_vec(),
            ids(1, 3),
            ids(8, 4),
            ids(30, 5),
            a[..16].to_vec(),
            ids(12, 6),
        ];
        let jobs: Vec<(Vec<u32>, usize, usize)> = prompts.iter().enumerate().map(|(i, p)| (p.clone(), 3 + i % 5, 2 * i)).collect();
        // Quantized, prompt rows are not shape-invariant (chunks of 16 rows take the VNNI lane tiles
        // where the CPU has them, shorter last chunks the row tiles): whole chunks are reused.
        for (model, dtype, quant, chunk) in [
            ("tiny-mistral-f32", "auto", None, 8),
            ("tiny-mistral-bf16", "auto", None, 8),
            ("tiny-mistral-f32", "bf16", None, 8),
            ("tiny-mistral-f32", "auto", Some("q8_0"), 16),
        ] {
            let opts = LoadOptions::new(dir.join(model).display().to_string()).expand("every:4").dtype(dtype);
            let loaded = load(&quant.map_or(opts.clone(), |q| opts.quant(q))).unwrap();
            let m = &loaded.model;
            assert_eq!(m.prompt_rows_invariant(), quant.is_none(), "{model} {dtype} {quant:?}");
            let slots = |n: usize| Slots::new(m, n, 256, &DecodeOptions::default(), &tok, &shared).unwrap().with_pacing(chunk, Duration::ZERO);
            let cold: Vec<Heard> = jobs.iter().map(|j| serve_all(&mut slots(4), &[(j.0.clone(), j.1, 0)]).remove(0)).collect();
            let mut warm = slots(4);
            let one_by_one: Vec<Heard> = jobs.iter().map(|j| serve_all(&mut warm, &[(j.0.clone(), j.1, 0)]).remove(0)).collect();
            let together = serve_all(&mut slots(4), &jobs);
            for (i, c) in cold.iter().enumerate() {
                assert_eq!(c.1, Some((StopReason::MaxTokens, jobs[i].1)), "{model} {dtype} job {i}");
                assert!(one_by_one[i].0 == c.0, "{model} {dtype} job {i}: a warm cache changed the answer");
                assert!(together[i].0 == c.0, "{model} {dtype} job {i}: served beside others, the answer changed");
            }
            let reused: Vec<usize> = one_by_one.iter().map(|h| h.2).collect();
            // The same prompt again (job 1) and its extension (job 2): to the token where rows are
            // shape-invariant (all but the last two tokens of a repeat), else whole chunks.
            let want = if quant.is_none() { [21, 23] } else { [16, 16] };
            assert_eq!([reused[1], reused[2]], want, "{model} {dtype} {quant:?}: reused {reused:?}");
        }
    }

    /// A one-token prompt runs on the decode path, so a later prompt that starts with its token reuses
    /// nothing of it (one slot: the next prompt finds that cache).
    #[test]
    fn a_one_token_prompt_is_not_reused() {
        let (dir, tok, shared) = fixtures();
        let loaded = load(&LoadOptions::new(dir.join("tiny-mistral-f32").display().to_string()).expand("every:4")).unwrap();
        let slots = || Slots::new(&loaded.model, 1, 256, &DecodeOptions::default(), &tok, &shared).unwrap().with_pacing(8, Duration::ZERO);
        let a: Vec<u32> = (0..20).map(|i| (i * 7919 % 31999 + 1) as u32).collect();
        for len in [3, 5, 20] {
            let cold = serve_all(&mut slots(), &[(a[..len].to_vec(), 3, 0)]).remove(0);
            let mut warm = slots();
            serve_all(&mut warm, &[(a[..1].to_vec(), 2, 0)]);
            let after = serve_all(&mut warm, &[(a[..len].to_vec(), 3, 0)]).remove(0);
            assert_eq!(after.2, 0, "{len} tokens after a one-token prompt: reused");
            assert!(after.0 == cold.0, "{len} tokens after a one-token prompt: the answer changed");
        }
    }

    /// On CUDA (here its emulator) several slots decode by the batched fused step over a pool of
    /// their caches: every answer and its log-probabilities are the same bits as the job's served
    /// alone in one slot (whose decode is the one-cache fused step), f32 and bf16; and without
    /// log-probabilities, greedy, each row's next token taken on the device.
    #[test]
    fn the_batched_fused_step_serves_each_answer_as_alone() {
        let (dir, tok, shared) = fixtures();
        // After the tokenizer (tens of thousands of small blocks the guard need not hold).
        let _guard = crate::kernels::guard_buffers();
        let ids = |n: usize, seed: usize| -> Vec<u32> { (0..n).map(|i| ((i * 7919 + seed * 104729) % 31999 + 1) as u32).collect() };
        let jobs: Vec<(Vec<u32>, usize, usize)> =
            [ids(23, 1), ids(9, 2), ids(17, 3), ids(2, 4), ids(12, 5), ids(30, 6)].into_iter().enumerate().map(|(i, p)| (p, 3 + i % 3, i)).collect();
        let step = crate::step::StepOptions { splits: Some(2), emulate_cuda: Some(expanse_cuda_emulator::Schedule::Forward), ..Default::default() };
        let decode = DecodeOptions { path: DecodePath::Fused, step };
        for (model, dtype) in [("tiny-mistral-f32", "auto"), ("tiny-mistral-bf16", "auto")] {
            let loaded = load(&LoadOptions::new(dir.join(model).display().to_string()).expand("every:4").dtype(dtype)).unwrap();
            let m = &loaded.model;
            let slots = |n: usize| Slots::new(m, n, 64, &decode, &tok, &shared).unwrap().with_pacing(8, Duration::ZERO);
            for logprobs in [Some(3), None] {
                let mut together = slots(3);
                assert!(together.batch_step.is_some(), "{model}: the batched step is on");
                let got = serve_all_with(&mut together, &jobs, logprobs);
                assert!(together.batch_step.is_some(), "{model}: the batched step stayed on");
                for (i, j) in jobs.iter().enumerate() {
                    let alone = serve_all_with(&mut slots(1), &[(j.0.clone(), j.1, 0)], logprobs).remove(0);
                    assert_eq!(alone.1, Some((StopReason::MaxTokens, j.1)), "{model} job {i}");
                    assert!(got[i].0 == alone.0 && got[i].1 == alone.1, "{model} job {i} (logprobs {logprobs:?}): batched, the answer changed");
                }
            }
        }
    }

    /// An unrelated request takes the slot left alone longest, so a conversation's next turn still
    /// finds its cache; a panic in a batched step fails only the row that fails alone too, the slot
    /// is freed, and the others' answers are their lone answers.
    #[test]
    fn slots_are_reused_fairly_and_a_failing_row_fails_alone() {
        let (dir, tok, shared) = fixtures();
        let loaded = load(&LoadOptions::new(dir.join("tiny-mistral-f32").display().to_string()).expand("every:4")).unwrap();
        let slots = |n: usize| Slots::new(&loaded.model, n, 256, &DecodeOptions::default(), &tok, &shared).unwrap().with_pacing(8, Duration::ZERO);
        let a: Vec<u32> = (0..57).map(|i| (i * 7919 % 31999 + 1) as u32).collect();
        let other: Vec<u32> = (0..30).map(|i| (i * 104729 % 31999 + 1) as u32).collect();
        let mut s = slots(4);
        let heard: Vec<Heard> = [&a[..40], &other[..], &other[..20], &a[..]].iter().map(|p| serve_all(&mut s, &[(p.to_vec(), 3, 0)]).remove(0)).collect();
        assert!(heard[3].2 >= 32, "the conversation's next turn found its cache ({} tokens reused)", heard[3].2);

        let jobs: Vec<(Vec<u32>, usize, usize)> = vec![(a[..20].to_vec(), 6, 0), (other.clone(), 6, 0), (a[..33].to_vec(), 6, 1)];
        let lone: Vec<Heard> = jobs.iter().map(|j| serve_all(&mut slots(4), &[(j.0.clone(), j.1, 0)]).remove(0)).collect();
        let mut faulty = slots(4).with_fault(Some(Fault::Panic));
        let got = serve_all(&mut faulty, &jobs);
        assert_eq!((got[0].1, got[0].3), (None, 1), "the first run fails once, with no Done");
        for k in [1, 2] {
            assert_eq!(got[k].3, 0);
            assert!(got[k].0 == lone[k].0 && got[k].1 == lone[k].1, "job {k}: its lone answer beside a failing row");
        }
        assert_eq!(faulty.running(), 0, "every slot is free again");
        assert!(faulty.fault.is_none(), "the fault ended with the run it hit");
        let after = serve_all(&mut faulty, &[(a[..20].to_vec(), 6, 0)]).remove(0);
        assert!(after.0 == lone[0].0, "the server answers afterwards, as before");
    }

    #[test]
    fn prompts_split_at_multiples_of_the_chunk_and_never_end_on_one_token() {
        // (tokens, chunk) → start of the last chunk
        for (n, chunk, want) in [(1, 8, 0), (2, 8, 0), (8, 8, 0), (9, 8, 0), (10, 8, 8), (16, 8, 8), (17, 8, 8), (18, 8, 16), (3, 2, 0), (4, 2, 2), (5, 2, 2)] {
            let start = last_chunk_start(n, chunk);
            assert_eq!(start, want, "n {n}, chunk {chunk}");
            assert!(n - start >= 2 || n == 1, "n {n}, chunk {chunk}: a one-token last chunk");
        }
        // From any start that leaves two tokens: no one-token chunk (unless the prompt is one token),
        // cuts at multiples of the chunk but for the last, a chunk of at most chunk + 2; from 0, the
        // cuts above.
        for chunk in 2..7 {
            for n in 1..40usize {
                let mut from_zero = vec![];
                // Where a prompt may resume: at least two tokens left (`reusable`), or from 0.
                for start in 0..n.saturating_sub(1).max(1) {
                    let mut cuts = vec![start];
                    while let Some(&at) = cuts.last().filter(|&&at| at < n) {
                        let end = chunk_end(at, n, chunk);
                        assert!(end > at && end <= n && (end - at >= 2 || n == 1) && end - at <= chunk + 2, "n {n}, chunk {chunk}, {at} → {end}");
                        assert!(end == n || end.is_multiple_of(chunk), "n {n}, chunk {chunk}: a cut at {end}");
                        cuts.push(end);
                    }
                    if start == 0 {
                        from_zero = cuts;
                    }
                }
                let last = last_chunk_start(n, chunk);
                let want: Vec<usize> = (0..last).step_by(chunk).chain([last, n]).collect();
                assert_eq!(from_zero, want, "n {n}, chunk {chunk}");
            }
        }
    }
}
