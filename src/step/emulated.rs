//! The decode step's CUDA executor with its device swapped for the CPU emulator of the same kernel
//! sources (tests only): the launches `launches::resolve` makes for a GPU, run on CPU tensors. What
//! it proves on every test run is everything of the CUDA step but the device itself: the kernels,
//! their launch geometry, the step's wiring of buffers, cache and state, the self-check and its
//! diagnosis, and (its tests allocating between guard pages) that no launch reads or writes out of
//! its buffers. The graph capture and the device itself need a GPU (gpu-check).

use candle_core::{DType, Device, Tensor};
use expanse_cuda_emulator::Schedule;

use super::launches::{self, Addresses};
use super::plan::{Buf, Buffers, Plan};
use super::Dims;
use crate::error::{Error, Result};
use crate::kernels::emulated::{host_ptr, EmulatedKernels};
use crate::kernels::launch::Launcher;
use crate::model::{Cache, Model};

pub(super) struct EmulatedExec {
    k: EmulatedKernels,
    bufs: Buffers<Tensor>,
    _partial: Tensor,
    /// `[token, pos, next, slot]` per row (u32), read by the kernels in place.
    state: Tensor,
    /// The launches of each batch size (index n - 1).
    launches: Vec<Vec<launches::OpLaunches>>,
    /// Rows of the current token.
    n: usize,
    _cache: Vec<Tensor>,
}

fn ptr(t: &Tensor) -> Result<u64> {
    Ok(host_ptr(t)?)
}

/// Copies `src`'s bytes over `dst` (same dtype and length, both contiguous CPU tensors).
fn overwrite(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.dtype() != src.dtype() || dst.elem_count() != src.elem_count() {
        return Err(Error::internal("emulated step: overwrite with another dtype or length"));
    }
    let (d, s) = (ptr(dst)?, ptr(src)?);
    // SAFETY: both address `elem_count` elements of the same dtype in distinct live allocations,
    // and no borrow of either storage is alive.
    unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, src.elem_count() * src.dtype().size_in_bytes()) };
    Ok(())
}

impl EmulatedExec {
    pub(super) fn new(model: &Model, cache: &Cache, plan: &Plan, dims: &Dims, schedule: Schedule) -> Result<EmulatedExec> {
        let dtype = model.dtype;
        let bufs = Buffers::new(dims, |n| Tensor::zeros(n, dtype, &Device::Cpu))?;
        let partial = Tensor::zeros(crate::kernels::launch::attention_scratch_words(&dims.attention_batch(dims.batch), plan.splits), DType::F32, &Device::Cpu)?;
        let state = Tensor::zeros(launches::STATE_WORDS * dims.batch, DType::U32, &Device::Cpu)?;
        let (cos, sin) = model.rotary_tables();
        let addresses = Addresses { bufs: bufs.map(ptr)?, partial: ptr(&partial)?, state: ptr(&state)?, cos: ptr(cos)?, sin: ptr(sin)? };
        let (launches, kept) = launches::resolve(plan, model, cache, dims, &addresses, &ptr)?;
        let k = EmulatedKernels { dtype, head_dim: dims.head_dim, schedule };
        Ok(EmulatedExec { k, bufs, _partial: partial, state, launches, n: 1, _cache: kept })
    }

    pub(super) fn launch(&self, i: usize) -> Result<usize> {
        let op = &self.launches[self.n - 1][i];
        for l in op {
            self.k.launch(l)?;
        }
        Ok(op.len())
    }

    pub(super) fn set_state(&mut self, rows: &[super::Row]) -> Result<()> {
        let words = launches::state_words(rows, self.launches.len())?;
        let mut all = self.state.to_vec1::<u32>()?;
        all[..words.len()].copy_from_slice(&words);
        self.n = rows.len();
        overwrite(&self.state, &Tensor::new(all.as_slice(), &Device::Cpu)?)
    }

    pub(super) fn next(&self) -> Result<Vec<u32>> {
        Ok(launches::next_of(&self.state.to_vec1::<u32>()?, self.n))
    }

    pub(super) fn bump_next(&mut self, vocab: usize) -> Result<()> {
        let mut s = self.state.to_vec1::<u32>()?;
        launches::bump_next(&mut s, self.n, vocab);
        overwrite(&self.state, &Tensor::new(s.as_slice(), &Device::Cpu)?)
    }

