//! Bad input: one clear line naming the file, flag or tensor, exit code 2, never a panic.

use std::fs;
use std::path::Path;

use candle_core::Device;
use expanse::loader::{write_safetensors, Checkpoint};

use crate::common::*;

/// Runs expanse and checks the failure: exit 2, a single `error:` line containing every `needle`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let out = expanse(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {err}");
    }
    assert!(out.stdout.is_empty(), "no partial output on stdout");
}

/// A copy of the bf16 tiny model in a temp dir (real files, not symlinks).
fn copy_model(tmp: &Path) -> std::path::PathBuf {
    let src = fixtures().join("tiny-mistral-bf16");
    let dst = tmp.join("model");
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// Rewrites model.safetensors with `edit` applied to the list of (name, tensor).
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, candle_core::Tensor)>)) {
    let file = dir.join("model.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&file)).unwrap();
    let mut tensors: Vec<(String, candle_core::Tensor)> =
        ck.names().into_iter().map(|n| (n.to_string(), ck.load(n, &ck.entry(n).unwrap().shape.clone(), &Device::Cpu).unwrap())).collect();
    drop(ck);
    edit(&mut tensors);
    let refs: Vec<(&str, &candle_core::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors(&file, &refs, None).unwrap();
}

#[test]
fn missing_model_folder() {
    fails_with(&["inspect", "--model", "/nonexistent/model-dir"], &["/nonexistent/model-dir"]);
}

#[test]
fn missing_config_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    fs::remove_file(dir.join("config.json")).unwrap();
    fails_with(&["inspect", "--model", dir.to_str().unwrap()], &["config.json"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let f = dir.join("model.safetensors");
    let len = fs::metadata(&f).unwrap().len();
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    fails_with(&["inspect", "--model", dir.to_str().unwrap()], &["model.safetensors", "truncated"]);
}

#[test]
fn missing_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |t| t.retain(|(n, _)| n != "model.layers.2.mlp.up_proj.weight"));
    fails_with(
        &["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2", "--out", tmp.path().join("o.safetensors").to_str().unwrap()],
        &["model.layers.2.mlp.up_proj.weight", "missing"],
    );
    assert!(!tmp.path().join("o.safetensors").exists(), "no partial output file");
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    rewrite(&dir, |t| {
        for (n, x) in t.iter_mut() {
            if n == "model.layers.1.self_attn.k_proj.weight" {
                *x = x.narrow(0, 0, 8).unwrap();
            }
        }
    });
    fails_with(
        &["logits", "--model", dir.to_str().unwrap(), "--ids", "1,2", "--out", tmp.path().join("o.safetensors").to_str().unwrap()],
        &["model.layers.1.self_attn.k_proj.weight", "[8, 32]", "[16, 32]"],
    );
}

#[test]
fn config_of_another_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap().replace("MistralForCausalLM", "Qwen2ForCausalLM");
    fs::write(dir.join("config.json"), cfg).unwrap();
    fails_with(&["plan", "--model", dir.to_str().unwrap()], &["config.json", "Qwen2ForCausalLM"]);
}

#[test]
fn every_zero() {
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", "every:0"], &["--expand every:0"]);
}

#[test]
fn yaml_with_unknown_merge_method() {
    let tmp = tempfile::tempdir().unwrap();
    let y = tmp.path().join("slerp.yml");
    let text = fs::read_to_string(fixtures().join("mergekit-every4.yml")).unwrap().replace("passthrough", "slerp");
    fs::write(&y, text).unwrap();
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", y.to_str().unwrap()], &["slerp.yml", "merge_method", "slerp"]);
}

#[test]
fn yaml_with_out_of_range_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let y = tmp.path().join("range.yml");
    let text = fs::read_to_string(fixtures().join("mergekit-every4.yml")).unwrap().replace("[4, 8]", "[4, 12]");
    assert!(text.contains("[4, 12]"));
    fs::write(&y, text).unwrap();
    fails_with(&["plan", "--model", &fixture("tiny-mistral-bf16"), "--expand", y.to_str().unwrap()], &["range.yml", "layer_range", "[4, 12]"]);
}

#[test]
fn unknown_hub_id_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let out = command(&["inspect", "--model", "nobody/no-such-model"]).env("HF_HOME", tmp.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("nobody/no-such-model") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The bad-input table: each case prepares a folder, runs one command, and checks the exit code and
// the first line of stderr (`FirstError`: the first `error:` line, for chat, which reports a failed
// REPL command and goes on). Cases that write files also check that the folder holds exactly what
// it held before: no partial output, no staging folder, no temporary file.

/// Which stderr line a case checks.
#[derive(Clone, Copy)]
enum Line {
    First,
    FirstError,
}

struct Case {
    name: &'static str,
    /// Makes the case's files in the temp folder (see the `setup_*` helpers).
    setup: fn(&Path),
    /// `{tmp}` is the case's temp folder, `{fx}` the fixtures folder.
    args: &'static [&'static str],
    stdin: &'static str,
    env: &'static [(&'static str, &'static str)],
    code: i32,
    line: Line,
    needles: &'static [&'static str],
    /// The command writes files: nothing may be left behind.
    writes: bool,
}

const fn case(name: &'static str, setup: fn(&Path), args: &'static [&'static str], code: i32, needles: &'static [&'static str]) -> Case {
    Case { name, setup, args, stdin: "", env: &[], code, line: Line::First, needles, writes: false }
}

const fn writes(c: Case) -> Case {
    Case { writes: true, ..c }
}

fn no_setup(_: &Path) {}

/// tmp/model: a copy of the bf16 tiny model.
fn setup_model(tmp: &Path) {
    copy_model(tmp);
}

fn edit_config(tmp: &Path, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let dir = copy_model(tmp);
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn set_config(tmp: &Path, key: &str, value: serde_json::Value) {
    edit_config(tmp, |o| {
        o.insert(key.to_string(), value.clone());
    });
}

/// tmp/model with `value` at the first element of `tensor`, still bf16.
fn poison(tmp: &Path, tensor: &str, value: f32) {
    let dir = copy_model(tmp);
    rewrite(&dir, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == tensor {
                let mut v = t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v[0] = value;
                *t = candle_core::Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap().to_dtype(t.dtype()).unwrap();
            }
        }
    });
}

fn retype(tmp: &Path, tensor: &str, dtype: candle_core::DType) {
    let dir = copy_model(tmp);
    rewrite(&dir, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == tensor {
                *t = t.to_dtype(dtype).unwrap();
            }
        }
    });
}

