//! Fuzzing the parsers of user files on stable Rust: proptest mutates the valid files of
//! tests/fixtures/fuzz/ (drops, duplicates and retypes keys, changes numbers, truncates, flips bytes,
//! nests values deeply) and hands them to the parser. Every outcome must be a value or an error that
//! names the input — never a panic — and each parser's harness must reach several distinct kinds of
//! error (random bytes would all fail at the first byte and prove nothing).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

use expanse::config::Config;
use expanse::expand::Plan;
use expanse::template::{ChatTemplate, Message};

use crate::common::fixtures;

/// Cases per parser: enough to reach deep into each format, cheap enough for every `cargo test`.
const CASES: u32 = 2500;

/// One edit. Numbers pick a position among the candidates (modulo their count).
#[derive(Debug, Clone)]
enum Mutation {
    /// Removes the n-th object key (depth first).
    DropKey(u32),
    /// Writes the n-th object's first member twice.
    DuplicateKey(u32),
    /// Replaces the n-th value by another type.
    Retype(u32, u8),
    /// Replaces the n-th number in the text by a troublesome one.
    Number(u32, u8),
    /// Cuts the text at n.
    Truncate(u32),
    /// XORs the byte at n with a mask.
    Flip(u32, u8),
    /// Edits the chat template string (when the document has one).
    Template(u32, u8),
    /// Wraps the n-th value in arrays and objects nested `NESTING[k]` deep.
    Nest(u32, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<u32>().prop_map(Mutation::DropKey),
        any::<u32>().prop_map(Mutation::DuplicateKey),
        (any::<u32>(), any::<u8>()).prop_map(|(a, b)| Mutation::Retype(a, b)),
        (any::<u32>(), any::<u8>()).prop_map(|(a, b)| Mutation::Number(a, b)),
        any::<u32>().prop_map(Mutation::Truncate),
        (any::<u32>(), 1u8..=255).prop_map(|(a, b)| Mutation::Flip(a, b)),
        (any::<u32>(), any::<u8>()).prop_map(|(a, b)| Mutation::Template(a, b)),
        (any::<u32>(), any::<u8>()).prop_map(|(a, b)| Mutation::Nest(a, b)),
    ]
}

const NUMBERS: [&str; 12] = ["0", "-1", "-0.0", "1e308", "1e999", "18446744073709551616", "4294967296", "0.5", ".nan", "NaN", ".inf", "3"];
/// Nesting depths: within every parser's limits, just past expanse's YAML limit (64), and far past
/// serde's recursion limit (128).
const NESTING: [usize; 4] = [2, 65, 200, 1000];
const TEMPLATE_BITS: [&str; 8] = [
    "{% for %}",
    "{% endfor %}",
    "{{ raise_exception('no') }}",
    "{{ messages[99]['content'] }}",
    "{{ 1 / 0 }}",
    "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
    "{{ bos_token.unknown_method() }}",
    "",
];

