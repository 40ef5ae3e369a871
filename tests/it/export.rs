//! `expand --out`: the written checkpoint against mergekit 0.1.5's real output, byte for byte; round
//! trips through the loader; sharding; and the refusals that must leave no partial folder behind.

use std::path::Path;
use std::process::Output;

use expanse::cmd::expand::{export, ExportOptions, ExportReport};
use expanse::engine::{self, ids_tensor, LoadOptions};
use expanse::expand::Plan;
use expanse::loader::{resolve, Checkpoint};
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    let p = p.as_ref();
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn run_export(model: &str, expand: &str, out: &Path, tweak: impl FnOnce(&mut ExportOptions)) -> ExportReport {
    let mut opts = ExportOptions::new(fixture(model), expand, out);
    tweak(&mut opts);
    export(&opts).unwrap_or_else(|e| panic!("export {model} {expand}: {e}"))
}

fn logits(model: &Model, ids: &[u32]) -> candle_core::Tensor {
    let mut cache = Cache::new(model, ids.len()).unwrap();
    model.forward(&ids_tensor(ids, &model.device).unwrap(), &mut cache, Logits::All).unwrap()
}

/// No staging or moved-aside folder may survive an export, successful or not.
fn assert_no_leftovers(parent: &Path) {
    let stray: Vec<String> = names_in(parent).into_iter().filter(|n| n.contains(".expanse-")).collect();
    assert!(stray.is_empty(), "left behind in {}: {stray:?}", parent.display());
}

#[test]
fn yaml_exports_are_byte_identical_to_mergekit() {
    for (yaml, merged) in [("mergekit-every4.yml", "tiny-mergekit-every4-bf16"), ("mergekit-scaled.yml", "tiny-mergekit-scaled-bf16")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let report = run_export("tiny-mistral-bf16", &fixture(yaml), &out, |_| {});
        let theirs = fixtures().join(merged);
        assert_eq!(names_in(&out), names_in(&theirs), "{yaml}: file set");
        assert_eq!(report.files, names_in(&out));
        // README.md is the only file allowed to differ (it says expanse wrote it).
        for f in names_in(&theirs).iter().filter(|f| *f != "README.md") {
            assert!(read(out.join(f)) == read(theirs.join(f)), "{yaml}: {f} differs from mergekit's");
        }
        // The card carries the YAML verbatim, as mergekit's does.
        let card = String::from_utf8(read(out.join("README.md"))).unwrap();
        assert!(card.contains(&String::from_utf8(read(fixtures().join(yaml))).unwrap()));
        assert_eq!(report.shards.len(), 1);
        assert_eq!(report.layers, 10);
        assert_no_leftovers(tmp.path());
    }
}

#[test]
fn every_4_export_matches_mergekit_and_records_an_equivalent_yaml() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("every4");
    let report = run_export("tiny-mistral-bf16", "every:4", &out, |_| {});
    assert_eq!(report.inserted, vec![4, 9]);
    let theirs = fixtures().join("tiny-mergekit-every4-bf16");
    for f in ["model.safetensors", "config.json", "generation_config.json"] {
        assert!(read(out.join(f)) == read(theirs.join(f)), "every:4: {f} differs from mergekit's");
    }
    // The generated YAML plans exactly every:4, and exporting from it writes the same weights.
    let yml = out.join("mergekit_config.yml");
    let model = fixture("tiny-mistral-bf16");
    let replanned = Plan::from_mergekit_file(&yml, 8, &model).unwrap();
    assert_eq!(replanned.layers, Plan::every(4, 8).unwrap().layers);
    assert!(replanned.warnings.is_empty(), "{:?}", replanned.warnings);
    let again = tmp.path().join("again");
    run_export("tiny-mistral-bf16", yml.to_str().unwrap(), &again, |_| {});
    assert!(read(again.join("model.safetensors")) == read(out.join("model.safetensors")));
    assert!(read(again.join("mergekit_config.yml")) == read(&yml), "a YAML plan is recorded verbatim");
}

#[test]
fn exported_checkpoint_runs_bit_identically_to_the_in_memory_expansion() {
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    for spec in ["every:4".to_string(), fixture("mergekit-scaled.yml")] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m");
        run_export("tiny-mistral-bf16", &spec, &out, |_| {});
        let ours = load("tiny-mistral-bf16", &spec, "bf16");
        let reloaded = engine::load(&LoadOptions::new(out.display().to_string()).expand("none").dtype("bf16")).unwrap();
        assert_eq!(reloaded.model.blocks.len(), 10);
        assert!(bit_identical(&logits(&ours.model, &ids), &logits(&reloaded.model, &ids)), "{spec}");
    }
}

