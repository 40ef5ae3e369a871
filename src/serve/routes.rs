//! The HTTP side: the axum router, its handlers, and the middleware around them (request counting,
//! auth, body limit, CORS). Handlers check and tokenize a request, queue a `Job`, and turn the job's
//! events into a JSON answer or an SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::auth::ApiKey;
use super::error::ApiError;
use super::openai::{finish_reason, Choice, Delta, Endpoint, Envelope, Input, Prompt, Request, Scores, Usage};
use super::tools::{self, Tools};
use super::worker::{Event, Job, Outcome, Queue, Run, Shared, SubmitError};
use crate::constraint::{Constraint, Grammar};
use crate::conversation::Prompter;
use crate::error::Error;
use crate::generation::{StopReason, TokenLogprobs};
use crate::sampling::SamplingParams;
use crate::template::Message;

/// What every handler reads: the queue to the worker, the prompters, and the server's settings.
pub struct App {
    pub shared: Arc<Shared>,
    pub queue: Queue,
    /// The names a request may give as `model`: the aliases, then the checkpoint's (answers carry
    /// the name the request gave, else the first).
    pub names: Vec<String>,
    pub created: u64,
    /// The chat template's prompter (chat completions) and the raw one (completions).
    pub chat: Arc<Prompter>,
    pub raw: Arc<Prompter>,
    pub limits: Limits,
    /// Sampling for the fields a request leaves out: generation_config.json under the flags.
    pub defaults: SamplingParams,
    /// `--system`, for conversations that bring none.
    pub system: Option<String>,
    pub api_key: Option<ApiKey>,
}

/// What bounds a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// KV cache length: prompt and answer together.
    pub context: usize,
    /// Answer length when a request names none (`--max-tokens`, else the cap).
    pub max_tokens: usize,
    /// Most tokens a request may ask for (`--max-tokens-cap`).
    pub max_tokens_cap: usize,
    /// Largest request body (`--body-limit`).
    pub body: usize,
}

pub fn router(app: Arc<App>, cors: Option<tower_http::cors::CorsLayer>) -> Router {
    let r = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|method: Method, uri: Uri| async move { ApiError::route_not_found(method.as_str(), uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { ApiError::method_not_allowed(method.as_str(), uri.path()) })
        .layer(DefaultBodyLimit::max(app.limits.body))
        // A bug in a handler answers 500 instead of dropping the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::internal("the request handler panicked").into_response()))
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app);
    match cors {
        Some(c) => r.layer(c),
        None => r,
    }
}

/// Counts every answer by status for `/metrics`.
async fn count(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    let resp = next.run(req).await;
    app.shared.metrics.count_request(resp.status().as_u16());
    resp
}

/// With `--api-key`, everything but `/health` needs the key.
async fn auth(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    match &app.api_key {
        Some(key) if req.uri().path() != "/health" && !key.allows(req.headers()) => ApiError::unauthorized().into_response(),
        _ => next.run(req).await,
    }
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shared.ready.load(Ordering::SeqCst) {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        ApiError::unavailable("model_loading", "the model is loading").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], app.shared.metrics.render()).into_response()
}

