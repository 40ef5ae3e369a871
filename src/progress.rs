//! Progress bars on stderr: byte bars for reading and writing checkpoints, count bars for the
//! commands' own loops. Drawn only when stderr is a terminal, so logs and pipes stay clean.

use std::io::IsTerminal;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::Result;
use crate::loader::Checkpoint;
use crate::model::WeightSource;

/// Where bars draw: stderr on a terminal, nowhere otherwise.
pub fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// A bar of `len` steps drawn with `template` (indicatif's syntax), on [`target`].
pub fn bar(len: Option<u64>, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(len, target());
    // The templates are literals of this crate; a typo shows as indicatif's default bar, not an error.
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// A bar over `total` bytes, `verb` first (`loading`, `writing`), then rate and time left; its
/// message names the tensor or file at hand.
pub fn bytes_bar(verb: &str, total: u64) -> ProgressBar {
    let template = format!("{verb} {{bar:30}} {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}} {{wide_msg}}");
    bar(Some(total), &template)
}

/// A checkpoint read through a byte bar: every tensor read advances it by its stored size.
pub struct Reading<'a> {
    pub checkpoint: &'a mut Checkpoint,
    pub bar: &'a ProgressBar,
}

impl WeightSource for Reading<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.bar.set_message(name.to_string());
        let t = self.checkpoint.tensor(name, shape, device)?;
        self.bar.inc(self.checkpoint.entry(name).map_or(0, |e| e.byte_len() as u64));
        Ok(t)
    }

    fn has(&self, name: &str) -> bool {
        self.checkpoint.has(name)
    }

    fn location(&self, name: &str) -> Option<std::path::PathBuf> {
        self.checkpoint.location(name)
    }
}
