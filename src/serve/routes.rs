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
use super::openai::{finish_reason, Endpoint, Envelope, Input, Request, Usage};
use super::worker::{Event, Job, Outcome, Queue, Shared, SubmitError};
use crate::conversation::Prompter;
use crate::error::Error;
use crate::generation::StopReason;
use crate::sampling::SamplingParams;
use crate::template::Message;

/// What every handler reads: the queue to the worker, the prompters, and the server's settings.
pub struct App {
    pub shared: Arc<Shared>,
    pub queue: Queue,
    pub model_id: String,
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

fn model_object(app: &App) -> Value {
    json!({ "id": app.model_id, "object": "model", "created": app.created, "owned_by": "expanse" })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_object(&app)] }))
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id != app.model_id {
        return Err(ApiError::model_not_found(&id, &app.model_id));
    }
    Ok(Json(model_object(&app)))
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
    if let Some(m) = req.model.as_deref().filter(|m| *m != app.model_id) {
        return Err(ApiError::model_not_found(m, &app.model_id));
    }
    if !app.shared.ready.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("model_loading", "the model is still loading (GET /health answers 200 once it is ready)"));
    }
    let (job, rx) = app.job(&req)?;
    app.queue.submit(job).map_err(|e| match e {
        SubmitError::Full => ApiError::unavailable("queue_full", "every place in the queue is taken (--queue); try again shortly"),
        SubmitError::Stopped => stopping(),
    })?;
    let envelope = Envelope { endpoint, id: answer_id(endpoint), created: unix_time(), model: app.model_id.clone() };
    if req.stream {
        let events = sse(envelope, rx, req.include_usage).map(Ok::<_, Infallible>);
        Ok(Sse::new(events).into_response())
    } else {
        Ok(Json(collect(envelope, rx).await?).into_response())
    }
}

fn stopping() -> ApiError {
    ApiError::unavailable("shutting_down", "the server is shutting down")
}

impl App {
    /// The request's prompt ids, answer length and stops, checked against the context.
    fn job(&self, req: &Request) -> Result<(Job, UnboundedReceiver<Event>), ApiError> {
        let (prompter, input_param, rendered) = match &req.input {
            Input::Messages(messages) => {
                let mut messages = messages.clone();
                if let Some(s) = self.system.as_deref().filter(|_| messages[0].role != "system") {
                    messages.insert(0, Message::system(s));
                }
                (&self.chat, "messages", self.chat.encode(&messages))
            }
            Input::Prompt(p) => (&self.raw, "prompt", self.raw.encode(&[Message::user(p.as_str())])),
        };
        let ctx = self.limits.context;
        // A client hears what is wrong with its request, never where the server keeps its files.
        let (_, prompt) = rendered.map_err(|e| match e {
            Error::PromptTooLong { .. } => {
                ApiError::context_length(input_param, format!("the prompt is longer than the server's context of {ctx} tokens can hold"))
            }
            e => ApiError::field(input_param, e.without_paths()),
        })?;
        if prompt.len() > ctx {
            let msg = format!("the prompt is {} tokens; the server's context is {ctx} tokens", prompt.len());
            return Err(ApiError::context_length(input_param, msg));
        }
        let max_tokens = match req.max_tokens {
            Some(n) if n > self.limits.max_tokens_cap => {
                return Err(ApiError::field(
                    "max_tokens",
                    format!("max_tokens {n} is over the server's cap of {} (--max-tokens-cap)", self.limits.max_tokens_cap),
                ));
            }
            Some(n) if prompt.len() + n > ctx => {
                let msg = format!("the prompt ({} tokens) and max_tokens ({n}) exceed the server's context of {ctx} tokens", prompt.len());
                return Err(ApiError::context_length("max_tokens", msg));
            }
            Some(n) => n,
            None => self.limits.max_tokens,
        };
        let (stop_ids, stop_strings) = prompter.with_stops(&req.stop);
        let (tx, rx) = unbounded_channel();
        Ok((Job { prompt, sampling: req.sampling.clone(), max_tokens, stop_ids, stop_strings, events: tx }, rx))
    }
}

/// The whole answer, once the worker is done.
async fn collect(envelope: Envelope, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(piece) => text.push_str(&piece),
            Event::Done(o) if o.stop == StopReason::Interrupted => return Err(stopping()),
            Event::Done(o) => {
                text.push_str(&o.tail);
                return Ok(envelope.response(&text, finish_reason(o.stop), usage(&o)));
            }
            Event::Failed(msg) => return Err(ApiError::internal(msg)),
        }
    }
    Err(stopping())
}

fn usage(o: &Outcome) -> Usage {
    Usage::new(o.prompt_tokens, o.cached_tokens, o.completion_tokens)
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The SSE stream of one answer: a chunk per token (a chat answer opens with the assistant's role),
/// a closing chunk with `finish_reason`, the usage chunk if asked for, then `data: [DONE]`. A failure
/// after the headers went out arrives as an `{"error": …}` event, without `[DONE]`.
fn sse(envelope: Envelope, rx: UnboundedReceiver<Event>, include_usage: bool) -> impl Stream<Item = SseEvent> {
    let opening = (envelope.endpoint == Endpoint::Chat).then(|| data(&envelope.chunk(true, None, None, include_usage)));
    let body = stream::unfold(Some(rx), move |rx| {
        let envelope = envelope.clone();
        async move {
            let mut rx = rx?;
            let events = match rx.recv().await {
                Some(Event::Token(piece)) => return Some((vec![data(&envelope.chunk(false, Some(&piece), None, include_usage))], Some(rx))),
                Some(Event::Done(o)) if o.stop == StopReason::Interrupted => vec![data(&stopping().body())],
                Some(Event::Done(o)) => {
                    let mut v = Vec::new();
                    if !o.tail.is_empty() {
                        v.push(data(&envelope.chunk(false, Some(&o.tail), None, include_usage)));
                    }
                    v.push(data(&envelope.chunk(false, None, Some(finish_reason(o.stop)), include_usage)));
                    if include_usage {
                        v.push(data(&envelope.usage_chunk(usage(&o))));
                    }
                    v.push(SseEvent::default().data("[DONE]"));
                    v
                }
                Some(Event::Failed(msg)) => vec![data(&ApiError::internal(msg).body())],
                None => vec![data(&stopping().body())],
            };
            Some((events, None))
        }
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
            model_id: "tiny".into(),
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
                assert_eq!(job.prompt, want, "--system is added to a conversation without one");
                assert_eq!(job.max_tokens, 16, "the server's default answer length");
                job.events.send(Event::Token("a".into())).unwrap();
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
