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
use crate::kernels::launch::{Launch, Launcher};
use crate::model::{Cache, Model};

pub(super) struct EmulatedExec {
    k: EmulatedKernels,
    bufs: Buffers<Tensor>,
    _partial: Tensor,
    /// `[token, pos, next, slot]` per row (u32), read by the kernels in place.
    state: Tensor,
    /// The launches of each batch size (index n - 1).
    launches: Vec<Vec<Launch>>,
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

    pub(super) fn launch(&self, i: usize) -> Result<()> {
        Ok(self.k.launch(&self.launches[self.n - 1][i])?)
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
        let dir = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        engine::load(&LoadOptions::new(dir).expand(expand).dtype(dtype)).unwrap().model
    }

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
        let mut cache = prefilled(model);
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
