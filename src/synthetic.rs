//! Random weights in a real model's shapes (`--synthetic PRESET|CONFIG.json`), so machines without the
//! checkpoint can run and benchmark the real sizes. Random, never zeros: only a plan's scaling makes zeros.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::WeightSource;

/// Presets embedded in the binary: name → config.json text.
pub const PRESETS: &[(&str, &str)] = &[("openchat-3.5-0106", include_str!("presets/openchat-3.5-0106.json"))];

/// Resolves `--synthetic`: a preset name or a config.json path.
pub fn config(spec: &str) -> Result<Config> {
    if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == spec) {
        return Config::from_json(text, Path::new(spec));
    }
    let path = Path::new(spec);
    if path.is_file() {
        return Config::from_file(path);
    }
    let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
    Err(Error::flag("--synthetic", format!("`{spec}` is neither a preset ({}) nor a config.json file", names.join(", "))))
}

/// Generates each weight on first request: norms near 1, projections N(0, 1/√fan_in) so activations
/// stay in range through many layers.
pub struct Synthetic {
    pub dtype: DType,
    seed: u64,
}

impl Synthetic {
    pub fn new(dtype: DType, seed: u64) -> Synthetic {
        Synthetic { dtype, seed }
    }
}

/// `n` samples of N(0, 1) from a seeded generator, in parallel chunks each with its own stream.
fn normal_cpu(n: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for pair in chunk.chunks_mut(2) {
            // Box–Muller: two uniforms → two independent normals.
            let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
            let u2: f32 = rng.random::<f32>();
            let r = (-2.0 * u1.ln()).sqrt();
            let (s, c) = (2.0 * std::f32::consts::PI * u2).sin_cos();
            pair[0] = r * c;
            if pair.len() > 1 {
                pair[1] = r * s;
            }
        }
    });
    out
}

impl WeightSource for Synthetic {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.seed = self.seed.wrapping_add(1);
        let n: usize = shape.iter().product();
        let (mean, std) = if shape.len() == 1 {
            (1.0, 0.1)
        } else if name.contains("embed") {
            (0.0, 1.0)
        } else {
            (0.0, 1.0 / (shape[shape.len() - 1] as f64).sqrt())
        };
        let t = match device {
            // GPUs generate in place: seeding their generator is cheap and 7B samples on the host are not.
            Device::Cuda(_) | Device::Metal(_) => {
                device.set_seed(self.seed)?;
                Tensor::randn(mean as f32, std as f32, shape, device)?
            }
            Device::Cpu => Tensor::from_vec(normal_cpu(n, self.seed), shape, device)?.affine(std, mean)?,
        };
        Ok(t.to_dtype(self.dtype)?)
    }

    fn has(&self, _: &str) -> bool {
        true
    }
}
