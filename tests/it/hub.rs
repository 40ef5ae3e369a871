//! Hub ids resolve through the standard Hugging Face cache layout (HF_HOME honoured, offline).

use std::fs;

use crate::common::*;

/// Lays out `HF_HOME/hub/models--{org}--{name}/{refs/main, snapshots/<hash>/…}` like huggingface_hub.
fn fake_cache(home: &std::path::Path, id: &str, model: &str) {
    let repo = home.join("hub").join(format!("models--{}", id.replace('/', "--")));
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(hash);
    fs::create_dir_all(&snap).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), hash).unwrap();
    for e in fs::read_dir(fixtures().join(model)).unwrap() {
        let p = e.unwrap().path();
        fs::copy(&p, snap.join(p.file_name().unwrap())).unwrap();
    }
}

#[test]
fn hub_id_resolves_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path(), "acme/tiny-mistral", "tiny-mistral-f32");
    let out = command(&["inspect", "--model", "acme/tiny-mistral", "--json"]).env("HF_HOME", tmp.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "acme/tiny-mistral");
    assert_eq!(v["layers"], 8);
    assert_eq!(v["architecture"], "MistralForCausalLM");
}

#[test]
fn uncached_id_with_unreachable_hub_names_the_id() {
    let tmp = tempfile::tempdir().unwrap();
    let out = command(&["inspect", "--model", "acme/not-cached"])
        .env("HF_HOME", tmp.path())
        .env_remove("HF_HUB_OFFLINE")
        // Port 9 (discard) on loopback refuses at once: the download path runs and fails fast.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("acme/not-cached") && err.contains("cannot be reached"), "{err}");
}
