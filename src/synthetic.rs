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

impl WeightSource for Synthetic {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.seed = self.seed.wrapping_add(1);
        let (mean, std) = if shape.len() == 1 {
            (1.0, 0.1)
        } else if name.contains("embed") {
            (0.0, 1.0)
        } else {
            (0.0, 1.0 / (shape[shape.len() - 1] as f64).sqrt())
        };
        // Made in place, in the run dtype, by a counter-based kernel: the same weights on every
        // device (the model builder asks on the host and uploads).
        let t = Tensor::zeros(shape, self.dtype, device)?;
        crate::kernels::fill_normal(&t, self.seed, mean as f32, std as f32)?;
        Ok(t)
    }

    fn has(&self, _: &str) -> bool {
        true
    }
}
