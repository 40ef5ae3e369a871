//! The bytes each op of the decode step must move per token (weights, the KV cache at a context,
//! activations), so that a measured time can be set beside "bytes / copy bandwidth": the floor no
//! kernel of a memory-bound step can beat. `table` prints it; `bench`/gpu-check can print it with
//! the copy bandwidth they measured.

use super::Dims;

/// One op of the step, per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The op's kernel, as the plan names it.
    pub op: &'static str,
    /// Launches per token (one per executed layer, or one).
    pub launches: usize,
    /// Bytes read and written per token, all launches.
    pub bytes: u64,
}

/// The step's ops at `dims` with `elem` bytes per activation value and `weight` bytes per projection
/// weight (`elem`, or a quantized type's bits / 8 with its scales: 0.5625 for Q4_K), `layers`
/// executed blocks, attention over a cache holding `kv_len` tokens (keys past the sliding window not
/// read) split `splits` ways. Counted once per value a kernel must touch: reads and writes, as a
/// device-to-device copy's bandwidth counts them.
pub fn roofline(d: &Dims, elem: usize, weight: f64, kv_len: usize, layers: usize, splits: usize) -> Vec<Row> {
    let e = elem as u64;
    let weights = |n: u64| (n as f64 * weight).round() as u64;
    let (h, nh, nkv, hd, i, v) = (d.hidden as u64, d.n_heads as u64, d.n_kv_heads as u64, d.head_dim as u64, d.intermediate as u64, d.vocab as u64);
    let qkv = d.qkv() as u64;
    let keys = d.window.map_or(kv_len, |w| kv_len.min(w)) as u64;
    // x and the block output read, x and h written, the norm's weight read.
    let norm = 5 * h * e;
    let gemv = |rows: u64, cols: u64| weights(rows * cols) + (cols + rows) * e;
    let partials = if splits > 1 { 2 * splits as u64 * nh * (hd + 2) * 4 } else { 0 };
    let l = layers;
    vec![
        Row { op: "input_layernorm", launches: l, bytes: l as u64 * norm },
        Row { op: "qkv_proj", launches: l, bytes: l as u64 * gemv(qkv, h) },
        // q, k, v read; q and k written back; the k and v rows written into the cache; cos and sin.
        Row { op: "rope_kv", launches: l, bytes: l as u64 * (qkv + (nh + nkv) * hd + 2 * nkv * hd + hd) * e },
        // Every attended key and value once per KV head, q read, y written, the splits' partials.
        Row { op: "attention", launches: l, bytes: l as u64 * ((2 * keys * nkv * hd + 2 * nh * hd) * e + partials) },
        Row { op: "o_proj", launches: l, bytes: l as u64 * gemv(h, nh * hd) },
        Row { op: "post_attention_layernorm", launches: l, bytes: l as u64 * norm },
        // gate and up rows, x read, the product written.
        Row { op: "gate_up_proj", launches: l, bytes: l as u64 * (weights(2 * i * h) + (h + i) * e) },
        Row { op: "down_proj", launches: l, bytes: l as u64 * gemv(h, i) },
        Row { op: "norm", launches: 1, bytes: norm },
        Row { op: "lm_head", launches: 1, bytes: gemv(v, h) },
        Row { op: "argmax", launches: 1, bytes: v * e },
    ]
}

/// The rows as a table: bytes per token and, given a copy bandwidth in GB/s (bytes read plus
/// written), the time they take at it.
pub fn table(rows: &[Row], copy_gbps: Option<f64>) -> String {
    let total: u64 = rows.iter().map(|r| r.bytes).sum();
    let mut out = format!("{:<26} {:>8} {:>14} {:>12} {:>7}\n", "op", "launches", "MB per token", "us at copy", "share");
    let us = |b: u64| copy_gbps.map_or("-".to_string(), |g| format!("{:.1}", b as f64 / (g * 1e3)));
    for r in rows {
        out += &format!("{:<26} {:>8} {:>14.2} {:>12} {:>6.1}%\n", r.op, r.launches, r.bytes as f64 / 1e6, us(r.bytes), 100.0 * r.bytes as f64 / total as f64);
    }
    let launches: usize = rows.iter().map(|r| r.launches).sum();
    out += &format!("{:<26} {:>8} {:>14.2} {:>12} {:>6.1}%\n", "total", launches, total as f64 / 1e6, us(total), 100.0);
    out
}

