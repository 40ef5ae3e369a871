//! Chat and generate: the template against OpenChat's published ids and transformers' rendering,
//! greedy generation against transformers, KV-cache reuse across turns, the CLI's bad-input handling,
//! and the REPL driven in a real pseudo-terminal.

use std::sync::atomic::AtomicBool;

use expanse::conversation::{Prompter, Session};
use expanse::generation::{generate, Generator};
use expanse::sampling::{Sampler, SamplingParams};
use expanse::template::{ChatTemplate, Message};
use expanse::tokenizer::Tokenizer;
use serde_json::Value;

use crate::common::*;

/// OpenChat's README: `GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:` with its BOS.
const OPENCHAT_HELLO: [u32; 17] = [1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198, 3123, 21631, 28747];

fn greedy_ref() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("ref-greedy-f32.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn prompter(spec: Option<&str>, stops: &[String]) -> Prompter {
    let dir = fixtures().join("openchat-tokenizer");
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::resolve(spec, Some(&dir), Some(&dir.join("tokenizer_config.json"))).unwrap();
    Prompter::new(tok, template, &[], stops)
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..SamplingParams::default() }
}

#[test]
fn checkpoint_and_builtin_templates_give_openchat_published_ids() {
    for spec in [None, Some("openchat")] {
        let p = prompter(spec, &[]);
        let (text, got) = p.encode(&[Message::user("Hello")]).unwrap();
        assert_eq!(text, "<s>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:", "{spec:?}");
        assert_eq!(got, OPENCHAT_HELLO, "{spec:?}");
        assert_eq!(got.iter().filter(|&&i| i == 1).count(), 1, "exactly one BOS");
    }
    // The stop set: the tokenizer's eos `<|end_of_turn|>` doubles as the template's turn terminator.
    assert_eq!(prompter(None, &[]).stop_ids, vec![32000]);
}

#[test]
fn multi_turn_matches_transformers_apply_chat_template() {
    let r = &greedy_ref()["multi_turn"];
    let p = prompter(None, &[]);
    let (text, got) = p.encode(&messages(&r["messages"])).unwrap();
    assert_eq!(text, r["rendered_prompt"].as_str().unwrap());
    assert_eq!(got, ids(&r["prompt_ids"]));
    assert_eq!(got.iter().filter(|&&i| i == 1).count(), 1);
}

#[test]
fn system_message_unicode_and_emoji() {
    let p = prompter(None, &[]);
    let msgs = [Message::system("Réponds en français 🇫🇷."), Message::user("Ça va? 你好 👋🏽")];
    let (text, got) = p.encode(&msgs).unwrap();
    assert_eq!(text, "<s>GPT4 Correct System: Réponds en français 🇫🇷.<|end_of_turn|>GPT4 Correct User: Ça va? 你好 👋🏽<|end_of_turn|>GPT4 Correct Assistant:");
    assert_eq!(got[0], 1);
    assert_eq!(got.iter().filter(|&&i| i == 1).count(), 1);
    assert_eq!(got.iter().filter(|&&i| i == 32000).count(), 2);
    // The ids carry the text exactly, emoji included (they go through byte-fallback tokens); the
    // legacy Llama tokenizer starts each piece after a special token with a word boundary, which
    // decodes as a space there.
    assert_eq!(p.tokenizer.decode(&got, false).unwrap().replace("> ", ">"), text);
    // The user turn tokenizes as in the published example: same ids after the system part.
    let (_, plain) = p.encode(&[Message::user("Hello")]).unwrap();
    let (_, with_sys) = p.encode(&[Message::system("S"), Message::user("Hello")]).unwrap();
    assert_eq!(with_sys[with_sys.len() - 16..], plain[1..]);
}

#[test]
fn raw_template_and_stop_strings() {
    let p = prompter(Some("none"), &["<|end_of_turn|>".into(), "User:".into()]);
    let (text, got) = p.encode(&[Message::user("Hello")]).unwrap();
    assert_eq!(text, "Hello", "no BOS written into a raw prompt's text");
    assert_eq!(got, vec![1, 22557], "the tokenizer's post-processor adds BOS, as transformers does");
    assert_eq!(p.stop_ids, vec![32000], "a special token's text becomes its id");
    assert_eq!(p.stop_strings, vec!["User:".to_string()]);
}