fn write_yaml(tmp: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(fixtures().join("mergekit-every4.yml")).unwrap();
    assert!(text.contains(from), "{from}");
    fs::write(tmp.join("e.yml"), text.replacen(from, to, 1)).unwrap();
}

fn synthetic(tmp: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value = serde_json::from_str(include_str!("../../src/presets/openchat-3.5-0106.json")).unwrap();
    v[key] = value;
    fs::write(tmp.join("huge.json"), v.to_string()).unwrap();
}

/// Two logits files: tmp/a.safetensors and tmp/b.safetensors, b with a NaN where a has 0.5.
fn logits_pair(tmp: &Path, b_value: f32, b_ids: &[i64], b_positions: usize) {
    let a = candle_core::Tensor::from_vec(vec![0.5f32, 1.0, 2.0, 3.0], (2, 2), &Device::Cpu).unwrap();
    let mut bv = vec![b_value, 1.0, 2.0, 3.0];
    bv.truncate(2 * b_positions);
    let b = candle_core::Tensor::from_vec(bv, (b_positions, 2), &Device::Cpu).unwrap();
    let ids = |v: &[i64]| candle_core::Tensor::new(v, &Device::Cpu).unwrap();
    write_safetensors(&tmp.join("a.safetensors"), &[("logits", &a), ("input_ids", &ids(&[1, 2]))], None).unwrap();
    write_safetensors(&tmp.join("b.safetensors"), &[("logits", &b), ("input_ids", &ids(b_ids))], None).unwrap();
}

/// A Hugging Face cache in tmp/hf whose snapshot files are symlinks into blobs/, as huggingface_hub lays it out.
fn setup_hub_blobs(tmp: &Path) {
    let repo = tmp.join("hf/hub/models--acme--tiny");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(hash);
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("blobs")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), hash).unwrap();
    for (i, e) in fs::read_dir(fixtures().join("tiny-mistral-bf16")).unwrap().enumerate() {
        let p = e.unwrap().path();
        let blob = repo.join("blobs").join(format!("blob{i}"));
        fs::copy(&p, &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snap.join(p.file_name().unwrap())).unwrap();
    }
}

/// A FIFO (named pipe) at `p`: opening it for reading waits for a writer, forever in these tests.
fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

/// tmp/model with its `file` replaced by a FIFO.
fn fifo_in_model(tmp: &Path, file: &str) {
    let dir = copy_model(tmp);
    fs::remove_file(dir.join(file)).unwrap();
    mkfifo(&dir.join(file));
}

/// A chat template file in tmp/t.jinja.
fn setup_template(tmp: &Path) {
    fs::write(tmp.join("t.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
}

const SNAPSHOT_WEIGHTS: &str = "{tmp}/hf/hub/models--acme--tiny/snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors";

/// tmp/model with 6316 embedding rows, fewer than its tokenizer's 32002 ids (and eos 2, no
/// generation_config.json).
fn shrink_vocab(tmp: &Path) {
    let dir = copy_model(tmp);
    rewrite(&dir, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                *t = t.narrow(0, 0, 6316).unwrap();
            }
        }
    });
    // Its end-of-turn id (32000) is past the new vocabulary too: ids in the configs are refused first.
    for (file, from, to) in
        [("config.json", "\"vocab_size\": 32002", "\"vocab_size\": 6316"), ("config.json", "\"eos_token_id\": 32000", "\"eos_token_id\": 2")]
    {
        let p = dir.join(file);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{file} states {from}");
        fs::write(p, text.replace(from, to)).unwrap();
    }
    fs::remove_file(dir.join("generation_config.json")).unwrap();
}

/// tmp/model with `key` of its generation_config.json set to `value`.
fn set_generation(tmp: &Path, key: &str, value: serde_json::Value) {
    let p = copy_model(tmp).join("generation_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    fs::write(&p, v.to_string()).unwrap();
}

/// (name, tensor) pairs, as `rewrite` edits them.
type Tensors = Vec<(String, candle_core::Tensor)>;

/// tmp/model with the extra tensors `add` makes from the existing ones.
fn add_tensors(tmp: &Path, add: fn(&Tensors) -> Tensors) {
    let dir = copy_model(tmp);
    rewrite(&dir, |ts| {
        let extra = add(ts);
        ts.extend(extra);
    });
}

fn tensor(ts: &Tensors, name: &str) -> candle_core::Tensor {
    ts.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()).unwrap()
}

/// A Mistral checkpoint with a q_proj bias (transformers' Mistral has none: it warns and drops it).
fn add_bias(tmp: &Path) {
    add_tensors(tmp, |ts| vec![("model.layers.0.self_attn.q_proj.bias".into(), tensor(ts, "model.layers.0.input_layernorm.weight"))]);
}

/// A ninth layer in the weights of a model whose config says 8.
fn add_layer(tmp: &Path) {
    add_tensors(tmp, |ts| expanse::expand::LAYER_TENSORS.iter().map(|s| (format!("model.layers.8.{s}"), tensor(ts, &format!("model.layers.7.{s}")))).collect());
}

/// tmp/deep.yml: `slices:` holding `depth` nested flow sequences (160 kB at 80,000).
fn deep_yaml(tmp: &Path, depth: usize) {
    fs::write(tmp.join("deep.yml"), format!("slices: {}{}\nmerge_method: passthrough\n", "[".repeat(depth), "]".repeat(depth))).unwrap();
}

/// A template file `name` in tmp.
fn template(tmp: &Path, name: &str, text: &str) {
    fs::write(tmp.join(name), text).unwrap();
}

/// Loops over 3·10⁷ steps before rendering anything: seconds of work that a template budget stops.
const LOOPING_TEMPLATE: &str = "{% for i in range(100000) %}{% for j in range(300) %}{% endfor %}{% endfor %}{{ bos_token }}hi";
/// A 100 MB string concatenated with itself: more memory than any prompt needs.
const GROWING_TEMPLATE: &str = "{% set a = 'x' * 100000000 %}{% set b = a ~ a ~ a ~ a %}{{ bos_token }}{{ b|length }}";

const SCALE_YAML_FROM: &str = "value: 0.0";