/// `--alias` names first (in order, each once), then the checkpoint's own name.
pub fn served_names(aliases: &[String], checkpoint: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in aliases.iter().map(String::as_str).chain([checkpoint]) {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    names
}

fn model_object(app: &App, name: &str) -> Value {
    json!({ "id": name, "object": "model", "created": app.created, "owned_by": "expanse" })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.names.iter().map(|n| model_object(&app, n)).collect();
    Json(json!({ "object": "list", "data": data }))
}

impl App {
    /// The served name `requested` is, or a 404 listing them.
    fn served(&self, requested: &str) -> Result<&str, ApiError> {
        self.names.iter().find(|n| *n == requested).map(String::as_str).ok_or_else(|| ApiError::model_not_found(requested, &self.names.join("`, `")))
    }
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let name = app.served(&id)?;
    Ok(Json(model_object(&app, name)))
}

/// The body of a non-generating endpoint as JSON, or a 400.
fn json_body(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Value, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(limit),
        _ => ApiError::bad_request(format!("could not read the body: {}", r.body_text())),
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// llama-server's `POST /tokenize`: `{"content", "add_special" (false), "with_pieces" (false)}` →
/// `{"tokens": [id, ...]}`, or `[{"id", "piece"}, ...]` with pieces. Special tokens written in the
/// text are parsed as such, as llama-server does.
async fn tokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let v = json_body(body, app.limits.body)?;
    let content = v.get("content").and_then(Value::as_str).ok_or_else(|| ApiError::field("content", "`content` must be a string"))?;
    let flag = |k: &str| match v.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::field(k, format!("`{k}` must be true or false"))),
    };
    let (add_special, with_pieces) = (flag("add_special")?, flag("with_pieces")?);
    let tok = &app.raw.tokenizer;
    let ids = tok.encode(content, add_special).map_err(|e| ApiError::field("content", e.to_string()))?;
    if !with_pieces {
        return Ok(Json(json!({ "tokens": ids })));
    }
    let pieces = ids
        .iter()
        .map(|&id| Ok(json!({ "id": id, "piece": tok.decode(&[id], false).map_err(|e| ApiError::internal(e.to_string()))? })))
        .collect::<Result<Vec<Value>, ApiError>>()?;
    Ok(Json(json!({ "tokens": pieces })))
}

/// llama-server's `POST /detokenize`: `{"tokens": [id, ...]}` → `{"content"}`; an id outside the
/// vocabulary is a 400 naming `tokens`.
async fn detokenize(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let v = json_body(body, app.limits.body)?;
    let bad = || ApiError::field("tokens", "`tokens` must be a list of token ids");
    let list = v.get("tokens").and_then(Value::as_array).ok_or_else(bad)?;
    let tok = &app.raw.tokenizer;
    let vocab = tok.inner().get_vocab_size(true) as u64;
    let ids = list
        .iter()
        .map(|x| match x.as_u64() {
            Some(id) if id < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::field("tokens", format!("token id {id} is outside the vocabulary (0 to {})", vocab - 1))),
            None => Err(bad()),
        })
        .collect::<Result<Vec<u32>, ApiError>>()?;
    let content = tok.decode(&ids, false).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({ "content": content })))
}

async fn chat_completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(&app, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    answer(&app, Endpoint::Completion, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Checks, tokenizes and queues a request, then answers it whole or as a stream.
async fn answer(app: &App, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(app.limits.body),
        _ => ApiError::bad_request(format!("could not read the body: {}", r.body_text())),
    })?;
    let req = Request::parse(endpoint, &body, &app.defaults)?;
    let name = match req.model.as_deref() {
        Some(m) => app.served(m)?.to_string(),
        None => app.names[0].clone(),
    };
    if !app.shared.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("model_loading", "the model is still loading (GET /health answers 200 once it is ready)"));
    }
    // A bias on a token the tokenizer does not have is a mistake in the request, not a no-op.
    let vocab = app.raw.tokenizer.inner().get_vocab_size(true);
    if let Some((id, _)) = req.sampling.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
        return Err(ApiError::field("logit_bias", format!("logit_bias: token id {id} is outside the vocabulary (0 to {})", vocab - 1)));
    }
    let grammar = grammar(&req);
    let (mut job, rx, echoes) = app.job(&req, grammar.is_some())?;
    // Compiled once the cheap checks passed (prompt, context, limits), each run starting a copy.
    let prompter = if endpoint == Endpoint::Chat { app.chat.clone() } else { app.raw.clone() };
    if let Some(c) = compile(prompter, grammar).await? {
        job.runs.iter_mut().for_each(|r| r.constraint = Some(c.clone()));
    }
    let choices = job.runs.len();
    app.queue.submit(job).map_err(|e| match e {
        SubmitError::Full => ApiError::unavailable("queue_full", "every place in the queue is taken (--queue); try again shortly"),
        SubmitError::Stopped => stopping(),
    })?;
    let envelope = Envelope { endpoint, id: answer_id(endpoint), created: unix_time(), model: name };
    let out = Answer {
        envelope,
        prompter: app.raw.clone(),
        choices,
        n: req.n,
        echoes,
        logprobs: req.logprobs.is_some(),
        include_usage: req.include_usage,
        tools: req.tools.clone(),
    };
    if req.stream {
        Ok(Sse::new(sse(out, rx).map(Ok::<_, Infallible>)).into_response())
    } else {
        Ok(Json(collect(out, rx).await?).into_response())
    }
}

