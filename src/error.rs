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

    #[error("chat template: {0}")]
    Template(String),

    #[error("the prompt is {prompt} tokens and does not fit the context of {context} tokens (--ctx, max_position_embeddings)")]
    ContextTooSmall { prompt: usize, context: usize },

    #[error("{tokens} tokens exceed the model's max_position_embeddings {max}")]
    ContextTooLong { tokens: usize, max: usize },

    #[error("the context is full: {needed} tokens do not fit the KV cache of {capacity} (--ctx)")]
    ContextFull { needed: usize, capacity: usize },

    /// The fused decode step broke the CUDA context (an illegal address or a failed launch): nothing
    /// can run on that device in this process any more.
    #[error("the fast decode path crashed the GPU context ({0}); rerun with --decode-path reference to avoid it")]
    FastPathCrashed(String),

    /// A fault inside expanse or on the device, not in the user's input.
    #[error("internal error: {0}")]
    Internal(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::BadFile { path: path.into(), msg: msg.to_string() }
    }

    pub fn flag(flag: &str, msg: impl std::fmt::Display) -> Self {
        Error::Flag { flag: flag.to_string(), msg: msg.to_string() }
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Error::Internal(msg.to_string())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
