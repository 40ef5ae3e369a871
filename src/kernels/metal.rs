//! Metal launches (decode attention only: Metal runs the reference forward pass, see
//! `crate::step`); the shaders in kernels/metal/*.metal are compiled at run time (once per device)
//! through candle's Metal device.
//!
//! expanse does not depend on `candle-metal-kernels` / `objc2-metal`
//! directly, so their types (`ComputePipeline`, `MTLSize`, ...) are only used
//! through type inference here: pipelines are cached as `dyn Any`, and
//! `MTLSize` (a `#[repr(C)]` struct of three `NSUInteger`s) is built by
//! [`mtl_size`]. The shaders request precise math themselves
//! (`#pragma METAL fp math_mode(safe)` on MSL >= 3.2 and `precise::`
//! functions), because the default compile options enable fast math.

use super::{AttnDims, MAX_HEAD_DIM};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const DECODE_ATTENTION_SRC: &str = include_str!("../../kernels/metal/decode_attention.metal");

type Cache = Mutex<HashMap<(candle_core::metal_backend::DeviceId, &'static str), Arc<dyn Any + Send + Sync>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Cached per (device, key); `T` is inferred from `make`.
fn cached<T: Any + Send + Sync + Clone>(dev: &MetalDevice, key: &'static str, make: impl FnOnce() -> Result<T>) -> Result<T> {
    let k = (dev.id(), key);
    if let Some(v) = cache().lock().unwrap().get(&k) {
        if let Some(v) = v.downcast_ref::<T>() {
            return Ok(v.clone());
        }
    }
    let v = make()?;
    cache().lock().unwrap().insert(k, Arc::new(v.clone()));
    Ok(v)
}

/// Loads (compiling the library on first use) the compute pipeline for
/// `function` in `source`. A macro, so that the pipeline's type
/// (candle-metal-kernels' `ComputePipeline`) is inferred at the call site.
macro_rules! pipeline {
    ($dev:expr, $lib_key:expr, $source:expr, $function:expr) => {{
        let dev: &MetalDevice = $dev;
        let function: &'static str = $function;
        let library =
            cached(dev, $lib_key, || dev.metal_device().new_library_with_source($source, None).map_err(|e| candle_core::Error::from(MetalError::from(e))))?;
        cached(dev, function, || {
            let f = library.get_function(function, None).map_err(MetalError::from)?;
            dev.metal_device().new_compute_pipeline_state_with_function(&f).map_err(|e| candle_core::Error::from(MetalError::from(e)))
        })
    }};
}

/// `MTLSize { width, height, depth }` without naming objc2-metal.
fn mtl_size<S: Copy>(w: usize, h: usize, d: usize) -> S {
    assert_eq!(std::mem::size_of::<S>(), 3 * std::mem::size_of::<usize>(), "MTLSize layout changed");
    // SAFETY: MTLSize is #[repr(C)] { width, height, depth: NSUInteger (= usize) }.
    unsafe { std::mem::transmute_copy(&[w, h, d]) }
}

fn kernel(op: &'static str, dt: DType) -> Result<&'static str> {
    Ok(match (op, super::dtype_suffix(dt)?) {
        ("decode_attention", "f32") => "expanse_decode_attn_f32",
        ("decode_attention", "bf16") => "expanse_decode_attn_bf16",
        ("decode_attention", "f16") => "expanse_decode_attn_f16",
        _ => bail!("{op}: no Metal kernel for {dt:?}"),
    })
}

fn u32_arg(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} does not fit in u32")))
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DecodeAttnParams {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    kv_start: u32,
    kv_end: u32,
    q_sb: u32,
    q_sh: u32,
    k_sb: u32,
    k_sh: u32,
    k_ss: u32,
    v_sb: u32,
    v_sh: u32,
    v_ss: u32,
    scale: f32,
}

/// Simdgroups per threadgroup; must match NW in decode_attention.metal.
const NW: usize = 4;

#[allow(clippy::too_many_arguments)] // a CustomOp3's three (storage, layout) operands, and the op's parameters
pub(crate) fn decode_attention(
    s1: &MetalStorage,
    l1: &Layout,
    s2: &MetalStorage,
    l2: &Layout,
    s3: &MetalStorage,
    l3: &Layout,
    d: &AttnDims,
    scale: f32,
) -> Result<(MetalStorage, Shape)> {
    let dt = s1.dtype();
    if s2.dtype() != dt || s3.dtype() != dt {
        bail!("decode_attention: dtype mismatch");
    }
    if d.head_dim > MAX_HEAD_DIM {
        bail!("decode_attention: head_dim {} > {MAX_HEAD_DIM} is not supported on Metal", d.head_dim);
    }
    let params = DecodeAttnParams {
        n_heads: u32_arg("n_heads", d.n_heads)?,
        n_kv_heads: u32_arg("n_kv_heads", d.n_kv_heads)?,
        head_dim: u32_arg("head_dim", d.head_dim)?,
        kv_start: u32_arg("kv_start", d.kv_start)?,
        kv_end: u32_arg("kv_len", d.kv_end)?,
        q_sb: u32_arg("q stride", d.q_sb)?,
        q_sh: u32_arg("q stride", d.q_sh)?,
        k_sb: u32_arg("k stride", d.k_sb)?,
        k_sh: u32_arg("k stride", d.k_sh)?,
        k_ss: u32_arg("k stride", d.k_ss)?,
        v_sb: u32_arg("v stride", d.v_sb)?,
        v_sh: u32_arg("v stride", d.v_sh)?,
        v_ss: u32_arg("v stride", d.v_ss)?,
        scale,
    };
    let dev = s1.device();
    let name = kernel("decode_attention", dt)?;
    let pipe = pipeline!(dev, "expanse_decode_attention.metal", DECODE_ATTENTION_SRC, name)?;
    if pipe.max_total_threads_per_threadgroup() < NW * 32 {
        bail!("decode_attention: Metal pipeline allows only {} threads per threadgroup", pipe.max_total_threads_per_threadgroup());
    }
    let n_out = d.b * d.n_heads * d.head_dim;
    let out = dev.new_buffer_builder().with_size_for(n_out, dt).with_label(name).build()?;
    let sz = dt.size_in_bytes();

    let guard = dev.command_encoder()?;
    let enc = guard.as_ref();
    enc.set_label(name);
    enc.set_compute_pipeline_state(&pipe);
    enc.set_input_buffer(0, Some(s1.buffer()), l1.start_offset() * sz);
    enc.set_input_buffer(1, Some(s2.buffer()), l2.start_offset() * sz);
    enc.set_input_buffer(2, Some(s3.buffer()), l3.start_offset() * sz);
    enc.set_output_buffer(3, Some(&*out), 0);
    enc.set_bytes(4, &params);
    enc.dispatch_thread_groups(mtl_size(d.n_heads, 1, d.b), mtl_size(NW * 32, 1, 1));
    drop(guard);
    Ok((MetalStorage::new(out, dev.clone(), n_out, dt), d.out_shape()))
}