static CASES: &[Case] = &[
    // Closed classes of defect, one or more cases each (the issue's numbering).
    // 2. checks that pass on NaN
    case(
        "compare-logits NaN fails the check",
        |t| logits_pair(t, f32::NAN, &[1, 2], 2),
        &["compare-logits", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--tolerance", "1"],
        1,
        &["FAIL", "NaN"],
    ),
    case(
        "compare-logits --tolerance NaN",
        |t| logits_pair(t, 0.5, &[1, 2], 2),
        &["compare-logits", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--tolerance", "NaN"],
        2,
        &["--tolerance", "NaN"],
    ),
    case(
        "compare-logits --tolerance negative",
        |t| logits_pair(t, 0.5, &[1, 2], 2),
        &["compare-logits", "{tmp}/a.safetensors", "{tmp}/b.safetensors", "--tolerance=-1"],
        2,
        &["--tolerance", "-1"],
    ),
    case(
        "verify --tolerance NaN",
        no_setup,
        &["verify", "--synthetic", "{fx}/tiny-mistral-bf16/config.json", "--tolerance", "NaN"],
        2,
        &["--tolerance", "NaN"],
    ),
    case(
        "compare-logits other input_ids",
        |t| logits_pair(t, 0.5, &[1, 3], 2),
        &["compare-logits", "{tmp}/a.safetensors", "{tmp}/b.safetensors"],
        2,
        &["b.safetensors", "input_ids"],
    ),
    case(
        "compare-logits other shapes",
        |t| logits_pair(t, 0.5, &[1, 2], 1),
        &["compare-logits", "{tmp}/a.safetensors", "{tmp}/b.safetensors"],
        2,
        &["b.safetensors", "[1, 2]", "[2, 2]"],
    ),
    // 3. absurd sizes
    case(
        "huge max_position_embeddings",
        |t| set_config(t, "max_position_embeddings", 1u64.into_huge()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["config.json", "max_position_embeddings", "needs"],
    ),
    case(
        "huge num_hidden_layers",
        |t| set_config(t, "num_hidden_layers", 1u64.into_huge()),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "num_hidden_layers"],
    ),
    case(
        "vocab_size beyond the embedding",
        |t| set_config(t, "vocab_size", 1u64.into_huge()),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["model.embed_tokens.weight", "shape"],
    ),
    case(
        "synthetic huge hidden_size",
        |t| synthetic(t, "hidden_size", 1u64.into_huge()),
        &["bench", "--synthetic", "{tmp}/huge.json", "--device", "cpu"],
        2,
        &["huge.json", "weights", "needs"],
    ),
    case(
        "synthetic huge num_hidden_layers",
        |t| synthetic(t, "num_hidden_layers", 1u64.into_huge()),
        &["plan", "--synthetic", "{tmp}/huge.json"],
        2,
        &["huge.json", "num_hidden_layers", "needs"],
    ),
    case(
        "synthetic huge max_position_embeddings",
        |t| synthetic(t, "max_position_embeddings", 1u64.into_huge()),
        &["verify", "--synthetic", "{tmp}/huge.json", "--device", "cpu"],
        2,
        &["max_position_embeddings", "needs"],
    ),
    case(
        "template rendering hundreds of MB",
        |t| fs::write(t.join("big.jinja"), "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxxxxxxxx' }}{% endfor %}{% endfor %}").unwrap(),
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "{tmp}/big.jinja", "--prompt", "hi"],
        2,
        &["chat template", "rendered prompt", "big.jinja"],
    ),
    case(
        "prompt longer than the context",
        no_setup,
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--ctx", "8", "--prompt", "a prompt that is certainly longer than eight tokens of context"],
        2,
        &["does not fit the context of 8"],
    ),
    // 4. values that make the model meaningless
    case(
        "sliding_window 0",
        |t| set_config(t, "sliding_window", 0.into()),
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/l.safetensors"],
        2,
        &["config.json", "sliding_window"],
    ),
    case(
        "rms_norm_eps 0",
        |t| set_config(t, "rms_norm_eps", 0.into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["config.json", "rms_norm_eps"],
    ),
    case(
        "rms_norm_eps negative",
        |t| set_config(t, "rms_norm_eps", (-1e-5).into()),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "rms_norm_eps"],
    ),
    case(
        "eos_token_id past 2^32 (read as 2 once)",
        |t| set_config(t, "eos_token_id", 4294967298u64.into()),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "eos_token_id", "4294967298"],
    ),
    case(
        "eos_token_id negative (dropped once)",
        |t| set_config(t, "eos_token_id", serde_json::json!([2, -1])),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "eos_token_id", "-1"],
    ),
    case(
        "bos_token_id outside the vocabulary",
        |t| set_config(t, "bos_token_id", 32002.into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["config.json", "bos_token_id", "32002", "vocab_size"],
    ),
    case(
        "generation_config eos_token_id outside the vocabulary",
        |t| set_generation(t, "eos_token_id", serde_json::json!([32000, 99999])),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "eos_token_id", "99999", "vocab_size"],
    ),
    case(
        "rope_theta 0",
        |t| {
            edit_config(t, |o| {
                o.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 0.0}));
            })
        },
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "rope_theta"],
    ),
    case(
        "NaN weight",
        |t| poison(t, "model.layers.3.mlp.up_proj.weight", f32::NAN),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["model.safetensors", "model.layers.3.mlp.up_proj.weight", "NaN"],
    ),
    case(
        "infinite weight",
        |t| poison(t, "model.norm.weight", f32::INFINITY),
        &["verify", "--model", "{tmp}/model", "--ids", "1,2"],
        2,
        &["model.norm.weight", "infinite"],
    ),
    case(
        "NaN scale in a YAML",
        |t| write_yaml(t, SCALE_YAML_FROM, "value: .nan"),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml"],
        2,
        &["e.yml", "value", "NaN"],
    ),
    // 5. integer weights
    case(
        "integer weight loaded",
        |t| retype(t, "model.layers.0.self_attn.q_proj.weight", candle_core::DType::I64),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["model.layers.0.self_attn.q_proj.weight", "I64"],
    ),
    // 6. errors from inside candle
    case(
        "empty chat template",
        |t| fs::write(t.join("empty.jinja"), "").unwrap(),
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "{tmp}/empty.jinja", "--prompt", "hi"],
        2,
        &["chat template", "empty"],
    ),
    case(
        "tokenizer beyond the embedding",
        shrink_vocab,
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["tokenizer", "tokenizer.json", "32001", "6316"],
    ),
    case("internal error exits 3", no_setup, &["inspect", "--model", "{fx}/tiny-mistral-bf16"], 3, &["internal error", "EXPANSE_BACKTRACE"])
        .env(&[("EXPANSE_TEST_FAULT", "candle")]),
    case("panic exits 3 in one line", no_setup, &["inspect", "--model", "{fx}/tiny-mistral-bf16"], 3, &["internal error", "EXPANSE_TEST_FAULT"])
        .env(&[("EXPANSE_TEST_FAULT", "panic")]),
    // 7. misleading messages
    case(
        "missing config says so once",
        |t| {
            let d = copy_model(t);
            fs::remove_file(d.join("config.json")).unwrap();
        },
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json: not found (--model"],
    ),
    case(
        "config.json is a folder",
        |t| {
            let d = copy_model(t);
            fs::remove_file(d.join("config.json")).unwrap();
            fs::create_dir(d.join("config.json")).unwrap();
        },
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "folder"],
    ),
    case(
        "config.json is a symlink loop",
        |t| {
            let d = copy_model(t);
            fs::remove_file(d.join("config.json")).unwrap();
            std::os::unix::fs::symlink(d.join("config.json"), d.join("config.json")).unwrap();
        },
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["config.json", "symbolic links"],
    ),
    case(
        "looping --model path is not a hub id",
        |t| std::os::unix::fs::symlink(t.join("loop"), t.join("loop")).unwrap(),
        &["inspect", "--model", "loop/model"],
        2,
        &["loop/model", "symbolic links"],
    ),
    case(
        "reversed layer_range",
        |t| write_yaml(t, "[4, 8]", "[8, 4]"),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml"],
        2,
        &["e.yml", "layer_range", "reversed"],
    ),
    case(
        "empty layer_range",
        |t| write_yaml(t, "[4, 8]", "[4, 4]"),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml"],
        2,
        &["e.yml", "layer_range", "empty"],
    ),
    // Issue 22, second round (its numbering).
    // 5. templates that would run on or eat memory
    case(
        "template looping without output",
        |t| template(t, "loop.jinja", LOOPING_TEMPLATE),
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "{tmp}/loop.jinja", "--prompt", "hi", "--max-tokens", "1"],
        2,
        &["chat template", "loop.jinja", "steps"],
    ),
    case(
        "template growing a string",
        |t| template(t, "grow.jinja", GROWING_TEMPLATE),
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "{tmp}/grow.jinja", "--prompt", "hi", "--max-tokens", "1"],
        2,
        &["chat template", "grow.jinja", "memory"],
    ),
    // 6. YAML nested or sized beyond any mergekit config
    case(
        "YAML nested 80,000 deep",
        |t| deep_yaml(t, 80_000),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/deep.yml"],
        2,
        &["deep.yml", "nested", "64"],
    ),
    case(
        "YAML block sequences nested 5,000 deep",
        |t| fs::write(t.join("deep.yml"), format!("slices:\n{}x\n", "- ".repeat(5000))).unwrap(),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/deep.yml"],
        2,
        &["deep.yml", "nested", "64"],
    ),
    case(
        "YAML of 2 MB",
        |t| write_yaml(t, "merge_method", &format!("# {}\nmerge_method", "x".repeat(2 << 20))),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml"],
        2,
        &["e.yml", "MiB"],
    ),
    // 7. weights a cast makes infinite
    case(
        "weight beyond f16 in --dtype f16",
        |t| poison(t, "model.layers.2.mlp.down_proj.weight", 99840.0),
        &["generate", "--model", "{tmp}/model", "--dtype", "f16", "--prompt", "hi"],
        2,
        &["model.safetensors", "model.layers.2.mlp.down_proj.weight", "99840", "f16", "bf16"],
    ),
    case(
        "weight beyond f16 in the YAML's dtype",
        |t| {
            poison(t, "model.layers.2.mlp.down_proj.weight", -99840.0);
            write_yaml(t, "dtype: bfloat16", "dtype: float16");
        },
        &["generate", "--model", "{tmp}/model", "--expand", "{tmp}/e.yml", "--dtype", "f32", "--prompt", "hi"],
        2,
        &["model.layers.2.mlp.down_proj.weight", "-99840", "f16", "e.yml"],
    ),
    // 8. accepted values that ended in an internal error
    case(
        "bench --threads 100000",
        no_setup,
        &["bench", "--synthetic", "{fx}/tiny-mistral-bf16/config.json", "--threads", "100000", "-p", "4", "-n", "2", "-r", "1"],
        2,
        &["--threads", "100000"],
    ),
    case(
        "generation_config repetition_penalty 0",
        |t| set_generation(t, "repetition_penalty", 0.into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "repetition_penalty", "0"],
    ),
    // 9. generation_config.json with the flags' checks
    case(
        "generation_config temperature -1",
        |t| set_generation(t, "temperature", (-1).into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "temperature", "-1"],
    ),
    case(
        "generation_config top_p 0",
        |t| set_generation(t, "top_p", 0.into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "top_p"],
    ),
    case(
        "generation_config repetition_penalty -1",
        |t| set_generation(t, "repetition_penalty", (-1).into()),
        &["inspect", "--model", "{tmp}/model"],
        2,
        &["generation_config.json", "repetition_penalty", "-1"],
    ),
    case(
        "generation_config top_k -5",
        |t| set_generation(t, "top_k", (-5).into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "top_k", "-5"],
    ),
    case(
        "generation_config temperature \"hot\"",
        |t| set_generation(t, "temperature", "hot".into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "temperature", "hot"],
    ),
    case(
        "generation_config do_sample \"yes\"",
        |t| set_generation(t, "do_sample", "yes".into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "do_sample"],
    ),
    case(
        "generation_config eos_token_id -1",
        |t| set_generation(t, "eos_token_id", (-1).into()),
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["generation_config.json", "eos_token_id", "-1"],
    ),
    // 10. inputs that change the result, refused rather than ignored
    case(
        "q_proj bias in a Mistral checkpoint",
        add_bias,
        &["generate", "--model", "{tmp}/model", "--prompt", "hi"],
        2,
        &["model.safetensors", "model.layers.0.self_attn.q_proj.bias"],
    ),
    case("more layers than num_hidden_layers", add_layer, &["inspect", "--model", "{tmp}/model"], 2, &["config.json", "num_hidden_layers", "model.layers.8."]),
    case(
        "YAML tokenizer_source",
        |t| write_yaml(t, "merge_method", "tokenizer_source: base\nmerge_method"),
        &["plan", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml"],
        2,
        &["e.yml", "tokenizer_source"],
    ),
    case(
        "--revision with a local folder",
        no_setup,
        &["inspect", "--model", "{fx}/tiny-mistral-bf16", "--revision", "v2"],
        2,
        &["--revision", "v2", "tiny-mistral-bf16"],
    ),
    // #22 (second round), 4: serve's connection limits, checked before anything binds or loads
    case(
        "serve --header-timeout 0",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--header-timeout", "0"],
        2,
        &["--header-timeout", "`0`", "seconds > 0"],
    ),
    case(
        "serve --idle-timeout negative",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--idle-timeout=-1"],
        2,
        &["--idle-timeout", "`-1`", "seconds > 0"],
    ),
    case(
        "serve --shutdown-timeout NaN",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--shutdown-timeout", "NaN"],
        2,
        &["--shutdown-timeout", "`NaN`", "seconds ≥ 0"],
    ),
    case(
        "serve --header-timeout infinite",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--header-timeout", "inf"],
        2,
        &["--header-timeout", "`inf`", "too long"],
    ),
    case(
        "serve --max-connections 0",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--max-connections", "0"],
        2,
        &["--max-connections", "at least 1"],
    ),
    case(
        "serve --max-connections beyond the fd limit",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--max-connections", "100000000"],
        2,
        &["--max-connections", "100000000", "ulimit -n"],
    ),
    // A value starting with '-' is the flag's (its own check names the flag), not an unknown argument.
    case(
        "--temperature -1 (two words)",
        no_setup,
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--prompt", "hi", "--temperature", "-1"],
        2,
        &["--temperature", "-1"],
    ),
    case(
        "--presence-penalty -inf",
        no_setup,
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--prompt", "hi", "--presence-penalty", "-inf"],
        2,
        &["--presence-penalty", "-inf"],
    ),
    case(
        "--device cpu:7 (an ordinal ignored once)",
        no_setup,
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--prompt", "hi", "--device", "cpu:7"],
        2,
        &["--device", "cpu:7", "no ordinal"],
    ),
    case("--seed -1", no_setup, &["generate", "--model", "{fx}/tiny-mistral-bf16", "--prompt", "hi", "--seed", "-1"], 2, &["--seed", "-1"]),
    case(
        "serve --queue beyond any use (its slots are allocated up front)",
        no_setup,
        &["serve", "--model", "{fx}/tiny-mistral-bf16", "--device", "cpu", "--port", "0", "--queue", "18446744073709551615"],
        2,
        &["--queue", "18446744073709551615", "over 4096"],
    ),
    // Writing commands: nothing may be left behind.
    writes(case(
        "expand: NaN weight",
        |t| poison(t, "model.layers.3.mlp.up_proj.weight", f32::NAN),
        &["expand", "--model", "{tmp}/model", "--out", "{tmp}/out"],
        2,
        &["model.layers.3.mlp.up_proj.weight", "NaN"],
    )),
    writes(case(
        "expand: integer weight",
        |t| retype(t, "model.layers.0.self_attn.q_proj.weight", candle_core::DType::U8),
        &["expand", "--model", "{tmp}/model", "--out", "{tmp}/out"],
        2,
        &["model.layers.0.self_attn.q_proj.weight", "U8"],
    )),
    writes(case(
        "expand --force into the source's folder",
        setup_model,
        &["expand", "--model", "{tmp}/model", "--out", "{tmp}/model", "--force"],
        2,
        &["--out", "model is /", "which this run reads"],
    )),
    writes(case(
        "expand --force over a folder holding the source",
        setup_model,
        &["expand", "--model", "{tmp}/model", "--out", "{tmp}", "--force"],
        2,
        &["--out", "holds", "which this run reads"],
    )),
    writes(
        case(
            "expand --force over the hub's blobs",
            setup_hub_blobs,
            &["expand", "--model", "acme/tiny", "--out", "{tmp}/hf/hub/models--acme--tiny/blobs", "--force"],
            2,
            &["--out", "blobs", "holds", "which this run reads"],
        )
        .env(&[("HF_HOME", "{tmp}/hf")]),
    ),
    writes(case(
        "expand --force over the YAML's folder",
        |t| {
            fs::create_dir(t.join("y")).unwrap();
            write_yaml(t, "[4, 8]", "[4, 8]");
            fs::rename(t.join("e.yml"), t.join("y/e.yml")).unwrap();
        },
        &["expand", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/y/e.yml", "--out", "{tmp}/y", "--force"],
        2,
        &["--out", "e.yml"],
    )),
    writes(case(
        "expand: reversed layer_range",
        |t| write_yaml(t, "[4, 8]", "[8, 4]"),
        &["expand", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml", "--out", "{tmp}/out"],
        2,
        &["layer_range", "reversed"],
    )),
    writes(case(
        "expand: rms_norm_eps 0",
        |t| set_config(t, "rms_norm_eps", 0.into()),
        &["expand", "--model", "{tmp}/model", "--out", "{tmp}/out"],
        2,
        &["rms_norm_eps"],
    )),
    writes(case(
        "logits: NaN weight",
        |t| poison(t, "lm_head.weight", f32::NAN),
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/l.safetensors"],
        2,
        &["lm_head.weight", "NaN"],
    )),
    writes(case(
        "logits: integer weight",
        |t| retype(t, "model.norm.weight", candle_core::DType::U32),
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/l.safetensors"],
        2,
        &["model.norm.weight", "U32"],
    )),
    writes(case(
        "logits: --out is a folder",
        |t| fs::create_dir(t.join("dir")).unwrap(),
        &["logits", "--model", "{fx}/tiny-mistral-bf16", "--ids", "1,2", "--out", "{tmp}/dir"],
        2,
        &["--out", "dir", "folder"],
    )),
    writes(case(
        "logits: --ids out of range",
        no_setup,
        &["logits", "--model", "{fx}/tiny-mistral-bf16", "--ids", "1,99999", "--out", "{tmp}/l.safetensors"],
        2,
        &["--ids", "99999"],
    )),
    writes(case(
        "logits: bad --ids",
        no_setup,
        &["logits", "--model", "{fx}/tiny-mistral-bf16", "--ids", "1,,x", "--out", "{tmp}/l.safetensors"],
        2,
        &["--ids", "1,,x"],
    )),
    writes(case(
        "logits: sliding_window 0",
        |t| set_config(t, "sliding_window", 0.into()),
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/l.safetensors"],
        2,
        &["sliding_window"],
    )),
    writes(case(
        "logits: weight beyond f16 in --dtype f16",
        |t| poison(t, "model.layers.2.mlp.down_proj.weight", 99840.0),
        &["logits", "--model", "{tmp}/model", "--dtype", "f16", "--ids", "1,2", "--out", "{tmp}/l.safetensors"],
        2,
        &["model.layers.2.mlp.down_proj.weight", "f16"],
    )),
    writes(case(
        "expand: weight beyond f16 in --dtype f16",
        |t| poison(t, "model.layers.2.mlp.down_proj.weight", 99840.0),
        &["expand", "--model", "{tmp}/model", "--dtype", "f16", "--out", "{tmp}/out"],
        2,
        &["model.safetensors", "model.layers.2.mlp.down_proj.weight", "99840", "f16"],
    )),
    writes(case(
        "expand: --revision with a local folder",
        setup_model,
        &["expand", "--model", "{tmp}/model", "--revision", "main", "--out", "{tmp}/out"],
        2,
        &["--revision"],
    )),
    writes(Case {
        stdin: "/save {tmp}/sub\n",
        line: Line::FirstError,
        ..case("chat /save onto a folder", |t| fs::create_dir(t.join("sub")).unwrap(), &["chat", "--model", "{fx}/tiny-mistral-bf16"], 0, &["error:", "sub"])
    }),
    writes(Case {
        stdin: "/save {tmp}/no/such/dir/c.json\n",
        line: Line::FirstError,
        ..case("chat /save into a missing folder", no_setup, &["chat", "--model", "{fx}/tiny-mistral-bf16"], 0, &["error:", "no/such/dir"])
    }),
    // Issue #22, second round. 13. messages that name the wrong thing (a FIFO called a folder, an empty path as nothing)
    case("model.safetensors is a FIFO", |t| fifo_in_model(t, "model.safetensors"), &["inspect", "--model", "{tmp}/model"], 2, &["model.safetensors", "FIFO"]),
    case("config.json is a FIFO", |t| fifo_in_model(t, "config.json"), &["inspect", "--model", "{tmp}/model"], 2, &["config.json", "FIFO"]),
    case("--model is empty", no_setup, &["inspect", "--model", ""], 2, &["--model", "empty"]),
    case("--against is empty", no_setup, &["verify", "--model", "{fx}/tiny-mistral-bf16", "--against", "", "--ids", "1,2"], 2, &["--against", "empty"]),
    case(
        "--chat-template is empty",
        no_setup,
        &["generate", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "", "--prompt", "hi"],
        2,
        &["--chat-template", "empty"],
    ),
    // 13, output side: the output's path and flag, not a staging name, and before the model loads
    writes(case(
        "logits --out in a missing folder, before the load",
        |t| poison(t, "lm_head.weight", f32::NAN),
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/nope/x.st"],
        2,
        &["--out", "nope/x.st: parent folder", "nope"],
    )),
    writes(Case {
        stdin: "/save {tmp}/nodir/conv.json\n",
        line: Line::FirstError,
        ..case(
            "chat /save names the file, not a temporary",
            no_setup,
            &["chat", "--model", "{fx}/tiny-mistral-bf16"],
            0,
            &["/save", "nodir/conv.json: parent folder"],
        )
    }),
    writes(case(
        "logits --out onto a FIFO",
        |t| mkfifo(&t.join("p")),
        &["logits", "--model", "{fx}/tiny-mistral-bf16", "--ids", "1,2", "--out", "{tmp}/p"],
        2,
        &["--out", "/p", "FIFO"],
    )),
    // Issue #22, second round. 2. an output over (or inside) what the run reads: refused, nothing written
    writes(case(
        "logits --out over the weights",
        setup_model,
        &["logits", "--model", "{tmp}/model", "--ids", "1,2,3", "--out", "{tmp}/model/model.safetensors"],
        2,
        &["--out", "model/model.safetensors", "which this run reads"],
    )),
    writes(case(
        "logits --out over config.json",
        setup_model,
        &["logits", "--model", "{tmp}/model", "--ids", "1,2,3", "--out", "{tmp}/model/config.json"],
        2,
        &["--out", "model/config.json", "which this run reads"],
    )),
    writes(case(
        "logits --out over the --expand YAML",
        |t| write_yaml(t, "[4, 8]", "[4, 8]"),
        &["logits", "--model", "{fx}/tiny-mistral-bf16", "--expand", "{tmp}/e.yml", "--ids", "1,2,3", "--out", "{tmp}/e.yml"],
        2,
        &["--out", "e.yml", "which this run reads"],
    )),
    writes(
        case(
            "logits --out over a hub snapshot's weights",
            setup_hub_blobs,
            &["logits", "--model", "acme/tiny", "--ids", "1,2", "--out", SNAPSHOT_WEIGHTS],
            2,
            &["--out", "model.safetensors", "which this run reads"],
        )
        .env(&[("HF_HOME", "{tmp}/hf")]),
    ),
    writes(case(
        "logits --out into the model's folder",
        setup_model,
        &["logits", "--model", "{tmp}/model", "--ids", "1,2", "--out", "{tmp}/model/l.safetensors"],
        2,
        &["--out", "l.safetensors", "lies inside", "which this run reads"],
    )),
    writes(Case {
        stdin: "/save {tmp}/model/model.safetensors\n",
        line: Line::FirstError,
        ..case(
            "chat /save over the weights",
            setup_model,
            &["chat", "--model", "{tmp}/model"],
            0,
            &["/save", "model/model.safetensors", "which this run reads"],
        )
    }),
    writes(Case {
        stdin: "/save {tmp}/t.jinja\n",
        line: Line::FirstError,
        ..case(
            "chat /save over its --chat-template",
            setup_template,
            &["chat", "--model", "{fx}/tiny-mistral-bf16", "--chat-template", "{tmp}/t.jinja"],
            0,
            &["/save", "t.jinja", "which this run reads"],
        )
    }),
];

/// Makes absurd numbers readable in the table.
trait Huge {
    fn into_huge(self) -> serde_json::Value;
}

impl Huge for u64 {
    fn into_huge(self) -> serde_json::Value {
        (self << 50).into()
    }
}

impl Case {
    const fn env(self, env: &'static [(&'static str, &'static str)]) -> Case {
        Case { env, ..self }
    }
}

/// Every file under `dir`, with its size, as relative paths.
fn tree(dir: &Path) -> Vec<(String, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let meta = fs::symlink_metadata(&p).unwrap();
            out.push((p.strip_prefix(root).unwrap().display().to_string(), if meta.is_file() { meta.len() } else { 0 }));
            if meta.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Runs one case; the failure message, if it fails.
fn run_case(c: &Case) -> Option<String> {
    let tmp = tempfile::tempdir().unwrap();
    (c.setup)(tmp.path());
    let fill = |s: &str| s.replace("{tmp}", &tmp.path().display().to_string()).replace("{fx}", &fixtures().display().to_string());
    let args: Vec<String> = c.args.iter().map(|a| fill(a)).collect();
    let before = tree(tmp.path());
    let mut cmd = command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.env_remove("RUST_BACKTRACE").env_remove("EXPANSE_BACKTRACE").current_dir(tmp.path());
    for (k, v) in c.env {
        cmd.env(k, fill(v));
    }
    let mut child = cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), fill(c.stdin).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let line = match c.line {
        Line::First => err.lines().next(),
        Line::FirstError => err.lines().find(|l| l.starts_with("error:")),
    }
    .unwrap_or("");
    let mut problems = Vec::new();
    if out.status.code() != Some(c.code) {
        problems.push(format!("exit {:?}, expected {}", out.status.code(), c.code));
    }
    if err.contains("panicked") || err.contains("stack backtrace") {
        problems.push("a panic or backtrace".into());
    }
    if c.code >= 2 && (err.lines().count() != 1 || !line.starts_with("error: ")) {
        problems.push("not a single `error:` line".into());
    }
    for n in c.needles {
        if !line.contains(n) {
            problems.push(format!("`{n}` missing"));
        }
    }
    if line.contains("not found: not found") {
        problems.push("repeated cause".into());
    }
    if c.writes && tree(tmp.path()) != before {
        problems.push(format!("files changed: {:?} → {:?}", before.len(), tree(tmp.path())));
    }
    (!problems.is_empty()).then(|| format!("{}: {} — stderr: {err}", c.name, problems.join("; ")))
}

#[test]
fn bad_input_table() {
    assert!(CASES.len() >= 71, "{} cases", CASES.len());
    assert!(CASES.iter().filter(|c| c.writes).count() >= 19);
    let failures: Vec<String> = CASES.iter().filter_map(run_case).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

/// Runs expanse with stdout a pipe whose reader is already gone: the first write meets EPIPE.
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command(args).env_remove("RUST_BACKTRACE").stdout(writer).stderr(std::process::Stdio::piped()).output().unwrap()
}

/// A closed stdout ends the process quietly, the way `cat` ends: by SIGPIPE (or exit 0), never a panic.
fn assert_quiet_epipe(out: &std::process::Output, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    let err = String::from_utf8_lossy(&out.stderr);
    let quiet = out.status.code() == Some(0) || out.status.signal() == Some(libc::SIGPIPE);
    assert!(quiet && err.is_empty(), "{what}: {:?}, stderr: {err}", out.status);
}

#[test]
fn closed_stdout_ends_every_command_quietly() {
    let model = fixture("tiny-mistral-bf16");
    let tmp = tempfile::tempdir().unwrap();
    let l = tmp.path().join("l.safetensors").display().to_string();
    let status = command(&["logits", "--model", &model, "--ids", "1,2,3", "--out", &l]).status().unwrap();
    assert!(status.success());
    let runs: [&[&str]; 6] = [
        &["inspect", "--model", &model],
        &["inspect", "--model", &model, "--json"],
        &["plan", "--model", &model],
        &["compare-logits", &l, &l],
        &["verify", "--model", &model, "--ids", "1,2", "--steps", "1"],
        &["generate", "--model", &model, "--prompt", "hi", "--max-tokens", "3", "--temperature", "0"],
    ];
    for args in runs {
        assert_quiet_epipe(&with_closed_stdout(args), &args.join(" "));
    }
    // expand reports after the checkpoint is complete: the closed pipe must not undo or spoil it.
    let out = tmp.path().join("out");
    let run = with_closed_stdout(&["expand", "--model", &model, "--out", out.to_str().unwrap()]);
    assert_quiet_epipe(&run, "expand");
    for f in ["model.safetensors", "config.json", "tokenizer.json", "README.md"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let stray: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains("expanse-")).collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn backtraces_only_on_request() {
    let model = fixture("tiny-mistral-bf16");
    for fault in ["candle", "panic"] {
        let quiet = command(&["inspect", "--model", &model]).env_remove("RUST_BACKTRACE").env("EXPANSE_TEST_FAULT", fault).output().unwrap();
        let err = String::from_utf8_lossy(&quiet.stderr);
        assert_eq!((quiet.status.code(), err.lines().count()), (Some(3), 1), "{fault}: {err}");
        let asked = command(&["inspect", "--model", &model])
            .env_remove("RUST_BACKTRACE")
            .env("EXPANSE_BACKTRACE", "1")
            .env("EXPANSE_TEST_FAULT", fault)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&asked.stderr);
        assert_eq!(asked.status.code(), Some(3), "{err}");
        assert!(err.lines().count() > 3 && err.lines().next().unwrap().starts_with("error: internal error"), "{fault}: {err}");
    }
}

/// A FIFO listed as a shard by the index is refused at once, not opened: opening a FIFO waits for a
/// writer, so the command would hang.
#[test]
fn a_fifo_shard_is_refused_not_waited_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    fs::remove_file(dir.join("model.safetensors")).unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "w.safetensors"}}"#;
    fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    mkfifo(&dir.join("w.safetensors"));
    let mut child =
        command(&["inspect", "--model", dir.to_str().unwrap()]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(30) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("inspect still waiting on the FIFO after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.lines().count() == 1 && err.contains("w.safetensors") && err.contains("FIFO"), "{err}");
}

/// A tensor in two shards is refused naming it and both files: which copy is the model's cannot be
/// told (a map of names kept the last shard's, and ran it silently).
#[test]
fn a_tensor_in_two_shards_is_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_model(tmp.path());
    let whole = dir.join("model.safetensors");
    let ck = Checkpoint::open(std::slice::from_ref(&whole)).unwrap();
    let norm = ck.load("model.norm.weight", &ck.entry("model.norm.weight").unwrap().shape.clone(), &Device::Cpu).unwrap();
    drop(ck);
    let again = (norm + 4.0).unwrap();
    write_safetensors(&dir.join("b.safetensors"), &[("model.norm.weight", &again)], None).unwrap();
    fs::rename(&whole, dir.join("a.safetensors")).unwrap();
    let index = r#"{"metadata": {}, "weight_map": {"model.embed_tokens.weight": "a.safetensors", "model.norm.weight": "b.safetensors"}}"#;
    fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    fails_with(&["inspect", "--model", dir.to_str().unwrap()], &["model.norm.weight", "a.safetensors", "b.safetensors", "one shard only"]);
}

