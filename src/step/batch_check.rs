//! The batched step's promise, checked on whichever executor a test builds (the CUDA emulator in
//! every test run, the GPU in gpu-check): each row's logits are the bits its sequence gets decoded
//! alone, whoever else is in the batch, in which row, and since when.

use super::{DecodePath, DecodeStep, StepOptions, StepOut};
use crate::engine::ids_tensor;
use crate::model::{Cache, Logits, Model};

/// A prompt crossing the fixtures' sliding window (8), and ids decoded after it.
pub(crate) const PROMPT: [u32; 11] = [1, 415, 2936, 9060, 285, 1142, 28705, 28740, 28750, 28770, 13];
const DECODE: [u32; 5] = [1014, 2696, 6153, 2, 32000];

/// The ids taken modulo the model's vocabulary (the fixtures' vocabularies differ).
pub(crate) fn ids(model: &Model, ids: &[u32]) -> Vec<u32> {
    ids.iter().map(|&i| i % model.config.vocab_size as u32).collect()
}

fn logits(out: StepOut) -> Vec<f32> {
    match out {
        StepOut::Logits(l) => l.to_vec1::<f32>().unwrap(),
        StepOut::Token(_) => unreachable!("asked for logits"),
    }
}

/// Five sequences of different lengths (one past the fixtures' window) decoded alone on `path`'s
/// one-cache step (`alone`), then together on the batched step (`together`) in batches that change
/// every round — who is in them, in which row — some rounds greedy: every row's logits must be the
/// lone run's bits, and every greedy row its argmax. Panics naming the round, row and sequence.
pub(crate) fn rows_are_their_lone_bits(m: &Model, path: DecodePath, alone: &StepOptions, together: &StepOptions) {
    let prompts: [&[u32]; 5] = [&PROMPT, &PROMPT[..5], &PROMPT[3..11], &PROMPT[1..3], &PROMPT[..9]];
    // Batches of 5 and 4 rows take the GEMVs' tiled kernels, of 3 and 2 the SwiGLU's tiled and the
    // plain GEMV, of 1 the plain ones; rounds 2 and 4 are greedy.
    let rounds: [&[usize]; 7] = [&[0, 1, 2, 3, 4], &[4, 2, 0], &[1], &[3, 1, 4, 2, 0], &[2, 3, 1, 0], &[4, 0, 3, 1, 2], &[3, 4]];
    let cap = PROMPT.len() + DECODE.len();
    let decode = ids(m, &DECODE);
    let want: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = Cache::new(m, cap).unwrap();
            m.forward(&ids_tensor(&ids(m, p), &m.device).unwrap(), &mut cache, Logits::Last).unwrap();
            let mut step = DecodeStep::new(m, &cache, path, alone).unwrap();
            decode.iter().map(|&id| logits(step.decode(&mut cache, id, true).unwrap())).collect()
        })
        .collect();
    // The prompts prefilled into the slots of one pool by the reference forward pass.
    let mut pool = Cache::pool(m, prompts.len(), cap).unwrap();
    for (c, p) in pool.iter_mut().zip(&prompts) {
        m.forward(&ids_tensor(&ids(m, p), &m.device).unwrap(), c, Logits::Last).unwrap();
    }
    let mut step = DecodeStep::batched(m, &pool.iter().collect::<Vec<_>>(), path, together).unwrap();
    assert_eq!(step.batch(), prompts.len());
    let mut done = [0usize; 5];
    for (r, seqs) in rounds.iter().enumerate() {
        let tokens: Vec<u32> = seqs.iter().map(|&s| decode[done[s]]).collect();
        // The round's rows in its order, each its sequence's slot.
        let mut slots: Vec<Option<&mut Cache>> = pool.iter_mut().map(Some).collect();
        let mut caches: Vec<&mut Cache> = seqs.iter().map(|&s| slots[s].take().unwrap()).collect();
        let greedy = r == 2 || r == 4;
        let out = step.decode_batch(&mut caches, &tokens, !greedy).unwrap();
        assert_eq!(out.len(), seqs.len());
        for ((row, &s), o) in seqs.iter().enumerate().zip(out) {
            let (want, what) = (&want[s][done[s]], format!("{path:?} round {r} row {row} (sequence {s}, token {})", done[s]));
            match o {
                StepOut::Token(t) => assert_eq!(t, crate::kernels::cpu::argmax(want), "{what}: argmax"),
                o => assert!(logits(o).iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: logits differ from the sequence's alone"),
            }
            done[s] += 1;
        }
    }
    assert_eq!(done, [DECODE.len(); 5]);
    for (c, p) in pool.iter().zip(&prompts) {
        assert_eq!(c.len(), p.len() + DECODE.len(), "each slot advanced once per token it ran");
    }
}