#[test]
fn small_shard_size_writes_mergekit_shards_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    run_export("tiny-mistral-bf16", "every:4", &single, |_| {});
    let limit = 1_000_000u64;
    let report = run_export("tiny-mistral-bf16", "every:4", &sharded, |o| o.shard_size = limit);
    let n = report.shards.len();
    assert_eq!(n, 3);
    for (i, s) in report.shards.iter().enumerate() {
        assert_eq!(s.file, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        // Only a tensor larger than the limit (embed, lm_head: 2 MB) may make a shard exceed it.
        assert!(s.tensor_bytes <= limit || s.tensors == 1, "{s:?}");
    }
    assert!(!sharded.join("model.safetensors").exists());
    // mergekit's own index for `--out-shard-size 1M` on this plan (mergekit-yaml tests/fixtures/
    // mergekit-every4.yml OUT --out-shard-size 1M): same shard boundaries, same order, same bytes.
    let index_bytes = read(sharded.join("model.safetensors.index.json"));
    assert!(index_bytes == read(fixtures().join("mergekit-every4-shard1M.index.json")), "{}", String::from_utf8_lossy(&index_bytes));
    let index: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    assert_eq!(index["metadata"]["total_size"], report.tensor_bytes);
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 93);
    let a = Checkpoint::open(&resolve(single.to_str().unwrap(), None).unwrap().weights).unwrap();
    let files = resolve(sharded.to_str().unwrap(), None).unwrap();
    assert_eq!(files.weights.len(), n);
    let b = Checkpoint::open(&files.weights).unwrap();
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        assert!(a.bytes(name).unwrap() == b.bytes(name).unwrap(), "{name}");
        assert!(map.contains_key(name), "{name} missing from the index");
    }
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    let one = engine::load(&LoadOptions::new(single.display().to_string()).expand("none").dtype("bf16")).unwrap();
    let many = engine::load(&LoadOptions::new(sharded.display().to_string()).expand("none").dtype("bf16")).unwrap();
    assert!(bit_identical(&logits(&one.model, &ids), &logits(&many.model, &ids)));
}