    pub(super) fn read_buf(&self, b: Buf) -> Result<Vec<f32>> {
        Ok(self.bufs.get(b).to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    pub(super) fn write_buf(&mut self, b: Buf, values: &[f32]) -> Result<()> {
        let t = self.bufs.get(b);
        overwrite(t, &Tensor::from_slice(values, values.len(), &Device::Cpu)?.to_dtype(t.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{self, Tolerance};
    use super::super::{DecodePath, DecodeStep, Fault, StepOptions, StepOut};
    use super::*;
    use crate::engine::{self, ids_tensor, LoadOptions};
    use crate::model::Logits;

    use super::super::batch_check::{ids, PROMPT};

    /// Ids decoded one at a time after `PROMPT`.
    const DECODE: [u32; 6] = [1014, 2696, 6153, 2, 32000, 31999];

    fn load(fixture: &str, expand: &str, dtype: &str) -> Model {
        load_quant(fixture, expand, dtype, None)
    }

    /// A fixture (a folder or a GGUF file under tests/fixtures), quantized at load with `quant`.
    fn load_quant(fixture: &str, expand: &str, dtype: &str, quant: Option<&str>) -> Model {
        let (source, opts) = open_quant(fixture, expand, dtype, quant);
        engine::load_from(source, &opts, &Device::Cpu).unwrap().model
    }

    /// The fixture's source (its config and tokenizer read) and the options to load it with. A test
    /// under a guard scope opens sources first: a GGUF's tokenizer (32k strings, alive while its
    /// source is) would take most of the guard's live blocks, leaving the weights unguarded.
    fn open_quant(fixture: &str, expand: &str, dtype: &str, quant: Option<&str>) -> (engine::Source, LoadOptions) {
        let dir = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let source = engine::Source::open(&dir, None).unwrap();
        let opts = LoadOptions::new(dir).expand(expand).dtype(dtype);
        (source, quant.map_or(opts.clone(), |q| opts.quant(q)))
    }

    /// Quantized models of the fixtures: a Q4_K_M GGUF (its 32-wide rows fell back to Q5_0 and Q8_0,
    /// mixed within the qkv stacks) and `--quant` of the others' 32-value types, in f32 and bf16.
    const QUANTIZED: [(&str, &str, Option<&str>); 4] = [
        ("gguf/tiny-mistral-q4_k_m.gguf", "f32", None),
        ("gguf/tiny-mistral-q4_k_m.gguf", "bf16", None),
        ("tiny-mistral-f32", "f32", Some("q4_1")),
        ("tiny-mistral-bf16", "bf16", Some("q5_1")),
    ];

    fn emulated(splits: usize, schedule: Schedule) -> StepOptions {
        StepOptions { splits: Some(splits), emulate_cuda: Some(schedule), ..Default::default() }
    }

    fn prefilled(model: &Model) -> Cache {
        let mut cache = Cache::new(model, PROMPT.len() + DECODE.len()).unwrap();
        model.forward(&ids_tensor(&ids(model, &PROMPT), &model.device).unwrap(), &mut cache, Logits::Last).unwrap();
        cache
    }

    /// f32 logits of each decoded id: through the reference forward pass (`opts` None) or a step.
    fn decode(model: &Model, opts: Option<&StepOptions>) -> Vec<Vec<f32>> {
        decode_after(model, model, opts)
    }

    /// As `decode`, on a cache the `prefill` model's forward pass filled with the prompt.
    fn decode_after(model: &Model, prefill: &Model, opts: Option<&StepOptions>) -> Vec<Vec<f32>> {
        let mut cache = prefilled(prefill);
        let mut step = opts.map(|o| DecodeStep::new(model, &cache, DecodePath::Fused, o).unwrap());
        let row = |t: Tensor| t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        ids(model, &DECODE)
            .into_iter()
            .map(|id| match &mut step {
                None => row(model.forward(&ids_tensor(&[id], &model.device).unwrap(), &mut cache, Logits::Last).unwrap()),
                Some(s) => match s.decode(&mut cache, id, true).unwrap() {
                    StepOut::Logits(l) => {
                        let l = row(l);
                        assert_eq!(s.next_token().unwrap(), crate::kernels::cpu::argmax(&l), "the device's argmax is the logits'");
                        l
                    }
                    StepOut::Token(_) => unreachable!("asked for logits"),
                },
            })
            .collect()
    }

    #[test]
    fn the_cuda_step_on_the_emulator_decodes_as_the_reference() {
        // Guard pages before the buffers here (after them in the other tests).
        let _guard = crate::kernels::guard_buffers_front();
        // f32: only summation orders differ (1e-5 relative); bf16: the self-check's agreement. The
        // expanded models run every base block and the transparent copies.
        for (fixture, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16"), ("tiny-llama-f32", "f32")] {
            let m = load(fixture, "every:4", dtype);
            let want = decode(&m, None);
            for splits in [1, 3] {
                let got = decode(&m, Some(&emulated(splits, Schedule::Reverse)));
                let tol = if dtype == "f32" { 1e-5 } else { Tolerance::for_dtype(DType::BF16).rel };
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let what = format!("{fixture} every:4 splits {splits} token {i}");
                    let d = crate::compare::Diff::new(g, w);
                    assert!(d.within_rel(tol), "{what}: {d}");
                    let top1 = crate::compare::Top1::new(g, w);
                    assert!(top1.agrees(2.0), "{what}: {top1}");
                }
            }
        }
    }

    /// `m` with every quantized projection replaced by its dequantized weights (dense, in `m`'s
    /// dtype): for an f32 model, the same weights the quantized kernels multiply with.
    fn dequantized(m: &Model) -> Model {
        use crate::model::Linear;
        let dense = |l: &Linear| match l.quantized() {
            Some(q) => Linear::Dense(q.dequantize().unwrap().to_dtype(m.dtype).unwrap()),
            None => l.clone(),
        };
        let mut t = m.clone();
        for b in &mut t.blocks {
            let a = &mut b.self_attn;
            let (q, k, v) = (a.q_proj.dims().0, a.k_proj.dims().0, a.v_proj.dims().0);
            a.qkv_proj = dense(&a.qkv_proj);
            (a.q_proj, a.k_proj, a.v_proj) = (a.qkv_proj.rows(0, q).unwrap(), a.qkv_proj.rows(q, k).unwrap(), a.qkv_proj.rows(q + k, v).unwrap());
            a.o_proj = dense(&a.o_proj);
            let f = &mut b.mlp;
            let i = f.up_proj.dims().0;
            f.gate_up_proj = dense(&f.gate_up_proj);
            (f.gate_proj, f.up_proj) = (f.gate_up_proj.rows(0, i).unwrap(), f.gate_up_proj.rows(i, i).unwrap());
            f.down_proj = dense(&f.down_proj);
        }
        t.lm_head = dense(&t.lm_head);
        t
    }

    /// The f32 quantized model `m` on the step decodes as the reference pass of its dequantized
    /// weights (on the cache that pass prefilled), up to summation order.
    #[track_caller]
    fn assert_decodes_as_dequantized(m: &Model, step: &StepOptions, what: &str) {
        let twin = dequantized(m);
        let (want, got) = (decode(&twin, None), decode_after(m, &twin, Some(step)));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = crate::compare::Diff::new(g, w);
            assert!(d.within_rel(1e-5), "{what} token {i}: {d}");
        }
    }

    /// The quantized GEMVs in the step. In f32 the fused step decodes as the reference forward pass
    /// of the dequantized weights (on the cache that pass prefilled), up to summation order: each
    /// weight read as ggml defines it, every run of a mixed stack in its columns. Against the
    /// quantized reference (whose CPU kernels round the activations to 8-bit blocks, as llama.cpp
    /// does) the self-check passes, in f32 and bf16. The expanded model on the step gives the base
    /// model's bits on the step, with and without `--skip-transparent`.
    #[test]
    fn the_cuda_step_on_the_emulator_decodes_quantized_models_as_the_reference() {
        let sources: Vec<_> = QUANTIZED.iter().map(|&(f, dtype, q)| ["every:4", "none", "every:4"].map(|e| open_quant(f, e, dtype, q))).collect();
        let _guard = crate::kernels::guard_buffers();
        for ((fixture, dtype, quant), [expanded, none, skip]) in QUANTIZED.into_iter().zip(sources) {
            let what = format!("{fixture} {dtype} {quant:?}");
            let load = |(s, o): (engine::Source, LoadOptions)| engine::load_from(s, &o, &Device::Cpu).unwrap().model;
            let m = load(expanded);
            assert!(m.quant_type().is_some(), "{what}: not quantized");
            let opts = emulated(2, Schedule::Forward);
            let got = decode(&m, Some(&opts));
            if dtype == "f32" {
                assert_decodes_as_dequantized(&m, &opts, &what);
            }
            let v = check::check_path(&m, DecodePath::Fused, &opts, &ids(&m, &PROMPT), 64).unwrap();
            assert!(v.pass, "{what}: {}", v.warning());
            let base = decode(&load(none), Some(&opts));
            let mut skip = load(skip);
            skip.skip_transparent().unwrap();
            for (name, g) in [("expanded", got), ("skip", decode(&skip, Some(&opts)))] {
                for (i, (g, b)) in g.iter().zip(&base).enumerate() {
                    assert!(g.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what} {name} token {i}: not the base's bits");
                }
            }
        }
    }

    /// The K-quants in the step, on a synthetic model whose rows are whole 256-value blocks (hidden
    /// 256; its down projection, 896 wide, takes llama-quantize's fallback: a second type in the
    /// step): in f32 the step decodes as the reference pass of the dequantized weights, and the
    /// self-check passes against the quantized reference.
    #[test]
    fn the_cuda_step_on_the_emulator_runs_k_quants_as_their_dequantized_weights() {
        let _guard = crate::kernels::guard_buffers();
        let spec = format!("{}/scripts/rehearsal-openchat-small.json", env!("CARGO_MANIFEST_DIR"));
        for q in ["q4_k", "q5_k", "q6_k"] {
            let opts = LoadOptions::new(spec.clone()).expand("every:4").dtype("f32").quant(q);
            let m = engine::load_synthetic(&spec, &opts, &Device::Cpu).unwrap().1;
            assert_eq!(m.blocks[0].self_attn.qkv_proj.quantized().map(|w| w.quant_type().name()), Some(q));
            let step = emulated(2, Schedule::Shuffled(3));
            assert_decodes_as_dequantized(&m, &step, q);
            let v = check::check_path(&m, DecodePath::Fused, &step, &ids(&m, &PROMPT), 64).unwrap();
            assert!(v.pass, "{q}: {}", v.warning());
        }
    }

    #[test]
    fn the_batched_quantized_cuda_step_on_the_emulator_gives_each_row_the_bits_it_gets_alone() {
        let sources: Vec<_> = QUANTIZED[1..3].iter().map(|&(f, dtype, q)| open_quant(f, "every:4", dtype, q)).collect();
        let _guard = crate::kernels::guard_buffers();
        for (source, opts) in sources {
            let m = engine::load_from(source, &opts, &Device::Cpu).unwrap().model;
            super::super::batch_check::rows_are_their_lone_bits(&m, DecodePath::Fused, &emulated(2, Schedule::Forward), &emulated(2, Schedule::Shuffled(5)));
        }
    }

    /// A quantized model whose gate and up projections differ in type runs the reference path
    /// (`auto`), and asking for the fused step names the layer and the types.
    #[test]
    fn a_quantized_gate_up_of_two_types_is_refused_naming_the_layer() {
        let mut m = load_quant("tiny-mistral-f32", "none", "f32", Some("q8_0"));
        let mlp = &mut m.blocks[1].mlp;
        let gate_up = mlp.gate_up_proj.quantized().unwrap().clone();
        let (rows, cols) = gate_up.dims();
        let (a, b) = (gate_up.rows(0, rows / 2).unwrap(), gate_up.rows(rows / 2, rows / 2).unwrap());
        let a = crate::quant::QMatrix::quantize("gate", &a.dequantize().unwrap(), crate::quant::QuantType::Q4_0, &Device::Cpu).unwrap();
        let (ab, bb) = (a.row_bytes().unwrap(), b.row_bytes().unwrap());
        let mixed = crate::quant::QMatrix::stacked(
            "gate_up",
            &[(&ab, rows / 2, crate::quant::QuantType::Q4_0), (&bb, rows / 2, crate::quant::QuantType::Q8_0)],
            cols,
            &Device::Cpu,
        )
        .unwrap();
        mlp.gate_up_proj = crate::model::Linear::Quantized(mixed);
        assert_eq!(DecodePath::Auto.resolve_on(&m, true).unwrap(), DecodePath::Reference);
        let e = DecodePath::Fused.resolve_on(&m, true).unwrap_err().to_string();
        assert!(e.contains("--decode-path") && e.contains("layer 1") && e.contains("q4_0") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn the_batched_cuda_step_on_the_emulator_gives_each_row_the_bits_it_gets_alone() {
        let _guard = crate::kernels::guard_buffers();
        for (fixture, dtype) in [("tiny-mistral-f32", "f32"), ("tiny-mistral-bf16", "bf16")] {
            let m = load(fixture, "every:4", dtype);
            super::super::batch_check::rows_are_their_lone_bits(&m, DecodePath::Fused, &emulated(2, Schedule::Forward), &emulated(2, Schedule::Shuffled(11)));
        }
    }

    #[test]
    fn the_batched_step_refuses_the_cpu_and_caches_outside_its_pool() {
        let m = load("tiny-mistral-f32", "none", "f32");
        let mut pool = Cache::pool(&m, 2, 8).unwrap();
        let refs: Vec<&Cache> = pool.iter().collect();
        let e = DecodeStep::batched(&m, &refs, DecodePath::Fused, &StepOptions::default()).err().unwrap();
        assert!(e.to_string().contains("--decode-path") && e.to_string().contains("CUDA"), "{e}");
        assert!(DecodeStep::batched(&m, &refs[1..], DecodePath::Fused, &emulated(1, Schedule::Forward)).is_err(), "a pool's slots from the first");
        let mut step = DecodeStep::batched(&m, &refs, DecodePath::Fused, &emulated(1, Schedule::Forward)).unwrap();
        let mut lone = Cache::new(&m, 8).unwrap();
        assert!(step.decode_batch(&mut [&mut lone], &[1], true).is_err(), "a cache outside the pool");
        let (a, _) = pool.split_at_mut(1);
        let mut other = a[0].clone();
        assert!(step.decode_batch(&mut [&mut a[0], &mut other], &[1, 2], true).is_err(), "one slot twice");
        assert_eq!(a[0].len(), 0, "nothing ran");
    }

    #[test]
    fn the_cuda_step_on_the_emulator_keeps_expanded_and_skip_equal_to_base_bit_for_bit() {
        let _guard = crate::kernels::guard_buffers();
        for dtype in ["f32", "bf16"] {
            let fixture = format!("tiny-mistral-{dtype}");
            let opts = emulated(2, Schedule::Forward);
            let base = decode(&load(&fixture, "none", dtype), Some(&opts));
            let mut skip = load(&fixture, "every:4", dtype);
            skip.skip_transparent().unwrap();
            for (name, m) in [("expanded", load(&fixture, "every:4", dtype)), ("skip", skip)] {
                let got = decode(&m, Some(&opts));
                for (i, (g, b)) in got.iter().zip(&base).enumerate() {
                    assert!(g.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{dtype} {name} token {i}");
                }
            }
        }
    }

    #[test]
    fn the_self_check_passes_on_the_emulated_cuda_step_and_names_an_injected_fault() {
        let _guard = crate::kernels::guard_buffers();
        let prompt = [1u32, 415, 2936, 9060, 285, 1142, 28705, 28740, 28750, 28770];
        for (fixture, dtype) in [("tiny-mistral-bf16", "bf16"), ("tiny-mistral-f32", "f32")] {
            let m = load(fixture, "every:4", dtype);
            let prompt = ids(&m, &prompt);
            let v = check::check_path(&m, DecodePath::Fused, &emulated(3, Schedule::Shuffled(7)), &prompt, 64).unwrap();
            assert!(v.pass, "{fixture}: {}", v.warning());
            for (fault, layer, op) in [
                ("2:gate_up_proj", "layer 2", "gate_up_proj"),
                ("2:gate_up_proj:nan", "layer 2", "gate_up_proj"),
                ("6:attention:nan", "layer 6", "attention"),
                ("lm_head:nan", "", "lm_head"),
            ] {
                let opts = StepOptions { fault: Some(Fault::parse(fault).unwrap()), ..emulated(3, Schedule::Forward) };
                let v = check::check_path(&m, DecodePath::Fused, &opts, &prompt, 64).unwrap();
                assert!(!v.pass, "{fixture} {fault}: the fault went unnoticed");
                let finding = v.finding.clone().unwrap_or_default();
                assert!(finding.contains(layer) && finding.contains(op), "{fixture} {fault}: {finding}");
                if fault.ends_with(":nan") {
                    assert!(v.warning().contains("non-finite"), "{fixture} {fault}: {}", v.warning());
                }
            }
        }
    }
}