fn stopping() -> ApiError {
    ApiError::unavailable("shutting_down", "the server is shutting down")
}

impl App {
    /// A token-id prompt's ids, each within the tokenizer's vocabulary.
    fn check_ids(&self, ids: &[u32]) -> Result<Vec<u32>, ApiError> {
        let vocab = self.raw.tokenizer.inner().get_vocab_size(true);
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => Err(ApiError::field("prompt", format!("prompt: token id {id} is outside the vocabulary (0 to {})", vocab - 1))),
            None => Ok(ids.to_vec()),
        }
    }

    /// A conversation's prompt, with the request's tools: handed to a template that renders them, else
    /// written in by the convention (`serve::tools`) — into the system message, or, for a template
    /// that refuses one, before the first user message.
    fn conversation(&self, req: &Request, messages: &[Message]) -> crate::error::Result<Rendered> {
        let native = self.chat.template.renders_tools();
        let definitions = req.tools.as_ref().filter(|_| native).map(|t| &t.definitions);
        let encode = |into_system| self.chat.encode_with_tools(&Tools::messages(req.tools.as_ref(), messages, native, into_system), req.ending, definitions);
        match encode(true) {
            Err(Error::Template { .. }) if req.tools.is_some() && !native && !messages.iter().any(|m| m.role == "system") => encode(false),
            r => r,
        }
    }

    /// The request's prompts: (the text `echo` writes, the ids), each checked against the context.
    fn prompts(&self, req: &Request) -> Result<(&Prompter, Vec<Rendered>), ApiError> {
        let ctx = self.limits.context;
        let (prompter, param, rendered) = match &req.input {
            Input::Messages(messages) => {
                let mut messages = messages.clone();
                if let Some(s) = self.system.as_deref().filter(|_| messages[0].role != "system") {
                    messages.insert(0, Message::system(s));
                }
                (&*self.chat, "messages", vec![self.conversation(req, &messages)])
            }
            Input::Prompts(prompts) => {
                let each = |p: &Prompt| match p {
                    Prompt::Text(t) => self.raw.encode(&[Message::user(t.as_str())]).map(|(_, ids)| (t.clone(), ids)),
                    Prompt::Ids(ids) => Ok((self.raw.tokenizer.decode(ids, true)?, ids.clone())),
                };
                for p in prompts {
                    if let Prompt::Ids(ids) = p {
                        self.check_ids(ids)?;
                    }
                }
                (&*self.raw, "prompt", prompts.iter().map(each).collect())
            }
        };
        // A client hears what is wrong with its request, never where the server keeps its files.
        let checked = |r: crate::error::Result<Rendered>| {
            let (text, ids) = r.map_err(|e| match e {
                Error::PromptTooLong { .. } => {
                    ApiError::context_length(param, format!("the prompt is longer than the server's context of {ctx} tokens can hold"))
                }
                e => ApiError::field(param, e.without_paths()),
            })?;
            if ids.len() > ctx {
                return Err(ApiError::context_length(param, format!("the prompt is {} tokens; the server's context is {ctx} tokens", ids.len())));
            }
            Ok((text, ids))
        };
        Ok((prompter, rendered.into_iter().map(checked).collect::<Result<_, _>>()?))
    }

    /// The answer length: the request's (within the cap, and leaving the longest prompt room), else the server's.
    fn max_tokens(&self, req: &Request, longest: usize) -> Result<usize, ApiError> {
        let (ctx, cap) = (self.limits.context, self.limits.max_tokens_cap);
        match req.max_tokens {
            Some(n) if n > cap => Err(ApiError::field("max_tokens", format!("max_tokens {n} is over the server's cap of {cap} (--max-tokens-cap)"))),
            Some(n) if longest + n > ctx => {
                let msg = format!("the prompt ({longest} tokens) and max_tokens ({n}) exceed the server's context of {ctx} tokens");
                Err(ApiError::context_length("max_tokens", msg))
            }
            Some(n) => Ok(n),
            None => Ok(self.limits.max_tokens),
        }
    }

    /// The job of a request: `n` runs per prompt, in order (choice `i` of a prompt samples with seed
    /// `seed + i`), and each prompt's text for `echo` (empty without it). A `constrained` job's runs get
    /// their grammar from `answer`, and no stop strings.
    fn job(&self, req: &Request, constrained: bool) -> Result<(Job, UnboundedReceiver<Event>, Vec<String>), ApiError> {
        let (prompter, prompts) = self.prompts(req)?;
        let max_tokens = self.max_tokens(req, prompts.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0))?;
        let runs = prompts
            .iter()
            .flat_map(|(_, ids)| {
                (0..req.n).map(|i| Run {
                    prompt: ids.clone(),
                    sampling: SamplingParams { seed: req.sampling.seed.wrapping_add(i as u64), ..req.sampling.clone() },
                    constraint: None,
                })
            })
            .collect();
        let echoes = if req.echo { prompts.into_iter().map(|(text, _)| text).collect() } else { Vec::new() };
        let (stop_ids, mut stop_strings) = prompter.with_stops(&req.stop);
        if constrained {
            // The grammar ends a constrained answer; a stop string would cut it short of parsing.
            stop_strings.clear();
        }
        let (tx, rx) = unbounded_channel();
        let prompt_logprobs = req.echo && req.logprobs.is_some();
        Ok((Job { runs, max_tokens, stop_ids, stop_strings, logprobs: req.logprobs, prompt_logprobs, events: tx }, rx, echoes))
    }
}

