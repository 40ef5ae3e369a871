//! `expanse serve`: an OpenAI-compatible HTTP server in front of one engine. This module wires the
//! pieces together — the listener, the model worker thread, the router — and stops them on
//! SIGINT/SIGTERM: no new connections, in-flight generations end at their next token, and within
//! `--shutdown-timeout` the process exits 0.

mod auth;
mod conn;
mod error;
mod metrics;
mod openai;
mod routes;
mod slots;
mod tools;
mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conversation::{ChatOptions, Prompter};
use crate::engine::{LoadOptions, Loaded, Source};
use crate::error::{Error, Result};

pub use routes::Limits;

/// `expanse serve`'s settings beyond the model flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// Requests that may wait while the slots are busy (`--queue`); more get 503.
    pub queue: usize,
    /// Sequences answered at once (`--parallel`); None: sized for the device.
    pub parallel: Option<usize>,
    pub api_key: Option<String>,
    /// `--cors ORIGIN` (`*` for any); None: no CORS headers at all.
    pub cors: Option<String>,
    pub body_limit: usize,
    pub max_tokens_cap: usize,
    /// Prompts run in chunks starting at multiples of this; a later prompt reuses whole chunks.
    pub prefill_chunk: usize,
    /// Seconds a request may take to arrive, from its first byte to the end of its body (`--header-timeout`).
    pub header_timeout: f64,
    /// Seconds a connection may sit with no request under way (`--idle-timeout`).
    pub idle_timeout: f64,
    /// Most open connections (`--max-connections`); None: what the file-descriptor limit leaves room for.
    pub max_connections: Option<usize>,
    /// Seconds a stop waits for answers under way (`--shutdown-timeout`).
    pub shutdown_timeout: f64,
    /// `--alias`: more names a request may give as `model`.
    pub aliases: Vec<String>,
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
    Ok(CorsLayer::new().allow_origin(allow).allow_methods([Method::GET, Method::POST]).allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]))
}

/// A number of seconds from the command line; `zero` says whether 0 is allowed.
fn seconds(flag: &str, secs: f64, zero: bool) -> Result<Duration> {
    if secs.is_nan() || secs < 0.0 || (secs == 0.0 && !zero) {
        return Err(Error::flag(flag, format!("`{secs}`: expected a number of seconds {}", if zero { "≥ 0" } else { "> 0" })));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| Error::flag(flag, format!("`{secs:e}` seconds is too long")))
}

/// `--max-connections`, or by default as many as the file-descriptor limit leaves room for.
fn max_connections(asked: Option<usize>) -> Result<usize> {
    let room = conn::connection_room();
    match asked {
        None => Ok(room),
        Some(0) => Err(Error::flag("--max-connections", "must be at least 1")),
        Some(n) if n > room => {
            let fds = conn::open_file_limit();
            Err(Error::flag(
                "--max-connections",
                format!("{n} is more than this process's {fds} file descriptors leave room for (ulimit -n {fds}): at most {room}"),
            ))
        }
        Some(n) => Ok(n),
    }
}

/// The connection settings, checked.
fn check_connections(opts: &ServeOptions) -> Result<conn::ConnLimits> {
    Ok(conn::ConnLimits {
        header_timeout: seconds("--header-timeout", opts.header_timeout, false)?,
        idle_timeout: seconds("--idle-timeout", opts.idle_timeout, false)?,
        max_connections: max_connections(opts.max_connections)?,
        shutdown_timeout: seconds("--shutdown-timeout", opts.shutdown_timeout, true)?,
    })
}

