//! Typed errors of the library: every variant names the file, flag, key or tensor at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },

    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },

    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, got: Vec<usize>, expected: Vec<usize> },

    #[error("{path}: architecture `{arch}` is not supported (expanse runs MistralForCausalLM and LlamaForCausalLM)")]
    Architecture { path: PathBuf, arch: String },

    #[error("--expand {spec}: {msg}")]
    ExpandSpec { spec: String, msg: String },

    #[error("{path}: `{key}`: {msg}")]
    MergeConfig { path: PathBuf, key: String, msg: String },

    #[error("model `{id}`: {msg}")]
    Hub { id: String, msg: String },

    #[error("{flag}: {msg}")]
    Flag { flag: String, msg: String },

    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    #[error("{path}: not enough free disk space: the expanded checkpoint needs {needed}, {free} free")]
    DiskSpace { path: PathBuf, needed: String, free: String },

    /// A template that cannot be rendered; `origin` names where it came from (its file, or `built-in OpenChat`).
    #[error("chat template: {msg}{}", at(.origin))]
    Template { msg: String, origin: Option<String> },

    /// A rendered prompt past the most bytes the context can hold (`ChatTemplate::set_output_limit`):
    /// a conversation too long for the context, or a template that loops its way to megabytes.
    #[error("chat template: the rendered prompt passed {limit} bytes, more than the model's context can hold{}", at(.origin))]
    PromptTooLong { limit: usize, origin: Option<String> },

    #[error("the prompt is {prompt} tokens and does not fit the context of {context} tokens (--ctx, max_position_embeddings)")]
    ContextTooSmall { prompt: usize, context: usize },

    #[error("{tokens} tokens exceed the model's max_position_embeddings {max}")]
    ContextTooLong { tokens: usize, max: usize },

    #[error("the context is full: {needed} tokens do not fit the KV cache of {capacity} (--ctx)")]
    ContextFull { needed: usize, capacity: usize },

    /// The fused decode step broke the CUDA context (an illegal address or a failed launch): nothing
    /// can run on that device in this process any more (exit 3).
    #[error("the fast decode path crashed the GPU context ({0}); rerun with --decode-path reference to avoid it")]
    FastPathCrashed(String),

    /// A request that cannot fit: the model, a table or a cache larger than the device's memory.
    #[error("{what} needs {needed}, more than the {available} of memory {device}")]
    TooLarge { what: String, needed: String, available: String, device: String },

    /// A grammar for constrained decoding (a JSON schema, a tool's parameters) that cannot be compiled,
    /// or a tokenizer it cannot be applied to.
    #[error("constrained decoding: {0}")]
    Grammar(String),

    /// A failure inside expanse or on the device, not caused by the input (exit 3).
    #[error("internal error: {0}")]
    Internal(String),

    /// Candle failed (a device error, or an expanse bug): the input was checked before it got here.
    #[error("internal error: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// What kind of failure an error is, which decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The user's files, flags or environment are at fault (exit 2).
    BadInput,
    /// expanse or the device failed on checked input (exit 3).
    Internal,
}

/// ` (ORIGIN)` after a template error's message, when it knows where the template came from.
fn at(origin: &Option<String>) -> String {
    origin.as_ref().map(|o| format!(" ({o})")).unwrap_or_default()
}

/// A candle error on one line. candle attaches a multi-line backtrace when RUST_BACKTRACE is set (seen
/// on the GPU machine, 2026-12-04), and puts context on a line of its own: both are folded away here.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        e => one_line(&e.to_string()),
    }
}

