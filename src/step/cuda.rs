//! The decode step on CUDA: every op a launch of our kernels on device buffers allocated once, with
//! every address resolved when the step is built; after one warm-up token the ops are captured as a
//! CUDA graph and replayed per token. The token id and position live in device memory (`state`), so
//! one graph serves every position; nothing inside the captured region allocates or copies. A batched
//! step has launches and a graph per batch size (the grids differ), each captured on its size's
//! second token.

use candle_core::cuda_backend::cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaSlice, DevicePtr};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Device, Tensor};

use super::launches::{self, Addresses};
use super::plan::{Buf, Buffers, Plan};
use super::Dims;
use crate::error::{Error, Result};
use crate::kernels::cuda::{tensor_ptr, CudaKernels};
use crate::kernels::launch::Launcher;
use crate::model::{Cache, Model};

pub(super) struct CudaExec {
    k: CudaKernels,
    device: Device,
    /// The step's buffers on the device (tensors, so checks can read and write them with candle).
    bufs: Buffers<Tensor>,
    /// Split-attention scratch; owned here because the launches address it.
    _partial: Tensor,
    /// `[token, pos, next, slot]` per row.
    state: CudaSlice<u32>,
    /// Every op's launch for each batch size (index n - 1), resolved once (`launches::resolve`).
    launches: Vec<Vec<launches::OpLaunches>>,
    /// Rows of the current token.
    n: usize,
    /// The captured graph of each batch size, and whether a token of that size ran (index n - 1).
    graphs: Vec<Option<CudaGraph>>,
    warmed_up: Vec<bool>,
    /// The cache's buffers, kept alive while the launches address them.
    _cache: Vec<Tensor>,
}

impl CudaExec {
    pub(super) fn new(dev: &CudaDevice, dtype: DType, model: &Model, cache: &Cache, plan: &Plan, dims: &Dims) -> Result<CudaExec> {
        let k = CudaKernels::load(dev, dtype, dims.head_dim)?;
        let device = model.device.clone();
        let bufs = Buffers::new(dims, |n| Tensor::zeros(n, dtype, &device))?;
        let partial = Tensor::zeros(crate::kernels::launch::attention_scratch_words(&dims.attention_batch(dims.batch), plan.splits), DType::F32, &device)?;
        let state = dev.alloc_zeros::<u32>(launches::STATE_WORDS * dims.batch)?;
        let ptr = |t: &Tensor| tensor_ptr(t, k.stream());
        let (cos, sin) = model.rotary_tables();
        let addresses = Addresses { bufs: bufs.map(&ptr)?, partial: ptr(&partial)?, state: state.device_ptr(k.stream()).0, cos: ptr(cos)?, sin: ptr(sin)? };
        let (launches, kept) = launches::resolve(plan, model, cache, dims, &addresses, &ptr)?;
        // `state` and `partial` are moved, not copied: the launches address these allocations.
        let sizes = launches.len();
        Ok(CudaExec {
            k,
            device,
            bufs,
            _partial: partial,
            state,
            launches,
            n: 1,
            graphs: (0..sizes).map(|_| None).collect(),
            warmed_up: vec![false; sizes],
            _cache: kept,
        })
    }

    /// Launches op `i` for the current batch size (the only place the step's kernels are launched);
    /// returns how many launches it took.
    pub(super) fn launch(&self, i: usize) -> Result<usize> {
        let op = &self.launches[self.n - 1][i];
        for l in op {
            self.k.launch(l).map_err(|e| classify(e.into()))?;
        }
        Ok(op.len())
    }

    /// Writes the rows' state (the first rows of the state buffer) and makes their count current.
    pub(super) fn set_state(&mut self, rows: &[super::Row]) -> Result<()> {
        let host = launches::state_words(rows, self.launches.len())?;
        let mut head = self.state.slice_mut(..host.len());
        self.k.stream().memcpy_htod(&host[..], &mut head).w().map_err(|e| classify(e.into()))?;
        self.n = rows.len();
        Ok(())
    }