#[test]
fn dtype_override_converts_a_sharded_f32_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let report = run_export("tiny-mistral-f32", "every:4", &out, |o| o.dtype = "bf16".into());
    assert_eq!(report.dtype, "bfloat16");
    let cfg: serde_json::Value = serde_json::from_slice(&read(out.join("config.json"))).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 10);
    assert_eq!(cfg["dtype"], "bfloat16");
    let yaml = String::from_utf8(read(out.join("mergekit_config.yml"))).unwrap();
    assert!(yaml.ends_with("dtype: bfloat16\n"), "{yaml}");
    let ck = Checkpoint::open(&resolve(out.to_str().unwrap(), None).unwrap().weights).unwrap();
    assert!(ck.names().iter().all(|n| ck.entry(n).unwrap().dtype == candle_core::DType::BF16));
    // Same bits as expanding in memory in bf16.
    let (ids, _) = reference("ref-mistral-bf16.safetensors");
    let ours = load("tiny-mistral-f32", "every:4", "bf16");
    let reloaded = engine::load(&LoadOptions::new(out.display().to_string()).expand("none").dtype("bf16")).unwrap();
    assert!(bit_identical(&logits(&ours.model, &ids), &logits(&reloaded.model, &ids)));
    // Its inserted blocks are exactly zero, as the loader's check sees.
    assert_eq!(reloaded.model.transparent_layers(), vec![4, 9]);
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = command(args);
    c.env_remove("EXPANSE_FAKE_FREE_BYTES");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn expand_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = ["expand", "--model", &fixture("tiny-mistral-bf16"), "--out", out].iter().map(|s| s.to_string()).collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cli_expand(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let args = expand_args(out.to_str().unwrap(), extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    cli(&refs, env)
}

#[test]
fn cli_writes_and_reports_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let o = cli_expand(&out, &["--expand", "every:4", "--shard-size", "3MB", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["layers"], 10);
    assert_eq!(report["shards"].as_array().unwrap().len(), 2);
    assert!(out.join("model-00002-of-00002.safetensors").is_file());
    // Progress goes to stderr only on a terminal: nothing here.
    assert!(!stderr(&o).contains("writing"), "{}", stderr(&o));
}

#[test]
fn non_empty_out_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("busy");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = cli_expand(&out, &[], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("--out") && err.contains("not empty") && err.contains("--force"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(names_in(&out), vec!["keep.txt"]);

    let o = cli_expand(&out, &["--expand", "every:4", "--force"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!out.join("keep.txt").exists());
    assert!(read(out.join("model.safetensors")) == read(fixtures().join("tiny-mergekit-every4-bf16/model.safetensors")));
    assert_no_leftovers(tmp.path());

    // An empty folder is fine without --force.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = cli_expand(&empty, &[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn unwritable_parent_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A parent that is a file: refused even for root, which ignores permission bits.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let o = cli_expand(&file.join("out"), &[], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--out") && stderr(&o).contains("parent folder"), "{}", stderr(&o));

    // A read-only parent (only meaningful when not running as root).
    #[cfg(unix)]
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let o = cli_expand(&ro.join("out"), &[], &[]);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(ro.to_str().unwrap()), "{}", stderr(&o));
        assert!(names_in(&ro).is_empty());
    }
}

#[test]
fn not_enough_disk_is_refused_with_the_amount_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("big");
    let o = cli_expand(&out, &[], &[("EXPANSE_FAKE_FREE_BYTES", "1000000")]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("not enough free disk space") && err.contains("needs ") && err.contains("1.0 MB free"), "{err}");
    assert!(!out.exists());
    assert_no_leftovers(tmp.path());
    // Enough (fake) space: it goes through.
    let o = cli_expand(&out, &[], &[("EXPANSE_FAKE_FREE_BYTES", "100000000")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bad_plans_and_flags_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for (extra, needle) in
        [(vec!["--expand", "every:0"], "--expand every:0"), (vec!["--dtype", "int8"], "--dtype"), (vec!["--shard-size", "0"], "--shard-size")]
    {
        let o = cli_expand(&out, &extra, &[]);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{extra:?}: {}", stderr(&o));
        assert!(!out.exists(), "{extra:?}");
        assert_no_leftovers(tmp.path());
    }
    // Writing over the source checkpoint itself is refused, --force or not.
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-mistral-bf16").join(f), src.join(f)).unwrap();
    }
    let args = ["expand", "--model", src.to_str().unwrap(), "--out", src.to_str().unwrap(), "--force"];
    let o = cli(&args, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("which this run reads"), "{}", stderr(&o));
    assert_eq!(names_in(&src), vec!["config.json", "model.safetensors"]);
}

#[test]
fn verify_against_the_export_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("every4");
    let o = cli_expand(&out, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model = fixture("tiny-mistral-bf16");
    let v = cli(&["verify", "--model", &model, "--against", out.to_str().unwrap(), "--steps", "2", "--json"], &[]);
    assert_eq!(v.status.code(), Some(0), "{}", stderr(&v));
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(report["verdict"]["pass"], true, "{report}");
}

/// Runs expanse under `umask 027`: every file it creates must be 0640, as any file the user makes.
#[test]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let l = tmp.path().join("l.safetensors");
    let model = fixture("tiny-mistral-bf16");
    for args in [
        vec!["expand", "--model", &model, "--out", out.to_str().unwrap(), "--shard-size", "1MB"],
        vec!["logits", "--model", &model, "--ids", "1,2", "--out", l.to_str().unwrap()],
    ] {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("umask 027 && exec \"$0\" \"$@\"")
            .arg(bin())
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
    files.push(l);
    assert!(files.len() > 5);
    for f in files {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}: mode {mode:o}", f.display());
    }
}

/// A killed run leaves its staging folder (`.NAME.expanse-staging-PID`, formerly `.NAME.expanse-tmp-PID`);
/// the next run removes those whose process is gone and keeps those of live processes.
#[test]
fn stale_staging_folders_of_dead_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let live = std::process::id();
    let stale = [format!(".out.expanse-staging-{dead}"), format!(".other.expanse-tmp-{dead}")];
    let kept = format!(".out.expanse-staging-{live}");
    for d in stale.iter().chain([&kept]) {
        std::fs::create_dir(tmp.path().join(d)).unwrap();
        std::fs::write(tmp.path().join(d).join(".tmpXYZ"), b"partial").unwrap();
    }
    let out = tmp.path().join("out");
    let run = expanse(&["expand", "--model", &fixture("tiny-mistral-bf16"), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut left = names_in(tmp.path());
    left.sort();
    assert_eq!(left, vec![kept, "out".to_string()]);
}

/// The test hook that stops a publishing run at a chosen point (see `staging::PUBLISH_HOOK_ENV`).
const PUBLISH_HOOK: &str = "EXPANSE_TEST_PUBLISH";

/// Names under `dir` that expanse stages or sets aside (`.NAME.expanse-…`).
fn staged_in(dir: &Path) -> Vec<String> {
    names_in(dir).into_iter().filter(|n| n.contains(".expanse-")).collect()
}

/// Output names up to the file system's limit (255 bytes) are written: the staging names made from
/// them must fit that limit too, whatever the output's name.
#[test]
fn outputs_with_the_longest_legal_names_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-mistral-bf16");
    let long = |ext: &str| tmp.path().join(format!("{}{ext}", "n".repeat(255 - ext.len())));
    let l = long(".safetensors");
    let o = cli(&["logits", "--model", &model, "--ids", "1,2", "--out", l.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(0), "logits: {}", stderr(&o));
    assert!(l.is_file());
    let out = long("");
    let o = cli_expand(&out, &[], &[]);
    assert_eq!(o.status.code(), Some(0), "expand: {}", stderr(&o));
    assert!(out.join("model.safetensors").is_file());
    let conv = long(".json");
    let mut chat = command(&["chat", "--model", &model])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut chat.stdin.take().unwrap(), format!("/save {}\n", conv.display()).as_bytes()).unwrap();
    let o = chat.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("error"), "chat /save: {}", stderr(&o));
    assert!(conv.is_file(), "chat /save: {}", stderr(&o));
    assert_eq!(staged_in(tmp.path()), Vec::<String>::new());
}

