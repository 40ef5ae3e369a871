//! Criterion benchmark of what constrained decoding costs the CPU (issue #26): building the
//! vocabulary llguidance walks (once per server), compiling a request's JSON schema (once per
//! request), and per answer token the mask over a 32k vocabulary plus moving the grammar on (what
//! `Sampler::sample` adds to a token). `cargo bench --bench constraint`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use expanse::constraint::{Constraint, Grammar, Vocabulary};
use expanse::tokenizer::Tokenizer;
use serde_json::json;

fn constrained(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openchat-tokenizer/tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": { "type": "string" },
            "country": { "type": "string" },
            "population": { "type": "integer", "minimum": 0 },
            "tags": { "type": "array", "items": { "type": "string" } },
        },
        "required": ["name", "country", "population", "tags"],
        "additionalProperties": false,
    });
    let grammar = Grammar::Json(schema);
    // An answer as a model would write it, in the tokenizer's own tokens. The grammar allows no
    // whitespace before the first `{` (as llama.cpp's and vLLM's do not), so the `▁` SentencePiece
    // puts first goes after it: `{` then ` "name": …`.
    let answer = r#""name": "Paris", "country": "France", "population": 2102650, "tags": ["capital", "Seine", "museums"]}"#;
    let mut ids = vec![tok.token_id("{").unwrap()];
    ids.extend(tok.encode(answer, false).unwrap());
    let vocab = Vocabulary::new(&tok, &[32000]).unwrap();
    let start = Constraint::new(&vocab, &grammar).unwrap();
    let walk = |c: &mut Constraint| {
        let mut logits = vec![0.0f64; 32002];
        for &id in &ids {
            logits.fill(0.0);
            c.mask(&mut logits).unwrap();
            assert!(logits[id as usize] == 0.0, "token {id} of the answer is not allowed");
            c.accept(id).unwrap();
        }
    };
    walk(&mut start.clone());
    let mut g = c.benchmark_group("constraint");
    g.sample_size(20);
    g.bench_function("vocabulary_32k", |b| b.iter(|| Vocabulary::new(&tok, &[32000]).unwrap()));
    g.bench_function("compile_schema", |b| b.iter(|| Constraint::new(&vocab, &grammar).unwrap()));
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function(format!("mask_and_accept_{}_tokens", ids.len()), |b| b.iter(|| walk(&mut start.clone())));
    g.finish();
}

criterion_group!(benches, constrained);
criterion_main!(benches);