#[test]
fn template_that_raises_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.jinja");
    std::fs::write(&f, "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ bos_token }}x").unwrap();
    let tdir = fixtures().join("openchat-tokenizer");
    let t = ChatTemplate::resolve(Some(f.to_str().unwrap()), None, Some(&tdir.join("tokenizer_config.json"))).unwrap();
    let err = t.render(&[Message::system("s")], true).unwrap_err().to_string();
    assert!(err.contains("System role not supported") && err.contains("t.jinja"), "{err}");
    assert_eq!(t.render(&[Message::user("u")], true).unwrap(), "<s>x");
    let missing = ChatTemplate::resolve(Some("/nonexistent/t.jinja"), None, None).err().unwrap().to_string();
    assert!(missing.starts_with("--chat-template: /nonexistent/t.jinja"), "{missing}");
}

#[test]
fn greedy_matches_transformers_with_and_without_expansion() {
    let r = greedy_ref();
    let p = prompter(None, &[]);
    for expand in ["none", "every:4"] {
        let m = load("tiny-mistral-f32", expand, "auto");
        // Through the generator directly, with the reference prompt ids.
        let mut g = Generator::new(&m.model, m.model.config.max_position_embeddings).unwrap();
        let stats = generate(&mut g, &ids(&r["prompt_ids"]), &mut Sampler::new(greedy()), 20, &[], |_| std::ops::ControlFlow::Continue(())).unwrap();
        assert_eq!(stats.generated, ids(&r["generated_ids"]), "--expand {expand}");
        // Through a chat session: template + tokenizer + stop ids, single and multi-turn.
        let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
        s.max_tokens = Some(20);
        let reply = s.send("Hello", &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert_eq!(reply.prompt_ids, ids(&r["prompt_ids"]));
        assert_eq!(reply.stats.generated, ids(&r["generated_ids"]), "--expand {expand}");
        let mt = &r["multi_turn"];
        let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
        s.max_tokens = Some(20);
        s.messages = messages(&mt["messages"])[..2].to_vec();
        let reply = s.send("How are you today?", &AtomicBool::new(false), &mut |_| {}).unwrap();
        assert_eq!(reply.prompt_ids, ids(&mt["prompt_ids"]));
        assert_eq!(reply.stats.generated, ids(&mt["generated_ids"]), "multi-turn, --expand {expand}");
    }
}

#[test]
fn multi_turn_reuses_the_cache_and_matches_a_full_prefill() {
    let m = load("tiny-mistral-f32", "every:4", "auto");
    let p = prompter(None, &[]);
    let stop = AtomicBool::new(false);
    let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
    s.max_tokens = Some(6);
    s.set_system(Some("Be brief."));
    let first = s.send("Hello", &stop, &mut |_| {}).unwrap();
    assert_eq!(first.stats.prefilled_tokens, first.stats.prompt_tokens);
    let mut streamed = String::new();
    let second = s.send("And then? 🙂", &stop, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, second.text);
    let reused = second.stats.prompt_tokens - second.stats.prefilled_tokens;
    assert!(reused >= first.stats.prompt_tokens, "turn 2 re-ran {} of {} prompt tokens", second.stats.prefilled_tokens, second.stats.prompt_tokens);

    // A fresh session with the same history prefills everything and must answer identically.
    let mut fresh = Session::new(&m.model, &p, None, greedy()).unwrap();
    fresh.max_tokens = Some(6);
    fresh.messages = s.messages[..s.messages.len() - 2].to_vec();
    let again = fresh.send("And then? 🙂", &stop, &mut |_| {}).unwrap();
    assert_eq!(again.stats.prefilled_tokens, again.stats.prompt_tokens);
    assert_eq!(again.prompt_ids, second.prompt_ids);
    assert_eq!(again.stats.generated, second.stats.generated);

    // /reset: a new conversation runs its whole prompt again.
    s.reset();
    assert_eq!(s.messages, vec![Message::system("Be brief.")]);
    let r = s.send("Hello", &stop, &mut |_| {}).unwrap();
    assert_eq!(r.stats.prefilled_tokens, r.stats.prompt_tokens);
    assert_eq!(r.stats.generated, first.stats.generated);
}

#[test]
fn long_conversations_drop_the_oldest_turns() {
    let m = load("tiny-mistral-f32", "none", "auto");
    let p = prompter(None, &[]);
    let stop = AtomicBool::new(false);
    let mut s = Session::new(&m.model, &p, Some(64), greedy()).unwrap();
    s.max_tokens = Some(8);
    s.set_system(Some("sys"));
    let mut dropped = 0;
    for i in 0..6 {
        let r = s.send(&format!("question number {i}"), &stop, &mut |_| {}).unwrap();
        assert!(r.prompt_ids.len() + 8 <= 64, "turn {i}: prompt {} tokens", r.prompt_ids.len());
        dropped += r.dropped;
        assert_eq!(s.messages[0], Message::system("sys"), "the system message survives");
        assert_eq!(s.messages[1].role, "user", "the conversation still starts with a user turn");
    }
    assert!(dropped > 0);
    // A prompt that cannot fit at all is refused and the conversation is unchanged.
    let before = s.messages.clone();
    let err = s.send(&"word ".repeat(80), &stop, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("does not fit the context of 64 tokens"), "{err}");
    assert_eq!(s.messages, before);
}

/// A `/save` file of a system message and `turns` questions and answers: far more than the tiny
/// fixtures' context of 256 tokens (and its 34,816 bytes of rendered prompt) can hold.
fn long_conversation(dir: &std::path::Path, turns: usize) -> std::path::PathBuf {
    let mut messages = vec![Message::system("sys")];
    for i in 0..turns {
        messages.push(Message::user(format!("question number {i}")));
        messages.push(Message::assistant(format!("answer number {i}")));
    }
    let f = dir.join("long.json");
    std::fs::write(&f, serde_json::json!({ "messages": messages }).to_string()).unwrap();
    f
}

#[test]
fn a_loaded_conversation_too_long_to_render_drops_its_oldest_turns() {
    let m = load("tiny-mistral-f32", "none", "auto");
    // The checkpoint's prompter, with its limit on the rendered prompt's bytes.
    let p = Prompter::for_source(&m.source, None, &[]).unwrap();
    let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
    s.max_tokens = Some(4);
    let dir = tempfile::tempdir().unwrap();
    s.load(&long_conversation(dir.path(), 1500)).unwrap();
    let mut full = s.messages.clone();
    full.push(Message::user("And now?"));
    let r = s.send("And now?", &AtomicBool::new(false), &mut |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.prompt_ids.len() + 4 <= 256, "prompt {} tokens", r.prompt_ids.len());
    assert_eq!((&s.messages[0], s.messages[1].role.as_str()), (&Message::system("sys"), "user"));
    let kept = s.messages.len() - 2;
    assert_eq!(r.dropped, full.len() - 1 - kept);
    assert_eq!(s.messages[1..=kept], full[full.len() - kept..], "the newest turns are kept, in order");
    // The fewest dropped: the turn before the first one kept would not have fit.
    let mut longer = vec![Message::system("sys")];
    longer.extend_from_slice(&full[full.len() - kept - 2..]);
    assert!(p.encode(&longer).map_or(true, |(_, ids)| ids.len() + 4 > 256), "{} messages dropped, fewer would do", r.dropped);
}

#[test]
fn interrupted_answers_stay_in_the_conversation() {
    let m = load("tiny-mistral-f32", "none", "auto");
    let p = prompter(None, &[]);
    let stop = AtomicBool::new(false);
    let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
    let mut n = 0;
    let r = s
        .send("Hello", &stop, &mut |_| {
            n += 1;
            if n == 3 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .unwrap();
    assert_eq!(r.stats.stop, expanse::generation::StopReason::Interrupted);
    assert!(r.stats.generated.len() < 10);
    assert_eq!(s.messages.last().unwrap(), &Message::assistant(r.text.clone()));
}

#[test]
fn save_and_load_round_trip_and_reject_malformed_files() {
    let m = load("tiny-mistral-f32", "none", "auto");
    let p = prompter(None, &[]);
    let mut s = Session::new(&m.model, &p, None, greedy()).unwrap();
    s.max_tokens = Some(3);
    s.set_system(Some("sys ✓"));
    s.send("Hello 😀", &AtomicBool::new(false), &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("conv.json");
    s.save(&f).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    let mut t = Session::new(&m.model, &p, None, greedy()).unwrap();
    t.load(&f).unwrap();
    assert_eq!(t.messages, s.messages);
    for (name, body) in [("bad.json", "{not json"), ("role.json", r#"{"messages":[{"role":"wizard","content":"x"}]}"#), ("shape.json", r#"{"messages":"x"}"#)] {
        let bad = dir.path().join(name);
        std::fs::write(&bad, body).unwrap();
        let err = t.load(&bad).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        assert_eq!(t.messages, s.messages, "a failed /load keeps the conversation");
    }
}

fn tiny() -> String {
    fixture("tiny-mistral-f32")
}

#[test]
fn generate_cli_json_matches_transformers() {
    let r = greedy_ref();
    let out = expanse(&[
        "generate",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--json",
        "--show-prompt",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&v["prompt_ids"]), ids(&r["prompt_ids"]));
    assert_eq!(ids(&v["generated_ids"]), ids(&r["generated_ids"]));
    assert_eq!(v["stop"], "max_tokens");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[1, 420, 6316, 28781,"), "--show-prompt prints the ids: {err}");

    // Plain output: only the generated text on stdout, the same text the JSON reports.
    let plain = expanse(&["generate", "--model", &tiny(), "--device", "cpu", "--prompt", "Hello", "--temperature", "0", "--max-tokens", "20"]);
    assert!(plain.status.success());
    assert_eq!(String::from_utf8(plain.stdout).unwrap(), format!("{}\n", v["text"].as_str().unwrap()));
}

#[test]
fn generate_cli_bad_input_exits_2_naming_the_flag() {
    let cases: [(&[&str], &str); 5] = [
        (&["--prompt", "  "], "--prompt"),
        (&["--prompt", "Hello", "--ctx", "5"], "--ctx"),
        (&["--prompt", "Hello", "--ctx", "100000"], "--ctx"),
        (&["--prompt", "Hello", "--chat-template", "/nonexistent.jinja"], "--chat-template"),
        (&["--prompt", "Hello", "--temperature=-1"], "--temperature"),
    ];
    let model = tiny();
    for (args, flag) in cases {
        let mut all = vec!["generate", "--model", &model, "--device", "cpu"];
        all.extend_from_slice(args);
        let out = expanse(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.lines().count() == 1, "{args:?}: {err}");
    }
}

#[test]
fn piped_chat_answers_each_line_and_survives_bad_commands() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[1, 2").unwrap();
    let saved = dir.path().join("saved.json");
    let mut child = command(&["chat", "--model", &tiny(), "--device", "cpu", "--temperature", "0", "--max-tokens", "5"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!(
        "Hello\n/frobnicate\n/load {}\n/set temperature banana\n\nHow are you today?\n/paste\nfirst\n\nsecond\n/end\nthird \\\nfourth\n/save {}\n",
        bad.display(),
        saved.display()
    );
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout.lines().count(), 4, "one answer line per user turn: {stdout:?}");
    assert!(!stdout.contains(">>>") && !stdout.contains('\x1b'), "no prompt or colour when piped: {stdout:?}");
    assert!(stderr.contains("unknown command /frobnicate"), "{stderr}");
    assert!(stderr.contains("bad.json"), "{stderr}");
    assert!(stderr.contains("temperature: `banana`"), "{stderr}");
    let conv = expanse::conversation::read_conversation(&saved).unwrap();
    let roles: Vec<&str> = conv.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant", "user", "assistant", "user", "assistant"]);
    assert_eq!(conv[4].content, "first\n\nsecond", "/paste … /end is one message");
    assert_eq!(conv[6].content, "third \nfourth", "a trailing \\ continues the message");
    let answers: Vec<&str> = conv.iter().skip(1).step_by(2).map(|m| m.content.as_str()).collect();
    assert_eq!(format!("{}\n", answers.join("\n")), stdout);
}

#[test]
fn piped_chat_answers_after_loading_a_conversation_too_long_for_the_context() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let f = long_conversation(dir.path(), 1500);
    let mut child = command(&["chat", "--model", &tiny(), "--device", "cpu", "--temperature", "0", "--max-tokens", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("/load {}\nAnd now?\n", f.display()).as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(stderr.contains("(loaded 3001 messages") && stderr.contains("oldest messages to fit the context of 256 tokens"), "{stderr}");
    assert!(stdout.lines().count() == 1 && !stdout.trim().is_empty(), "one answer: {stdout:?}");
}

/// The REPL in a real pseudo-terminal: streamed answer, /reset, Ctrl-C mid-answer, Ctrl-D.
#[test]
fn repl_in_a_pseudo_terminal() {
    let home = tempfile::tempdir().unwrap();
    // A 40 ms pause per token keeps an answer running for seconds (the tiny model's 256 positions),
    // so the Ctrl-C below always lands mid-answer.
    let mut c = command(&["chat", "--model", &tiny(), "--device", "cpu", "--temperature", "0", "--decode-delay-ms", "40"]);
    c.env("HOME", home.path()).env_remove("XDG_STATE_HOME").env_remove("EXPANSE_HISTORY");
    let mut p = rexpect::session::spawn_command(c, Some(60_000)).unwrap();
    p.exp_string("/help").unwrap();
    p.exp_string(">>> ").unwrap();

    p.send_line("/max").unwrap();
    p.exp_string("unknown command /max").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("/set max_tokens 3").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("Hello").unwrap();
    // rexpect reads bytes as Latin-1, so the `·` separators are matched as \S+.
    p.exp_regex(r"3 tokens \S+ first token").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("/reset").unwrap();
    p.exp_string("(new conversation)").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_line("/set max_tokens 200").unwrap();
    p.exp_string(">>> ").unwrap();

    p.send_line("Tell me a long story").unwrap();
    p.exp_string("Tell me a long story").unwrap();
    // Wait for the answer's first text (a line that is not a terminal escape): the answer is now
    // streaming, and at ≥ 40 ms a token its 200 tokens take ≥ 8 s, so Ctrl-C lands mid-answer.
    p.exp_regex(r"\n[^\x1b\r\n]").unwrap();
    p.send_control('c').unwrap();
    let (before, _) = p.exp_regex(r"\d+ tokens \S+ first token \d+ ms \S+ [\d.]+ tok/s \S+ interrupted").unwrap();
    assert!(!before.contains("context full"), "{before}");
    p.exp_string(">>> ").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_string("context:").unwrap();
    p.exp_string(">>> ").unwrap();
    // Text on the line + Ctrl-C clears it rather than exiting; Ctrl-D on the empty line exits 0.
    p.send("half typed").unwrap();
    p.send_control('c').unwrap();
    p.send_control('d').unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("expanse chat ended with {other:?}"),
    }
    assert!(home.path().join(".local/state/expanse/chat_history").is_file(), "history file written");

    // Ctrl-C at an empty prompt also exits cleanly.
    let mut c = command(&["chat", "--model", &tiny(), "--device", "cpu"]);
    c.env("EXPANSE_HISTORY", home.path().join("h"));
    let mut p = rexpect::session::spawn_command(c, Some(60_000)).unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_control('c').unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("Ctrl-C at the prompt ended expanse chat with {other:?}"),
    }
}

/// A history file pointed at what the chat reads (here its config.json, which rustyline would
/// rewrite as a history) is not written: the chat says so and runs without history.
#[test]
fn history_over_the_models_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for e in std::fs::read_dir(fixture("tiny-mistral-bf16")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    let config = model.join("config.json");
    let before = std::fs::read(&config).unwrap();
    let mut c = command(&["chat", "--model", model.to_str().unwrap(), "--device", "cpu"]);
    c.env("EXPANSE_HISTORY", &config);
    let mut p = rexpect::session::spawn_command(c, Some(60_000)).unwrap();
    let banner = p.exp_string(">>> ").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_string("context:").unwrap();
    p.exp_string(">>> ").unwrap();
    p.send_control('d').unwrap();
    match p.process().wait().unwrap() {
        rexpect::process::WaitStatus::Exited(_, code) => assert_eq!(code, 0),
        other => panic!("expanse chat ended with {other:?}"),
    }
    let after = String::from_utf8_lossy(&std::fs::read(&config).unwrap()).into_owned();
    assert!(after.as_bytes() == before, "the history was written into config.json:\n{after}");
    assert!(banner.contains("no chat history"), "{banner}");
}

#[test]
fn generate_cli_system_raw_and_stdin() {
    let model = tiny();
    let base = ["generate", "--model", model.as_str(), "--device", "cpu", "--temperature", "0", "--max-tokens", "2", "--json"];
    let run = |extra: &[&str], stdin: Option<&str>| -> Value {
        use std::io::Write;
        let mut c = command(&base);
        c.args(extra).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        c.stdin(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = run(&["--prompt", "Hello", "--system", "Be brief."], None);
    assert_eq!(v["prompt"], "<s>GPT4 Correct System: Be brief.<|end_of_turn|>GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:");
    let raw = run(&["--prompt", "Hello", "--raw"], None);
    assert_eq!(raw["prompt"], "Hello");
    assert_eq!(ids(&raw["prompt_ids"]), vec![1, 22557], "BOS and `▁Hello`, as in the published ids");
    let piped = run(&[], Some("Hello\n"));
    assert_eq!(ids(&piped["prompt_ids"]), OPENCHAT_HELLO);
}

#[test]
fn piped_chat_reports_a_raising_template_and_goes_on() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("strict.jinja");
    std::fs::write(&t, "{% if 'forbidden' in messages[-1]['content'] %}{{ raise_exception('forbidden word in the last message') }}{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
    let mut child = command(&["chat", "--model", &tiny(), "--device", "cpu", "--max-tokens", "3", "--chat-template", t.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"a forbidden thing\nHello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("chat template: forbidden word in the last message"), "{stderr}");
    assert_eq!(stderr.matches("tok/s").count(), 1, "only the second line was answered: {stderr}");
}

/// Today's date by the system's `date` (C locale), as Python's strftime writes it in `format`.
fn date_now(format: &str) -> String {
    let out = std::process::Command::new("date").arg(format!("+{format}")).env("LC_ALL", "C").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim_end_matches('\n').to_string()
}

/// The chat templates of Llama 3.1, 3.2 and 3.3 Instruct and DeepSeek-R1-Distill-Llama-8B (llama.cpp's
/// copies of the models' own) render as transformers renders them
/// (`tests/fixtures/make_template_refs.py`), with and without the generation prompt; Llama 3.2's
/// `strftime_now` writes today's date (the reference holds `\0FORMAT\0` in its place, filled here by
/// the system's `date`).
#[test]
fn llama_chat_templates_render_as_transformers() {
    let dir = fixtures().join("templates");
    let refs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("ref-renders.json")).unwrap()).unwrap();
    assert_eq!(refs.len(), 16);
    let mut dated = 0;
    for r in &refs {
        let name = r["template"].as_str().unwrap();
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        let special = expanse::template::TokenizerConfig {
            bos_token: Some(r["bos_token"].as_str().unwrap().into()),
            eos_token: Some(r["eos_token"].as_str().unwrap().into()),
            ..Default::default()
        };
        let template = ChatTemplate::from_source(&source, special).unwrap();
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        let want = r["text"].as_str().unwrap();
        // Dates filled before and after rendering: a render across midnight matches one of them.
        let fill = |date: &dyn Fn(&str) -> String| {
            let parts: Vec<&str> = want.split('\0').collect();
            parts.iter().enumerate().map(|(i, p)| if i % 2 == 1 { date(p) } else { p.to_string() }).collect::<String>()
        };
        let before = fill(&date_now);
        let got = template.render(&messages(&r["messages"]), gen).unwrap();
        let after = fill(&date_now);
        assert!(got == before || got == after, "{name} (generation prompt {gen}):\n{got:?}\nwant\n{before:?}");
        dated += usize::from(want.contains('\0'));
    }
    assert_eq!(dated, 4, "Llama 3.2's renders carry the date");
}
