//! `expanse serve`: an OpenAI-compatible HTTP server in front of one engine. This module wires the
//! pieces together — the listener, the model worker thread, the router — and stops them on
//! SIGINT/SIGTERM: no new connections, in-flight generations end at their next token, exit 0.

mod auth;
mod error;
mod metrics;
mod openai;
mod routes;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::chat::{ChatOptions, Prompter};
use crate::engine::{LoadOptions, Loaded, Source};
use crate::error::{Error, Result};

pub use routes::Limits;

/// `expanse serve`'s settings beyond the model flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Requests that may wait while one runs (`--queue`); more get 503.
    pub queue: usize,
    pub api_key: Option<String>,
    /// `--cors ORIGIN` (`*` for any); None: no CORS headers at all.
    pub cors: Option<String>,
    pub body_limit: usize,
    pub max_tokens_cap: usize,
    /// Prompts run in chunks starting at multiples of this; a later prompt reuses whole chunks.
    pub prefill_chunk: usize,
    /// Template, stops, system message, default answer length, context and sampling, as `chat` takes them.
    pub chat: ChatOptions,
}

/// One line on the server's log (stderr). A log nobody reads any more (a closed pipe) must not
/// stop the server, so a failed write is dropped, where `eprintln!` would panic.
pub(crate) fn log(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "expanse serve: {line}");
}

fn cors_layer(origin: &str) -> Result<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origin == "*" {
        AllowOrigin::any()
    } else {
        let value = HeaderValue::from_str(origin).map_err(|_| Error::flag("--cors", format!("{origin:?} is not a valid origin")))?;
        AllowOrigin::exact(value)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]))
}

/// The settings checked before anything binds or loads.
fn check(source: &Source, opts: &ServeOptions) -> Result<Limits> {
    if opts.max_tokens_cap == 0 {
        return Err(Error::flag("--max-tokens-cap", "must be at least 1"));
    }
    if let Some(n) = opts.chat.max_tokens.filter(|&n| n > opts.max_tokens_cap) {
        return Err(Error::flag("--max-tokens", format!("{n} is over --max-tokens-cap {}", opts.max_tokens_cap)));
    }
    if opts.api_key.as_deref().is_some_and(str::is_empty) {
        return Err(Error::flag("--api-key", "is empty (unset EXPANSE_API_KEY or give a key)"));
    }
    if opts.prefill_chunk < 2 {
        return Err(Error::flag("--prefill-chunk", "must be at least 2"));
    }
    if opts.body_limit == 0 {
        return Err(Error::flag("--body-limit", "must be at least 1 byte"));
    }
    Ok(Limits {
        context: opts.chat.ctx.unwrap_or(source.config.max_position_embeddings),
        max_tokens: opts.chat.max_tokens.unwrap_or(opts.max_tokens_cap),
        max_tokens_cap: opts.max_tokens_cap,
        body: opts.body_limit,
    })
}

/// Serves `source` until SIGINT/SIGTERM. The port opens before the weights load (`/health` answers
/// 503 meanwhile); a load that fails stops the server with its error.
pub fn run(source: Source, load: LoadOptions, opts: ServeOptions) -> Result<()> {
    let limits = check(&source, &opts)?;
    let cors = opts.cors.as_deref().map(cors_layer).transpose()?;
    let choice = crate::device::select(&load.device)?;
    if let Some(n) = &choice.notice {
        eprintln!("{n}");
    }
    let device = choice.device;
    let chat = Arc::new(Prompter::for_source(&source, opts.chat.template.as_deref(), &opts.chat.stops)?);
    let raw = Arc::new(Prompter::for_source(&source, Some("none"), &opts.chat.stops)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // The HTTP side mostly waits; the cores belong to the model.
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("<tokio runtime>", e))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)))
        .map_err(|e| Error::flag("--host/--port", format!("cannot listen on {}:{}: {e}", opts.host, opts.port)))?;
    let addr = listener.local_addr().map_err(|e| Error::io("<listener>", e))?;
    let shared = Arc::new(worker::Shared { metrics: metrics::Metrics::new(), ready: AtomicBool::new(false), stopping: AtomicBool::new(false) });
    let (queue, jobs) = worker::Queue::new(opts.queue, shared.clone());
    let app = Arc::new(routes::App {
        shared: shared.clone(),
        queue,
        model_id: source.files.name.clone(),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        chat: chat.clone(),
        raw,
        limits,
        defaults: opts.chat.sampling.clone(),
        system: opts.chat.system.clone(),
        api_key: opts.api_key.clone().map(auth::ApiKey::new),
    });
    let (worker_done, worker_exit) = tokio::sync::oneshot::channel::<()>();
    let worker_opts = worker::WorkerOptions {
        ctx: opts.chat.ctx,
        decode_delay: opts.chat.decode_delay,
        prefill_chunk: opts.prefill_chunk,
        decode: opts.chat.decode.clone(),
    };
    let worker_shared = shared.clone();
    let worker = std::thread::Builder::new()
        .name("expanse-model".into())
        .spawn(move || {
            let load = || -> Result<Loaded> { crate::engine::load_from(source, &load, &device) };
            // On a pool thread, so the kernels' parallel loops fork in place (crate::threads).
            let result = crate::threads::run_on_pool(|| worker::run(load, &chat.tokenizer, jobs, &worker_shared, worker_opts));
            drop(worker_done);
            result
        })
        .map_err(|e| Error::io("<model worker thread>", e))?;
    log(format_args!("listening on http://{addr} (loading the model; GET /health answers 200 once it is ready)"));
    let served = runtime.block_on(serve(listener, routes::router(app, cors), shared.clone(), worker_exit));
    shared.stopping.store(true, Ordering::SeqCst);
    let worked = worker.join().map_err(|_| Error::internal("the model worker thread panicked"))?;
    worked?;
    served.map_err(|e| Error::io(format!("http://{addr}"), e))
}

/// Serves until a signal (or the worker's end: a failed load), then lets in-flight answers finish.
async fn serve(listener: tokio::net::TcpListener, router: axum::Router, shared: Arc<worker::Shared>, worker_exit: tokio::sync::oneshot::Receiver<()>) -> std::io::Result<()> {
    let stop = async move {
        tokio::select! {
            _ = signal() => log(format_args!("stopping (signal)")),
            _ = worker_exit => {}
        }
        // In-flight generations end at their next token; queued jobs are dropped.
        shared.stopping.store(true, Ordering::SeqCst);
    };
    axum::serve(listener, router).with_graceful_shutdown(stop).await
}

/// SIGINT or SIGTERM.
async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