/// Most requests `--queue` lets wait: far more than any one machine answers in a request's timeout.
const MAX_QUEUE: usize = 4096;

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
    if opts.parallel == Some(0) {
        return Err(Error::flag("--parallel", "must be at least 1"));
    }
    let path = opts.chat.decode.path;
    if matches!(path, crate::step::DecodePath::Fused | crate::step::DecodePath::Graph) && opts.parallel.is_some_and(|n| n > 1) {
        let msg = format!(
            "{}: the fused step decodes one sequence at a time; drop --parallel (several are decoded in batches, on the reference kernels)",
            path.as_str()
        );
        return Err(Error::flag("--decode-path", msg));
    }
    if opts.prefill_chunk < 2 {
        return Err(Error::flag("--prefill-chunk", "must be at least 2"));
    }
    if opts.body_limit == 0 {
        return Err(Error::flag("--body-limit", "must be at least 1 byte"));
    }
    // The queue's slots are allocated up front (a bounded channel).
    if opts.queue > MAX_QUEUE {
        return Err(Error::flag("--queue", format!("{} is over {MAX_QUEUE}", opts.queue)));
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
    let connections = check_connections(&opts)?;
    let cors = opts.cors.as_deref().map(cors_layer).transpose()?;
    let choice = crate::device::select(&load.device)?;
    if let Some(n) = &choice.notice {
        eprintln!("{n}");
    }
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
        names: routes::served_names(&opts.aliases, &source.files.name),
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        chat: chat.clone(),
        raw,
        limits,
        defaults: opts.chat.sampling.clone(),
        system: opts.chat.system.clone(),
        api_key: opts.api_key.clone().map(auth::ApiKey::new),
    });
    let worker_opts = worker::WorkerOptions {
        ctx: opts.chat.ctx,
        decode_delay: opts.chat.decode_delay,
        prefill_chunk: opts.prefill_chunk,
        decode: opts.chat.decode.clone(),
        parallel: opts.parallel,
    };
    let (worker, worker_exit) = Worker::spawn(source, load, choice.device, chat, jobs, shared.clone(), worker_opts)?;
    log(format_args!("listening on http://{addr} (loading the model; GET /health answers 200 once it is ready)"));
    let stop = stop_signal(shared.clone(), worker_exit);
    let stopped = runtime.block_on(conn::serve(listener, routes::router(app, cors), connections, shared.clone(), stop));
    shared.stopping.store(true, Ordering::SeqCst);
    worker.join(stopped.checked_add(connections.shutdown_timeout))
}

/// The model worker thread's result, sent as it ends.
struct Worker(std::sync::mpsc::Receiver<Result<()>>);

impl Worker {
    /// Starts the thread that loads the model and runs the jobs; the receiver closes when it ends
    /// (which stops the server: a failed load).
    fn spawn(
        source: Source,
        load: LoadOptions,
        device: candle_core::Device,
        chat: Arc<Prompter>,
        jobs: std::sync::mpsc::Receiver<worker::Job>,
        shared: Arc<worker::Shared>,
        opts: worker::WorkerOptions,
    ) -> Result<(Worker, tokio::sync::oneshot::Receiver<()>)> {
        let (result, done) = std::sync::mpsc::channel();
        let (ended, exit) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("expanse-model".into())
            .spawn(move || {
                let load = || -> Result<Loaded> { crate::engine::load_from(source, &load, &device) };
                // On a pool thread, so the kernels' parallel loops fork in place (crate::threads).
                let _ = result.send(crate::threads::run_on_pool(|| worker::run(load, &chat.tokenizer, jobs, &shared, opts)));
                drop(ended);
            })
            .map_err(|e| Error::io("<model worker thread>", e))?;
        Ok((Worker(done), exit))
    }

    /// The worker's result, waiting until `deadline` at most: a worker still busy then (reading a
    /// long prompt, loading the model) ends with the process.
    fn join(self, deadline: Option<Instant>) -> Result<()> {
        // With nothing to do, the worker looks for the stop every 100 ms.
        let wait = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(250)));
        match self.0.recv_timeout(wait) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                log(format_args!("the model worker is still busy after --shutdown-timeout; exiting without it"));
                Ok(())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error::internal("the model worker thread panicked")),
        }
    }
}

/// Resolves at SIGINT/SIGTERM, or when the worker ends (a failed load), and marks the server
/// stopping: in-flight generations end at their next token, queued jobs are dropped.
async fn stop_signal(shared: Arc<worker::Shared>, worker_exit: tokio::sync::oneshot::Receiver<()>) {
    tokio::select! {
        _ = signal() => log(format_args!("stopping (signal)")),
        _ = worker_exit => {}
    }
    shared.stopping.store(true, Ordering::SeqCst);
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