/// Paths of every node of `v`, depth first (`None` keys index arrays).
fn nodes(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Object(o) => {
            for (k, child) in o {
                at.push(k.clone());
                nodes(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(format!("#{i}"));
                nodes(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match k.strip_prefix('#') {
        Some(i) if v.is_array() => v.get_mut(i.parse::<usize>().ok()?),
        _ => v.get_mut(k),
    })
}

/// JSON text of `v` with the first member of object number `dup` written twice.
fn to_text(v: &Value, dup: &mut Option<usize>, out: &mut String) {
    match v {
        Value::Object(o) => {
            let twice = *dup == Some(0);
            *dup = dup.and_then(|d| d.checked_sub(1));
            out.push('{');
            let members: Vec<_> = o.iter().collect();
            let repeated = if twice && !members.is_empty() { Some(members[0]) } else { None };
            for (i, (k, child)) in repeated.into_iter().chain(members.iter().copied()).enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                to_text(child, dup, out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                to_text(child, dup, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Applies `edits` to a structured document `doc` and renders it (JSON text, which YAML reads too).
fn mutate_doc(doc: &Value, edits: &[Mutation]) -> Vec<u8> {
    let mut v = doc.clone();
    let mut dup = None;
    let mut text_edits = Vec::new();
    for m in edits {
        let mut paths = Vec::new();
        nodes(&v, &mut Vec::new(), &mut paths);
        let pick = |n: u32| paths[n as usize % paths.len()].clone();
        match m {
            Mutation::DropKey(n) => {
                let keyed: Vec<_> = paths.iter().filter(|p| p.last().is_some_and(|k| !k.starts_with('#'))).collect();
                if let Some(p) = keyed.get(*n as usize % keyed.len().max(1)) {
                    let (last, parent) = p.split_last().unwrap();
                    if let Some(Value::Object(o)) = node_mut(&mut v, parent) {
                        o.remove(last);
                    }
                }
            }
            Mutation::DuplicateKey(n) => dup = Some(*n as usize % 4),
            Mutation::Retype(n, t) => {
                if let Some(node) = node_mut(&mut v, &pick(*n)) {
                    *node = match t % 6 {
                        0 => Value::Null,
                        1 => Value::Bool(true),
                        2 => Value::String("7".into()),
                        3 => serde_json::json!([1, "x"]),
                        4 => serde_json::json!({"k": 1}),
                        _ => serde_json::json!(-3.5),
                    };
                }
            }
            Mutation::Nest(n, k) => {
                if let Some(node) = node_mut(&mut v, &pick(*n)) {
                    let mut inner = node.take();
                    for i in 0..NESTING[*k as usize % NESTING.len()] {
                        inner = if i % 2 == 0 { serde_json::json!([inner]) } else { serde_json::json!({ "k": inner }) };
                    }
                    *node = inner;
                }
            }
            Mutation::Template(n, k) => {
                if let Some(Value::String(t)) = v.get_mut("chat_template") {
                    let at = floor_char(t, *n as usize % (t.len() + 1));
                    match k % 3 {
                        0 => t.truncate(at),
                        1 => t.insert_str(at, TEMPLATE_BITS[*k as usize % TEMPLATE_BITS.len()]),
                        _ => *t = TEMPLATE_BITS[*k as usize % TEMPLATE_BITS.len()].to_string(),
                    }
                }
            }
            other => text_edits.push(other.clone()),
        }
    }
    let mut text = String::new();
    to_text(&v, &mut dup, &mut text);
    mutate_bytes(text.into_bytes(), &text_edits)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The byte-level edits: troublesome numbers, truncation, flipped bytes.
fn mutate_bytes(mut b: Vec<u8>, edits: &[Mutation]) -> Vec<u8> {
    for m in edits {
        match m {
            Mutation::Number(n, k) => {
                let text = String::from_utf8_lossy(&b).into_owned();
                let spans: Vec<(usize, usize)> = number_spans(&text);
                if let Some(&(s, e)) = spans.get(*n as usize % spans.len().max(1)) {
                    b = format!("{}{}{}", &text[..s], NUMBERS[*k as usize % NUMBERS.len()], &text[e..]).into_bytes();
                }
            }
            Mutation::Truncate(n) => b.truncate(*n as usize % (b.len() + 1)),
            Mutation::Flip(n, mask) if !b.is_empty() => {
                let i = *n as usize % b.len();
                b[i] ^= mask;
            }
            _ => {}
        }
    }
    b
}

/// Byte spans of the numbers in `text`.
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()) {
            let s = i;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || b".eE+-".contains(&bytes[i])) {
                i += 1;
            }
            spans.push((s, i));
        }
        i += 1;
    }
    spans
}

/// The kind of an error: its message without the input's name, quoted parts and numbers, cut to a
/// few words. Two messages of one kind differ only in what they quote.
fn kind_of(msg: &str, name: &str) -> String {
    let msg = msg.replace(name, "");
    let mut out = String::new();
    let mut quoted = false;
    for c in msg.chars() {
        match c {
            '`' | '"' => quoted = !quoted,
            _ if quoted => {}
            c if c.is_ascii_digit() => {}
            c => out.push(c),
        }
    }
    out.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()).take(6).collect::<Vec<_>>().join(" ")
}

/// Runs `CASES` mutations of the corpus `files` through `parse`, which returns Ok or the error text.
/// Every error must contain `name`; returns the kinds of error seen.
fn fuzz(files: &[&str], name: &str, parse: impl Fn(&[u8]) -> Result<(), String>) -> BTreeSet<String> {
    let corpus: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(fixtures().join("fuzz").join(f)).unwrap()).collect();
    for seed in &corpus {
        assert_eq!(parse(seed), Ok(()), "the corpus itself must parse");
    }
    let docs: Vec<Option<Value>> = corpus.iter().map(|c| structured(c)).collect();
    let kinds = std::cell::RefCell::new(BTreeSet::new());
    let config = PropConfig { cases: CASES, failure_persistence: None, ..PropConfig::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let strategy = (0..corpus.len(), prop::collection::vec(mutation(), 1..=3), any::<bool>());
    let result = runner.run(&strategy, |(i, edits, as_text)| {
        let input = match (&docs[i], as_text) {
            (Some(doc), false) => mutate_doc(doc, &edits),
            _ => mutate_bytes(corpus[i].clone(), &edits),
        };
        if let Err(msg) = parse(&input) {
            if !msg.contains(name) {
                return Err(TestCaseError::fail(format!("error does not name {name}: {msg}")));
            }
            kinds.borrow_mut().insert(kind_of(&msg, name));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    kinds.into_inner()
}

/// A JSON or YAML document as a JSON value, for the structural mutations.
fn structured(bytes: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(bytes).ok()?;
    let v: Value = serde_json::from_str(text).ok().or_else(|| serde_yaml::from_str(text).ok())?;
    (v.is_object() || v.is_array()).then_some(v)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_kinds(what: &str, kinds: &BTreeSet<String>, at_least: usize) {
    // Shown with --nocapture: which errors the mutations reached.
    eprintln!("{what}: {} kinds of error: {kinds:#?}", kinds.len());
    assert!(kinds.len() >= at_least, "{what}: only {} kinds of error reached: {kinds:#?}", kinds.len());
}

#[test]
fn config_json() {
    let path = PathBuf::from("fuzzed/config.json");
    let kinds = fuzz(&["config-mistral.json", "config-llama.json", "config-openchat.json"], "fuzzed/config.json", |b| {
        Config::from_json(&text(b), &path).map(|_| ()).map_err(|e| e.to_string())
    });
    assert_kinds("config.json", &kinds, 8);
}

#[test]
fn mergekit_yaml() {
    let path = PathBuf::from("fuzzed/expand.yml");
    let kinds = fuzz(&["every4.yml", "scaled.yml", "openchat-40layers.yml"], "fuzzed/expand.yml", |b| {
        Plan::from_mergekit_yaml(&text(b), &path, 32, "openchat/openchat-3.5-0106").map(|_| ()).map_err(|e| e.to_string())
    });
    assert_kinds("mergekit YAML", &kinds, 8);
}

/// The safetensors header: its JSON mutated like any other, then framed with its length prefix
/// (right, or off by the mutation), or the whole file's bytes flipped and cut.
#[test]
fn safetensors_header() {
    let path = PathBuf::from("fuzzed/model.safetensors");
    let file = std::fs::read(fixtures().join("fuzz/small.safetensors")).unwrap();
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let (header, data) = (&file[8..8 + n], &file[8 + n..]);
    let parse = |b: &[u8]| expanse::loader::parse_header(b, &path).map(|_| ()).map_err(|e| e.to_string());
    // Whole-file mutations.
    let mut kinds = fuzz(&["small.safetensors"], "fuzzed/model.safetensors", parse);
    // Header mutations, reframed.
    let doc: Value = serde_json::from_slice(header).unwrap();
    let config = PropConfig { cases: CASES, failure_persistence: None, ..PropConfig::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let seen = std::cell::RefCell::new(BTreeSet::new());
    runner
        .run(&(prop::collection::vec(mutation(), 1..=3), -9i64..=9), |(edits, skew)| {
            let h = mutate_doc(&doc, &edits);
            let len = (h.len() as i64 + if skew.abs() > 6 { skew } else { 0 }).max(0) as u64;
            let bytes: Vec<u8> = len.to_le_bytes().iter().chain(&h).chain(data).copied().collect();
            if let Err(msg) = parse(&bytes) {
                prop_assert!(msg.contains("fuzzed/model.safetensors"), "{msg}");
                seen.borrow_mut().insert(kind_of(&msg, "fuzzed/model.safetensors"));
            }
            Ok(())
        })
        .unwrap();
    kinds.extend(seen.into_inner());
    assert_kinds("safetensors header", &kinds, 6);
}

#[test]
fn safetensors_index() {
    let path = PathBuf::from("fuzzed/model.safetensors.index.json");
    let kinds =
        fuzz(&["index.json"], "fuzzed/model.safetensors.index.json", |b| expanse::loader::parse_index(&text(b), &path).map(|_| ()).map_err(|e| e.to_string()));
    assert_kinds("safetensors index", &kinds, 4);
}

/// tokenizer_config.json through the real path: read from disk, template compiled, then rendered.
#[test]
fn tokenizer_config_and_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    let name = path.display().to_string();
    let files = ["tokenizer_config-openchat.json", "tokenizer_config-chatml.json", "tokenizer_config-named.json"];
    let kinds = fuzz(&files, &name, |b| {
        std::fs::write(&path, b).unwrap();
        let render = |t: ChatTemplate| t.render(&[Message::system("Be brief."), Message::user("Hi")], true);
        let mut t = ChatTemplate::resolve(None, None, Some(Path::new(&path))).map_err(|e| e.to_string())?;
        t.set_output_limit(1 << 20);
        render(t).map(|_| ()).map_err(|e| e.to_string())
    });
    assert_kinds("tokenizer_config.json", &kinds, 8);
}

/// generation_config.json through the real path: read from disk, each key checked as its flag is;
/// every file accepted must also sample (a value that parses but breaks the sampler is a miss).
#[test]
fn generation_config_json() {
    use expanse::config::GenerationConfig;
    use expanse::sampling::{Sampler, SamplingParams};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("generation_config.json");
    let name = path.display().to_string();
    let logits = candle_core::Tensor::new(&[2.5f32, -1.0, 7.0, 0.0, 3.0], &candle_core::Device::Cpu).unwrap();
    let kinds = fuzz(&["generation_config-sampling.json", "generation_config-tiny.json"], &name, |b| {
        std::fs::write(&path, b).unwrap();
        let gc = GenerationConfig::from_file(&path).map_err(|e| e.to_string())?;
        let mut sampler = Sampler::new(SamplingParams::from_generation_config(&gc));
        match sampler.sample(&logits, &[0, 2, 1]) {
            Ok(_) => Ok(()),
            Err(e) => panic!("{name} was accepted ({gc:?}) but sampling failed: {e}"),
        }
    });
    assert_kinds("generation_config.json", &kinds, 12);
}

#[test]
fn ids_flag() {
    let kinds = fuzz(&["ids.txt"], "--ids", |b| {
        for line in text(b).lines() {
            expanse::engine::parse_ids(line).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    assert_kinds("--ids", &kinds, 3);
}