/// `generate --json`'s generated ids with `extra` flags; panics with stderr unless it exits 0.
fn generated_ids(extra: &[&str]) -> Vec<u64> {
    let model = fixture("tiny-mistral-bf16");
    let mut args = vec!["generate", "--model", &model, "--prompt", "Hello there", "--max-tokens", "4", "--json"];
    args.extend(extra);
    let out = command(&args).env_remove("RUST_BACKTRACE").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{extra:?}: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Values every check accepts answer, never end in an internal error: a temperature or a repeat
/// penalty so small that a logit divided by it overflows f32 (issue 22, 8). A temperature of 1e-40
/// is sampling in the limit where it is greedy: the same tokens.
#[test]
fn tiny_positive_sampling_values_answer() {
    let greedy = generated_ids(&["--temperature", "0"]);
    assert_eq!(greedy.len(), 4);
    assert_eq!(generated_ids(&["--temperature", "1e-40", "--seed", "3"]), greedy);
    assert_eq!(generated_ids(&["--temperature", "1e-300", "--top-k", "5", "--top-p", "0.5"]), greedy);
    // A penalty that small makes a repeated token with a positive logit win outright (the answer may
    // then end early, at a repeated end-of-turn).
    for temperature in ["0.8", "0"] {
        let ids = generated_ids(&["--repeat-penalty", "1e-40", "--temperature", temperature]);
        assert!(!ids.is_empty() && ids.len() <= 4, "{ids:?}");
    }
}

/// `/set temperature 1e-300` in a chat: the next answers come (exit 0), and a rejected `/set`
/// leaves the settings and the conversation as they were.
#[test]
fn chat_set_with_tiny_values_keeps_the_conversation() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved.json");
    let model = fixture("tiny-mistral-bf16");
    let mut child = command(&["chat", "--model", &model, "--temperature", "0", "--max-tokens", "3"])
        .env_remove("RUST_BACKTRACE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("Hello\n/set temperature 1e-300\nAgain\n/set repeat_penalty 1e-40\n/set top_p 0\nOnce more\n/save {}\n", saved.display());
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("internal error"), "{stderr}");
    assert!(stderr.contains("error: top_p must be in (0, 1], got 0"), "{stderr}");
    let conv = expanse::conversation::read_conversation(&saved).unwrap();
    assert_eq!(conv.len(), 6, "three turns kept: {conv:?}");
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(v["sampling"]["temperature"], 1e-300);
    assert_eq!(v["sampling"]["top_p"], 0.95, "the refused /set changed nothing");
}

