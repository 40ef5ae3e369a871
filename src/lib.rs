//! expanse: load a Mistral/Llama checkpoint, expand it LLaMA-Pro style in memory, and run it.

pub mod chat;
pub mod compare;
pub mod bench;
pub mod budget;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod expand;
pub mod export;
pub mod generate;
pub mod generator;
pub mod inspect;
pub mod kernels;
pub mod loader;
pub mod logits;
pub mod model;
pub mod progress;
pub mod sampling;
pub mod serve;
pub mod staging;
pub mod step;
pub mod stream;
pub mod synthetic;
pub mod template;
pub mod threads;
pub mod tokenizer;
pub mod verify;

pub use error::{Error, Result};
