//! expanse's integration tests: one binary, one module per area, fixtures under tests/fixtures/
//! (made by tests/fixtures/make_fixtures.py with Hugging Face transformers and mergekit).

mod batch;
mod bench;
mod chat;
mod clients;
mod common;
mod engine;
mod errors;
mod export;
mod fuzz;
mod gguf;
mod hub;
mod mergekit;
mod quant;
mod quantized;
mod serve;
mod step;
mod structured;
mod tiers;
mod tokenizer;
mod verify;

/// Lets a test put the buffers it allocates between guard pages (`expanse_cuda_emulator::guard`):
/// the fused step's tests do, so that its kernels' raw-pointer loops cannot stray unseen.
#[global_allocator]
static ALLOC: expanse_cuda_emulator::guard::GuardedAlloc = expanse_cuda_emulator::guard::GuardedAlloc;
