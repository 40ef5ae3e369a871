//! expanse: load a Mistral/Llama checkpoint, expand it LLaMA-Pro style in memory, and run it.

pub mod budget;
pub mod cmd;
pub mod compare;
pub mod config;
pub mod constraint;
pub mod conversation;
pub mod device;
pub mod engine;
pub mod error;
pub mod expand;
pub mod generation;
pub mod kernels;
pub mod loader;
pub mod model;
pub mod progress;
pub mod quant;
pub mod sampling;
pub mod serve;
pub mod staging;
pub mod step;
pub mod stream;
pub mod synthetic;
pub mod template;
pub mod threads;
pub mod tokenizer;

pub use error::{Error, Result};