/// The grammar a request's answers follow, and the field it came from: a required tool call's, else
/// `response_format`'s.
fn grammar(req: &Request) -> Option<(Grammar, &'static str)> {
    match req.tools.as_ref().and_then(Tools::grammar) {
        Some(g) => Some((g, "tools")),
        None => req.format.clone().map(|g| (g, "response_format")),
    }
}

/// `grammar` compiled against `prompter`'s vocabulary (built on first use), on a blocking thread: a
/// large schema takes seconds, which must not hold up the server's other connections. A grammar
/// llguidance cannot take, or a tokenizer it cannot read, is a 400 naming the field.
async fn compile(prompter: Arc<Prompter>, grammar: Option<(Grammar, &'static str)>) -> Result<Option<Constraint>, ApiError> {
    let Some((grammar, param)) = grammar else { return Ok(None) };
    let compiled = tokio::task::spawn_blocking(move || {
        let vocabulary = prompter.vocabulary().map_err(|e| format!("`{param}` cannot be used with this model: {e}"))?;
        Constraint::new(vocabulary, &grammar).map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| ApiError::internal("compiling the grammar panicked"))?;
    compiled.map(Some).map_err(|e| ApiError::field(param, e))
}

/// A prompt as rendered: (the text `echo` writes, its ids).
type Rendered = (String, Vec<u32>);

/// What an answer's objects are built from, beside the worker's events.
struct Answer {
    envelope: Envelope,
    /// Its tokenizer names the tokens of log-probabilities.
    prompter: Arc<Prompter>,
    /// Choices in all, and per prompt (usage counts each prompt once, as OpenAI and vLLM do).
    choices: usize,
    n: usize,
    /// Completions' `echo`: each prompt's text, before its choices' answers (empty: no echo).
    echoes: Vec<String>,
    logprobs: bool,
    include_usage: bool,
    /// Chat: the functions an answer may call (an answer that is a call becomes `tool_calls`).
    tools: Option<Tools>,
}

impl Answer {
    /// Choice `text`'s function calls, in OpenAI's shape, if it is nothing but calls.
    fn calls(&self, text: &str, streamed: bool) -> Option<Value> {
        self.tools.as_ref()?.calls(text).map(|c| tools::wire_calls(&c, streamed))
    }

    /// The text choice `i` starts with: its prompt's when echoed.
    fn echo(&self, choice: usize) -> &str {
        self.echoes.get(choice / self.n).map_or("", String::as_str)
    }

    /// Adds the prompt's tokens (the first with no log-probability) to `scores`.
    fn push_prompt(&self, scores: &mut Scores, first: u32, logprobs: &[TokenLogprobs]) {
        let tok = &self.prompter.tokenizer;
        scores.push(tok, first, None);
        for lp in logprobs {
            scores.push(tok, lp.id, Some(lp));
        }
    }

    fn scored(&self, scores: &mut Scores) -> Value {
        if self.logprobs {
            scores.take()
        } else {
            Value::Null
        }
    }
}

/// Token counts summed over an answer's choices; a prompt's tokens count once however many choices it has.
#[derive(Default)]
struct Tally {
    prompt: usize,
    cached: usize,
    completion: usize,
}

impl Tally {
    fn add(&mut self, first_of_prompt: bool, o: &Outcome) {
        if first_of_prompt {
            self.prompt += o.prompt_tokens;
            self.cached += o.cached_tokens;
        }
        self.completion += o.completion_tokens;
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt, self.cached, self.completion)
    }
}

/// The whole answer, once the worker has run every choice.
async fn collect(a: Answer, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let endpoint = a.envelope.endpoint;
    let mut texts: Vec<String> = (0..a.choices).map(|i| a.echo(i).to_string()).collect();
    let mut scores: Vec<Scores> = (0..a.choices).map(|_| Scores::new(endpoint)).collect();
    let mut finishes = vec![""; a.choices];
    let mut calls = vec![None; a.choices];
    let mut tally = Tally::default();
    let tok = &a.prompter.tokenizer;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Prompt { choice, first, logprobs } => a.push_prompt(&mut scores[choice], first, &logprobs),
            Event::Token { choice, text, logprobs } => {
                texts[choice].push_str(&text);
                if let Some(lp) = logprobs {
                    scores[choice].push(tok, lp.id, Some(&lp));
                }
            }
            Event::Done { outcome, .. } if outcome.stop == StopReason::Interrupted => return Err(stopping()),
            Event::Done { choice, outcome } => {
                texts[choice].push_str(&outcome.tail);
                calls[choice] = a.calls(&texts[choice], false);
                finishes[choice] = if calls[choice].is_some() { "tool_calls" } else { finish_reason(outcome.stop) };
                tally.add(choice.is_multiple_of(a.n), &outcome);
                if choice + 1 == a.choices {
                    let choices = texts
                        .into_iter()
                        .zip(scores.iter_mut())
                        .enumerate()
                        .map(|(index, (text, s))| Choice { index, text, finish: finishes[index], logprobs: a.scored(s), tool_calls: calls[index].take() })
                        .collect();
                    return Ok(a.envelope.response(choices, tally.usage()));
                }
            }
            Event::Failed(msg) => return Err(ApiError::internal(msg)),
            Event::Refused(msg) => return Err(ApiError::bad_request(msg)),
        }
    }
    Err(stopping())
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// An answer being streamed: the choices opened so far, their log-probabilities and the tally.
struct Streaming {
    a: Answer,
    /// Choices whose opening chunk went out (a chat answer's role; an echoed prompt).
    opened: usize,
    scores: Vec<Scores>,
    tally: Tally,
    /// With tools: a choice's text held back while it may still be a function call (None once it
    /// cannot be, and its text streams).
    held: Vec<Option<String>>,
}