/// One op kind's measured time per token (`DecodeStep::op_times`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub launches: usize,
    pub seconds: f64,
}

/// An op's measured time beside the time its bytes take at the copy bandwidth.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpProfile {
    pub op: &'static str,
    pub launches: usize,
    /// Bytes the op must move per token (`roofline`).
    pub bytes: u64,
    pub measured_us: f64,
    /// `bytes` at the copy bandwidth measured in the same run (None where it was not measured).
    pub roofline_us: Option<f64>,
}

impl OpProfile {
    /// Bytes moved per second as measured.
    pub fn achieved_gbps(&self) -> f64 {
        self.bytes as f64 / (self.measured_us * 1e3).max(1e-9)
    }

    /// The roofline's time over the measured: 1.0 is the bandwidth limit.
    pub fn of_roofline(&self) -> Option<f64> {
        self.roofline_us.map(|r| r / self.measured_us.max(1e-9))
    }
}

/// `times` (every op kind the step ran) beside their `rows`; an op without a row is an error, so the
/// roofline cannot silently miss an op a plan gained.
pub fn profile(rows: &[Row], times: &[OpTime], copy_bps: Option<f64>) -> Result<Vec<OpProfile>, String> {
    times
        .iter()
        .map(|t| {
            let row = rows.iter().find(|r| r.op == t.op).ok_or_else(|| format!("the roofline has no row for the step's op {}", t.op))?;
            // One launch per op, but one per run of a type for a quantized stack of several (the
            // roofline counts ops): fewer than the roofline's count is an op it does not know.
            if t.launches < row.launches {
                return Err(format!("{}: the roofline counts {} launches, the step ran {}", t.op, row.launches, t.launches));
            }
            Ok(OpProfile {
                op: t.op,
                launches: t.launches,
                bytes: row.bytes,
                measured_us: t.seconds * 1e6,
                roofline_us: copy_bps.map(|bw| row.bytes as f64 / bw * 1e6),
            })
        })
        .collect()
}