    /// The argmax each row of the last token wrote (waits for the device).
    pub(super) fn next(&self) -> Result<Vec<u32>> {
        let host = self.k.stream().clone_dtoh(&self.state).w().map_err(|e| classify(e.into()))?;
        Ok(launches::next_of(&host, self.n))
    }

    /// The fault injection's perturbation of the argmax: each row's next id instead.
    pub(super) fn bump_next(&mut self, vocab: usize) -> Result<()> {
        let mut host = self.k.stream().clone_dtoh(&self.state).w()?;
        launches::bump_next(&mut host, self.n, vocab);
        self.k.stream().memcpy_htod(&host[..], &mut self.state).w()?;
        Ok(())
    }

    /// Buffer `b` as f32 on the host (the first read after a step: a device fault surfaces here).
    pub(super) fn read_buf(&self, b: Buf) -> Result<Vec<f32>> {
        let read = || -> Result<Vec<f32>> { Ok(self.bufs.get(b).to_dtype(DType::F32)?.to_vec1::<f32>()?) };
        read().map_err(classify)
    }

    pub(super) fn write_buf(&mut self, b: Buf, values: &[f32]) -> Result<()> {
        let t = self.bufs.get(b);
        let src = Tensor::from_slice(values, values.len(), &self.device)?.to_dtype(t.dtype())?;
        t.slice_set(&src, 0, 0)?;
        Ok(())
    }

    pub(super) fn warmed_up(&self) -> bool {
        self.warmed_up[self.n - 1]
    }

    pub(super) fn mark_warmed_up(&mut self) {
        self.warmed_up[self.n - 1] = true;
    }

    pub(super) fn has_graph(&self) -> bool {
        self.graphs[self.n - 1].is_some()
    }

    /// Starts recording the step's launches (after the warm-up token loaded every module).
    pub(super) fn begin_capture(&mut self) -> Result<()> {
        let s = self.k.stream();
        s.synchronize().w().map_err(|e| classify(e.into()))?;
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w().map_err(|e| classify(e.into()))
    }

    /// Ends the capture (always, so a failed launch cannot leave the stream capturing) and
    /// instantiates the graph.
    pub(super) fn end_capture(&mut self, ran: Result<()>) -> Result<()> {
        let graph = self.k.stream().end_capture(CUgraphInstantiate_flags(0));
        ran?;
        let graph = graph.w().map_err(|e| classify(e.into()))?;
        let Some(graph) = graph else { return Err(Error::internal("CUDA graph capture recorded nothing")) };
        graph.upload().w().map_err(|e| classify(e.into()))?;
        self.graphs[self.n - 1] = Some(graph);
        Ok(())
    }

    pub(super) fn replay(&self) -> Result<()> {
        let Some(g) = &self.graphs[self.n - 1] else { return Err(Error::internal("no captured graph to replay")) };
        g.launch().w().map_err(|e| classify(e.into()))
    }

    /// Nodes of the current batch size's graph.
    pub(super) fn graph_nodes(&self) -> Option<usize> {
        let g = self.graphs[self.n - 1].as_ref()?;
        let mut n = 0usize;
        // SAFETY: the graph is alive (owned by self); a null node array asks only for the count.
        let r = unsafe { sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(n)
    }
}

/// CUDA errors that leave the context unusable (every later call fails with them): the process cannot
/// recover in place and must exit, naming the fast path as the cause.
fn classify(e: Error) -> Error {
    let text = e.to_string();
    const STICKY: [&str; 6] = ["ILLEGAL_ADDRESS", "LAUNCH_FAILED", "MISALIGNED_ADDRESS", "ILLEGAL_INSTRUCTION", "HARDWARE_STACK_ERROR", "INVALID_PC"];
    if STICKY.iter().any(|s| text.contains(s)) {
        Error::FastPathCrashed(text)
    } else {
        e
    }
}