/// Every command that runs the model takes `--threads` (`-t`): checked before any work (0 is a usage
/// error naming the flag), and in effect (verify's report names the CPU's thread count).
#[test]
fn every_model_command_takes_threads() {
    let model = fixture("tiny-mistral-f32");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("l.safetensors").display().to_string();
    let commands: [&[&str]; 6] = [
        &["chat", "--model", &model],
        &["generate", "--model", &model, "--prompt", "Hi"],
        &["logits", "--model", &model, "--ids", "1,2", "--out", &out_file],
        &["verify", "--model", &model],
        &["bench", "--model", &model],
        &["serve", "--model", &model, "--port", "0"],
    ];
    for args in commands {
        let out = expanse(&[args, &["--device", "cpu", "-t", "0"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{} -t 0: {err}", args[0]);
        assert!(err.contains("--threads") && err.lines().count() == 1, "{} -t 0: {err}", args[0]);
    }
    let out = expanse(&["verify", "--model", &model, "--device", "cpu", "--threads", "1", "--steps", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.to_string().contains("cpu (1 threads)"), "verify --threads 1 ran on one thread: {v}");
}

/// `--frequency-penalty`/`--presence-penalty`: checked (a usage error naming the flag out of
/// [-2, 2]), negative values accepted, and in effect on a greedy answer that repeats itself.
#[test]
fn frequency_and_presence_penalties_from_the_command_line() {
    let model = fixture("tiny-mistral-f32");
    let base = ["generate", "--model", model.as_str(), "--device", "cpu", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "24", "--json"];
    let ids = |extra: &[&str]| -> Vec<u64> {
        let out = expanse(&[&base[..], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    let plain = ids(&[]);
    let distinct = |v: &[u64]| v.iter().collect::<std::collections::HashSet<_>>().len();
    assert_eq!(distinct(&plain), plain.len(), "the tiny model's greedy answer repeats nothing: {plain:?}");
    // Negative penalties favour what the window (prompt and answer) already holds: the answer changes
    // and starts repeating itself.
    let favoured = ids(&["--frequency-penalty", "-2", "--presence-penalty", "-2"]);
    assert_ne!(favoured, plain, "negative penalties change the greedy answer");
    assert!(distinct(&favoured) < favoured.len(), "negative penalties make it repeat: {favoured:?}");
    for flag in ["--frequency-penalty", "--presence-penalty"] {
        let out = expanse(&[&base[..], &[flag, "2.5"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} 2.5: {err}");
        assert!(err.contains(flag) && err.contains("[-2, 2]"), "{err}");
    }
}

/// An output over a file of the user's that the command did not write is refused, the file kept
/// byte for byte: `logits --out` replaces a logits file (a rerun) or, with `--force`, anything;
/// chat's `/save` replaces an earlier save only.
#[test]
fn outputs_replace_only_their_own_kind_of_file() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let precious = tmp.path().join("notes.txt");
    fs::write(&precious, "the user's own words\n").unwrap();
    let model = fixture("tiny-mistral-bf16");
    let logits = |out: &Path, extra: &[&str]| {
        let mut args = vec!["logits", "--model", &model, "--ids", "1,2,3", "--out", out.to_str().unwrap()];
        args.extend(extra);
        expanse(&args)
    };
    let run = logits(&precious, &[]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.code() == Some(2) && err.contains("--out") && err.contains("notes.txt") && err.contains("--force") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert_eq!(fs::read_to_string(&precious).unwrap(), "the user's own words\n");
    let out = tmp.path().join("l.safetensors");
    for _ in 0..2 {
        let run = logits(&out, &[]);
        assert!(run.status.success(), "a rerun replaces its own logits: {}", String::from_utf8_lossy(&run.stderr));
    }
    let forced = tmp.path().join("forced.txt");
    fs::write(&forced, "old").unwrap();
    assert!(logits(&forced, &["--force"]).status.success());
    assert!(Checkpoint::open(std::slice::from_ref(&forced)).unwrap().names() == ["input_ids", "logits"]);
    // chat: /save over the notes is refused (the chat goes on), over its own earlier save it replaces.
    let saved = tmp.path().join("conv.json");
    let mut child = command(&["chat", "--model", &model, "--temperature", "0", "--max-tokens", "2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("Hello\n/save {}\n/save {}\n/save {}\n", precious.display(), saved.display(), saved.display());
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(err.contains("/save") && err.contains("notes.txt") && err.contains("not a conversation"), "{err}");
    assert_eq!(fs::read_to_string(&precious).unwrap(), "the user's own words\n");
    assert_eq!(expanse::conversation::read_conversation(&saved).unwrap().len(), 2);
}