/// The profile as a table: per op, bytes per token, the measured time, the bandwidth it reached, the
/// roofline's time and the share of it reached.
pub fn profile_table(ops: &[OpProfile]) -> String {
    let total = OpProfile {
        op: "total",
        launches: ops.iter().map(|p| p.launches).sum(),
        bytes: ops.iter().map(|p| p.bytes).sum(),
        measured_us: ops.iter().map(|p| p.measured_us).sum(),
        roofline_us: ops.iter().map(|p| p.roofline_us).sum(),
    };
    let mut out =
        format!("{:<26} {:>8} {:>12} {:>12} {:>10} {:>12} {:>11}\n", "op", "launches", "MB/token", "measured us", "GB/s", "roofline us", "of roofline");
    for p in ops.iter().chain(std::iter::once(&total)) {
        out += &format!(
            "{:<26} {:>8} {:>12.2} {:>12.1} {:>10.0} {:>12} {:>11}\n",
            p.op,
            p.launches,
            p.bytes as f64 / 1e6,
            p.measured_us,
            p.achieved_gbps(),
            p.roofline_us.map_or("-".into(), |r| format!("{r:.1}")),
            p.of_roofline().map_or("-".into(), |f| format!("{:.0} %", 100.0 * f)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantType;

    /// OpenChat-3.5-0106 (Mistral-7B shapes), bf16, expanded to 40 layers.
    fn openchat() -> Dims {
        Dims {
            hidden: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 128,
            intermediate: 14336,
            vocab: 32002,
            capacity: 4096,
            eps: 1e-5,
            window: Some(4096),
            scale: 1.0 / 128f32.sqrt(),
            batch: 1,
        }
    }

    #[test]
    fn profile_refuses_ops_the_roofline_does_not_count() {
        let rows = roofline(&openchat(), 2, 2.0, 100, 4, 1);
        let t = |op, launches| OpTime { op, launches, seconds: 1e-4 };
        let p = profile(&rows, &[t("qkv_proj", 4), t("lm_head", 1)], Some(1e12)).unwrap();
        // 4 layers of 6144 x 4096 bf16 weights: 201 MB, 201 us at 1 TB/s, measured in 100 us.
        assert_eq!(p[0].bytes, 4 * (6144 * 4096 + 4096 + 6144) * 2);
        assert!((p[0].roofline_us.unwrap() - p[0].bytes as f64 / 1e6).abs() < 1e-6 && p[0].measured_us == 100.0);
        assert!((p[0].of_roofline().unwrap() - p[0].bytes as f64 / 1e8).abs() < 1e-9);
        assert!(profile(&rows, &[t("qkv_proj", 3)], None).unwrap_err().contains("ran 3"), "fewer launches than the plan has ops");
        assert_eq!(profile(&rows, &[t("qkv_proj", 8)], None).unwrap()[0].launches, 8, "a stack of two types: two launches per op");
        assert!(profile(&rows, &[t("attention_combine", 4)], None).unwrap_err().contains("attention_combine"), "an op without a row");
        let table = profile_table(&p);
        assert!(table.lines().last().unwrap().starts_with("total") && table.contains("qkv_proj"), "{table}");
    }

    #[test]
    fn openchat_bytes_per_token() {
        let d = openchat();
        for kv_len in [512usize, 4096] {
            let splits = crate::kernels::launch::attention_splits(d.capacity, crate::kernels::launch::attention_blocks_per_split(1, d.n_heads, d.n_kv_heads));
            let rows = roofline(&d, 2, 2.0, kv_len, 40, splits);
            // Printed for the record (`cargo test openchat_bytes_per_token -- --nocapture`); an
            // H200's device-to-device copy measures about 4,300 GB/s.
            println!("OpenChat bf16, 40 layers, context {kv_len}, {splits} splits:\n{}", table(&rows, Some(4300.0)));
            let weights = |op: &str| rows.iter().find(|r| r.op == op).unwrap().bytes;
            // The weights of one layer: 436 MB (qkv 50.3, o 33.6, gate/up 234.9, down 117.5).
            let layer = (weights("qkv_proj") + weights("o_proj") + weights("gate_up_proj") + weights("down_proj")) / 40;
            assert!((436_000_000..437_000_000).contains(&layer), "{layer}");
            // K and V of every attended token (16.8 MB per layer at 4,096), q and y, and the splits'
            // partials written and read back (1.1 MB at 32 splits: sized by the capacity, so short
            // contexts pay it too, from L2).
            let attn = weights("attention") / 40;
            let kv = 2 * kv_len as u64 * 8 * 128 * 2;
            assert_eq!(attn, kv + 2 * 32 * 128 * 2 + 2 * splits as u64 * 32 * 130 * 4, "{attn} vs {kv}");
            assert_eq!(rows.iter().map(|r| r.launches).sum::<usize>(), 8 * 40 + 3);
        }
        // Q4_K weights (4.5 bits each): a layer streams 122.7 MB of blocks, the activations in bf16.
        let q = roofline(&d, 2, QuantType::Q4K.bits_per_weight() / 8.0, 512, 40, 1);
        let layer: u64 = q.iter().filter(|r| r.op.ends_with("_proj")).map(|r| r.bytes).sum::<u64>() / 40;
        assert!((122_600_000..122_800_000).contains(&layer), "{layer}");
    }
}
