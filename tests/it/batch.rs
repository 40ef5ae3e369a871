//! Batched decoding (`Model::decode_rows`, what `serve --parallel` steps): each sequence's logits in a
//! batch are the bits it gets alone, whatever else is in the batch and wherever it stands — dense f32
//! and bf16, quantized types, sliding windows — and alone they are `Model::forward`'s on one token.

use candle_core::{Device, Tensor};
use expanse::engine::{self, LoadOptions};
use expanse::model::{Cache, Logits, Model};

use crate::common::*;

/// A Mistral shape whose rows are whole K-quant blocks, wide enough that 17 rows would take the
/// lane products of a prompt (which sum in another order) if decode rows were let near them.
const WIDE: &str = r#"{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 256,
 "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
 "num_hidden_layers": 4, "vocab_size": 512, "max_position_embeddings": 96, "rms_norm_eps": 1e-5,
 "rope_theta": 10000.0, "sliding_window": 24, "tie_word_embeddings": false, "dtype": "float32"}"#;

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Prompts of different lengths (some past the sliding window), fresh per run.
fn prompts(n: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..3 + (i * 7 + seed as usize) % 29).map(|j| ((j * 7919 + i * 104729 + seed as usize * 31) % (vocab - 1) + 1) as u32).collect()).collect()
}

/// A cache holding `prompt`, run as a prompt, and the greedy token after it.
fn prefilled(model: &Model, prompt: &[u32]) -> (Cache, u32) {
    let mut cache = Cache::new(model, model.config.max_position_embeddings).unwrap();
    let logits = model.forward(&engine::ids_tensor(prompt, &model.device).unwrap(), &mut cache, Logits::Last).unwrap();
    (cache, argmax(&logits)[0])
}

/// `steps` greedy decode steps of every prompt together, each step's logits checked bit for bit
/// against the same sequence stepped alone by `decode_rows` and by `forward`. A sequence leaves the
/// batch after a number of steps of its own, so rows also move up and the batch shrinks.
fn check(model: &Model, what: &str, n: usize, steps: usize) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 % 1000;
    let prompts = prompts(n, model.config.vocab_size, seed);
    let (mut batch, mut next): (Vec<Cache>, Vec<u32>) = prompts.iter().map(|p| prefilled(model, p)).unzip();
    let mut alone: Vec<Cache> = prompts.iter().map(|p| prefilled(model, p).0).collect();
    let mut by_forward: Vec<Cache> = prompts.iter().map(|p| prefilled(model, p).0).collect();
    let mut live: Vec<usize> = (0..n).collect();
    for step in 0..steps {
        live.retain(|&i| step < steps - i % 3);
        let tokens: Vec<u32> = live.iter().map(|&i| next[i]).collect();
        let mut caches: Vec<&mut Cache> = batch.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, c)| c).collect();
        let logits = model.decode_rows(&tokens, &mut caches).unwrap();
        assert_eq!(logits.dims(), &[live.len(), model.config.vocab_size]);
        for (row, &i) in live.iter().enumerate() {
            let got = logits.get(row).unwrap();
            let one = model.decode_rows(&[next[i]], &mut [&mut alone[i]]).unwrap().get(0).unwrap();
            let ids = engine::ids_tensor(&[next[i]], &model.device).unwrap();
            let fwd = model.forward(&ids, &mut by_forward[i], Logits::Last).unwrap().squeeze(0).unwrap();
            let seed_note = format!("{what}, seed {seed}, step {step}, sequence {i} (row {row} of {})", live.len());
            assert!(bits(&got) == bits(&one), "{seed_note}: logits in the batch differ from alone");
            assert!(bits(&one) == bits(&fwd), "{seed_note}: decode_rows alone differs from forward");
            assert!(bits(&got).iter().all(|b| f32::from_bits(*b).is_finite()), "{seed_note}: a non-finite logit");
            next[i] = argmax(&got)[0];
        }
    }
}

#[test]
fn a_sequences_logits_in_a_batch_are_its_logits_alone_dense() {
    for (name, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16")] {
        let m = engine::load(&LoadOptions::new(fixture(name)).expand("every:4").dtype(dtype)).unwrap();
        check(&m.model, &format!("{name} {dtype}"), 6, 10);
    }
}

#[test]
fn a_sequences_logits_in_a_batch_are_its_logits_alone_wide_and_quantized() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("config.json");
    std::fs::write(&spec, WIDE).unwrap();
    let spec = spec.display().to_string();
    for (dtype, quant) in [("f32", None), ("bf16", None), ("f32", Some("q8_0")), ("f32", Some("q4_k")), ("f32", Some("q5_k")), ("f32", Some("q6_k"))] {
        let mut opts = LoadOptions::new(&spec).expand("every:2").dtype(dtype);
        if let Some(q) = quant {
            opts = opts.quant(q);
        }
        let model = engine::load_synthetic(&spec, &opts, &Device::Cpu).unwrap().1;
        check(&model, &format!("wide {dtype} {quant:?}"), 17, 4);
    }
}
