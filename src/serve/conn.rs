//! The server's connections: the accept loop, and what hyper leaves to the code that drives it — a
//! cap on open connections (at the cap the longest-idle one is closed to make room, so `/health`
//! always gets through), a deadline for a request to arrive, an idle keep-alive timeout, and a stop
//! that ends in bounded time. hyper serves each connection; this module decides when one must end.
//!
//! hyper's own `header_read_timeout` cannot do this: it runs from the moment hyper waits for a head,
//! so it is an idle timeout and a header timeout in one, it does not cover the body, and it tells
//! nobody whether a connection is idle — which the cap needs to know.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tower::ServiceExt;

use super::error::ApiError;
use super::worker::Shared;

/// How long connections may take and how many may be open.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// `--header-timeout`: from a request's first byte until its headers and body are in.
    pub header_timeout: Duration,
    /// `--idle-timeout`: with no request under way, after the accept or the last answer.
    pub idle_timeout: Duration,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--shutdown-timeout`: after a stop, how long answers under way may take to end.
    pub shutdown_timeout: Duration,
}

/// File descriptors kept back from connections: the listener, the model's files, the runtime and
/// its signal pipe, stdio, and the short-lived connections that are refused at the cap.
const RESERVED_FDS: usize = 64;

/// Connections that may be refused at once (each holds a descriptor for `REFUSAL_TIME` at most).
const REFUSALS: usize = 16;
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// How many file descriptors this process may open (`ulimit -n`, RLIMIT_NOFILE's soft limit).
pub fn open_file_limit() -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit through a valid pointer to a local.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            // RLIM_INFINITY and other huge values: more than any cap needs.
            return usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX).min(1 << 20);
        }
    }
    // Unknown: macOS's default soft limit, a guess unlikely to be too high.
    256
}

/// The most connections the file-descriptor limit leaves room for: all but `RESERVED_FDS` of them,
/// and never less than half (a limit as low as 128 leaves 64).
pub fn connection_room() -> usize {
    let fds = open_file_limit();
    fds.saturating_sub(RESERVED_FDS).max(fds / 2).max(1)
}

/// What one connection is doing: whether it may be closed to make room, and when it must close.
struct Activity {
    /// Requests being answered (one at a time on HTTP/1).
    answering: usize,
    /// When the request now arriving sent its first byte; None once its body is in.
    arriving: Option<Instant>,
    /// Since when nothing has been under way: the accept, or the end of the last answer.
    idle_since: Instant,
}

/// One connection's activity, told by its stream and its requests' bodies, read by its task.
struct Conn {
    activity: Mutex<Activity>,
    /// Wakes the connection's task to look at its deadline again.
    changed: Notify,
}

impl Conn {
    fn new() -> Conn {
        let activity = Activity { answering: 0, arriving: None, idle_since: Instant::now() };
        Conn { activity: Mutex::new(activity), changed: Notify::new() }
    }

    /// The activity; plain values, so a panic elsewhere cannot leave them half-written.
    fn lock(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Activity)) {
        change(&mut self.lock());
        self.changed.notify_one();
    }

    /// Bytes came in: with nothing under way, a request has begun to arrive.
    fn received(&self) {
        let mut a = self.lock();
        if a.answering == 0 && a.arriving.is_none() {
            a.arriving = Some(Instant::now());
            drop(a);
            self.changed.notify_one();
        }
    }

    /// hyper has a request's head: it is being answered, and its body, if any, is still arriving.
    fn request(self: &Arc<Conn>, body_in: bool) -> Answered {
        self.update(|a| {
            a.answering += 1;
            a.arriving = if body_in { None } else { Some(a.arriving.unwrap_or_else(Instant::now)) };
        });
        Answered(self.clone())
    }

    fn body_in(&self) {
        self.update(|a| a.arriving = None);
    }

    fn answered(&self) {
        self.update(|a| {
            a.answering = a.answering.saturating_sub(1);
            if a.answering == 0 {
                a.idle_since = Instant::now();
            }
        });
    }

    /// When the connection must close if nothing changes (None while an answer is under way), and
    /// why: a request slower to arrive than `--header-timeout`, or no request for `--idle-timeout`.
    fn deadline(&self, limits: &ConnLimits) -> Option<(Instant, &'static str)> {
        let a = self.lock();
        match (a.arriving, a.answering) {
            (Some(t), _) => t.checked_add(limits.header_timeout).map(|d| (d, "header_timeout")),
            (None, 0) => a.idle_since.checked_add(limits.idle_timeout).map(|d| (d, "idle_timeout")),
            (None, _) => None,
        }
    }

    /// With no answer under way: how long it has had nothing to do, a connection with a request
    /// still arriving ranking after every quiet one (the first to close at the cap ranks lowest).
    fn quiet(&self) -> Option<(bool, Instant)> {
        let a = self.lock();
        (a.answering == 0).then(|| (a.arriving.is_some(), a.arriving.unwrap_or(a.idle_since)))
    }
}

/// Held while a request is answered: from its head until its answer's body is dropped (sent
/// whole, or its connection gone).
struct Answered(Arc<Conn>);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.answered();
    }
}

/// The TCP stream, telling its connection when bytes come in.
struct Watched {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.received();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A request's body, telling its connection when it is in (or given up on by the handler).
struct Arriving {
    body: Incoming,
    conn: Option<Arc<Conn>>,
}

impl Arriving {
    fn done(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.body_in();
        }
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.done();
    }
}

impl HttpBody for Arriving {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.body.is_end_stream() {
            this.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body, holding its request's `Answered` until it is dropped.
struct Answer {
    body: Body,
    _answered: Answered,
}

impl HttpBody for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The router, each request's arrival and answer told to its connection.
fn service(
    router: Router,
    conn: Arc<Conn>,
) -> impl hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible, Future: Send> + Send {
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let answered = conn.request(req.body().is_end_stream());
        let req = req.map(|body| Body::new(Arriving { body, conn: Some(conn.clone()) }));
        let answer = router.clone().oneshot(req);
        async move {
            let response = answer.await?;
            Ok(response.map(|body| Body::new(Answer { body, _answered: answered })))
        }
    })
}

/// Sleeps until `deadline`; forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until it ends, misses its deadline, or the server stops: at the stop a
/// connection with nothing under way (a request still arriving included) closes at once, one
/// answering closes after that answer.
async fn run_connection(stream: TcpStream, conn: Arc<Conn>, router: Router, limits: ConnLimits, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let io = TokioIo::new(Watched { stream, conn: conn.clone() });
    let http = hyper::server::conn::http1::Builder::new().serve_connection(io, service(router, conn.clone()));
    let mut http = std::pin::pin!(http);
    let mut stopping = false;
    loop {
        let deadline = conn.deadline(&limits);
        tokio::select! {
            _ = http.as_mut() => return,
            () = until(deadline.map(|(d, _)| d)) => {
                if let Some((_, why)) = conn.deadline(&limits).filter(|(d, _)| *d <= Instant::now()) {
                    shared.metrics.count_closed(why);
                    return;
                }
            }
            () = conn.changed.notified() => {}
            _ = stop.changed(), if !stopping => {
                stopping = true;
                if conn.quiet().is_some() {
                    return;
                }
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The open connections, oldest first, each with the handle that ends its task.
struct Open {
    conns: Mutex<BTreeMap<u64, (Arc<Conn>, AbortHandle)>>,
    shared: Arc<Shared>,
}

impl Open {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (Arc<Conn>, AbortHandle)>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the connection that has had nothing to do for longest; false when every one is busy.
    fn close_longest_idle(&self) -> bool {
        let mut conns = self.lock();
        let longest = conns.iter().filter_map(|(id, (c, _))| Some((c.quiet()?, *id))).min().map(|(_, id)| id);
        let Some((_, task)) = longest.and_then(|id| conns.remove(&id)) else { return false };
        task.abort();
        self.shared.metrics.count_closed("max_connections");
        true
    }
}

/// Removes its connection from `Open` when the connection's task ends or is aborted.
struct Registered {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
        self.open.shared.metrics.open_connections.dec();
    }
}

/// What the accept loop hands every connection.
struct Acceptor {
    router: Router,
    limits: ConnLimits,
    open: Arc<Open>,
    tasks: JoinSet<()>,
    /// Tells every connection the server is stopping.
    stopping: watch::Sender<bool>,
    refusals: Arc<Semaphore>,
    next_id: u64,
}

impl Acceptor {
    /// Serves a new connection, closing the longest-idle one at the cap; with every connection
    /// busy it is refused.
    fn admit(&mut self, stream: TcpStream) {
        // Answers stream token by token: each piece goes out at once, not when a packet fills.
        let _ = stream.set_nodelay(true);
        let full = self.open.lock().len() >= self.limits.max_connections;
        if full && !self.open.close_longest_idle() {
            self.refuse(stream);
            return;
        }
        let (id, conn) = (self.next_id, Arc::new(Conn::new()));
        self.next_id += 1;
        let registered = Registered { open: self.open.clone(), id };
        let serve = run_connection(stream, conn.clone(), self.router.clone(), self.limits, self.open.shared.clone(), self.stopping.subscribe());
        // Locked across the spawn, so the task's `Registered` cannot remove the entry before it is in.
        let mut conns = self.open.lock();
        let task = self.tasks.spawn(async move {
            let _registered = registered;
            serve.await;
        });
        conns.insert(id, (conn, task));
        self.open.shared.metrics.open_connections.inc();
    }

    /// Answers 503 `too_many_connections` and closes; a connection beyond even the refusals'
    /// allowance is closed unanswered.
    fn refuse(&self, stream: TcpStream) {
        self.open.shared.metrics.count_closed("refused");
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            let answer = hyper::service::service_fn(|_: Request<Incoming>| async {
                let msg = "every connection the server allows is busy (--max-connections); try again shortly";
                Ok::<_, Infallible>(ApiError::unavailable("too_many_connections", msg).into_response())
            });
            let http = hyper::server::conn::http1::Builder::new().keep_alive(false).serve_connection(TokioIo::new(stream), answer);
            let _ = tokio::time::timeout(REFUSAL_TIME, http).await;
        });
    }

    /// A failed accept: the one connection's fault, or the process's (out of file descriptors or
    /// memory) — then an idle connection gives up its descriptor, and the loop pauses, not spins.
    async fn accept_failed(&self, e: io::Error) {
        use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
        if !matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted) {
            self.open.close_longest_idle();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends every connection: idle ones at once, answers under way when they end, and whatever
    /// is left after `--shutdown-timeout`.
    async fn stop(mut self) {
        let _ = self.stopping.send(true);
        let ended = tokio::time::timeout(self.limits.shutdown_timeout, async { while self.tasks.join_next().await.is_some() {} }).await;
        if ended.is_err() {
            super::log(format_args!("closing {} connections still answering after --shutdown-timeout", self.tasks.len()));
            self.tasks.shutdown().await;
        }
    }
}

/// Serves `router` on `listener` until `stop` resolves, then ends every connection, within
/// `limits.shutdown_timeout`; returns the instant the stop came.
pub async fn serve(listener: TcpListener, router: Router, limits: ConnLimits, shared: Arc<Shared>, stop: impl Future<Output = ()>) -> Instant {
    let open = Arc::new(Open { conns: Mutex::new(BTreeMap::new()), shared });
    let mut acceptor =
        Acceptor { router, limits, open, tasks: JoinSet::new(), stopping: watch::channel(false).0, refusals: Arc::new(Semaphore::new(REFUSALS)), next_id: 0 };
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            // Reaps the ended connections' tasks.
            Some(_) = acceptor.tasks.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => acceptor.admit(stream),
                Err(e) => acceptor.accept_failed(e).await,
            },
        }
    }
    let stopped = Instant::now();
    // No new connections from here: the port closes.
    drop(listener);
    acceptor.stop().await;
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_s_deadline_follows_what_it_is_doing() {
        let limits =
            ConnLimits { header_timeout: Duration::from_secs(1), idle_timeout: Duration::from_secs(60), max_connections: 1, shutdown_timeout: Duration::ZERO };
        let why = |c: &Conn| c.deadline(&limits).map(|(_, why)| why);
        let c = Arc::new(Conn::new());
        assert_eq!((why(&c), c.quiet().map(|q| q.0)), (Some("idle_timeout"), Some(false)), "just accepted");
        c.received();
        assert_eq!((why(&c), c.quiet().map(|q| q.0)), (Some("header_timeout"), Some(true)), "a request arriving");
        let answered = c.request(false);
        assert_eq!((why(&c), c.quiet()), (Some("header_timeout"), None), "its body still arriving");
        c.body_in();
        assert_eq!(why(&c), None, "answering: no deadline, however long the answer");
        c.received();
        assert_eq!(why(&c), None, "bytes of a next request, read while answering");
        drop(answered);
        assert_eq!((why(&c), c.quiet().map(|q| q.0)), (Some("idle_timeout"), Some(false)), "answered");
        let huge = ConnLimits { idle_timeout: Duration::MAX, ..limits };
        assert_eq!(c.deadline(&huge), None, "a timeout past the clock's end is none");
    }
}