impl Streaming {
    fn chunk(&self, choice: usize, delta: Delta, finish: Option<&str>) -> SseEvent {
        data(&self.a.envelope.chunk(choice, delta, finish, self.a.include_usage))
    }

    /// The opening chunks of every choice up to `choice` not yet opened; `prompt` is the prompt's
    /// log-probabilities when `choice` opens with them.
    fn open(&mut self, choice: usize, prompt: Option<(u32, Vec<TokenLogprobs>)>) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while self.opened <= choice {
            let i = self.opened;
            self.opened += 1;
            let logprobs = match &prompt {
                Some((first, lps)) if i == choice => {
                    self.a.push_prompt(&mut self.scores[i], *first, lps);
                    self.a.scored(&mut self.scores[i])
                }
                _ => Value::Null,
            };
            match self.a.envelope.endpoint {
                Endpoint::Chat => out.push(self.chunk(i, Delta { role: true, ..Delta::default() }, None)),
                Endpoint::Completion if !self.a.echoes.is_empty() => {
                    out.push(self.chunk(i, Delta { text: Some(self.a.echo(i)), logprobs, ..Delta::default() }, None))
                }
                Endpoint::Completion => {}
            }
        }
        out
    }

    /// The chunks one event makes, and whether the stream ends with them.
    fn on(&mut self, event: Option<Event>) -> (Vec<SseEvent>, bool) {
        let out = match event {
            Some(Event::Prompt { choice, first, logprobs }) => self.open(choice, Some((first, logprobs))),
            Some(Event::Token { choice, text, logprobs }) => {
                let mut out = self.open(choice, None);
                if let Some(lp) = logprobs {
                    self.scores[choice].push(&self.a.prompter.tokenizer, lp.id, Some(&lp));
                }
                let text = match (&mut self.held[choice], &self.a.tools) {
                    (Some(held), Some(tools)) => {
                        held.push_str(&text);
                        if tools.may_be_call(held) {
                            return (out, false);
                        }
                        self.held[choice].take().unwrap_or_default()
                    }
                    _ => text,
                };
                let lp = self.a.scored(&mut self.scores[choice]);
                out.push(self.chunk(choice, Delta { text: Some(&text), logprobs: lp, ..Delta::default() }, None));
                out
            }
            Some(Event::Done { outcome, .. }) if outcome.stop == StopReason::Interrupted => return (vec![data(&stopping().body())], true),
            Some(Event::Done { choice, outcome }) => return self.done(choice, &outcome),
            Some(Event::Failed(msg)) => return (vec![data(&ApiError::internal(msg).body())], true),
            Some(Event::Refused(msg)) => return (vec![data(&ApiError::bad_request(msg).body())], true),
            None => return (vec![data(&stopping().body())], true),
        };
        (out, false)
    }

    /// A choice's held-back text and finish chunk; after the last choice, the usage chunk and `[DONE]`.
    fn done(&mut self, choice: usize, outcome: &Outcome) -> (Vec<SseEvent>, bool) {
        let mut out = self.open(choice, None);
        let tail = match self.held[choice].take() {
            Some(held) => held + &outcome.tail,
            None => outcome.tail.clone(),
        };
        let calls = self.a.calls(&tail, true);
        let finish = if calls.is_some() { "tool_calls" } else { finish_reason(outcome.stop) };
        // Held-back tokens' log-probabilities go out with their text (without tools, each token's went
        // with its own chunk).
        let lp = if self.a.tools.is_some() { self.a.scored(&mut self.scores[choice]) } else { Value::Null };
        match calls {
            Some(calls) => out.push(self.chunk(choice, Delta { tool_calls: Some(calls), logprobs: lp, ..Delta::default() }, None)),
            None if !tail.is_empty() => out.push(self.chunk(choice, Delta { text: Some(&tail), logprobs: lp, ..Delta::default() }, None)),
            None => {}
        }
        out.push(self.chunk(choice, Delta::default(), Some(finish)));
        self.tally.add(choice.is_multiple_of(self.a.n), outcome);
        if choice + 1 < self.a.choices {
            return (out, false);
        }
        if self.a.include_usage {
            out.push(data(&self.a.envelope.usage_chunk(self.tally.usage())));
        }
        out.push(SseEvent::default().data("[DONE]"));
        (out, true)
    }
}