/// Two runs publishing into one new --out: exactly one wins, the other exits 2 naming --out, and
/// neither replaces the other's output. The hook holds both before publishing until both have
/// passed their checks (both staging folders exist), so they really race.
#[test]
fn racing_publishers_into_one_new_out_leave_one_winner() {
    let model = fixture("tiny-mistral-bf16");
    for kind in ["expand", "logits"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let go = tmp.path().join("go");
        let hook = format!("hold:{}", go.display());
        let o = out.to_str().unwrap();
        let args: Vec<&str> = match kind {
            "expand" => vec!["expand", "--model", &model, "--out", o],
            _ => vec!["logits", "--model", &model, "--ids", "1,2", "--out", o],
        };
        let spawn = || {
            let mut c = command(&args);
            c.env(PUBLISH_HOOK, &hook).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        };
        let mut runs = [spawn(), spawn()];
        let started = std::time::Instant::now();
        while staged_in(tmp.path()).len() < 2
            && !runs.iter_mut().all(|r| r.try_wait().unwrap().is_some())
            && started.elapsed() < std::time::Duration::from_secs(60)
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::write(&go, "").unwrap();
        let [a, b] = runs.map(|r| r.wait_with_output().unwrap());
        let codes = [a.status.code(), b.status.code()];
        let (winner, loser) = if codes[0] == Some(0) { (&a, &b) } else { (&b, &a) };
        assert_eq!((winner.status.code(), loser.status.code()), (Some(0), Some(2)), "{kind}: exit codes {codes:?}; stderr: {} | {}", stderr(&a), stderr(&b));
        let err = stderr(loser);
        assert!(err.contains("--out") && err.contains(o) && err.lines().count() == 1, "{kind}: {err}");
        assert_eq!(staged_in(tmp.path()), Vec::<String>::new(), "{kind}");
        if kind == "expand" {
            assert!(read(out.join("model.safetensors")) == read(fixtures().join("tiny-mergekit-every4-bf16/model.safetensors")));
        } else {
            assert!(out.is_file());
        }
    }
}

/// `expand --force` killed between moving the old checkpoint aside and publishing its replacement:
/// the next run that writes into that folder puts the old checkpoint back; nothing is deleted.
#[test]
fn a_replacement_killed_between_its_renames_is_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = cli_expand(&out, &["--force"], &[(PUBLISH_HOOK, "kill")]);
    assert!(!o.status.success(), "the hook should have killed it: {:?} {}", o.status, stderr(&o));
    assert!(!out.exists(), "killed after moving the old checkpoint aside");
    assert_eq!(staged_in(tmp.path()).len(), 1);
    let o = cli_expand(&tmp.path().join("other"), &[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("restored") && stderr(&o).contains(out.to_str().unwrap()), "{}", stderr(&o));
    assert_eq!(names_in(&out), vec!["keep.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(staged_in(tmp.path()), Vec::<String>::new());
}

/// What an earlier expanse left when killed between its two renames: `.out.expanse-old-PID` (the old
/// checkpoint) beside `.out.expanse-tmp-PID` (the complete new one), and no `out`. The next export
/// into that folder puts the old checkpoint back instead of deleting both.
#[test]
fn leftovers_of_an_interrupted_replacement_are_restored_not_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let old = tmp.path().join(format!(".out.expanse-old-{dead}"));
    let new = tmp.path().join(format!(".out.expanse-tmp-{dead}"));
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("keep.txt"), "mine").unwrap();
    std::fs::create_dir(&new).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-mergekit-every4-bf16").join(f), new.join(f)).unwrap();
    }
    let o = cli_expand(&tmp.path().join("other"), &[], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = tmp.path().join("out");
    assert!(out.is_dir(), "the old checkpoint is gone: {:?}; stderr: {}", names_in(tmp.path()), stderr(&o));
    assert_eq!(names_in(&out), vec!["keep.txt"]);
    assert_eq!(staged_in(tmp.path()), Vec::<String>::new());
}