/// A message of several lines as one: its non-empty lines, trimmed, joined by "; ".
pub fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Whether the user asked for backtraces of internal errors (`EXPANSE_BACKTRACE=1`, or Rust's own
/// `RUST_BACKTRACE` set to anything but 0).
pub fn backtrace_requested() -> bool {
    let on = |v: &str| std::env::var(v).is_ok_and(|v| !v.is_empty() && v != "0");
    on("EXPANSE_BACKTRACE") || on("RUST_BACKTRACE")
}

impl Error {
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile { path: path.into(), msg: msg.to_string() }
    }

    pub fn flag(flag: &str, msg: impl std::fmt::Display) -> Self {
        Error::Flag { flag: flag.to_string(), msg: msg.to_string() }
    }

    /// A template error; `origin` (a file, `built-in OpenChat`) ends the message in parentheses.
    pub fn template(msg: impl std::fmt::Display, origin: Option<&dyn std::fmt::Display>) -> Self {
        Error::Template { msg: msg.to_string(), origin: origin.map(|o| o.to_string()) }
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Internal(_) | Error::Candle(_) | Error::FastPathCrashed(_) => ErrorKind::Internal,
            _ => ErrorKind::BadInput,
        }
    }

    /// The process exit code for this error: 2 for bad input, 3 for internal and device failures.
    pub fn exit_code(&self) -> u8 {
        match self.kind() {
            ErrorKind::BadInput => 2,
            ErrorKind::Internal => 3,
        }
    }

    /// The message without the files it names: what `expanse serve` tells a client, to whom the
    /// server's paths are none of its business (the server's own log keeps the whole message). Every
    /// variant is listed, so that a new one is a decision, not a leak.
    pub fn without_paths(&self) -> String {
        match self {
            Error::Io { source, .. } => format!("I/O error: {source}"),
            Error::BadFile { msg, .. } => format!("a server file is unusable: {msg}"),
            Error::MissingTensor { name, .. } => format!("missing tensor `{name}`"),
            Error::TensorShape { name, got, expected, .. } => format!("tensor `{name}` has shape {got:?}, expected {expected:?}"),
            Error::Architecture { arch, .. } => format!("architecture `{arch}` is not supported"),
            Error::MergeConfig { key, msg, .. } => format!("`{key}`: {msg}"),
            Error::Tokenizer { msg, .. } => format!("tokenizer: {msg}"),
            Error::DiskSpace { needed, free, .. } => format!("not enough free disk space: {needed} needed, {free} free"),
            Error::Template { msg, .. } => format!("chat template: {msg}"),
            Error::PromptTooLong { .. } => "the rendered prompt is longer than the model's context can hold".into(),
            Error::ExpandSpec { .. }
            | Error::Hub { .. }
            | Error::Flag { .. }
            | Error::ContextTooSmall { .. }
            | Error::ContextTooLong { .. }
            | Error::ContextFull { .. }
            | Error::FastPathCrashed(_)
            | Error::TooLarge { .. }
            | Error::Grammar(_)
            | Error::Internal(_)
            | Error::Candle(_) => self.to_string(),
        }
    }

    /// The backtrace captured with the error, where there is one (candle captures one when
    /// RUST_BACKTRACE is set).
    pub fn backtrace(&self) -> Option<String> {
        fn find(e: &candle_core::Error) -> Option<String> {
            use candle_core::Error as E;
            match e {
                E::WithBacktrace { backtrace, .. } => Some(backtrace.to_string()),
                E::Context { inner, .. } | E::WithPath { inner, .. } => find(inner),
                _ => None,
            }
        }
        match self {
            Error::Candle(e) => find(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candle_error_with_a_backtrace_is_one_line() {
        let inner = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("no CUDA-capable device is detected".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = inner.context("loading the step");
        assert!(e.to_string().contains('\n'), "candle's own text spans lines: {e}");
        let msg = candle_message(&e);
        assert_eq!(msg, "loading the step: no CUDA-capable device is detected");
        let e = Error::Candle(e);
        assert_eq!(e.to_string(), format!("internal error: {msg}"));
        // Folded out of the message, the backtrace is still there for EXPANSE_BACKTRACE=1.
        assert!(e.backtrace().is_some_and(|b| !b.is_empty()));
    }

    #[test]
    fn what_a_client_is_told_names_no_file() {
        let secret = "/srv/models/secret";
        let p = || PathBuf::from(secret).join("f");
        let origin: &dyn std::fmt::Display = &secret;
        let errors = [
            Error::io(p(), std::io::Error::other("denied")),
            Error::bad_file(p(), "bad"),
            Error::MissingTensor { path: p(), name: "w".into() },
            Error::TensorShape { path: p(), name: "w".into(), got: vec![1], expected: vec![2] },
            Error::Architecture { path: p(), arch: "X".into() },
            Error::MergeConfig { path: p(), key: "k".into(), msg: "m".into() },
            Error::Tokenizer { path: p(), msg: "m".into() },
            Error::DiskSpace { path: p(), needed: "1 GB".into(), free: "0 B".into() },
            Error::template("boom", Some(origin)),
            Error::PromptTooLong { limit: 9, origin: Some(secret.into()) },
        ];
        for e in errors {
            assert!(e.to_string().contains(secret), "the whole message names the file: {e}");
            let told = e.without_paths();
            assert!(!told.contains(secret) && !told.is_empty(), "{e} → {told}");
        }
    }
}