/// The SSE stream of one answer: per choice, in order, its opening (a chat answer's role, an echoed
/// prompt), a chunk per token, a closing chunk with `finish_reason`; then the usage chunk if asked
/// for, then `data: [DONE]`. A failure after the headers went out arrives as an `{"error": …}` event,
/// without `[DONE]`.
fn sse(a: Answer, rx: UnboundedReceiver<Event>) -> impl Stream<Item = SseEvent> {
    let scores = (0..a.choices).map(|_| Scores::new(a.envelope.endpoint)).collect();
    let held = (0..a.choices).map(|_| a.tools.as_ref().map(|_| String::new())).collect();
    let mut state = Streaming { a, opened: 0, scores, tally: Tally::default(), held };
    // A chat answer opens at once, before the worker takes the job.
    let opening = if state.a.envelope.endpoint == Endpoint::Chat { state.open(0, None) } else { Vec::new() };
    let body = stream::unfold(Some((state, rx)), |st| async move {
        let (mut state, mut rx) = st?;
        let (events, end) = state.on(rx.recv().await);
        Some((events, (!end).then_some((state, rx))))
    });
    stream::iter(opening).chain(body.flat_map(stream::iter))
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `chatcmpl-…` / `cmpl-…`: unique within the process and across restarts.
fn answer_id(endpoint: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{prefix}-{nanos:x}{:04x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::metrics::Metrics;
    use std::sync::atomic::AtomicBool;

    /// An app over the tiny fixture's tokenizer, with the receiving end of its queue.
    fn app() -> (Arc<App>, std::sync::mpsc::Receiver<Job>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-mistral-f32");
        let source = crate::engine::Source::open(&dir.display().to_string(), None).unwrap();
        let prompter = |t| Arc::new(Prompter::for_source(&source, t, &[]).unwrap());
        let shared = Arc::new(Shared { metrics: Metrics::new(), ready: AtomicBool::new(false), stopping: AtomicBool::new(false) });
        let (queue, jobs) = Queue::new(4, shared.clone());
        let limits = Limits { context: 256, max_tokens: 16, max_tokens_cap: 64, body: 1 << 20 };
        let app = App {
            shared,
            queue,
            names: served_names(&["fast".into(), "tiny".into()], "tiny"),
            created: 0,
            chat: prompter(None),
            raw: prompter(Some("none")),
            limits,
            defaults: SamplingParams::default(),
            system: Some("Be brief.".into()),
            api_key: None,
        };
        (Arc::new(app), jobs)
    }

    async fn body(r: Response) -> Value {
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn chat(text: &str) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(json!({ "messages": [{ "role": "user", "content": text }] }).to_string()))
    }

    fn json_req(v: Value) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from(v.to_string()))
    }

    #[tokio::test]
    async fn aliases_are_served_listed_and_echoed() {
        assert_eq!(served_names(&["a".into(), "b".into(), "a".into(), "ckpt".into()], "ckpt"), ["a", "b", "ckpt"], "each name once, aliases first");
        let (app, jobs) = app();
        let listed: Vec<String> =
            models(State(app.clone())).await.0["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
        assert_eq!(listed, ["fast", "tiny"]);
        assert_eq!(model(State(app.clone()), Path("fast".into())).await.unwrap().0["id"], "fast");
        let e = model(State(app.clone()), Path("gpt-4".into())).await.unwrap_err();
        assert!(e.status == StatusCode::NOT_FOUND && e.message.contains("`fast`, `tiny`"), "{e:?}");
        app.shared.ready.store(true, Ordering::SeqCst);
        // A request naming an alias is queued (its answer would carry that name); an unknown name is not.
        let app2 = app.clone();
        let handle = tokio::spawn(async move {
            let req = json_req(json!({ "model": "fast", "messages": [{ "role": "user", "content": "Hi" }] }));
            answer(&app2, Endpoint::Chat, req).await.map(|_| ())
        });
        let job = tokio::task::spawn_blocking(move || jobs.recv_timeout(std::time::Duration::from_secs(5)).map(|_| ())).await.unwrap();
        assert!(job.is_ok(), "the alias's request reached the queue");
        handle.abort();
        let e = answer(&app, Endpoint::Chat, json_req(json!({ "model": "nope", "messages": [{ "role": "user", "content": "Hi" }] }))).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::NOT_FOUND, Some("model_not_found")));
    }

    /// `/tokenize` gives the tokenizer's ids (and pieces), `/detokenize` their text back; both refuse
    /// what is not theirs, naming the field.
    #[tokio::test]
    async fn tokenize_and_detokenize_as_llama_server() {
        let (app, _jobs) = app();
        let tok = |v: Value| tokenize(State(app.clone()), json_req(v));
        let ids = tok(json!({ "content": "Hello world" })).await.unwrap().0;
        let want = app.raw.tokenizer.encode("Hello world", false).unwrap();
        assert_eq!(ids["tokens"], json!(want), "no BOS unless add_special");
        let with = tok(json!({ "content": "Hello world", "add_special": true, "with_pieces": true })).await.unwrap().0;
        let pieces = with["tokens"].as_array().unwrap();
        assert_eq!(pieces[0]["id"], 1, "add_special adds the tokenizer's BOS");
        assert_eq!(pieces.len(), want.len() + 1);
        assert_eq!(pieces[1]["id"], want[0]);
        assert!(pieces[1]["piece"].as_str().is_some_and(|p| p.contains("Hello")), "{with}");
        let back = detokenize(State(app.clone()), json_req(json!({ "tokens": want }))).await.unwrap().0;
        assert_eq!(back["content"], "Hello world");
        for (body, field) in [(json!({ "content": 5 }), "content"), (json!({ "content": "x", "add_special": "yes" }), "add_special")] {
            let e = tok(body).await.unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some(field)));
        }
        for body in [json!({ "tokens": [1, 99999999] }), json!({ "tokens": [-1] }), json!({ "tokens": "1,2" })] {
            let e = detokenize(State(app.clone()), json_req(body)).await.unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (StatusCode::BAD_REQUEST, Some("tokens")), "{e:?}");
        }
    }

    #[tokio::test]
    async fn health_and_answers_wait_for_the_model() {
        let (app, _jobs) = app();
        let r = health(State(app.clone())).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await["error"]["code"], "model_loading");
        let e = answer(&app, Endpoint::Chat, chat("Hi")).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::SERVICE_UNAVAILABLE, Some("model_loading")));
        app.shared.ready.store(true, Ordering::SeqCst);
        assert_eq!(health(State(app)).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn jobs_carry_the_rendered_prompt_and_a_worker_failure_is_a_500() {
        let (app, jobs) = app();
        app.shared.ready.store(true, Ordering::SeqCst);
        // A stand-in worker: checks each job, then fails it as an internal error would.
        let want = app.chat.encode(&[Message::system("Be brief."), Message::user("Hi")]).unwrap().1;
        let worker = std::thread::spawn(move || {
            for _ in 0..2 {
                let job = jobs.recv().unwrap();
                assert_eq!(job.runs[0].prompt, want, "--system is added to a conversation without one");
                assert_eq!(job.max_tokens, 16, "the server's default answer length");
                job.events.send(Event::Token { choice: 0, text: "a".into(), logprobs: None }).unwrap();
                job.events.send(Event::Failed("device lost".into())).unwrap();
            }
        });
        let e = answer(&app, Endpoint::Chat, chat("Hi")).await.unwrap_err();
        assert_eq!((e.status, e.code, e.message.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("internal_error"), "device lost"));
        // Streamed, the failure comes after the headers: an error event, and no [DONE].
        let streamed = Bytes::from(json!({ "messages": [{ "role": "user", "content": "Hi" }], "stream": true }).to_string());
        let r = answer(&app, Endpoint::Chat, Ok(streamed)).await.unwrap();
        let text = String::from_utf8(axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 3, "{text}");
        assert!(events[2].starts_with("data: {\"error\"") && events[2].contains("device lost"), "{text}");
        assert!(!text.contains("[DONE]"));
        worker.join().unwrap();
    }
}
