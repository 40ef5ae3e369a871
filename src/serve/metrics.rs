//! The server's counters and gauges, rendered for `GET /metrics` in the Prometheus (OpenMetrics)
//! text format by the Prometheus project's own client crate.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Everything `/metrics` reports; shared by the HTTP side and the worker (all atomics).
pub struct Metrics {
    registry: Registry,
    requests: Family<Vec<(String, String)>, Counter>,
    pub prompt_tokens: Counter,
    pub cached_prompt_tokens: Counter,
    pub generated_tokens: Counter,
    pub decode_seconds: Counter<f64, AtomicU64>,
    pub decode_tokens_per_second: Gauge<f64, AtomicU64>,
    pub queue_depth: Gauge,
    pub cancelled: Counter,
    /// Sequences in a slot now (reading their prompt or decoding), and the slots there are.
    pub running_sequences: Gauge,
    pub slots: Gauge,
    /// Decode steps run, the tokens they produced (tokens per step: their ratio), and the last step's.
    pub decode_steps: Counter,
    pub decode_step_tokens: Counter,
    pub last_step_tokens: Gauge,
    pub open_connections: Gauge,
    closed_connections: Family<Vec<(String, String)>, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("expanse");
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let (prompt_tokens, cached_prompt_tokens, generated_tokens, cancelled) =
            (Counter::default(), Counter::default(), Counter::default(), Counter::default());
        let decode_seconds = Counter::<f64, AtomicU64>::default();
        let decode_tokens_per_second = Gauge::<f64, AtomicU64>::default();
        let (queue_depth, open_connections) = (Gauge::default(), Gauge::default());
        let (running_sequences, slots, last_step_tokens) = (Gauge::default(), Gauge::default(), Gauge::default());
        let (decode_steps, decode_step_tokens) = (Counter::default(), Counter::default());
        let closed_connections = Family::<Vec<(String, String)>, Counter>::default();
        registry.register("requests", "HTTP requests answered, by status code", requests.clone());
        registry.register("prompt_tokens", "Prompt tokens of the answered requests", prompt_tokens.clone());
        registry.register("cached_prompt_tokens", "Prompt tokens found in the KV cache instead of run again", cached_prompt_tokens.clone());
        registry.register("generated_tokens", "Tokens generated", generated_tokens.clone());
        registry.register("decode_seconds", "Time spent decoding (after each answer's first token)", decode_seconds.clone());
        registry.register("decode_tokens_per_second", "Decode rate of the last answer", decode_tokens_per_second.clone());
        registry.register("queue_depth", "Requests waiting for the model", queue_depth.clone());
        registry.register("cancelled", "Generations stopped because their client went away", cancelled.clone());
        registry.register("running_sequences", "Sequences in a slot now, reading their prompt or decoding", running_sequences.clone());
        registry.register("slots", "Sequences the server runs at once (--parallel)", slots.clone());
        registry.register("decode_steps", "Decode steps run (each advances every decoding sequence by one token)", decode_steps.clone());
        registry.register("decode_step_tokens", "Tokens the decode steps produced (per step: this over decode_steps)", decode_step_tokens.clone());
        registry.register("last_step_tokens", "Sequences the last decode step advanced", last_step_tokens.clone());
        registry.register("open_connections", "Client connections open now", open_connections.clone());
        let closed_help = "Connections the server closed or refused, by reason (header_timeout, idle_timeout, max_connections, refused)";
        registry.register("closed_connections", closed_help, closed_connections.clone());
        Metrics {
            registry,
            requests,
            prompt_tokens,
            cached_prompt_tokens,
            generated_tokens,
            decode_seconds,
            decode_tokens_per_second,
            queue_depth,
            cancelled,
            running_sequences,
            slots,
            decode_steps,
            decode_step_tokens,
            last_step_tokens,
            open_connections,
            closed_connections,
        }
    }

    pub fn count_request(&self, status: u16) {
        self.requests.get_or_create(&vec![("status".to_string(), status.to_string())]).inc();
    }

    /// A connection the server closed (or refused) itself, and why.
    pub fn count_closed(&self, reason: &str) {
        self.closed_connections.get_or_create(&vec![("reason".to_string(), reason.to_string())]).inc();
    }

    /// The text `/metrics` returns.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_counts() {
        let m = Metrics::new();
        m.count_request(200);
        m.count_request(200);
        m.count_request(503);
        m.generated_tokens.inc_by(7);
        m.queue_depth.set(3);
        m.open_connections.set(2);
        m.count_closed("idle_timeout");
        let text = m.render();
        for line in [
            "expanse_requests_total{status=\"200\"} 2",
            "expanse_requests_total{status=\"503\"} 1",
            "expanse_generated_tokens_total 7",
            "expanse_queue_depth 3",
            "# TYPE expanse_decode_tokens_per_second gauge",
            "expanse_open_connections 2",
            "expanse_closed_connections_total{reason=\"idle_timeout\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
    }
}
