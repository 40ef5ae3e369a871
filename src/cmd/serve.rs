//! `expanse serve`: the flags of the OpenAI-compatible HTTP server (`crate::serve`), checked before
//! the model loads.

use clap::Args;

use super::args::{DecodeArgs, ModelArgs, PromptArgs, SkipArgs};
use super::Failure;
use crate::serve::ServeOptions;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub(super) model: ModelArgs,
    #[command(flatten)]
    skip: SkipArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// Address to listen on (0.0.0.0 exposes the server to the network)
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests that may wait while every slot is busy (at most 4096); more get 503
    #[arg(long, value_name = "N", default_value_t = 32)]
    queue: usize,
    /// Requests answered at once, each with a KV cache of --ctx tokens, decoded together; each answer
    /// is the one it gets alone, bit for bit (default: on the CPU up to 16, as many as half the
    /// available memory holds; 1 on a GPU, which then decodes on its fused step, and with
    /// --decode-path fused or graph)
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Require `Authorization: Bearer KEY` (prefer the environment variable: arguments show in `ps`)
    #[arg(long, env = "EXPANSE_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// Allow browser pages from ORIGIN (`*` for any) to call the API; no CORS headers without it
    #[arg(long, value_name = "ORIGIN")]
    cors: Option<String>,
    /// Largest request body in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    body_limit: usize,
    /// Most tokens a request may ask for (max_tokens); also the answer length when it names none
    /// and --max-tokens is not given
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_tokens_cap: usize,
    /// Prompts run in chunks of N tokens starting at multiples of N, so a prompt's answer does not
    /// depend on what ran before it; a prompt that shares a beginning with an earlier one reuses its
    /// cached positions (to the token on the CPU with f32/bf16 weights, elsewhere whole chunks)
    #[arg(long, value_name = "N", default_value_t = 256)]
    prefill_chunk: usize,
    /// Seconds a request may take to arrive, from its first byte to the end of its body; a slower
    /// client is disconnected
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    header_timeout: f64,
    /// Seconds a connection may stay open with no request under way
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    idle_timeout: f64,
    /// Most open connections; at the cap the longest-idle one is closed to admit a new one
    /// (default: what the file-descriptor limit, `ulimit -n`, leaves room for)
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Seconds SIGINT/SIGTERM waits for answers under way before closing their connections
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    shutdown_timeout: f64,
    /// Another name requests may give as `model` (repeatable; GET /v1/models lists them first,
    /// then the checkpoint's own name)
    #[arg(long, value_name = "NAME")]
    alias: Vec<String>,
}

/// `expanse serve`
pub fn run(args: ServeArgs) -> Result<(), Failure> {
    let ServeArgs {
        model,
        skip,
        decode,
        prompt,
        host,
        port,
        queue,
        parallel,
        api_key,
        cors,
        body_limit,
        max_tokens_cap,
        prefill_chunk,
        header_timeout,
        idle_timeout,
        max_connections,
        shutdown_timeout,
        alias,
    } = args;
    if let Some(a) = alias.iter().find(|a| a.trim().is_empty() || a.len() > 256) {
        return Err(crate::Error::flag("--alias", format!("`{a}`: a name is 1 to 256 characters, not blank")).into());
    }
    let source = model.source.checkpoint.open()?;
    let chat = prompt.options(&source, &decode)?;
    let opts = ServeOptions {
        host,
        port,
        queue,
        parallel,
        api_key,
        cors,
        body_limit,
        max_tokens_cap,
        prefill_chunk,
        header_timeout,
        idle_timeout,
        max_connections,
        shutdown_timeout,
        aliases: alias,
        chat,
    };
    crate::serve::run(source, model.options(skip.skip_transparent), opts)?;
    Ok(())
}
